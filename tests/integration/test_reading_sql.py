"""Reading SQL as psql and PostgreSQL do: every file runs exactly what `psql -f` runs, or is refused,
naming the line, before anything runs. Real files against a real server, side by side with psql."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import Db, load_library, module_params, run_module

sql = load_library("pg_migrate", "action_plugins")
NO_TX = "-- pg_migrate:no-transaction\n"


def catalog(db: Db, schema: str = "public") -> list[tuple]:
    """What a file made: relations with their columns, functions, rules and indexes, and the rows of t."""
    objects = db.query(
        "SELECT c.relname, c.relkind, string_agg(a.attname || ':' || format_type(a.atttypid, a.atttypmod), ',' "
        "ORDER BY a.attnum) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 WHERE n.nspname = %s "
        "AND c.relname NOT LIKE 'pg_migrate_history%%' GROUP BY 1, 2 ORDER BY 1", (schema,))
    routines = db.query("SELECT p.proname, pg_get_function_arguments(p.oid) FROM pg_proc p "
                        "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s ORDER BY 1", (schema,))
    rules = db.query("SELECT rulename, definition FROM pg_rules WHERE schemaname = %s ORDER BY 1", (schema,))
    rows = db.query("SELECT * FROM t ORDER BY 1") if db.query("SELECT to_regclass('public.t')")[0][0] else []
    return [*objects, *routines, *rules, *rows]


def same_as_psql(tmp_path, cluster, name: str, text: str) -> tuple[Db, dict]:
    """Apply one file with pg_migrate and with `psql -f`; both databases must end up the same."""
    ours, theirs = Db(cluster, f"{tmp_path.name[-20:]}_ours".lower()), Db(cluster, f"{tmp_path.name[-20:]}_psql".lower())
    for d in (ours, theirs):
        d.drop()
        d.create()
    path = tmp_path / name
    path.write_bytes(text.encode())
    theirs.psql_files(path)
    res, run = run_module(tmp_path, "pg_migrate", module_params(ours, migrations={name: text}, schema="public",
                                                                expected_tables=None))
    assert run.rc == 0, run.output
    assert catalog(ours) == catalog(theirs) != []
    theirs.drop()
    return ours, res


@pytest.fixture
def cleanup(cluster):
    made: list[Db] = []
    yield made
    for d in made:
        d.drop()


SAME_AS_PSQL = {
    "cr_only_line_endings": "-- old Mac editor\rCREATE TABLE t (id int);\r-- a comment\rINSERT INTO t VALUES (1);\r"
                            "-- another\rINSERT INTO t VALUES (2);\r",
    "non_ascii_identifiers": "CREATE TABLE prix_café (prix numeric);\nCREATE VIEW v AS SELECT 1 AS 名前;\n"
                             "CREATE TABLE t (id int);\nINSERT INTO t SELECT 1 FROM prix_café RIGHT JOIN v ON true;\n",
    "rule_with_several_actions": "CREATE TABLE t (id int);\nCREATE TABLE log (id int);\n"
                                 "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO log VALUES (1); "
                                 "UPDATE log SET id = 2);\nINSERT INTO t VALUES (7);\n",
    "empty_statements": "CREATE TABLE t (id int);;\n;\nINSERT INTO t VALUES (1);;;\n",
    "parameter_named_atomic_then_concurrently": NO_TX + "CREATE TABLE t (id int);\n"
        "CREATE FUNCTION f(atomic boolean) RETURNS int LANGUAGE sql AS 'SELECT 1';\n"
        "CREATE FUNCTION g(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT x; SELECT x + 1; END;\n"
        "CREATE INDEX CONCURRENTLY t_id ON t (id);\nINSERT INTO t VALUES (1);\n",
    "quotes_comments_and_dollar_quotes": "CREATE TABLE t (v text DEFAULT 'a;b''c');\n/* block; /* nested; */ still; */\n"
        "CREATE FUNCTION f() RETURNS text LANGUAGE plpgsql AS $body$ BEGIN RETURN ';'; END $body$;\n"
        "INSERT INTO t SELECT E'it\\'s;' || \"we;ird\" FROM (SELECT 'x' AS \"we;ird\") s;\n",
}


@pytest.mark.parametrize("case", sorted(SAME_AS_PSQL))
def test_files_run_exactly_as_psql_runs_them(tmp_path, cluster, cleanup, case):
    db, res = same_as_psql(tmp_path, cluster, "001_case.sql", SAME_AS_PSQL[case])
    cleanup.append(db)
    assert res["applied"][0]["transactional"] == (not SAME_AS_PSQL[case].startswith(NO_TX))


def test_marker_counts_only_in_the_leading_comment_lines(tmp_path, db):
    """A marker inside a block comment mid-file keeps the file transactional: a later error undoes it all."""
    db.create()
    text = "CREATE TABLE a (id int);\n/*\n-- pg_migrate:no-transaction\n*/\nCREATE TABLE b (id int);\nSELECT 1/0;\n"
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations={"001_x.sql": text}, schema="public",
                                                                expected_tables=None))
    assert run.rc != 0 and "rolled back" in res["msg"]
    assert db.query("SELECT to_regclass('a'), to_regclass('b')")[0] == (None, None)
    assert sql.is_transactional(text)
    assert not sql.is_transactional("\n  \r-- header\r\n-- pg_migrate:no-transaction\nSELECT 1;")
    assert sql.is_transactional("SELECT 1;\n-- pg_migrate:no-transaction\n")


def test_each_file_starts_from_the_session_defaults(tmp_path, db):
    """SET search_path or session_replication_role in one file does not leak into the next (psql -f per file)."""
    db.create()
    files = {
        "001_base.sql": "CREATE SCHEMA elsewhere;\nCREATE TABLE parent (id int PRIMARY KEY);\n",
        "002_settings.sql": "SET search_path = elsewhere;\nSET session_replication_role = replica;\n"
                            "SET ROLE NONE;\nCREATE TEMP TABLE scratch (id int);\n",
        "003_after.sql": "CREATE TABLE child (parent_id int REFERENCES parent);\n"
                         "CREATE TEMP TABLE scratch (id int);\n",
        "004_fk.sql": "INSERT INTO child VALUES (42);\n",
    }
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=files, schema="public",
                                                                expected_tables=None))
    assert run.rc != 0 and "004_fk.sql" in res["msg"] and "SQLSTATE 23503" in res["msg"], res
    assert db.query("SELECT to_regclass('public.child') IS NOT NULL, to_regclass('elsewhere.child') IS NULL")[0] \
        == (True, True)
    assert [r[0] for r in db.history("public")] == [1, 2, 3]


@pytest.mark.parametrize("text, line, words", [
    ("CREATE TABLE t (id int);\nCOPY t FROM stdin;\n1\n\\.\n", 2, "COPY ... FROM stdin"),
    ("CREATE TABLE t (id int);\nCOPY t (id) FROM STDIN WITH (FORMAT csv);\n1\n\\.\n", 2, "COPY ... FROM stdin"),
    ("SELECT 1 AS x \\gset\nCREATE TABLE t (id int);\n", 1, "\\gset is a psql meta-command"),
    ("CREATE TABLE t (id int);\nSELECT 1 \\; SELECT 2;\n", 2, "\\; is a psql meta-command"),
    ("\\set ON_ERROR_STOP on\nCREATE TABLE t (id int);\n", 1, "\\set is a psql meta-command"),
    ("CREATE TABLE t (v text);\nSET standard_conforming_strings = off;\nINSERT INTO t VALUES ('a\\'; DROP TABLE t; --');\n",
     2, "changes standard_conforming_strings"),
    ("CREATE TABLE t (id int);\nCOMMIT;\nCREATE TABLE u (id int);\n", 2, "it starts with COMMIT"),
    ("START TRANSACTION;\nCREATE TABLE t (id int);\n", 1, "it starts with START"),
    ("CREATE TABLE t (id int);\n\0\nCREATE TABLE u (id int);\n", 2, "it holds a NUL character"),
    ("CREATE TABLE t (id int);\nCREATE INDEX CONCURRENTLY t_id ON t (id);\n", 2,
     "CREATE INDEX CONCURRENTLY cannot run inside a transaction block"),
    ("CREATE TABLE t (v text DEFAULT 'never closed);\n", 1, "unterminated quoted string"),
])
def test_what_cannot_run_is_refused_naming_the_line_before_anything_runs(tmp_path, db, text, line, words):
    db.create()
    files = {"001_ok.sql": "CREATE TABLE ok (id int);\n", "002_x.sql": text}
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=files, schema="public",
                                                                expected_tables=None))
    assert run.rc != 0 and f"Migration 002_x.sql, line {line}: " in res["msg"] and words in res["msg"], res["msg"]
    assert "connection to the server was lost" not in res["msg"] and "Traceback" not in run.output
    assert db.query("SELECT to_regclass('ok'), to_regclass('t')")[0] == (None, None)  # nothing ran, 001 neither


@pytest.mark.parametrize("text, sqlstate", [
    ("CREATE TABLE t (id int);\nDO $$ BEGIN INSERT INTO t VALUES (1); COMMIT; END $$;\n", "2D000"),
    ("CREATE TYPE mood AS ENUM ('ok');\nALTER TYPE mood ADD VALUE 'great';\nSELECT 'great'::mood;\n", "55P04"),
])
def test_a_failure_that_the_no_transaction_marker_would_fix_says_so(tmp_path, db, text, sqlstate):
    db.create()
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations={"001_x.sql": text}, schema="public",
                                                                expected_tables=None))
    assert run.rc != 0 and f"SQLSTATE {sqlstate}" in res["msg"], res["msg"]
    assert "with '-- pg_migrate:no-transaction' in its first lines" in res["msg"] and "rolled back" in res["msg"]


def test_a_database_name_cut_mid_character_is_refused_clearly(tmp_path, cluster):
    name = "données_" + "é" * 30  # 68 bytes in UTF-8: PostgreSQL would cut it inside a character
    res, run = run_module(tmp_path, "pg_migrate", module_params(Db(cluster, name), on_missing_database="create"))
    assert run.rc != 0 and "bytes long in UTF-8; PostgreSQL names hold at most 63 bytes" in res["msg"]
    assert "Traceback" not in run.output and "UnicodeDecodeError" not in run.output


def test_every_file_that_cannot_run_is_named_in_one_run_and_in_the_plan(tmp_path, db):
    db.create()
    files = {"001_ok.sql": "CREATE TABLE ok (id int);\n",
             **{f"00{n}_wrapped.sql": f"BEGIN;\nCREATE TABLE t{n} (id int);\nCOMMIT;\n" for n in (2, 3, 4)}}
    for check in (True, False):
        res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=files, schema="public",
                                                                    expected_tables=None), check=check)
        assert run.rc != 0 and "3 migration files cannot run: " in res["msg"], res["msg"]
        for n in (2, 3, 4):
            assert f"Migration 00{n}_wrapped.sql, line 1: it starts with BEGIN" in res["msg"]
    assert db.query("SELECT to_regclass('ok')")[0] == (None,)


def test_a_database_reading_strings_with_standard_conforming_strings_off_is_refused_before_anything_runs(tmp_path, db):
    """Read with the setting on (the default), the COMMIT below is inside a string; a server reading with it off
    sees a quote escaped there, then the COMMIT as a statement, which would commit half the file."""
    db.create()
    db.query(f'ALTER DATABASE "{db.name}" SET standard_conforming_strings = off', dbname="postgres")
    files = {"001_t.sql": "CREATE TABLE t (v text);\n",
             "002_x.sql": "CREATE TABLE half (id int);\nSELECT '\\' || ' ; COMMIT; SELECT 1; --' || '\\';\n"}
    assert sql.analyse("002_x.sql", files["002_x.sql"]) == {}  # nothing the controller would refuse
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=files, schema="public",
                                                                expected_tables=None))
    assert run.rc != 0 and "reads strings with standard_conforming_strings = off" in res["msg"], res["msg"]
    assert "read 002_x.sql with it on" in res["msg"] and "Nothing was run" in res["msg"]
    assert db.query("SELECT to_regclass('t'), to_regclass('half')")[0] == (None, None)


@pytest.mark.every_major
def test_an_index_left_invalid_by_a_failed_concurrent_build_fails_the_deploy_until_it_is_dropped(tmp_path, db):
    db.create()
    db.query("CREATE TABLE public.prices (symbol text); INSERT INTO public.prices VALUES ('A'), ('A')")
    files = {"001_unique.sql": NO_TX + "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS prices_symbol_key "
                                       "ON public.prices (symbol);\n"}
    params = module_params(db, migrations=files, schema="public", expected_tables=None)
    res, run = run_module(tmp_path, "pg_migrate", params)
    assert run.rc != 0 and "SQLSTATE 23505" in res["msg"], res["msg"]
    db.query("DELETE FROM public.prices WHERE ctid = (SELECT max(ctid) FROM public.prices)")  # the duplicate fixed
    res, run = run_module(tmp_path, "pg_migrate", params)  # IF NOT EXISTS skips the INVALID index
    assert run.rc != 0 and "the managed schema has INVALID indexes: public.prices_symbol_key" in res["msg"], res
    assert "DROP INDEX CONCURRENTLY public.prices_symbol_key" in res["msg"]
    assert db.query("SELECT to_regclass('public.pg_migrate_history')") == [(None,)]  # not recorded
    db.query("DROP INDEX CONCURRENTLY public.prices_symbol_key")
    res, run = run_module(tmp_path, "pg_migrate", params)
    assert run.rc == 0 and [r[0] for r in db.history("public")] == [1], res
    assert db.query("SELECT indisvalid FROM pg_index WHERE indexrelid = 'public.prices_symbol_key'::regclass") == [(True,)]


@pytest.mark.every_major
@pytest.mark.parametrize("text", [
    "CREATE TABLE audit (id int, system_user text);\nCREATE TABLE t (id int);\n",
    "CREATE FUNCTION json_table(x int) RETURNS int LANGUAGE sql AS 'SELECT x';\nCREATE TABLE t (id int);\n",
    "CREATE TABLE t (a int, UNIQUE NULLS NOT DISTINCT (a));\n",  # syntax of 15 and later
    "CREATE TABLE t (id int);\nCREATE TABLE u (id int",  # cut short: the server says where
], ids=["system_user", "json_table", "nulls_not_distinct", "cut_short"])
def test_words_that_later_majors_made_keywords_are_the_servers_to_judge(tmp_path, cluster, cleanup, text):
    """Refused or not, exactly as psql on the same server: never by the controller's newer grammar."""
    ours, theirs = (Db(cluster, f"{tmp_path.name[-20:]}_{side}".lower()) for side in ("ours", "psql"))
    for d in (ours, theirs):
        d.drop()
        d.create()
        cleanup.append(d)
    path = tmp_path / "001_x.sql"
    path.write_text(text)
    psql_ok = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-1", "-d", theirs.name, "-f", str(path)],
                             env={**os.environ, **cluster.env()}, capture_output=True).returncode == 0
    res, run = run_module(tmp_path, "pg_migrate", module_params(ours, migrations={"001_x.sql": text}, schema="public",
                                                                expected_tables=None))
    assert (run.rc == 0) == psql_ok, res
    if psql_ok:
        assert catalog(ours) == catalog(theirs) != []
    else:
        assert "Migration 001_x.sql failed at line " in res["msg"] and "SQLSTATE 42601" in res["msg"], res["msg"]
        assert "rolled back" in res["msg"] and "Traceback" not in run.output


def test_a_file_of_comments_only_is_recorded_as_applied_as_psql_runs_it(tmp_path, db):
    db.create()
    files = {"001_t.sql": "CREATE TABLE t (id int);\n", "002_reserved.sql": "-- reserved for the billing team\n",
             "003_u.sql": "CREATE TABLE u (id int);\n"}
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=files, schema="public",
                                                                expected_tables=None))
    assert run.rc == 0 and [r[0] for r in db.history("public")] == [1, 2, 3], res


def test_a_marker_under_a_block_comment_header_runs_the_file_outside_a_transaction(tmp_path, db):
    db.create()
    files = {"001_t.sql": "CREATE TABLE t (id int);\n",
             "002_index.sql": "/*\n * Copyright 2026\n */\n-- pg_migrate:no-transaction\n"
                              "CREATE INDEX CONCURRENTLY t_id ON t (id);\n"}
    res, run = run_module(tmp_path, "pg_migrate", module_params(db, migrations=files, schema="public",
                                                                expected_tables=None))
    assert run.rc == 0 and res["applied"][1]["transactional"] is False, res
    assert db.query("SELECT to_regclass('public.t_id') IS NOT NULL") == [(True,)]
