"""pg_migrate against a real PostgreSQL, run through ansible-playbook as a task."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ansible.module_utils import pg_migrate_plan as pm
from conftest import (
    EXPECTED,
    MIGRATIONS,
    ROOT,
    ansible_env,
    load_library,
    module_params,
    read_migrations,
    run_module,
)


@pytest.mark.every_major
def test_fresh_apply_then_noop(tmp_path, db):
    db.create()
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, source="pytest fresh"))
    assert run.rc == 0, run.output
    assert res["changed"] is True
    assert [a["name"] for a in res["applied"]] == ["022_stock_monitoring_schema.sql",
                                                    "023_stock_monitoring_notifications.sql"]
    assert all(a["duration_ms"] > 0 and not a["adopted"] for a in res["applied"])
    assert res["missing_tables"] == [] and res["tables"] == EXPECTED and res["pending"] == []
    assert db.tables() == sorted([*EXPECTED, "pg_migrate_history"])
    row = db.query("SELECT applied_by, host, source, transactional, duration_ms > 0 FROM "
                   "stock_monitoring.pg_migrate_history WHERE version = 22")[0]
    assert row[0] == "postgres" and row[1] and row[2] == "pytest fresh" and row[3] and row[4]

    again, run = run_module(tmp_path, "pg_migrate", module_params(db))
    assert run.rc == 0, run.output
    assert again["changed"] is False and again["applied"] == [] and again["pending"] == []
    assert [a["version"] for a in again["already_applied"]] == [22, 23]


def test_another_sessions_temporary_tables_do_not_change_what_adoption_finds(tmp_path, db):
    """Adoption asks whether a file wrote to the catalog; another session creating temporary tables meanwhile
    (a report's scratch tables) writes there too, in its own transactions."""
    db.create()
    db.psql_files(*sorted(MIGRATIONS.glob("*.sql")))
    scratch, running = db.connect(), threading.Event()
    running.set()

    def create_temporary_tables() -> None:
        with scratch.cursor() as cur:
            for n in itertools.count():
                if not running.is_set():
                    return
                cur.execute(f"CREATE TEMPORARY TABLE scratch_{n} (id int, note text)")
                time.sleep(0.002)

    thread = threading.Thread(target=create_temporary_tables)
    thread.start()
    try:
        res, run = run_module(tmp_path, "pg_migrate", module_params(db))
    finally:
        running.clear()
        thread.join(10)
        scratch.close()
    assert run.rc == 0, run.output
    assert [a["adopted"] for a in res["applied"]] == [True, True]


def test_a_file_that_creates_something_in_a_subtransaction_while_adopting_is_not_adopted(tmp_path, db):
    """The DO ... EXCEPTION WHEN duplicate_object idiom creates its object in a subtransaction: that is a
    write of the file's, not something it found in place."""
    db.create()
    db.psql_files(*sorted(MIGRATIONS.glob("*.sql")))
    mood = {"024_mood.sql": "DO $$BEGIN CREATE TYPE stock_monitoring.mood AS ENUM ('calm');\n"
                            "EXCEPTION WHEN duplicate_object THEN NULL; END$$;\n"}
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations={
        **read_migrations(MIGRATIONS), **mood}))
    assert run.rc == 0, run.output
    assert [(a["name"], a["adopted"]) for a in res["applied"]] == [
        ("022_stock_monitoring_schema.sql", True), ("023_stock_monitoring_notifications.sql", True),
        ("024_mood.sql", False)]


@pytest.mark.every_major
def test_adopts_a_database_migrated_by_hand_with_psql(tmp_path, db):
    db.create()
    db.psql_files(*sorted(MIGRATIONS.glob("*.sql")))
    db.query("INSERT INTO stock_monitoring.watchlists (user_id, name) VALUES ('u1', 'tech')")
    res, run = run_module(tmp_path, "pg_migrate", module_params(db))
    assert run.rc == 0, run.output
    assert res["adopting"] is True and res["changed"] is True
    assert [a["adopted"] for a in res["applied"]] == [True, True]
    assert [r[3] for r in db.history()] == [True, True]
    assert db.query("SELECT count(*) FROM stock_monitoring.watchlists")[0][0] == 1  # data untouched
    again, _ = run_module(tmp_path, "pg_migrate", module_params(db))
    assert again["changed"] is False


