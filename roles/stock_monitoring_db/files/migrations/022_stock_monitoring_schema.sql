-- 022: Stock Monitoring core schema: watchlists, their items, price alerts and an audit log.
-- Readers: the Rust backend (per-user watchlists and alerts) and the Airflow alert DAG.
-- Every statement is CREATE ... IF NOT EXISTS so the file can run again on a database that was
-- migrated by hand with psql.

CREATE SCHEMA IF NOT EXISTS stock_monitoring;

-- A user's named list of ticker symbols.
CREATE TABLE IF NOT EXISTS stock_monitoring.watchlists (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     text        NOT NULL CHECK (length(user_id) BETWEEN 1 AND 255),
    name        text        NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 100),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT watchlists_user_id_name_key UNIQUE (user_id, name),
    CONSTRAINT watchlists_updated_after_created CHECK (updated_at >= created_at)
);

-- The unique constraint's index (user_id, name) also serves "watchlists of a user".

-- One ticker in a watchlist; removed with its watchlist.
CREATE TABLE IF NOT EXISTS stock_monitoring.watchlist_items (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    watchlist_id  bigint      NOT NULL REFERENCES stock_monitoring.watchlists (id) ON DELETE CASCADE,
    symbol        text        NOT NULL CHECK (symbol ~ '^[A-Z0-9][A-Z0-9.\-]{0,14}$'),
    note          text        CHECK (note IS NULL OR length(note) <= 1000),
    added_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT watchlist_items_watchlist_id_symbol_key UNIQUE (watchlist_id, symbol)
);

-- "Which watchlists hold this symbol" (fan-out of price events to users).
CREATE INDEX IF NOT EXISTS watchlist_items_symbol_idx
    ON stock_monitoring.watchlist_items (symbol);

-- A user's price alert, evaluated by the Airflow alert DAG.
CREATE TABLE IF NOT EXISTS stock_monitoring.alerts (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id            text          NOT NULL CHECK (length(user_id) BETWEEN 1 AND 255),
    symbol             text          NOT NULL CHECK (symbol ~ '^[A-Z0-9][A-Z0-9.\-]{0,14}$'),
    condition          text          NOT NULL CHECK (condition IN (
                                         'price_above', 'price_below',
                                         'percent_change_up', 'percent_change_down')),
    threshold          numeric(18,6) NOT NULL CHECK (threshold > 0),
    enabled            boolean       NOT NULL DEFAULT true,
    cooldown           interval      NOT NULL DEFAULT interval '1 hour'
                                     CHECK (cooldown >= interval '0'),
    last_triggered_at  timestamptz,
    created_at         timestamptz   NOT NULL DEFAULT now(),
    updated_at         timestamptz   NOT NULL DEFAULT now(),
    CONSTRAINT alerts_updated_after_created CHECK (updated_at >= created_at)
);

-- The alert DAG scans "enabled alerts by symbol"; a partial index keeps disabled ones out.
CREATE INDEX IF NOT EXISTS alerts_enabled_symbol_idx
    ON stock_monitoring.alerts (symbol) WHERE enabled;

-- The backend lists a user's alerts.
CREATE INDEX IF NOT EXISTS alerts_user_id_idx
    ON stock_monitoring.alerts (user_id);

-- Append-only history of changes made through the backend and the DAGs.
CREATE TABLE IF NOT EXISTS stock_monitoring.audit_log (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    actor        text        NOT NULL CHECK (length(actor) BETWEEN 1 AND 255),
    action       text        NOT NULL CHECK (length(action) BETWEEN 1 AND 100),
    entity_type  text        NOT NULL CHECK (length(entity_type) BETWEEN 1 AND 100),
    entity_id    text        NOT NULL CHECK (length(entity_id) BETWEEN 1 AND 255),
    details      jsonb       NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(details) = 'object')
);

-- "History of one entity, newest first".
CREATE INDEX IF NOT EXISTS audit_log_entity_idx
    ON stock_monitoring.audit_log (entity_type, entity_id, occurred_at DESC);
