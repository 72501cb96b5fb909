"""Through PgBouncer, as the backend reaches PostgreSQL: a real pgbouncer in front of the test cluster,
in transaction, statement and session pooling, with pools of one and of several server connections.
After each plan, deploy and verify, the application's own clients of the same pool must find every
server connection as a fresh session would: writable, default settings, their own role, no lock,
temporary table or prepared statement left behind."""

from __future__ import annotations

import pytest
from conftest import Db, env_text, play, write_migrations
from pgbouncer import PgBouncer

# A migration that sees the settings it runs under, then leaves session state behind, as a careless file
# would (psql -f per file forgets it too).
STATEFUL = {"024_stateful.sql": "CREATE TABLE stock_monitoring.seen AS SELECT current_setting('lock_timeout') "
                                "AS lock_timeout, current_setting('statement_timeout') AS statement_timeout;\n"
                                "SET search_path = stock_monitoring, public;\nSET statement_timeout = '1s';\n"
                                "PREPARE p AS SELECT 1;\nCREATE TEMP TABLE scratch (id int);\n"}


def through(bouncer: PgBouncer, db: Db, **changes) -> str:
    """The backend's .env: POSTGRES_HOST/PORT point at the pooler."""
    return env_text(db, POSTGRES_HOST=bouncer.host, POSTGRES_PORT=str(bouncer.port), **changes)


def assert_application_finds_clean_connections(bouncer: PgBouncer, db: Db) -> None:
    """As many application clients as the pool has server connections, each in a transaction at once, so that
    together they are handed every server connection of the pool; each must see a session as new."""
    assert bouncer.pool_mode != "statement" or bouncer.pool_size == 1
    db.query("CREATE TABLE IF NOT EXISTS public.app_writes (id int)")
    clients = []
    try:
        for _ in range(bouncer.pool_size):
            # Statement pooling allows no transaction block: there, one client at a time (and one server).
            conn = Db(bouncer, db.name).connect(autocommit=bouncer.pool_mode == "statement", user=db.cluster.user,
                                                password=db.cluster.password)
            clients.append(conn)
            with conn.cursor() as cur:
                cur.execute("SELECT current_setting('default_transaction_read_only'), "
                            "current_setting('transaction_read_only'), current_setting('search_path'), "
                            "current_setting('statement_timeout'), current_setting('lock_timeout'), "
                            "current_user = session_user, "
                            "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'), "
                            "(SELECT count(*) FROM pg_prepared_statements), "
                            "(SELECT count(*) FROM pg_class WHERE relpersistence = 't')")
                assert cur.fetchone() == ("off", "off", '"$user", public', "0", "0", True, 0, 0, 0)
                cur.execute("INSERT INTO public.app_writes VALUES (1)")
    finally:
        for conn in clients:
            conn.rollback()
            conn.close()


def pool_id(params: tuple) -> str:
    return f"{params[0]}-pool-{params[1]}" + ("-options-ignored" if len(params) > 2 else "")


# The last one takes the `options` startup parameter and drops it, as some installations are set up.
SHARING_POOLS = [("transaction", 1), ("transaction", 3), ("statement", 1), ("transaction", 1, "ignore options")]


@pytest.mark.parametrize("bouncer", SHARING_POOLS, ids=pool_id, indirect=True)
def test_a_pool_that_shares_server_connections_is_refused_by_plan_and_deploy_and_read_by_verify(
        tmp_path, db, bouncer):
    db.create()
    env = through(bouncer, db)
    for args in (["--check"], []):
        res = play(tmp_path, db, args=args, env=env)
        assert res.rc != 0, res.output
        assert f"{bouncer.host}:{bouncer.port} is a connection pooler that hands this session's server " \
               "connection to other clients between transactions" in res.output, res.output
        assert "stock_monitoring_db_postgres_host" in res.output and "Nothing was changed" in res.output
        assert db.query("SELECT to_regnamespace('stock_monitoring')") == [(None,)]
        assert_application_finds_clean_connections(bouncer, db)
    # The way around that the message names: the deploy goes to the server, the .env stays the backend's.
    direct = {"stock_monitoring_db_postgres_host": db.cluster.host, "stock_monitoring_db_postgres_port": db.cluster.port}
    assert play(tmp_path, db, env=env, extra=direct).rc == 0
    res = play(tmp_path, db, "verify-db.yml", env=env)
    assert res.rc == 0 and "schema: matches the schema file" in res.output, res.output
    assert_application_finds_clean_connections(bouncer, db)


def test_a_refused_first_deploy_through_a_transaction_pool_creates_no_database(tmp_path, db, cluster):
    bouncer = PgBouncer(cluster, {cluster.user: cluster.password}).start()
    try:
        res = play(tmp_path, db, env=through(bouncer, db))
        assert res.rc != 0 and "is a connection pooler that hands" in res.output, res.output
        assert not db.exists()
    finally:
        bouncer.stop()


@pytest.mark.parametrize("bouncer", [("session", 1), ("session", 3), ("session", 1, "ignore options")],
                         ids=pool_id, indirect=True)
def test_through_a_session_pool_plan_deploy_and_verify_work_and_leave_nothing_behind(tmp_path, db, bouncer):
    db.create()
    env = through(bouncer, db)
    folder = write_migrations(tmp_path / "m", STATEFUL, with_real=True)
    extra = {"stock_monitoring_db_migrations_dir": str(folder), "stock_monitoring_db_schema_file": ""}
    res = play(tmp_path, db, args=["--check"], env=env, extra=extra)
    assert res.rc == 0 and "pending (would apply): 022_stock_monitoring_schema.sql" in res.output, res.output
    assert_application_finds_clean_connections(bouncer, db)
    res = play(tmp_path, db, env=env, extra=extra)
    assert res.rc == 0 and [r[0] for r in db.history()] == [22, 23, 24], res.output
    # The deploy's timeouts held through the pooler (which takes no `options` startup parameter).
    (lock_timeout, statement_timeout), = db.query("SELECT * FROM stock_monitoring.seen")
    assert lock_timeout != "0" and statement_timeout == "15min"
    assert_application_finds_clean_connections(bouncer, db)
    res = play(tmp_path, db, "verify-db.yml", env=env, extra=extra)
    assert res.rc == 0, res.output
    assert_application_finds_clean_connections(bouncer, db)
    res = play(tmp_path, db, env=env, extra=extra)
    assert res.rc == 0 and "changed=0" in res.output, res.output


@pytest.mark.every_major
def test_directly_a_file_that_resets_its_settings_gets_the_deploys_timeouts_back(tmp_path, db):
    """The timeouts are the session's defaults on a direct connection (startup options), so RESET returns to
    them, as with `psql -f` and PGOPTIONS; not to the server's 0 (wait forever)."""
    resets = {"024_resets.sql": "SET lock_timeout = '1min';\nRESET ALL;\nCREATE TABLE stock_monitoring.seen AS SELECT "
                                "current_setting('lock_timeout') AS lock_timeout, "
                                "current_setting('statement_timeout') AS statement_timeout;\n"}
    folder = write_migrations(tmp_path / "m", resets, with_real=True)
    extra = {"stock_monitoring_db_migrations_dir": str(folder), "stock_monitoring_db_schema_file": "",
             "stock_monitoring_db_lock_retries": []}
    res = play(tmp_path, db, extra=extra)
    assert res.rc == 0, res.output
    assert db.query("SELECT * FROM stock_monitoring.seen") == [("5s", "15min")]
