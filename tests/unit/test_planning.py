"""Planning, without a server: file names, checksums, the plan against the history, and its policies."""

from __future__ import annotations

import pytest
import yaml
from ansible.errors import AnsibleError
from ansible.module_utils import pg_migrate_connect as connect
from ansible.module_utils import pg_migrate_plan as pm
from conftest import DEFAULTS, MIGRATIONS, ROOT, load_library, read_migrations

sql = load_library("pg_migrate", "action_plugins")


def load(files: dict):
    """Files as the module gets them: with what the action plugin found in them."""
    return pm.load_migrations(files, {name: sql.analyse(name, text) for name, text in files.items()})


def test_checksum_ignores_line_endings_bom_and_trailing_space():
    base = "CREATE TABLE a (id int);\nSELECT 1;\n"
    assert pm.checksum(base) == pm.checksum(base.replace("\n", "\r\n"))
    assert pm.checksum(base) == pm.checksum("\ufeff" + base)
    assert pm.checksum(base) == pm.checksum(base.replace("\n", "\r"))
    assert pm.checksum(base) == pm.checksum(base + "\n\n  ")
    assert pm.checksum(base) != pm.checksum(base.replace("a (", "b ("))


def test_real_migrations_load_in_order():
    migs = load(read_migrations(MIGRATIONS))
    assert [m.version for m in migs] == [22, 23]
    assert all(m.transactional and m.problem is None for m in migs)


@pytest.mark.parametrize("files, message", [
    ({}, "No migration files"),
    ({"22_a.sql": "SELECT 1;", "022_b.sql": "SELECT 1;"}, "have the same version 22"),
    ({"abc.sql": "SELECT 1;"}, "does not match NNN_name.sql"),
    ({"001_x.SQL": "SELECT 1;"}, "does not match"),
    ({"\u0660\u0662\u0664_arabic_indic.sql": "SELECT 1;"}, "does not match NNN_name.sql"),
    ({"001_tx.sql": "BEGIN;\nSELECT 1;\nCOMMIT;"}, "line 1: it starts with BEGIN"),
    ({"20191100000001000000_x.sql": "SELECT 1;"}, "its version 20191100000001000000 is larger than the history "
                                                  "table's version column holds \\(bigint"),
    ({"001_nul.sql": "CREATE TABLE a (id int);\n\0\nCREATE TABLE b (id int);\n"}, "line 2: it holds a NUL character"),
    ({"001_quote.sql": "SELECT 1;\nSELECT 'never closed;\n"}, "line 2: unterminated quoted string"),
    ({"001_cic.sql": "CREATE TABLE t (id int);\nCREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS i ON t (id);\n"},
     "line 2: CREATE INDEX CONCURRENTLY cannot run inside a transaction block"),
    ({"001_vacuum.sql": "/* maintenance */\nVACUUM (ANALYZE) t;\n"}, "line 2: VACUUM cannot run inside a transaction"),
])
def test_bad_file_sets_are_refused(files, message):
    with pytest.raises(pm.MigrationError, match=message):
        for mig in load(files):
            mig.check_runnable()


def test_the_module_refuses_files_that_its_action_plugin_did_not_read():
    with pytest.raises(pm.MigrationError, match="its action plugin did not read"):
        pm.load_migrations({"001_a.sql": "SELECT 1;"}, None)


def test_marker_makes_a_file_non_transactional_and_allows_transaction_control():
    migs = load({"005_idx.sql": "-- pg_migrate:no-transaction\nCREATE INDEX CONCURRENTLY i ON t (a);"})
    assert not migs[0].transactional


def test_gaps_in_numbering_are_ordered_numerically():
    migs = load({"10_b.sql": "SELECT 1;", "9_a.sql": "SELECT 1;", "100_c.sql": "SELECT 1;"})
    assert [m.version for m in migs] == [9, 10, 100]


def plan(files, history, **kw):
    kw.setdefault("accepted_changes", [])
    kw.setdefault("unknown_versions", "fail")
    kw.setdefault("out_of_order", "fail")
    return pm.make_plan(load(files), history, kw["accepted_changes"], kw["unknown_versions"],
                        kw["out_of_order"])


FILES = {"001_a.sql": "SELECT 1;", "002_b.sql": "SELECT 2;", "003_c.sql": "SELECT 3;"}


def hist(*versions, **checksums):
    return {v: {"name": f"{v:03d}", "checksum": checksums.get(f"v{v}", pm.checksum(f"SELECT {v};"))} for v in versions}


def test_plan_lists_pending_and_already_applied():
    p = plan(FILES, hist(1, 2))
    assert [m.version for m in p.pending] == [3]
    assert [m.version for m in p.already_applied] == [1, 2]
    assert p.drift == []