@pytest.mark.every_major
def test_failing_file_leaves_no_trace_and_names_file_line_and_sqlstate(tmp_path, db):
    db.create()
    files = {
        "001_ok.sql": "CREATE SCHEMA IF NOT EXISTS stock_monitoring;\nCREATE TABLE stock_monitoring.a (id int);\n",
        "002_bad.sql": "CREATE TABLE stock_monitoring.b (id int);\n\n-- the next statement fails\n"
                       "INSERT INTO stock_monitoring.b\n  SELECT * FROM stock_monitoring.missing;\n",
        "003_later.sql": "CREATE TABLE stock_monitoring.c (id int);\n",
    }
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=files, expected_tables=None))
    assert run.rc != 0
    assert "Migration 002_bad.sql failed at line 5: SQLSTATE 42P01 undefined_table" in res["msg"]
    assert 'relation "stock_monitoring.missing" does not exist' in res["msg"]
    assert "rolled back" in res["msg"]
    assert [a["name"] for a in res["applied"]] == ["001_ok.sql"]
    assert [p["name"] for p in res["pending"]] == ["002_bad.sql", "003_later.sql"]
    assert db.tables() == ["a", "pg_migrate_history"]  # b was rolled back with its file
    assert [r[0] for r in db.history()] == [1]
    assert "Traceback" not in run.output


def test_failure_of_the_first_file_leaves_no_schema_nor_history(tmp_path, db):
    db.create()
    files = {"001_bad.sql": "CREATE SCHEMA stock_monitoring;\nSELECT 1/0;\n"}
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=files, expected_tables=None))
    assert run.rc != 0 and "SQLSTATE 22012 division_by_zero" in res["msg"]
    assert "the server gives no position for this error" in res["msg"]
    assert not db.query("SELECT 1 FROM pg_namespace WHERE nspname = 'stock_monitoring'")


@pytest.mark.every_major
def test_edited_file_stops_the_run_until_that_exact_change_is_accepted(tmp_path, db):
    db.create()
    files = {p.name: p.read_text() for p in MIGRATIONS.glob("*.sql")}
    run_module(tmp_path, "pg_migrate", module_params(db, migrations=files))
    old = pm.checksum(files["022_stock_monitoring_schema.sql"])

    # Line endings and a BOM are not edits.
    schema_file = files["022_stock_monitoring_schema.sql"]
    crlf = {**files, "022_stock_monitoring_schema.sql": "\ufeff" + schema_file.replace("\n", "\r\n")}
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=crlf))
    assert run.rc == 0 and res["changed"] is False and res["drift"] == []

    edited = {**files, "022_stock_monitoring_schema.sql": files["022_stock_monitoring_schema.sql"] + "\n-- reviewed\n"}
    new = pm.checksum(edited["022_stock_monitoring_schema.sql"])
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=edited))
    assert run.rc != 0
    assert "022_stock_monitoring_schema.sql" in res["msg"] and old in res["msg"] and new in res["msg"]
    assert res["drift"] == [{"version": 22, "name": "022_stock_monitoring_schema.sql", "kind": "edited",
                             "old_checksum": old, "new_checksum": new}]

    accept = [{"version": 22, "old_checksum": old, "new_checksum": new}]
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=edited, accepted_changes=accept))
    assert run.rc == 0 and res["changed"] is True and res["accepted"][0]["version"] == 22
    assert db.query("SELECT checksum, previous_checksum FROM stock_monitoring.pg_migrate_history "
                    "WHERE version = 22")[0] == (new, old)
    res, _ = run_module(tmp_path, "pg_migrate", module_params(db, migrations=edited, accepted_changes=accept))
    assert res["changed"] is False


