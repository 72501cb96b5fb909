"""Progress without a server: what a row of PostgreSQL's views becomes, which statement of a file a line
names, the line an operator reads, the host-side poll, and the private progress file."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
from ansible.module_utils import pg_migrate_progress as progress
from conftest import load_library

plugin = load_library("pg_migrate", "action_plugins")
outcome = load_library("outcome", "roles/stock_monitoring_db/filter_plugins").outcome


def create_index(phase: str, **counts) -> dict:
    return {"create_index": {"command": "CREATE INDEX CONCURRENTLY", "phase": phase, "relation": "s.ticks",
                             "blocks_total": 0, "blocks_done": 0, "tuples_total": 0, "tuples_done": 0,
                             "lockers_total": 0, "lockers_done": 0, "partitions_total": 0, "partitions_done": 0,
                             **counts}}


def test_an_index_build_reports_its_phase_and_the_share_of_the_phase_done():
    scanning = progress.describe(create_index("building index: scanning table", blocks_total=75000,
                                              blocks_done=33867))
    assert scanning["text"] == ("CREATE INDEX CONCURRENTLY on s.ticks: building index: scanning table, 45.2% "
                                "(33,867 of 75,000 blocks)")
    assert scanning["view"] == "pg_stat_progress_create_index" and scanning["percent"] == 45.2
    # The blocks of the phase before are still counted while tuples load: the phase's own unit is shown.
    loading = progress.describe(create_index("building index: loading tuples in tree", blocks_total=75000,
                                             blocks_done=75000, tuples_total=9000000, tuples_done=4556237))
    assert loading["text"].endswith("loading tuples in tree, 50.6% (4,556,237 of 9,000,000 tuples)")
    assert progress.describe(create_index("building index: sorting live tuples", blocks_total=75000,
                                          blocks_done=75000))["text"].endswith("sorting live tuples")
    # A GIN, GiST, hash or BRIN build names no sub-phase: its blocks.
    assert progress.describe(create_index("building index", blocks_total=8, blocks_done=2))["text"].endswith(
        "building index, 25% (2 of 8 blocks)")


def test_a_concurrent_build_waiting_for_older_transactions_names_them():
    row = {**create_index("waiting for old snapshots", lockers_total=2, lockers_done=1, current_locker_pid=41),
           "blockers": [{"pid": 41, "application_name": "report", "user": "app", "state": "idle in transaction",
                         "transaction_open_s": 73.0}]}
    assert progress.describe(row)["text"] == (
        "CREATE INDEX CONCURRENTLY on s.ticks: waiting for old snapshots, 50% (1 of 2 older transactions): "
        "waiting for pid 41 (application 'report', idle in transaction, transaction open 73 s)")


def test_a_lock_wait_names_the_lock_and_each_blocking_session():
    row = {"wait_event_type": "Lock", "wait_event": "relation",
           "waiting": {"locktype": "relation", "mode": "AccessExclusiveLock", "relation": "s.alerts"},
           "blockers": [{"pid": 7, "application_name": "dag", "state": "active", "transaction_open_s": 12.0},
                        {"pid": 9, "application_name": "api", "state": None, "transaction_open_s": None}]}
    found = progress.describe(row)
    assert found["text"] == ("waiting for AccessExclusiveLock on s.alerts, blocked by pid 7 (application 'dag', "
                             "active, transaction open 12 s); pid 9 (application 'api', state hidden "
                             "(pg_read_all_stats))")
    assert found["waiting_for"]["relation"] == "s.alerts" and [b["pid"] for b in found["blockers"]] == [7, 9]
    rows = {"wait_event_type": "Lock", "wait_event": "transactionid", "waiting": {"locktype": "transactionid"}}
    assert progress.describe(rows)["text"] == "waiting for a row lock (another transaction's rows)"
    uncommitted = {**row, "waiting": {**row["waiting"], "relation": "16423"}, "blockers": []}
    assert progress.describe(uncommitted)["text"] == (
        "waiting for AccessExclusiveLock on a table created in this transaction (oid 16423)")


def test_many_blocking_sessions_are_counted_past_the_first_five():
    sessions = [{"pid": n, "application_name": "api", "state": "active", "transaction_open_s": 1} for n in range(8)]
    assert progress.sessions_text(sessions).endswith("; and 3 more") and progress.sessions_text(sessions).count(
        "pid ") == 5


@pytest.mark.parametrize(("row", "text"), [
    ({"cluster": {"command": "VACUUM FULL", "phase": "seq scanning heap", "relation": "s.t", "heap_blks_total": 10,
                  "heap_blks_scanned": 4}}, "VACUUM FULL on s.t: seq scanning heap, 40% (4 of 10 blocks)"),
    ({"cluster": {"command": "CLUSTER", "phase": "index scanning heap", "relation": "s.t", "heap_blks_total": 0,
                  "heap_tuples_written": 1500}}, "CLUSTER on s.t: index scanning heap, 1,500 tuples written"),
    ({"vacuum": {"phase": "scanning heap", "relation": "s.t", "heap_blks_total": 8, "heap_blks_scanned": 2}},
     "VACUUM on s.t: scanning heap, 25% (2 of 8 blocks)"),
    ({"analyze": {"phase": "acquiring sample rows", "relation": "s.t", "sample_blks_total": 300,
                  "sample_blks_scanned": 100}}, "ANALYZE on s.t: acquiring sample rows, 33.3% (100 of 300 blocks)"),
    ({"wait_event_type": "IO", "wait_event": "DataFileRead"}, "running, waiting on IO:DataFileRead"),
    ({"wait_event_type": None, "wait_event": None}, "running (on CPU, no wait event)"),
], ids=["VACUUM FULL", "CLUSTER", "VACUUM", "ANALYZE", "wait event", "on CPU"])
def test_the_other_views_and_the_wait_event(row, text):
    assert progress.describe(row)["text"] == text


TWO = ("-- alerts first\nALTER TABLE s.alerts ADD COLUMN note text;\n\n"
       "CREATE INDEX alerts_note ON s.alerts (note);\nCREATE INDEX n_note ON s.notifications\n  (note);\n")


def test_a_no_transaction_file_names_the_statement_the_module_runs():
    text = "-- pg_migrate:no-transaction\nCREATE INDEX CONCURRENTLY a ON s.t (x);\n/* next */ VACUUM s.t;\n"
    finding = plugin.analyse("024_x.sql", text)
    assert plugin.where_running(text, finding, {"statement": 1}) == {"line": 3, "sql": "VACUUM s.t"}


def test_a_transactional_file_names_the_one_statement_that_fits_what_the_server_reports():
    lock = {"statement": None, "waiting_for": {"relation": "s.notifications"}}
    assert plugin.where_running(TWO, {}, lock) == {"line": 5, "sql": "CREATE INDEX n_note ON s.notifications (note)"}
    build = {"statement": None, "command": "CREATE INDEX", "relation": "s.alerts"}
    assert plugin.where_running(TWO, {}, build)["line"] == 4
    assert plugin.fits({"command": "CREATE INDEX"}, "t", ["ALTER", "TABLE"], {"t", "primary", "key"})  # ADD PRIMARY KEY
    # Two statements on alerts fit a lock wait on it, and nothing fits a wait event: the lines, not a guess.
    assert plugin.where_running(TWO, {}, {"statement": None, "waiting_for": {"relation": "s.alerts"}}) == {
        "line": None, "lines": [2, 4], "sql": None}
    assert plugin.where_running(TWO, {}, {"statement": None, "wait_event": "IO:DataFileRead"})["lines"] == [2, 4, 5]
    assert plugin.where_running("\ufeffSELECT pg_sleep(9);", {}, {"statement": None}) == {
        "line": 1, "sql": "SELECT pg_sleep(9)"}


@pytest.mark.parametrize(("text", "event", "lines"), [
    # A CREATE TABLE is no index build; the DO block may be one (EXECUTE), and is the only one that may.
    ("CREATE TABLE s.t (x int);\nDO $$ BEGIN EXECUTE 'CREATE INDEX ON s.t (x)'; END $$;\n",
     {"command": "CREATE INDEX", "relation": "s.t"}, 2),
    # Beside a statement on that table, a DO block may be the one waiting too.
    ("ALTER TABLE s.t ADD COLUMN y int;\nDO $$ BEGIN PERFORM 1; END $$;\n", {"waiting_for": {"relation": "s.t"}},
     None),
    ("CREATE TABLE s.t (x int);\nCREATE INDEX ON s.t (x);\n", {"command": "CREATE INDEX", "relation": "s.t"}, 2),
    # DROP INDEX locks a table it does not name.
    ("UPDATE s.a SET x = 1 FROM s.t;\nDROP INDEX s.t_idx;\n", {"waiting_for": {"relation": "s.t"}}, None),
    # A table this transaction created has no name another session can read: nothing to match.
    ("CREATE TABLE s.t (x int);\nCREATE INDEX ON s.t (x) WHERE x <> 16423;\n",
     {"command": "CREATE INDEX", "relation": "16423"}, None),
], ids=["DO block", "DO block beside", "CREATE TABLE", "DROP INDEX", "uncommitted table"])
def test_a_statement_that_may_be_the_one_running_is_never_passed_over_for_a_guess(text, event, lines):
    found = plugin.where_running(text, {}, {"statement": None, **event})
    assert found["line"] == lines and (lines or len(found["lines"]) == 2)


def test_the_statement_shown_is_its_first_words_on_one_line():
    assert plugin.shown_sql("CREATE  INDEX -- why\n  a ON s.t(x)") == "CREATE INDEX a ON s.t(x)"
    long = plugin.shown_sql("INSERT INTO s.t VALUES ('" + "x" * 200 + "')")
    assert len(long) == plugin.SHOWN_SQL and long.endswith("…")


def test_the_line_an_operator_reads():
    event = {"migration": "024_x.sql", "line": 2, "sql": "ALTER TABLE s.alerts ADD COLUMN note text",
             "elapsed_s": 12.0, "attempt": 3, "attempts": 52, "text": "waiting for AccessExclusiveLock on s.alerts",
             "waiting_for": {}}
    assert plugin.progress_line("db1", event) == (
        "progress: [db1] 024_x.sql line 2 (ALTER TABLE s.alerts ADD COLUMN note text), 12 s, attempt 3 of 52: "
        "waiting for AccessExclusiveLock on s.alerts")
    first = {**event, "attempt": 1, "text": "running, waiting on IO:DataFileRead"}
    del first["waiting_for"]
    assert ", attempt" not in plugin.progress_line("db1", first)  # not retried yet, and not waiting for a lock
    assert plugin.progress_line("db1", {**event, "line": None, "lines": [2, 4]}).startswith(
        "progress: [db1] 024_x.sql one of the statements at lines 2, 4, 12 s")
    assert plugin.progress_line("db1", {**event, "finished": True, "text": "finished after 41.2 s"}) == (
        "progress: [db1] 024_x.sql line 2 (ALTER TABLE s.alerts ADD COLUMN note text): finished after 41.2 s")


def poll(tmp_path, offset: int = 0, seen: int = 0) -> str:
    command = plugin.POLL.format(token="t0k", offset=offset, start=offset + 1, seen=seen, ticks=2)
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, check=True,
                          env={"TMPDIR": str(tmp_path), "PATH": os.environ["PATH"]}).stdout


def test_the_poll_on_the_host_returns_what_was_added_and_says_when_the_module_is_gone(tmp_path):
    path = tmp_path / "pg_migrate-progress-t0k.jsonl"
    assert poll(tmp_path) == ""  # not there yet: waits a little, then returns nothing
    path.write_text("")
    assert poll(tmp_path) == "here\n"  # the first migration started
    path.write_text('{"seq": 1}\n{"seq": 2}\n')
    assert poll(tmp_path, offset=11, seen=1) == '{"seq": 2}\n'
    assert poll(tmp_path, offset=22, seen=1) == ""  # nothing new
    path.unlink()
    assert poll(tmp_path, offset=22, seen=1) == "gone\n"


def test_the_poll_reads_no_link_and_no_file_of_another_user(tmp_path):
    mine = tmp_path / "mine"
    mine.write_text('{"seq": 1}\n')
    (tmp_path / "pg_migrate-progress-t0k.jsonl").symlink_to(mine)
    assert poll(tmp_path) == "" and poll(tmp_path, seen=1) == "gone\n"
    (tmp_path / "pg_migrate-progress-t0k.jsonl").unlink()
    theirs = tmp_path / "pg_migrate-progress-t0k.jsonl"
    theirs.write_text('{"seq": 1}\n')
    os.chown(theirs, 65534, 65534)  # nobody's
    assert poll(tmp_path) == ""


def test_the_progress_file_is_private_never_another_one_and_goes_at_the_end(tmp_path):
    path = tmp_path / "pg_migrate-progress-abc.jsonl"
    mine = progress.Progress(None, 5, str(path))
    mine.start()  # when the module starts, before any statement
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == ""
    mine.begin("024_x.sql", None, 1)
    with mine.lock:
        mine.emit(mine.unit, {"text": "running"})
    assert '"text": "running"' in path.read_text()
    mine.close()
    with mine.lock:
        mine.emit(mine.unit, {"text": "after the end"})  # the watchdog's exit: nothing written, nothing kept
    assert not path.exists() and [e["seq"] for e in mine.unit.events] == [1]
    # A file (or a link) already at that name is never written to: the events stay in the result only.
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / "pg_migrate-progress-xyz.jsonl").symlink_to(tmp_path / "elsewhere")
    theirs = progress.Progress(None, 5, str(tmp_path / "pg_migrate-progress-xyz.jsonl"))
    theirs.start()
    theirs.begin("024_x.sql", None, 1)
    with theirs.lock:
        theirs.emit(theirs.unit, {"text": "running"})
    assert (tmp_path / "elsewhere").read_text() == "" and theirs.fd is None and len(theirs.unit.events) == 1
    theirs.close()
    assert (tmp_path / "pg_migrate-progress-xyz.jsonl").is_symlink()
    planted = tmp_path / "pg_migrate-progress-old.jsonl"  # a plain file, there before the module started
    planted.write_text("")
    planted.chmod(0o666)
    other = progress.Progress(None, 5, str(planted))
    other.start()
    other.begin("024_x.sql", None, 1)
    with other.lock:
        other.emit(other.unit, {"text": "running"})
    other.close()
    assert planted.exists() and planted.read_text() == "" and other.fd is None


def test_a_statement_as_long_as_the_interval_is_in_the_result_even_before_its_first_answer(tmp_path):
    """The first answer may come late (a connection to make): the statement's duration decides."""
    run = progress.Progress(None, 1, None)
    run.begin("024_x.sql", 0, 1)
    run.unit.started -= 1.5
    run.end(ok=True)
    run.begin("025_y.sql", 0, 1)  # short: not in the result
    run.end(ok=True)
    (entry,) = run.result()["progress"]
    assert entry["migration"] == "024_x.sql" and entry["duration_ms"] >= 1500 and entry["events"][-1]["finished"]


