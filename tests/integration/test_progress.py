"""A long migration is visible while it runs: every progress_interval seconds the deploy prints what
PostgreSQL says the statement is doing (an index build's phase and percentage, the session it waits for),
locally and over SSH, and the JSON report keeps the same events with each statement's duration."""

from __future__ import annotations

import glob
import json
import re
import statistics
import threading
import time
from itertools import pairwise

import pytest
from conftest import LOCAL, ROOT, Live, env_text, play, start_playbook, write_migrations

PROGRESS = (r"^progress: \[(?P<host>[^\]]+)\] (?P<file>\S+) (?P<where>.*?), (?P<elapsed>[\d.]+) s"
            r"(?P<tries>, attempt \d+ of \d+)?: (?P<text>.*)$")
TASK = "TASK [stock_monitoring_db : Create the database"
CIC = {"024_ticks_hash_index.sql": "-- pg_migrate:no-transaction\n"
                                  "CREATE INDEX CONCURRENTLY IF NOT EXISTS ticks_hash ON stock_monitoring.ticks (hash);\n"}
ADD_COLUMN = {"024_alerts_note.sql": "ALTER TABLE stock_monitoring.alerts ADD COLUMN note text;\n"}


def deploy(tmp_path, db, files: dict[str, str], **extra) -> Live:
    """A deploy of 022, 023 and `files`, in the background, with its JSON report."""
    (tmp_path / ".env").write_text(env_text(db))
    extra = {"stock_monitoring_db_migrations_dir": str(write_migrations(tmp_path / "m", files, with_real=True)),
             "stock_monitoring_db_report_file": str(tmp_path / "report.json"), **extra}
    return Live(start_playbook(ROOT / "playbooks" / "deploy-db.yml", inventory=LOCAL, extra_vars=extra,
                               env={"STOCK_MONITORING_DB_ENV_FILE": str(tmp_path / ".env")}))


def progress(live: Live) -> list[tuple[float, re.Match]]:
    return [(at, re.match(PROGRESS, line)) for at, line in live.matching(PROGRESS)]


def task_ended_at(live: Live) -> float:
    """When pg_migrate's task printed its result (the line after its progress lines)."""
    lines = list(live.lines)
    start = next(i for i, (_, line) in enumerate(lines) if line.startswith(TASK))
    return next(at for at, line in lines[start:] if re.match(r"(ok|changed|failed|fatal): \[", line))


def statements(report_file) -> list[dict]:
    return json.loads(report_file.read_text())[0]["progress"]


def test_a_long_index_build_shows_its_phase_and_a_rising_percentage_while_it_runs(tmp_path, db):
    db.create()
    assert play(tmp_path, db).rc == 0
    db.query("CREATE TABLE stock_monitoring.ticks AS SELECT g AS id, md5(g::text) AS hash "
             "FROM generate_series(1, 10000000) g")
    live = deploy(tmp_path, db, CIC, stock_monitoring_db_progress_interval=2)
    res = live.finish(300)
    assert res.rc == 0, res.output
    lines = progress(live)
    ended = task_ended_at(live)
    shown = [(at, m) for at, m in lines if at < ended and "CREATE INDEX CONCURRENTLY on stock_monitoring.ticks" in
             m["text"]]
    assert all(m["file"] == "024_ticks_hash_index.sql" and m["host"] == "localhost" and m["where"] ==
               "line 2 (CREATE INDEX CONCURRENTLY IF NOT EXISTS ticks_hash ON stock_monitoring.…)"
               for _, m in shown), res.output
    percents = [float(p) for _, m in shown for p in re.findall(r"([\d.]+)% \(", m["text"])]
    assert len(percents) >= 2 and any(b > a for a, b in pairwise(percents)), res.output
    assert any("building index: scanning table" in m["text"] and "blocks)" in m["text"] for _, m in shown)
    # Printed live, about every interval (2 s), not at the task's end.
    gaps = [b[0] - a[0] for a, b in pairwise(shown)]
    assert ended - shown[0][0] > 4 and statistics.median(gaps) < 2.75 and max(gaps) < 5, (gaps, res.output)
    (build,) = statements(tmp_path / "report.json")
    assert build["duration_ms"] > 10_000 and build["ok"] and build["line"] == 2 and build["statement"] == 0
    events = [e for e in build["events"] if not e.get("finished")]
    assert [e["text"] for e in events][:len(shown)] == [m["text"] for _, m in shown]
    assert {e["view"] for e in events if "view" in e} == {"pg_stat_progress_create_index"}
    assert build["events"][-1]["finished"] and "long statement: 024_ticks_hash_index.sql line 2" in res.output