def test_edited_file_stops_with_both_checksums_and_the_exact_acceptance():
    old = pm.checksum("SELECT 999;")
    with pytest.raises(pm.MigrationError) as err:
        plan(FILES, hist(1, 2, v2=old))
    assert "002_b.sql" in err.value.msg and old in err.value.msg and pm.checksum("SELECT 2;") in err.value.msg
    accepted = [{"version": 2, "old_checksum": old, "new_checksum": pm.checksum("SELECT 2;")}]
    p = plan(FILES, hist(1, 2, v2=old), accepted_changes=accepted)
    assert p.accepted[0]["version"] == 2 and [m.version for m in p.pending] == [3]
    # Accepting some other change does not accept this one.
    with pytest.raises(pm.MigrationError):
        plan(FILES, hist(1, 2, v2=old), accepted_changes=[{**accepted[0], "new_checksum": "0" * 64}])


def test_unknown_versions_fail_or_warn():
    with pytest.raises(pm.MigrationError, match="does not have: 004"):
        plan(FILES, hist(1, 2, 3, 4))
    p = plan(FILES, hist(1, 2, 3, 4), unknown_versions="warn")
    assert p.drift == [{"version": 4, "name": "004", "kind": "unknown"}]


def test_out_of_order_fails_or_applies():
    with pytest.raises(pm.MigrationError, match=r"older than the newest applied one \(3\): 002_b\.sql"):
        plan(FILES, hist(1, 3))
    p = plan(FILES, hist(1, 3), out_of_order="apply")
    assert [m.version for m in p.pending] == [2]


def test_connect_errors_are_classified():
    assert connect.classify_connect_error('FATAL:  password authentication failed for user "x"') == "auth"
    assert connect.classify_connect_error('FATAL:  database "x" does not exist') == "no_database"
    refused = "connection to server at \"127.0.0.1\", port 1 failed: Connection refused"
    assert connect.classify_connect_error(refused) == "down"
    assert connect.classify_connect_error("FATAL:  the database system is starting up") == "down"


def test_advisory_key_is_stable_and_signed_64_bit():
    key = pm.advisory_key("stock_monitoring", "pg_migrate_history")
    assert key == pm.advisory_key("stock_monitoring", "pg_migrate_history")
    assert -(2**63) <= key < 2**63
    assert key != pm.advisory_key("other", "pg_migrate_history")


def test_a_lock_schedule_expands_its_entries_and_no_entry_means_one_attempt():
    schedule = pm.lock_schedule([{"lock_timeout": "100ms", "sleep": "50ms", "times": 2},
                                 {"lock_timeout": "1s", "sleep": "2s"}])
    assert [(a.lock_timeout, a.pause) for a in schedule] == [("100ms", 0.05), ("100ms", 0.05), ("1s", 2.0)]
    assert [(a.lock_timeout, a.pause) for a in pm.lock_schedule([])] == [(None, 0.0)]
    assert pm.seconds("250") == 0.25 and pm.seconds("1.5min") == 90.0
    with pytest.raises(ValueError, match="'soon' is not a duration"):
        pm.lock_schedule([{"lock_timeout": "soon", "sleep": "1s"}])


@pytest.mark.parametrize("entry, words", [
    ({"lock_timeout": "20ms", "sleep": "1s", "times": 10**12}, "at most 1000 attempts"),
    ({"lock_timeout": "0", "sleep": "1s", "times": 1}, "more than 0"),
    ({"lock_timeout": "2h", "sleep": "1s", "times": 1}, "at most 1h"),
])
def test_a_lock_schedule_is_bounded_before_it_is_expanded(entry, words):
    with pytest.raises(ValueError, match=words):
        pm.lock_schedule([entry])


def test_a_lock_schedule_refuses_an_entry_of_no_attempt():
    with pytest.raises(ValueError, match="times is 0"):
        pm.lock_schedule([{"lock_timeout": "100ms", "sleep": "1s", "times": 0}])


def test_no_writable_server_is_told_apart_from_a_server_that_is_down_whatever_the_libpq():
    for message in ('connection to server at "db2" (10.0.0.2), port 5432 failed: session is read-only',
                    'connection to server at "db2", port 5432 failed: server is in hot standby mode',
                    'could not make a writable connection to server "db2:5432"'):  # libpq 10 to 13
        assert connect.classify_connect_error(message) == "standby"
    assert connect.classify_connect_error('connection to server at "db2", port 5432 failed: Connection refused') == "down"


def test_a_file_of_comments_only_is_a_no_op_and_a_cut_statement_is_the_servers_to_judge():
    empty, cut = load({"001_empty.sql": "-- reserved\n/* for later */\n", "002_cut.sql": "SELECT 1;\nCREATE TABLE t (id"})
    assert empty.problem is None and empty.transactional and empty.statements == []
    assert cut.problem is None and cut.statements is None  # sent whole: the server names the syntax error


@pytest.mark.parametrize("text", [
    "/* License: MIT\n * (c) 2026 */\n-- pg_migrate:no-transaction\nCREATE INDEX CONCURRENTLY i ON t (id);\n",
    "/*\n * pg_migrate:no-transaction\n */\nCREATE INDEX CONCURRENTLY i ON t (id);\n",
    "/* outer /* nested */ still outer */\r\n-- pg_migrate:no-transaction\r\nSELECT 1;",
])
def test_the_marker_may_stand_in_any_of_the_leading_comments(text):
    assert not sql.is_transactional(text)
    assert not sql.is_transactional("-- pg_migrate:no-transaction\n" + text)
    assert sql.is_transactional("SELECT 1;\n" + text)