def test_a_block_is_named_by_its_first_statement_and_a_long_one_keeps_its_first_and_latest_events():
    run = progress.Progress(None, 1, None)
    run.begin("024_x.sql", 3, 1)
    run.at(statement=5)  # the block's third statement runs now
    with run.lock:
        for n in range(progress.MAX_EVENTS + 10):
            run.emit(run.unit, {"text": f"event {n}"})
    assert run.unit.events[-1]["statement"] == 5
    run.end(ok=False)
    (entry,) = run.statements
    assert entry["statement"] == 3 and entry["events"][-1]["statement"] == 3 and entry["events_left_out"] == 11
    texts = [e["text"] for e in entry["events"]]
    assert len(texts) == progress.MAX_EVENTS and texts[0] == "event 0" and texts[-2] == f"event {progress.MAX_EVENTS + 9}"
    assert texts[-1] == "failed after 0.0 s"


def test_the_result_names_each_statement_with_or_without_a_reader():
    """locate_progress runs whether or not the lines were shown live (no_log, another connection)."""
    text = "ALTER TABLE s.alerts ADD COLUMN a int;\nALTER TABLE s.notifications ADD COLUMN a int;\n"
    result = {"progress": [{"migration": "024_x.sql", "statement": None, "events": [
        {"seq": 1, "statement": None, "waiting_for": {"relation": "s.notifications"}},
        {"seq": 2, "statement": None, "finished": True}]}]}
    plugin.locate_progress(result, lambda event: plugin.where_running(text, {}, event))
    (statement,) = result["progress"]
    assert statement["line"] == 2 and statement["events"][0]["line"] == 2 and statement["events"][1]["lines"] == [1, 2]
    unnamed = outcome({"progress": [{"migration": "024_x.sql", "duration_ms": 12000, "events": []}], "login": {}},
                      "web1", "s", "deploy")
    assert "long statement: 024_x.sql, 12.0 s" in unnamed["summary"]