@pytest.mark.parametrize("retries", [True, False], ids=["with lock retries", "one long lock_timeout"])
def test_a_deploy_waiting_for_a_table_names_the_session_that_holds_it(tmp_path, db, retries):
    db.create()
    assert play(tmp_path, db).rc == 0
    holder, pid = hold_alerts(db)
    extra = {"stock_monitoring_db_progress_interval": 1}
    if not retries:
        extra.update(stock_monitoring_db_lock_retries=[], stock_monitoring_db_lock_timeout="60s")
    live = deploy(tmp_path, db, ADD_COLUMN, **extra)
    # Between attempts, the sessions holding locks in the schema; in one long wait, pg_blocking_pids.
    held = ", AccessShareLock on stock_monitoring.alerts" if retries else ""
    named = rf"pid {pid} \(application 'nightly-report', idle in transaction{held}, transaction open \d+ s\)"
    live.wait(named, 60)
    holder.rollback()
    res = live.finish(120)
    assert res.rc == 0, res.output
    lines = [m for at, m in progress(live) if at < task_ended_at(live)]
    waits = [m for m in lines if re.search(named, m["text"])]
    assert waits and all(m["where"] == "line 1 (ALTER TABLE stock_monitoring.alerts ADD COLUMN note text)"
                         for m in waits), res.output
    if retries:
        assert all(re.fullmatch(r", attempt \d+ of 52", m["tries"] or "") for m in waits), res.output
        assert any(re.match(r"did not get its locks within the attempt's lock_timeout, pausing before attempt \d+; "
                            "holding locks in stock_monitoring: ", m["text"]) for m in waits), res.output
    else:
        assert any(m["text"].startswith("waiting for AccessExclusiveLock on stock_monitoring.alerts, blocked by")
                   for m in waits), res.output
    (wait,) = statements(tmp_path / "report.json")
    assert wait["ok"] and any(b["pid"] == pid and b["application_name"] == "nightly-report"
                              for e in wait["events"] for b in e.get("blockers", []) + e.get("holders", []))


def test_progress_is_printed_over_ssh_while_the_statement_runs(tmp_path, db, ssh_host):
    db.create()
    ssh_host.write_env(env_text(db))
    files = {"024_slow.sql": "-- a data fix that takes a while\nSELECT pg_sleep(6);\n"}
    live = Live(start_playbook(ROOT / "playbooks" / "deploy-db.yml", inventory=ssh_host.inventory, extra_vars={
        "stock_monitoring_db_migrations_dir": str(write_migrations(tmp_path / "m", files, with_real=True)),
        "stock_monitoring_db_progress_interval": 1, "stock_monitoring_db_report_file": str(tmp_path / "report.json")}))
    res = live.finish(180)
    assert res.rc == 0, res.output
    lines = progress(live)
    ended = task_ended_at(live)
    live_lines = [(at, m) for at, m in lines if at < ended - 1]
    assert len(live_lines) >= 3 and all(m["host"] == "deploy-host" and m["file"] == "024_slow.sql" and m["where"] ==
                                        "line 2 (SELECT pg_sleep(6))" for _, m in lines), res.output
    assert any(m["text"] == "running, waiting on Timeout:PgSleep" for _, m in live_lines), res.output
    assert re.search(r"024_slow.sql line 2 \(SELECT pg_sleep\(6\)\): finished after 6\.\d s", res.output)
    (slow,) = statements(tmp_path / "report.json")
    assert slow["duration_ms"] >= 6000 and slow["sql"] == "SELECT pg_sleep(6)"


def test_a_short_deploy_asks_nothing_and_prints_nothing(tmp_path, db):
    """A statement shorter than the interval costs no query, connection or file: a no-op deploy is unchanged."""
    db.create()
    before = set(glob.glob("/tmp/pg_migrate-progress-*"))
    res = play(tmp_path, db, extra={"stock_monitoring_db_progress_interval": 1})
    assert res.rc == 0 and "progress:" not in res.output, res.output
    assert not db.query("SELECT 1 FROM pg_stat_activity WHERE application_name LIKE '%%progress'", dbname="postgres")
    assert set(glob.glob("/tmp/pg_migrate-progress-*")) == before