@pytest.mark.every_major
def test_check_mode_executes_nothing_and_reports_the_plan(tmp_path, db):
    # The database does not exist yet: the plan is to create it and apply everything.
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, on_missing_database="create"), check=True, diff=True)
    assert run.rc == 0, run.output
    assert res["database_exists"] is False and res["changed"] is True and res["database_created"] is False
    assert [p["version"] for p in res["pending"]] == [22, 23]
    assert not db.exists()
    # With the fail policy, check mode predicts the failure a real run would have.
    res, run = run_module(tmp_path, "pg_migrate", module_params(db), check=True)
    assert run.rc != 0 and "does not exist" in res["msg"]
    # It exists, empty.
    db.create()
    before = db.query("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
    res, run = run_module(tmp_path, "pg_migrate", module_params(db), check=True, diff=True)
    assert run.rc == 0 and res["changed"] is True and len(res["pending"]) == 2 and res["applied"] == []
    assert "CREATE TABLE IF NOT EXISTS stock_monitoring.notifications" in res["diff"]["prepared"]
    assert "+  23 023_stock_monitoring_notifications.sql" in run.stdout or res["diff"]["after"].endswith(
        "23 023_stock_monitoring_notifications.sql\n")
    assert db.query("SELECT count(*) FROM pg_namespace WHERE nspname = 'stock_monitoring'")[0][0] == 0
    assert before  # the database was reachable
    # Half applied: only 023 is pending.
    db.psql_files(MIGRATIONS / "022_stock_monitoring_schema.sql")
    run_module(tmp_path, "pg_migrate", module_params(db, migrations={
        "022_stock_monitoring_schema.sql": (MIGRATIONS / "022_stock_monitoring_schema.sql").read_text()},
        expected_tables=None))
    res, _ = run_module(tmp_path, "pg_migrate", module_params(db), check=True)
    assert [p["version"] for p in res["pending"]] == [23] and res["missing_tables"] == ["notifications"]
    assert "notifications" not in db.tables()


def test_racing_deploys_apply_each_file_once(tmp_path, db, cluster):
    db.create()
    key = pm.advisory_key("stock_monitoring", "pg_migrate_history")
    holder = db.connect()
    holder.cursor().execute("SELECT pg_advisory_lock(%s)", (key,))
    procs = []
    for i in range(4):
        book = tmp_path / f"race{i}.json"
        res_file = tmp_path / f"race{i}.out"
        params = module_params(db, application_name=f"race-{i}")
        book.write_text(json.dumps([{"hosts": "localhost", "gather_facts": False,
                                                   "tasks": [{"pg_migrate": params}]}]))
        cmd = [str(Path(sys.executable).parent / "ansible-playbook"), str(book), "-i", "localhost,", "-c", "local",
               "-e", f"ansible_python_interpreter={sys.executable}"]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=ansible_env({"ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json"}),
                                       stdout=res_file.open("w"), stderr=subprocess.STDOUT), res_file))
    # All four wait for the lock at the same moment, then it is released.
    deadline = time.monotonic() + 60
    while db.query("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'race-%%'")[0][0] < 4:
        assert time.monotonic() < deadline, "the racing deploys never connected"
        time.sleep(0.1)
    holder.close()
    outcomes = []
    for proc, res_file in procs:
        assert proc.wait(120) == 0, res_file.read_text()
        text = res_file.read_text()
        outcomes.append(json.loads(text[text.index("{"):])["plays"][0]["tasks"][0]["hosts"]["localhost"])
    applied = sorted(a["version"] for o in outcomes for a in o["applied"])
    assert applied == [22, 23]  # each file applied by exactly one run
    assert sorted(o["changed"] for o in outcomes) == [False, False, False, True]
    assert [r[0] for r in db.history()] == [22, 23]


def test_lock_wait_deadline_names_the_holder(tmp_path, db):
    db.create()
    holder = db.connect()
    cur = holder.cursor()
    cur.execute("SET application_name = 'someone-elses-deploy'")
    cur.execute("SELECT pg_advisory_lock(%s)", (pm.advisory_key("stock_monitoring", "pg_migrate_history"),))
    pid = holder.get_backend_pid()
    try:
        res, run = run_module(tmp_path, "pg_migrate", module_params(db, lock_wait_timeout=1))
    finally:
        holder.close()
    assert run.rc != 0
    assert f"pid {pid} (user postgres, application 'someone-elses-deploy'" in res["msg"]
    assert not db.query("SELECT 1 FROM pg_namespace WHERE nspname = 'stock_monitoring'")


@pytest.mark.every_major
def test_non_transactional_file_runs_create_index_concurrently(tmp_path, db):
    db.create()
    files = {
        "001_t.sql": "CREATE SCHEMA IF NOT EXISTS stock_monitoring;\nCREATE TABLE stock_monitoring.t (a int, b int);\n",
        "002_idx.sql": "-- pg_migrate:no-transaction\n"
                       "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_a ON stock_monitoring.t (a);\n"
                       "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_b ON stock_monitoring.t (nope);\n",
    }
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=files, expected_tables=None))
    assert run.rc != 0
    assert "002_idx.sql failed at line 3 (statement 2)" in res["msg"] and "stayed committed" in res["msg"]
    assert [r[0] for r in db.history()] == [1]
    assert db.query("SELECT count(*) FROM pg_indexes WHERE indexname = 't_a'")[0][0] == 1
    files["002_idx.sql"] = files["002_idx.sql"].replace("(nope)", "(b)")
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=files, expected_tables=None))
    assert run.rc == 0 and [a["transactional"] for a in res["applied"]] == [False]
    assert [r[0] for r in db.history()] == [1, 2]


def test_concurrently_in_a_transactional_file_says_how_to_mark_it(tmp_path, db):
    db.create()
    files = {"001_t.sql": "CREATE TABLE t (a int);\nCREATE INDEX CONCURRENTLY t_a ON t (a);\n"}
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=files, expected_tables=None,
                                                                schema="public"))
    assert run.rc != 0 and "Migration 001_t.sql, line 2: CREATE INDEX CONCURRENTLY cannot run inside a transaction " \
        "block" in res["msg"] and "pg_migrate:no-transaction" in res["msg"], res["msg"]
    assert db.query("SELECT to_regclass('public.t')")[0][0] is None