def test_the_poll_leaves_out_the_shells_own_words(tmp_path):
    """Over SSH with a terminal, standard error comes with the output: the poll sends none."""
    (tmp_path / "pg_migrate-progress-t0k.jsonl").write_text('{"seq": 1}\n')
    command = plugin.POLL.format(token="t0k", offset=0, start=1, seen=1, ticks=1)
    # A file removed between the poll's test and its read is the same case as this missing one.
    out = subprocess.run(["/bin/sh", "-c", command + '; tail -c +1 "$f.removed"'], capture_output=True, text=True,
                         env={"TMPDIR": str(tmp_path), "PATH": os.environ["PATH"]})
    assert out.stdout == '{"seq": 1}\n' and out.stderr == ""


def test_a_long_statement_is_in_the_report_and_its_summary():
    statement = {"migration": "024_x.sql", "statement": None, "line": 2, "sql": "ALTER TABLE s.alerts ADD COLUMN n",
                 "duration_ms": 41210.5, "ok": True,
                 "events": [{"text": "waiting for AccessExclusiveLock on s.alerts"}, {"finished": True, "text": "x"}]}
    found = outcome({"changed": True, "mode": "deploy", "progress": [statement], "applied": [], "login": {}},
                    "web1", "s", "deploy")
    assert found["report"]["progress"] == [statement]
    assert ("long statement: 024_x.sql line 2 (ALTER TABLE s.alerts ADD COLUMN n), 41.2 s; last seen: waiting for "
            "AccessExclusiveLock on s.alerts") in found["summary"]