def test_progress_interval_0_turns_it_off(tmp_path, db):
    db.create()
    files = {"024_slow.sql": "SELECT pg_sleep(3);\n"}
    res = play(tmp_path, db, extra={"stock_monitoring_db_progress_interval": 0,
                                    "stock_monitoring_db_migrations_dir": str(write_migrations(tmp_path / "m", files,
                                                                                               with_real=True)),
                                    "stock_monitoring_db_report_file": str(tmp_path / "report.json")})
    assert res.rc == 0 and "progress:" not in res.output, res.output
    assert statements(tmp_path / "report.json") == []


def test_a_statement_in_a_file_of_several_is_named_by_the_table_the_server_reports(tmp_path, db):
    """A transactional file runs whole: the statement that fits the lock PostgreSQL reports is named."""
    db.create()
    assert play(tmp_path, db).rc == 0
    holder = db.connect(autocommit=False)
    holder.cursor().execute("SET application_name = 'holder'; LOCK TABLE stock_monitoring.notifications "
                            "IN ACCESS SHARE MODE")
    files = {"024_two.sql": "ALTER TABLE stock_monitoring.alerts ADD COLUMN note text;\n\n"
                            "-- then\nALTER TABLE stock_monitoring.notifications ADD COLUMN note text;\n"}
    live = deploy(tmp_path, db, files, stock_monitoring_db_progress_interval=1, stock_monitoring_db_lock_retries=[],
                  stock_monitoring_db_lock_timeout="60s")
    live.wait("application 'holder'", 60)
    threading.Timer(1.5, holder.rollback).start()
    res = live.finish(120)
    assert res.rc == 0, res.output
    waits = [m for _, m in progress(live) if "blocked by" in m["text"]]
    assert waits and all(m["where"] == "line 4 (ALTER TABLE stock_monitoring.notifications ADD COLUMN note text)"
                         for m in waits), res.output


def hold_alerts(db, app: str = "nightly-report"):
    """A session that read alerts in a transaction it keeps open: its ACCESS SHARE lock blocks ALTER TABLE."""
    holder = db.connect(autocommit=False)
    cur = holder.cursor()
    cur.execute("SET application_name = %s; SELECT count(*) FROM stock_monitoring.alerts; SELECT pg_backend_pid()",
                (app,))
    return holder, cur.fetchone()[0]


@pytest.mark.every_major
def test_the_progress_views_are_read_on_every_supported_major(tmp_path, db):
    db.create()
    assert play(tmp_path, db).rc == 0
    holder, pid = hold_alerts(db)
    live = deploy(tmp_path, db, ADD_COLUMN, stock_monitoring_db_progress_interval=1,
                  stock_monitoring_db_lock_retries=[], stock_monitoring_db_lock_timeout="60s")
    live.wait(rf"waiting for AccessExclusiveLock on stock_monitoring.alerts, blocked by pid {pid} ", 60)
    holder.rollback()
    res = live.finish(120)
    assert res.rc == 0 and "could not be read" not in res.output, res.output


@pytest.mark.parametrize("bouncer", [("session", 2)], indirect=True, ids=["session-pool-2"])
def test_through_a_session_pool_progress_finds_the_deploys_server_session(tmp_path, db, bouncer):
    """Behind PgBouncer the session's pid on the server is not the one the client was told: the deploy's
    progress asks about the server's, through the pool's second server connection."""
    db.create()
    assert play(tmp_path, db).rc == 0
    holder, pid = hold_alerts(db)
    (tmp_path / ".env").write_text(env_text(db, POSTGRES_HOST=bouncer.host, POSTGRES_PORT=str(bouncer.port)))
    extra = {"stock_monitoring_db_migrations_dir": str(write_migrations(tmp_path / "m", ADD_COLUMN, with_real=True)),
             "stock_monitoring_db_progress_interval": 1, "stock_monitoring_db_lock_retries": [],
             "stock_monitoring_db_lock_timeout": "60s"}
    live = Live(start_playbook(ROOT / "playbooks" / "deploy-db.yml", inventory=LOCAL, extra_vars=extra,
                               env={"STOCK_MONITORING_DB_ENV_FILE": str(tmp_path / ".env")}))
    live.wait(rf"waiting for AccessExclusiveLock on stock_monitoring.alerts, blocked by pid {pid} ", 60)
    holder.rollback()
    res = live.finish(120)
    assert res.rc == 0 and [r[0] for r in db.history()] == [22, 23, 24], res.output