def test_statements_split_as_psql_splits_them_when_the_parser_cannot_read_the_file():
    """The grammar of the controller's pglast may refuse words an older server takes (system_user became a
    keyword in 16): psql's own rule splits then, routine bodies included."""
    text = ("CREATE TABLE audit (id int, system_user text);\n"
            "CREATE OR REPLACE FUNCTION f(system_user int) RETURNS int LANGUAGE sql\n"
            "BEGIN ATOMIC SELECT 1; SELECT CASE WHEN system_user > 0 THEN 2 END; END;\n"
            "CREATE RULE r AS ON INSERT TO audit DO ALSO (INSERT INTO log VALUES (1); UPDATE log SET id = 2);\n"
            "SELECT 'a;b' -- ; not here\n;;\nSELECT 3")
    pieces = [text[piece] for piece in sql.psql_split(text)]
    assert [p.split()[0] for p in pieces] == ["CREATE", "CREATE", "CREATE", "SELECT", "SELECT"]
    assert pieces[1].endswith("END") and pieces[3] == "SELECT 'a;b'" and pieces[4] == "SELECT 3"
    found = sql.analyse("001_x.sql", "-- pg_migrate:no-transaction\n" + text)
    assert "problem" not in found and len(found["statements"]) == 5


def test_a_migration_whose_extension_is_not_lower_case_sql_is_refused_not_skipped(tmp_path):
    (tmp_path / "022_a.sql").write_text("SELECT 1;")
    (tmp_path / "024_b.SQL").write_text("SELECT 1;")
    with pytest.raises(AnsibleError, match=r"024_b\.SQL ends in \.SQL: .* rename it to 024_b\.sql"):
        load_library("migration_files", "roles/stock_monitoring_db/lookup_plugins").read_migrations(str(tmp_path))


@pytest.mark.parametrize("statement, once", [
    ("/* c */ DO $$BEGIN COMMIT; END$$", "may_commit"),
    ("CALL stock_monitoring.step()", "may_commit"),
    ("CREATE UNIQUE INDEX CONCURRENTLY i ON t (a)", "concurrently"),
    ("REINDEX (VERBOSE, TABLESPACE t, CONCURRENTLY) INDEX i", "concurrently"),
    ("ALTER TABLE p DETACH PARTITION p1 CONCURRENTLY", "concurrently"),
    ("REFRESH MATERIALIZED VIEW CONCURRENTLY v", None),
    ("-- CONCURRENTLY in a comment\nALTER TABLE t ADD COLUMN c int", None),
])
def test_statements_that_must_not_run_twice_are_known_by_their_tokens(statement, once):
    assert sql.run_once(statement) == once


def test_one_duration_reader_serves_the_timeouts_and_the_lock_schedule():
    """PostgreSQL takes 1.5s for lock_timeout; it does not take Arabic-Indic digits, which \\d would."""
    module = load_library("pg_migrate")
    params = {"lock_timeout": "1.5s", "statement_timeout": "15min", "lock_retries": [],
              "login_host": "h", "login_user": "u", "login_password": "", "login_db": "d", "maintenance_db": "postgres",
              "application_name": "a", "require_auth": "", "connect_timeout": 10, "progress_interval": 5, "schema": "s",
              "history_table": "pg_migrate_history", "plan_out": False, "expected_plan": None, "verify": False,
              "drop_schema": False}
    assert module.input_problem(params) is None and pm.seconds("1.5s") == 1.5
    with pytest.raises(ValueError, match="is not a duration"):
        pm.seconds("\u0665s")
    assert "is not a PostgreSQL duration" in module.input_problem({**params, "lock_timeout": "\u0665s"})


def test_every_option_but_the_internal_ones_is_documented():
    """validate-modules is told to accept the undocumented `_` options; this keeps the rest documented."""
    module = load_library("pg_migrate")
    documented = set(yaml.safe_load(module.DOCUMENTATION)["options"])
    public = {name for name in module.ARGUMENT_SPEC if not name.startswith("_")}
    assert public == documented
    assert {name for name in module.ARGUMENT_SPEC if name.startswith("_")} == {
        "_findings", "_migrations_path", "_migrations_sha256", "_controller_pid", "_progress_token"}


def test_the_role_documents_its_defaults_as_they_are():
    """meta/argument_specs.yml repeats defaults of defaults/main.yml for ansible-doc (the expected tables among
    them); where it does, they must agree. Every variable is in both."""
    specs = yaml.safe_load((ROOT / "roles" / "stock_monitoring_db" / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert set(options) == set(DEFAULTS)
    assert {name: spec["default"] for name, spec in options.items() if "default" in spec} == {
        name: DEFAULTS[name] for name, spec in options.items() if "default" in spec}
