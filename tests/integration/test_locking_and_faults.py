"""Faults and races against a real PostgreSQL: nothing lost, nothing half-done, every failure named."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import LOCAL, MIGRATIONS, ROOT, Db, env_text, finish, play, start_playbook, wait_for, write_migrations

DEPLOY = ROOT / "playbooks" / "deploy-db.yml"
APP = "stock-monitoring-db"


SLOW = {"024_slow.sql": "CREATE TABLE stock_monitoring.slow_a (id int);\nSELECT pg_sleep(3);\n"
                        "CREATE TABLE stock_monitoring.slow_b (id int);\n"}


def background_deploy(tmp_path: Path, db: Db, folder: Path, **extra):
    """deploy-db.yml at -vvvv in the background: every fault path is also checked for the password."""
    env_file = tmp_path / ".env"
    env_file.write_text(env_text(db))
    return start_playbook(DEPLOY, inventory=LOCAL, extra_vars={"stock_monitoring_db_migrations_dir": str(folder), **extra},
                          env={"STOCK_MONITORING_DB_ENV_FILE": str(env_file)}, args=["-vvvv"])


def assert_secret_free(output: str, password: str) -> None:
    for secret in (password, base64.b64encode(password.encode()).decode()):
        assert secret not in output


def active(db: Db, pattern: str) -> int:
    return db.query("SELECT pid FROM pg_stat_activity WHERE application_name = %s AND state = 'active' "
                    "AND query LIKE %s", (APP, pattern), dbname="postgres")


def assert_consistent(db: Db, applied: list[int]) -> None:
    """Recorded files have their effects; unrecorded ones have none."""
    assert [r[0] for r in db.history()] == applied
    tables = set(db.tables())
    assert ({"slow_a", "slow_b"} <= tables) == (24 in applied)
    assert not ({"slow_a", "slow_b"} & tables) or 24 in applied


def test_server_killed_during_a_migration(tmp_path, own_cluster):
    db = Db(own_cluster, "killed")
    proc = background_deploy(tmp_path, db, write_migrations(tmp_path / "m", SLOW, with_real=True))
    wait_for(lambda: db.exists() and active(db, "%pg_sleep%"), "the slow migration to run")
    os.kill(own_cluster.postmaster_pid(), signal.SIGKILL)
    res = finish(proc)
    assert res.rc != 0
    assert "Migration 024_slow.sql failed (the server gives no position for this error): the connection to the server " \
        "was lost" in res.output
    assert "Traceback" not in res.output
    assert_secret_free(res.output, own_cluster.password)
    wait_for(lambda: not own_cluster.running(), "the killed server to be gone")
    # The orphaned backends exit once they notice; then crash recovery.
    wait_for(lambda: _start(own_cluster), "the server to restart after SIGKILL", timeout=60)
    assert_consistent(db, [22, 23])
    again = play(tmp_path, db, extra={"stock_monitoring_db_migrations_dir": str(tmp_path / "m")})
    assert again.rc == 0, again.output
    assert_consistent(db, [22, 23, 24])


def _start(cluster) -> bool:
    try:
        cluster.start(wait=10)
        return True
    except subprocess.CalledProcessError:  # stale shared memory of the killed server: try again
        return False


def test_connection_terminated_by_the_server(tmp_path, db):
    proc = background_deploy(tmp_path, db, write_migrations(tmp_path / "m", SLOW, with_real=True))
    wait_for(lambda: db.exists() and active(db, "%pg_sleep%"), "the slow migration to run")
    pid = active(db, "%pg_sleep%")[0][0]
    db.query("SELECT pg_terminate_backend(%s)", (pid,), dbname="postgres")
    res = finish(proc)
    assert res.rc != 0
    assert_secret_free(res.output, db.cluster.password)
    # libpq reports a terminated backend as a closed connection, without the 57P01 SQLSTATE.
    assert "Migration 024_slow.sql failed (the server gives no position for this error): the connection to the server " \
        "was lost" in res.output
    assert "Traceback" not in res.output
    assert_consistent(db, [22, 23])
    again = play(tmp_path, db, extra={"stock_monitoring_db_migrations_dir": str(tmp_path / "m")})
    assert again.rc == 0, again.output
    assert_consistent(db, [22, 23, 24])


@pytest.mark.every_major
def test_without_lock_retries_lock_timeout_names_the_blocker_and_never_stalls_readers(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    blocker = db.connect(autocommit=False)
    cur = blocker.cursor()
    cur.execute("SET application_name = 'long-report'")
    cur.execute("SELECT count(*) FROM stock_monitoring.alerts")  # holds ACCESS SHARE until it ends
    alter = "ALTER TABLE stock_monitoring.alerts ADD COLUMN note text;\n"
    folder = write_migrations(tmp_path / "m", {"024_alter.sql": alter}, with_real=True)
    started = time.monotonic()
    proc = background_deploy(tmp_path, db, folder, stock_monitoring_db_lock_timeout="1s",
                             stock_monitoring_db_lock_retries=[])
    wait_for(lambda: db.query("SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE NOT l.granted "
                              "AND a.application_name = %s", (APP,)), "the ALTER TABLE to queue")
    waited = {}

    def reader() -> None:  # arrives behind the queued ALTER TABLE, as the backend's queries would
        conn = db.connect()
        began = time.monotonic()
        conn.cursor().execute("SELECT count(*) FROM stock_monitoring.alerts")
        waited["s"] = time.monotonic() - began
        conn.close()

    thread = threading.Thread(target=reader)
    thread.start()
    res = finish(proc)
    thread.join(30)
    blocker_pid = blocker.get_backend_pid()
    blocker.rollback()
    blocker.close()
    assert res.rc != 0
    assert_secret_free(res.output, db.cluster.password)
    assert "Migration 024_alter.sql failed (the server gives no position for this error): SQLSTATE 55P03 " \
        "lock_not_available" in res.output
    assert (f"lock_timeout (1s, stock_monitoring_db_lock_timeout) expired: blocked by pid {blocker_pid} "
            "(user postgres, application 'long-report'") in res.output
    assert waited["s"] < 2.0, f"a reader waited {waited['s']:.2f} s behind the migration"
    assert time.monotonic() - started < 60
    assert "note" not in [r[0] for r in db.query("SELECT column_name FROM information_schema.columns "
                                                 "WHERE table_name = 'alerts'")]
    assert [r[0] for r in db.history()] == [22, 23]
    again = play(tmp_path, db, extra={"stock_monitoring_db_migrations_dir": str(folder)})
    assert again.rc == 0 and [r[0] for r in db.history()] == [22, 23, 24]


def test_eight_deploys_at_once_against_a_server_without_the_database(tmp_path, db):
    env_file = tmp_path / ".env"
    env_file.write_text(env_text(db))
    # The first CREATE DATABASE queues behind this lock, so all eight deploys find the database
    # missing and meet at its creation: one creates it, the others wait for it, none fails.
    gate = db.connect(dbname="postgres", autocommit=False)
    gate.cursor().execute("LOCK TABLE pg_catalog.pg_database IN SHARE MODE")
    app = f"eight-{db.name}"  # sessions of this test's deploys only
    procs = [start_playbook(DEPLOY, inventory=LOCAL, env={"STOCK_MONITORING_DB_ENV_FILE": str(env_file)},
                            extra_vars={"stock_monitoring_db_application_name": app}) for _ in range(8)]
    seen: list[tuple] = []

    def met() -> bool:
        seen.append(db.query(
            "SELECT (SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE a.application_name = %s"
            " AND l.relation = 'pg_catalog.pg_database'::regclass AND NOT l.granted),"
            " (SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND datname = 'postgres')",
            (app, app), dbname="postgres")[0])
        return seen[-1] == (1, 8)

    try:
        try:
            wait_for(met, "all eight deploys to meet at the creation", timeout=120)
        except AssertionError as exc:
            outputs = [p.stdout.read() if p.poll() is not None else "running" for p in procs]
            raise AssertionError(f"{exc}: last seen (waiting on pg_database, connected) {seen[-1:]}; "
                                 f"{outputs}") from None
    finally:
        gate.rollback()
        gate.close()
    results = [finish(p) for p in procs]
    for res in results:
        assert res.rc == 0, res.output
        assert_secret_free(res.output, db.cluster.password)
    assert [r[0] for r in db.history()] == [22, 23]
    appliers = [r for r in results if "applied: 022_stock_monitoring_schema.sql in" in r.output]
    assert len(appliers) == 1
    assert sum("database: created" in r.output for r in results) == 1


def test_server_down_at_start_then_up_five_seconds_later(tmp_path, own_cluster):
    db = Db(own_cluster, "late")
    own_cluster.stop()
    proc = background_deploy(tmp_path, db, MIGRATIONS)
    time.sleep(5)
    own_cluster.start()
    res = finish(proc)
    assert res.rc == 0, res.output
    assert_secret_free(res.output, own_cluster.password)
    assert [r[0] for r in db.history()] == [22, 23]


def test_server_that_never_comes_up_fails_at_the_deadline(tmp_path, own_cluster):
    db = Db(own_cluster, "never")
    own_cluster.stop()
    began = time.monotonic()
    res = play(tmp_path, db, extra={"stock_monitoring_db_wait_timeout": 3}, args=["-vvvv"])
    took = time.monotonic() - began
    assert_secret_free(res.output, own_cluster.password)
    assert res.rc != 0
    assert f"PostgreSQL server at 127.0.0.1:{own_cluster.port} is not reachable (waited 3 s)" in res.output
    assert 3 <= took < 30 and "Traceback" not in res.output


@pytest.mark.every_major
def test_missing_privileges_are_named(tmp_path, db):
    role, password = f"app_{uuid.uuid4().hex[:8]}", "app-Pw-" + uuid.uuid4().hex[:8]
    db.query(f"CREATE ROLE {role} LOGIN NOCREATEDB PASSWORD %s", (password,), dbname="postgres")
    try:
        app_env = env_text(db, password=password, POSTGRES_USER=role)
        # --check predicts each failure that the deploy then has, and changes nothing.
        res = play(tmp_path, db, env=app_env, args=["--check"])
        assert res.rc != 0 and f"Role '{role}' lacks the CREATEDB privilege" in res.output and not db.exists()
        res = play(tmp_path, db, env=app_env, args=["-vvvv"])
        assert res.rc != 0
        assert_secret_free(res.output, password)
        assert f"Role '{role}' lacks the CREATEDB privilege needed to create database '{db.name}'" in res.output
        assert f"ALTER ROLE {role} CREATEDB" in res.output
        db.create()  # a DBA creates it, but grants nothing
        res = play(tmp_path, db, env=app_env, args=["--check"])
        assert res.rc != 0 and f"Role '{role}' lacks the CREATE privilege on database '{db.name}'" in res.output
        res = play(tmp_path, db, env=app_env)
        assert res.rc != 0
        assert f"Role '{role}' lacks the CREATE privilege on database '{db.name}'" in res.output
        assert f"GRANT CREATE ON DATABASE {db.name} TO {role}" in res.output
        assert not db.query("SELECT 1 FROM pg_namespace WHERE nspname = 'stock_monitoring'")
        db.query(f"GRANT CREATE ON DATABASE {db.name} TO {role}")
        res = play(tmp_path, db, env=app_env)
        assert res.rc == 0, res.output
        assert db.query("SELECT tableowner FROM pg_tables WHERE tablename = 'alerts'") == [(role,)]
    finally:
        db.drop()
        db.query(f"DROP ROLE {role}", dbname="postgres")


def test_wrong_password_is_not_retried_and_not_shown(tmp_path, db):
    began = time.monotonic()
    res = play(tmp_path, db, env=env_text(db, password="Wr0ng-pass-word"), args=["-vvvv"])
    assert res.rc != 0 and "was refused" in res.output and time.monotonic() - began < 30
    assert_secret_free(res.output, "Wr0ng-pass-word")


def test_a_deploy_waiting_on_create_index_concurrently_never_deadlocks(tmp_path, db):
    """Flyway's transaction-level lock deadlocks with CREATE INDEX CONCURRENTLY (flyway#1654); a
    session lock polled by the waiting deploy, outside any transaction, must not."""
    assert play(tmp_path, db).rc == 0
    db.query("INSERT INTO stock_monitoring.alerts (user_id, symbol, condition, threshold) "
             "SELECT 'u' || i, 'SYM' || mod(i, 500), 'price_above', 1 FROM generate_series(1, 20000) i")
    index = ("-- pg_migrate:no-transaction\nSELECT pg_sleep(2);\n"
             "CREATE INDEX CONCURRENTLY IF NOT EXISTS alerts_created_idx ON stock_monitoring.alerts (created_at);\n")
    folder = write_migrations(tmp_path / "m", {"024_index.sql": index}, with_real=True)
    first = background_deploy(tmp_path, db, folder)
    wait_for(lambda: active(db, "%pg_sleep%"), "the first deploy to start 024")
    (tmp_path / "second").mkdir()
    second = background_deploy(tmp_path / "second", db, folder)
    results = [finish(first, timeout=120), finish(second, timeout=120)]
    for res in results:
        assert res.rc == 0, res.output
    assert sum("applied: 024_index.sql in" in r.output for r in results) == 1
    assert [r[0] for r in db.history()] == [22, 23, 24]
    valid = db.query("SELECT indisvalid FROM pg_index WHERE indexrelid = 'stock_monitoring.alerts_created_idx'::regclass")
    assert valid == [(True,)]


class Report:
    """A long report transaction: it reads alerts (ACCESS SHARE, which an ALTER TABLE waits for) until ended."""

    def __init__(self, db: Db) -> None:
        self.conn = db.connect(autocommit=False)
        self.pid = self.conn.get_backend_pid()
        cur = self.conn.cursor()
        cur.execute("SET application_name = 'long-report'")
        cur.execute("SELECT count(*) FROM stock_monitoring.alerts")

    def end_after_blocking(self, db: Db, delay: float) -> threading.Thread:
        """End `delay` seconds after the deploy first ran into it (its ALTER of alerts seen in pg_stat_activity):
        a fixed delay from now would end it before a slow start of ansible-playbook got there."""
        def run() -> None:
            wait_for(lambda: bool(db.query("SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND query "
                                           "LIKE %s", (APP, "%ADD COLUMN note%"), dbname="postgres")),
                     "the deploy to reach the blocked statement", 120)
            time.sleep(delay)
            self.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def end(self) -> None:
        self.conn.rollback()
        self.conn.close()


class Readers:
    """The backend's reads of alerts, one every 20 ms, each timed, until stopped."""

    def __init__(self, db: Db) -> None:
        self.conn, self.waits, self.running = db.connect(), [], True
        self.thread = threading.Thread(target=self.read)
        self.thread.start()

    def read(self) -> None:
        with self.conn.cursor() as cur:
            while self.running:
                began = time.monotonic()
                cur.execute("SELECT count(*) FROM stock_monitoring.alerts WHERE enabled")
                self.waits.append(time.monotonic() - began)
                time.sleep(0.02)

    def stop(self) -> float:
        self.running = False
        self.thread.join(30)
        self.conn.close()
        return max(self.waits)