def test_connection_failures_are_told_apart_without_the_password(tmp_path, db, cluster):
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, login_password="wrong-" + cluster.password))
    assert run.rc != 0 and "was refused" in res["msg"] and "password authentication failed" in res["msg"]
    assert "Check POSTGRES_USER/POSTGRES_PASSWORD" in res["msg"]
    assert cluster.password not in run.output
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, on_missing_database="fail"))
    assert run.rc != 0 and f"Database '{db.name}' does not exist on 127.0.0.1:{cluster.port}" in res["msg"]
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, login_port=1, wait_timeout=1))
    assert run.rc != 0 and "127.0.0.1:1 is not reachable (waited 1 s)" in res["msg"]
    assert "Traceback" not in run.output


def test_a_large_migration_travels_as_a_temporary_file_and_leaves_nothing_behind(tmp_path, db):
    """Over 1 MiB of SQL goes through a file in the remote temporary directory, not the module's arguments."""
    db.create()
    files = big_migration("big")
    assert len(files["001_big.sql"]) > 1 << 20
    remote_tmp = tmp_path / "remote-tmp"
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=files, schema="public",
                                                                expected_tables=None),
                          env={"ANSIBLE_REMOTE_TMP": str(remote_tmp)})
    assert run.rc == 0 and res["applied"][0]["name"] == "001_big.sql", run.output
    assert db.query("SELECT count(*) FROM public.big")[0][0] == 40_000
    assert not [p for p in remote_tmp.rglob("*") if p.is_file()]


def big_migration(table: str) -> dict[str, str]:
    rows = "".join(f"INSERT INTO public.{table} VALUES ({i}, 'row {i}; with a (note)');\n" for i in range(40_000))
    return {"001_big.sql": f"CREATE TABLE public.{table} (id int, note text);\n" + rows}


def test_a_large_migration_file_swapped_on_the_target_is_refused_and_never_runs(tmp_path, db):
    """A shared remote_tmp (under /tmp, as where homes are on NFS): another local user replaces the task's
    file between its transfer and the module reading it. Her SQL must never run as the database login."""
    db.create()
    remote_tmp = tmp_path / "shared-tmp"
    remote_tmp.mkdir()
    payload = json.dumps({"migrations": {"001_big.sql": "CREATE TABLE public.pwned (id int);\n"}, "findings": {}})
    stop, swapped = threading.Event(), []

    def attacker() -> None:
        while not stop.is_set():
            for found in remote_tmp.rglob("pg_migrate-migrations.json"):
                planted = found.with_name(".planted")
                with contextlib.suppress(OSError):
                    planted.write_text(payload)
                    os.replace(planted, found)
                    swapped.append(found)
                    return

    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    slow_start = tmp_path / "python"  # the module starts a second after the transfer: she always wins the race
    slow_start.write_text(f"#!/bin/sh\nsleep 1\nexec {sys.executable} \"$@\"\n")
    slow_start.chmod(0o755)
    try:
        res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=big_migration("big"), schema="public",
                                                                    expected_tables=None),
                              env={"ANSIBLE_REMOTE_TMP": str(remote_tmp)}, interpreter=str(slow_start))
    finally:
        stop.set()
        thread.join()
    assert swapped, "the attacker never saw the file: the test proves nothing"
    assert "pwned" not in db.tables(schema="public"), run.output
    assert run.rc != 0 and "does not hold what the controller sent" in res["msg"], res  # refused, nothing ran
    assert not db.query("SELECT to_regclass('public.big')")[0][0]
    assert not [p for p in remote_tmp.rglob("*") if p.is_file()]


def test_a_large_migration_file_that_differs_from_its_digest_is_refused_and_removed(tmp_path):
    sent = tmp_path / "pg_migrate-migrations.json"
    sent.write_text(json.dumps({"migrations": {"001_x.sql": "CREATE TABLE public.pwned (id int);\n"}, "findings": {}}))
    params = {"_migrations_path": str(sent), "_migrations_sha256": hashlib.sha256(b"what the controller sent").hexdigest()}
    with pytest.raises(pm.MigrationError, match="does not hold what the controller sent"):
        load_library("pg_migrate").read_migrations(params)
    assert not sent.exists()


def test_a_history_table_from_before_attempts_were_recorded_gets_the_column(tmp_path, db):
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, on_missing_database="create"))
    assert run.rc == 0, run.output
    db.query("ALTER TABLE stock_monitoring.pg_migrate_history DROP COLUMN attempts")
    more = {**read_migrations(MIGRATIONS), "024_more.sql": "CREATE TABLE stock_monitoring.more (id int);\n"}
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=more))
    assert run.rc == 0 and res["applied"][0]["attempts"] == 1, run.output
    assert db.query("SELECT version, attempts FROM stock_monitoring.pg_migrate_history ORDER BY 1") == [
        (22, 1), (23, 1), (24, 1)]
