-- A deliberately broken migration for the failing-migration scenario.
CREATE TABLE IF NOT EXISTS stock_monitoring.price_history (
    symbol text NOT NULL,
    price numeric NOT NULL
);

INSERT INTO stock_monitoring.price_history (symbol, price)
SELECT symbol, price FROM stock_monitoring.no_such_table;