@pytest.mark.parametrize("bouncer", [("session", 1)], indirect=True, ids=["session-pool-1"])
def test_a_pool_with_no_second_server_connection_says_so_and_the_deploy_goes_on(tmp_path, db, bouncer):
    db.create()
    (tmp_path / ".env").write_text(env_text(db, POSTGRES_HOST=bouncer.host, POSTGRES_PORT=str(bouncer.port)))
    files = {"024_slow.sql": "SELECT pg_sleep(8);\n"}
    extra = {"stock_monitoring_db_migrations_dir": str(write_migrations(tmp_path / "m", files, with_real=True)),
             "stock_monitoring_db_progress_interval": 1}
    began = time.monotonic()
    live = Live(start_playbook(ROOT / "playbooks" / "deploy-db.yml", inventory=LOCAL, extra_vars=extra,
                               env={"STOCK_MONITORING_DB_ENV_FILE": str(tmp_path / ".env")}))
    res = live.finish(120)
    assert res.rc == 0 and [r[0] for r in db.history()] == [22, 23, 24], res.output
    assert "progress views could not be read: connected, but no answer within 5 s (a pool with no free" in res.output
    assert time.monotonic() - began < 30


def test_a_concurrent_build_waiting_for_an_older_transaction_names_it(tmp_path, db):
    db.create()
    assert play(tmp_path, db).rc == 0
    old = db.connect(autocommit=False)
    cur = old.cursor()
    cur.execute("SET application_name = 'old-report'; SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; "
                "SELECT count(*) FROM stock_monitoring.watchlists; SELECT pg_backend_pid()")
    pid = cur.fetchone()[0]
    files = {"024_alerts_symbol.sql": "-- pg_migrate:no-transaction\n"
                                      "CREATE INDEX CONCURRENTLY alerts_symbol_idx ON stock_monitoring.alerts (symbol);\n"}
    live = deploy(tmp_path, db, files, stock_monitoring_db_progress_interval=1)
    live.wait(rf"CREATE INDEX CONCURRENTLY on stock_monitoring.alerts: waiting for old snapshots, 0% \(0 of 1 older "
              rf"transactions\): waiting for pid {pid} \(application 'old-report', idle in transaction, "
              r"transaction open \d+ s\)$", 60)
    old.rollback()
    res = live.finish(120)
    assert res.rc == 0, res.output
    (build,) = statements(tmp_path / "report.json")
    waits = [e for e in build["events"] if e.get("phase") == "waiting for old snapshots"]
    assert waits and waits[0]["blockers"][0]["pid"] == pid and waits[0]["unit"] == "older transactions"


def test_a_throttled_vacuum_and_analyze_show_their_progress(tmp_path, db):
    db.create()
    assert play(tmp_path, db).rc == 0
    db.query("CREATE TABLE stock_monitoring.ticks AS SELECT g AS id, md5(g::text) AS hash "
             "FROM generate_series(1, 150000) g")
    files = {"024_maintenance.sql": "-- pg_migrate:no-transaction\n"
                                    "SET vacuum_cost_limit = 10;\nSET vacuum_cost_delay = '20ms';\n"
                                    "VACUUM stock_monitoring.ticks;\nANALYZE stock_monitoring.ticks;\n"}
    live = deploy(tmp_path, db, files, stock_monitoring_db_progress_interval=1)
    res = live.finish(180)
    assert res.rc == 0, res.output
    texts = [m["text"] for _, m in progress(live)]
    assert any(re.match(r"VACUUM on stock_monitoring.ticks: scanning heap, [\d.]+% \([\d,]+ of [\d,]+ blocks\)", t)
               for t in texts), res.output
    assert any(re.match(r"ANALYZE on stock_monitoring.ticks: acquiring sample rows, [\d.]+% \(", t) for t in texts), \
        res.output
    lines = {m["where"] for _, m in progress(live)}
    assert {"line 4 (VACUUM stock_monitoring.ticks)", "line 5 (ANALYZE stock_monitoring.ticks)"} <= lines, lines


def test_a_long_statement_that_fails_is_reported_with_its_duration(tmp_path, db):
    db.create()
    files = {"024_too_slow.sql": "SELECT pg_sleep(5);\n"}
    live = deploy(tmp_path, db, files, stock_monitoring_db_progress_interval=1,
                  stock_monitoring_db_statement_timeout="2500ms")
    res = live.finish(120)
    assert res.rc != 0 and "57014" in res.output, res.output
    assert re.search(r"^progress: \[localhost\] 024_too_slow.sql line 1 \(SELECT pg_sleep\(5\)\): failed after 2\.\d s$",
                     res.output, re.M), res.output
    (slow,) = statements(tmp_path / "report.json")
    assert not slow["ok"] and 2500 <= slow["duration_ms"] < 4000
