-- 023: in-app notifications written by the Airflow alert DAG when an alert triggers.
-- CREATE ... IF NOT EXISTS throughout, so the file can run again.

CREATE TABLE IF NOT EXISTS stock_monitoring.notifications (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     text        NOT NULL CHECK (length(user_id) BETWEEN 1 AND 255),
    -- Kept when the alert is deleted: the notification stays in the user's inbox.
    alert_id    bigint      REFERENCES stock_monitoring.alerts (id) ON DELETE SET NULL,
    title       text        NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    body        text        NOT NULL DEFAULT '' CHECK (length(body) <= 4000),
    payload     jsonb       NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(payload) = 'object'),
    -- Set by the DAG (for example alert id + trigger time) so that a retried run cannot notify twice.
    dedupe_key  text        NOT NULL CHECK (length(dedupe_key) BETWEEN 1 AND 255),
    created_at  timestamptz NOT NULL DEFAULT now(),
    read_at     timestamptz,
    CONSTRAINT notifications_dedupe_key_key UNIQUE (dedupe_key),
    CONSTRAINT notifications_read_after_created CHECK (read_at IS NULL OR read_at >= created_at)
);

-- "Unread notifications of a user, newest first".
CREATE INDEX IF NOT EXISTS notifications_user_unread_idx
    ON stock_monitoring.notifications (user_id, created_at DESC) WHERE read_at IS NULL;

-- "All notifications of a user, newest first" (inbox with read ones).
CREATE INDEX IF NOT EXISTS notifications_user_created_idx
    ON stock_monitoring.notifications (user_id, created_at DESC);

-- The foreign key's referencing side: ON DELETE SET NULL on alerts scans by alert_id.
CREATE INDEX IF NOT EXISTS notifications_alert_id_idx
    ON stock_monitoring.notifications (alert_id);