ALTER = {"024_alerts_note.sql": "ALTER TABLE stock_monitoring.alerts ADD COLUMN note text;\n"}


@pytest.mark.every_major
def test_a_migration_blocked_by_a_report_is_retried_and_goes_through_when_the_report_ends(tmp_path, db):
    """The default schedule: readers wait at most one attempt's lock_timeout (500 ms), never the report's length."""
    assert play(tmp_path, db).rc == 0
    report = Report(db)
    readers = Readers(db)
    report.end_after_blocking(db, 3)
    res = play(tmp_path, db, extra={"stock_monitoring_db_migrations_dir": str(write_migrations(
        tmp_path / "m", ALTER, with_real=True))})
    longest = readers.stop()
    assert res.rc == 0, res.output
    attempts = db.query("SELECT attempts FROM stock_monitoring.pg_migrate_history WHERE version = 24")[0][0]
    assert attempts > 1 and "applied: 024_alerts_note.sql in" in res.output and f"({attempts} attempts)" in res.output
    assert longest < 0.8, f"a reader waited {longest:.2f} s behind the migration"


@pytest.mark.every_major
def test_lock_retries_that_run_out_fail_naming_the_blocker(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    report = Report(db)
    try:
        res = play(tmp_path, db, extra={
            "stock_monitoring_db_migrations_dir": str(write_migrations(tmp_path / "m", ALTER, with_real=True)),
            "stock_monitoring_db_lock_retries": [{"lock_timeout": "100ms", "sleep": "50ms", "times": 3}]})
    finally:
        report.end()
    assert res.rc != 0
    assert ("It lost the race for its locks on each of 3 attempts (stock_monitoring_db_lock_retries): blocked by "
            f"pid {report.pid} (user postgres, application 'long-report'") in res.output, res.output
    assert [r[0] for r in db.history()] == [22, 23]


@pytest.mark.every_major
def test_in_a_no_transaction_file_the_blocked_statement_alone_is_retried(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    report = Report(db)
    report.end_after_blocking(db, 2)
    no_tx = {"024_no_tx.sql": "-- pg_migrate:no-transaction\nINSERT INTO stock_monitoring.watchlists (user_id, name) "
                              "VALUES ('u1', 'once');\nALTER TABLE stock_monitoring.alerts ADD COLUMN note text;\n"}
    res = play(tmp_path, db, extra={"stock_monitoring_db_migrations_dir": str(write_migrations(
        tmp_path / "m", no_tx, with_real=True)),
        "stock_monitoring_db_lock_retries": [{"lock_timeout": "50ms", "sleep": "500ms", "times": 20}]})
    assert res.rc == 0, res.output
    assert db.query("SELECT count(*) FROM stock_monitoring.watchlists WHERE name = 'once'")[0][0] == 1
    assert db.query("SELECT attempts FROM stock_monitoring.pg_migrate_history WHERE version = 24")[0][0] > 1


def own_block(blocked: str = "ALTER TABLE stock_monitoring.alerts ADD COLUMN note text;\n") -> dict[str, str]:
    """A no-transaction file that opens a transaction block of its own around a statement a report blocks."""
    return {"024_block.sql": "-- pg_migrate:no-transaction\n"
            "INSERT INTO stock_monitoring.watchlists (user_id, name) VALUES ('u1', 'before');\n"
            "BEGIN;\nINSERT INTO stock_monitoring.watchlists (user_id, name) VALUES ('u1', 'inside');\n"
            f"{blocked}COMMIT;\n"}


def named(db: Db, name: str) -> int:
    return db.query("SELECT count(*) FROM stock_monitoring.watchlists WHERE name = %s", (name,))[0][0]


@pytest.mark.every_major
def test_a_block_a_no_transaction_file_opens_itself_is_retried_whole_from_its_begin(tmp_path, db):
    """Retrying the blocked statement alone would run it in the block it aborted: the block is the unit."""
    assert play(tmp_path, db).rc == 0
    report = Report(db)
    report.end_after_blocking(db, 2)
    res = play(tmp_path, db, extra={
        "stock_monitoring_db_migrations_dir": str(write_migrations(tmp_path / "m", own_block(), with_real=True)),
        "stock_monitoring_db_lock_retries": [{"lock_timeout": "50ms", "sleep": "500ms", "times": 20}]})
    assert res.rc == 0, res.output
    assert (named(db, "before"), named(db, "inside")) == (1, 1)
    assert db.query("SELECT attempts FROM stock_monitoring.pg_migrate_history WHERE version = 24")[0][0] > 1


def test_a_block_whose_retries_run_out_is_named_as_rolled_back(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    report = Report(db)
    try:
        res = play(tmp_path, db, extra={
            "stock_monitoring_db_migrations_dir": str(write_migrations(tmp_path / "m", own_block(), with_real=True)),
            "stock_monitoring_db_lock_retries": [{"lock_timeout": "50ms", "sleep": "50ms", "times": 3}]})
    finally:
        report.end()
    assert res.rc != 0
    assert ("this statement ran in the block it opened at line 3: that block was rolled back, its statements "
            "before the block stayed committed") in res.output, res.output
    assert "on each of 3 attempts" in res.output
    assert (named(db, "before"), named(db, "inside")) == (1, 0)
    assert [r[0] for r in db.history()] == [22, 23]


def test_a_no_transaction_file_that_ends_inside_its_own_block_is_rolled_back_and_not_recorded(tmp_path, db):
    """psql rolls back a block left open when the file ends; a deploy must not report it applied."""
    assert play(tmp_path, db).rc == 0
    files = {"024_open.sql": "-- pg_migrate:no-transaction\n"
             "BEGIN;\nINSERT INTO stock_monitoring.watchlists (user_id, name) VALUES ('u1', 'inside');\n"}
    res = play(tmp_path, db, extra={"stock_monitoring_db_migrations_dir": str(write_migrations(
        tmp_path / "m", files, with_real=True))})
    assert res.rc != 0, res.output
    assert "ends inside the transaction it opened at line 2 (a BEGIN without COMMIT)" in res.output, res.output
    assert named(db, "inside") == 0 and [r[0] for r in db.history()] == [22, 23]


ONCE_MORE = "INSERT INTO stock_monitoring.watchlists (user_id, name) VALUES ('u1', 'once ' || clock_timestamp())"
BLOCKED = "ALTER TABLE stock_monitoring.alerts ADD COLUMN note text"


@pytest.mark.every_major
@pytest.mark.parametrize("statement", [
    f"DO $$BEGIN {ONCE_MORE}; COMMIT;\n  {BLOCKED}; END$$;\n",
    f"CREATE PROCEDURE stock_monitoring.step() LANGUAGE plpgsql AS $$BEGIN {ONCE_MORE}; COMMIT; {BLOCKED}; END$$;\n"
    "/* the step */ CALL stock_monitoring.step();\n",
], ids=["DO", "CALL"])
def test_a_statement_that_may_have_committed_is_never_retried_and_is_named(tmp_path, db, statement):
    """A DO block or a procedure may COMMIT part of its work before it loses a lock race: running it again
    would repeat what it committed. It runs once, and the failure says so."""
    assert play(tmp_path, db).rc == 0
    report = Report(db)
    try:
        res = play(tmp_path, db, extra={"stock_monitoring_db_migrations_dir": str(write_migrations(
            tmp_path / "m", {"024_commits.sql": "-- pg_migrate:no-transaction\n" + statement}, with_real=True)),
            "stock_monitoring_db_lock_retries": [{"lock_timeout": "50ms", "sleep": "100ms", "times": 4}]})
    finally:
        report.end()
    assert res.rc != 0, res.output
    assert db.query("SELECT count(*) FROM stock_monitoring.watchlists WHERE left(name, 5) = 'once '")[0][0] == 1
    assert "may have committed part of its work, so it was not retried" in res.output, res.output
    assert [r[0] for r in db.history()] == [22, 23]


@pytest.mark.every_major
def test_a_deadlock_victim_is_rolled_back_and_retried(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    other = db.connect(autocommit=False)
    cur = other.cursor()
    cur.execute("SET deadlock_timeout = '60s'")  # the migration, not this session, detects the deadlock
    cur.execute("LOCK TABLE stock_monitoring.alerts IN ACCESS EXCLUSIVE MODE")
    deadlock = {"024_deadlock.sql": "LOCK TABLE stock_monitoring.watchlists IN ACCESS EXCLUSIVE MODE;\n"
                                    "SELECT pg_sleep(0.3);\nLOCK TABLE stock_monitoring.alerts IN ACCESS EXCLUSIVE MODE;\n"}
    proc = background_deploy(tmp_path, db, write_migrations(tmp_path / "m", deadlock, with_real=True),
                             stock_monitoring_db_lock_retries=[{"lock_timeout": "20s", "sleep": "100ms", "times": 2}])
    wait_for(lambda: db.query("SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE l.granted "
                              "AND c.relname = 'watchlists' AND l.mode = 'AccessExclusiveLock' AND l.pid <> %s",
                              (other.get_backend_pid(),)), "the migration to lock watchlists")
    cur.execute("LOCK TABLE stock_monitoring.watchlists IN ACCESS EXCLUSIVE MODE")  # waits until the victim rolls back
    other.commit()
    res = finish(proc)
    other.close()
    assert res.rc == 0, res.output
    assert db.query("SELECT attempts FROM stock_monitoring.pg_migrate_history WHERE version = 24")[0][0] == 2


def test_creating_the_database_waits_past_lock_timeout_for_pg_database(tmp_path, db):
    """Another database being created or dropped holds pg_database for longer than lock_timeout (5 s)."""
    env_file = tmp_path / ".env"
    env_file.write_text(env_text(db))
    gate = db.connect(dbname="postgres", autocommit=False)
    gate.cursor().execute("LOCK TABLE pg_catalog.pg_database IN SHARE MODE")
    proc = start_playbook(DEPLOY, inventory=LOCAL, env={"STOCK_MONITORING_DB_ENV_FILE": str(env_file)})
    try:
        wait_for(lambda: db.query("SELECT count(*) FROM pg_locks WHERE relation = 'pg_catalog.pg_database'::regclass "
                                  "AND NOT granted", dbname="postgres")[0][0] == 1, "the creation to queue", 60)
        time.sleep(6)
    finally:
        gate.rollback()
        gate.close()
    res = finish(proc)
    assert res.rc == 0 and "database: created" in res.output, res.output


def test_a_pg_database_lock_held_past_the_deadline_names_its_holder(tmp_path, db):
    env_file = tmp_path / ".env"
    env_file.write_text(env_text(db))
    gate = db.connect(dbname="postgres", autocommit=False)
    gate.cursor().execute("SET application_name = 'dropping-another-db'; "
                          "LOCK TABLE pg_catalog.pg_database IN SHARE MODE")
    try:
        res = play(tmp_path, db, extra={"stock_monitoring_db_lock_wait_timeout": 2})
    finally:
        gate.rollback()
        gate.close()
    assert res.rc != 0 and f"Creating database '{db.name}'" in res.output and "waited 2 s" in res.output
    assert "application 'dropping-another-db'" in res.output and not db.exists()


def cluster_processes(cluster) -> list[int]:
    """The postmaster and every process it started."""
    root = cluster.postmaster_pid()
    return [root] + [int(pid) for pid in subprocess.run(["pgrep", "-P", str(root)], capture_output=True,
                                                        text=True).stdout.split()]


def test_a_server_that_stops_answering_mid_migration_fails_the_deploy_in_seconds(tmp_path, own_cluster):
    """Every process of the server stopped (SIGSTOP: a hung host, a frozen VM), the kernel still keeping the
    TCP connection: no timeout on the server runs, and keepalives are answered. The deploy asks the server on
    a second connection whether it still answers; it does not, twice: the run fails naming it."""
    db = Db(own_cluster, "stalled")
    slow = {"024_slow.sql": "CREATE TABLE stock_monitoring.slow_a (id int);\nSELECT pg_sleep(120);\n"}
    proc = background_deploy(tmp_path, db, write_migrations(tmp_path / "m", slow, with_real=True),
                             stock_monitoring_db_connect_timeout=3)
    wait_for(lambda: db.exists() and active(db, "%pg_sleep(120)%"), "the slow migration to run")
    stopped = cluster_processes(own_cluster)
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    began = time.monotonic()
    try:
        res = finish(proc, 120)
        waited = time.monotonic() - began
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert res.rc != 0 and waited < 30, (waited, res.output)
    assert "stopped answering" in res.output and "Traceback" not in res.output, res.output
    assert_secret_free(res.output, own_cluster.password)
    wait_for(lambda: not active(db, "%pg_sleep(120)%"), "the server to end the abandoned session", 15)
    assert_consistent(db, [22, 23])
