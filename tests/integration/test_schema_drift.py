"""The whole schema against the canonical schema file (make schema), on a real PostgreSQL: each kind of
hand-made change is named, and what is not drift is not reported."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
from conftest import MIGRATIONS, ROOT, play, write_migrations

SCHEMA_SCRIPT = ROOT / "scripts" / "schema.py"


def said(output: str) -> str:
    """The run's output with the YAML callback's line folding and quote doubling undone."""
    return " ".join(output.replace("''", "'").split())


@pytest.mark.every_major
def test_a_fresh_deploy_matches_the_schema_file_and_verify_says_so(tmp_path, db):
    res = play(tmp_path, db)
    assert res.rc == 0 and "schema: matches the schema file" in res.output, res.output
    res = play(tmp_path, db, "verify-db.yml")
    assert res.rc == 0 and "schema: matches the schema file" in res.output, res.output


HAND_MADE = {
    "ALTER TABLE stock_monitoring.alerts ADD COLUMN bars_hotfix int":
        "alerts.bars_hotfix: column not in the schema file",
    "ALTER TABLE stock_monitoring.watchlist_items DROP COLUMN note":
        "watchlist_items.note: column missing",
    "ALTER TABLE stock_monitoring.alerts ALTER COLUMN threshold TYPE numeric(20,8)":
        "alerts.threshold: type differs: numeric(18,6) in the schema file, numeric(20,8) in the database",
    "ALTER TABLE stock_monitoring.alerts ALTER COLUMN last_triggered_at SET NOT NULL":
        "alerts.last_triggered_at: NOT NULL differs: no in the schema file, yes in the database",
    "ALTER TABLE stock_monitoring.alerts ALTER COLUMN cooldown SET DEFAULT '02:00:00'":
        "alerts.cooldown: default differs: '01:00:00'::interval in the schema file, '02:00:00'::interval in the database",
    "DROP INDEX stock_monitoring.audit_log_entity_idx":
        "index audit_log_entity_idx: missing",
    "DROP INDEX stock_monitoring.alerts_user_id_idx; "
    "CREATE INDEX alerts_user_id_idx ON stock_monitoring.alerts (user_id, symbol)":
        "index alerts_user_id_idx: definition differs: CREATE INDEX alerts_user_id_idx ON stock_monitoring.alerts "
        "USING btree (user_id) in the schema file, CREATE INDEX alerts_user_id_idx ON stock_monitoring.alerts "
        "USING btree (user_id, symbol) in the database",
    "ALTER TABLE stock_monitoring.audit_log DROP CONSTRAINT audit_log_action_check":
        "constraint audit_log.audit_log_action_check: missing",
    "ALTER TABLE stock_monitoring.watchlists DROP CONSTRAINT watchlists_updated_after_created, "
    "ADD CONSTRAINT watchlists_updated_after_created CHECK (updated_at > created_at)":
        "constraint watchlists.watchlists_updated_after_created: definition differs: "
        "CHECK ((updated_at >= created_at)) in the schema file, CHECK ((updated_at > created_at)) in the database",
    "CREATE FUNCTION stock_monitoring.touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$; "
    "CREATE TRIGGER notifications_touch BEFORE UPDATE ON stock_monitoring.notifications "
    "FOR EACH ROW EXECUTE FUNCTION stock_monitoring.touch()":
        "trigger notifications.notifications_touch: not in the schema file",
}


@pytest.mark.every_major
def test_verify_names_each_change_made_by_hand_and_a_deploy_reports_them(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    db.query("; ".join(HAND_MADE))
    res = play(tmp_path, db, "verify-db.yml")
    assert res.rc != 0 and "schema differs from the schema file" in res.output
    for expected in [*HAND_MADE.values(), "function stock_monitoring.touch(): not in the schema file"]:
        assert expected in said(res.output), f"{expected!r} not in:\n{res.output}"
    # A deploy reports them and goes on (a deploy is not the place to undo a hotfix), unless told to fail.
    res = play(tmp_path, db)
    assert res.rc == 0 and "schema: differs from the schema file (12): " in said(res.output), res.output
    res = play(tmp_path, db, extra={"stock_monitoring_db_schema_drift": "fail"})
    assert res.rc != 0 and "alerts.bars_hotfix: column not in the schema file" in res.output


@pytest.mark.every_major
def test_an_invalid_index_is_drift(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    db.query("UPDATE pg_index SET indisvalid = false "
             "WHERE indexrelid = 'stock_monitoring.notifications_dedupe_key_key'::regclass")
    res = play(tmp_path, db, "verify-db.yml")
    assert res.rc != 0 and "index notifications_dedupe_key_key: definition differs: " in said(res.output), res.output
    assert "(dedupe_key) (INVALID) in the database" in said(res.output), res.output


@pytest.mark.every_major
def test_rows_vacuum_a_recreated_index_and_a_column_readded_alike_are_not_drift(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    db.query("INSERT INTO stock_monitoring.watchlists (user_id, name) SELECT 'u' || i, 'w' FROM generate_series(1, 500) i")
    db.query("VACUUM ANALYZE stock_monitoring.watchlists")
    db.query("DROP INDEX stock_monitoring.alerts_user_id_idx; "
             "CREATE INDEX alerts_user_id_idx ON stock_monitoring.alerts (user_id)")
    db.query("ALTER TABLE stock_monitoring.watchlist_items DROP COLUMN note; ALTER TABLE stock_monitoring.watchlist_items "
             "ADD COLUMN note text CHECK (note IS NULL OR length(note) <= 1000)")
    res = play(tmp_path, db, "verify-db.yml")
    assert res.rc == 0 and "schema: matches the schema file" in res.output, res.output


def deployed_with(tmp_path, db, more: dict[str, str]) -> dict:
    """022/023 and `more` deployed, with a schema file made from them (make schema's script): the extra
    variables that deploy and verify them."""
    folder = write_migrations(tmp_path / "m", more, with_real=True)
    schema_file = tmp_path / "schema.json"
    made = subprocess.run([sys.executable, str(SCHEMA_SCRIPT), "--migrations", str(folder), "--file", str(schema_file)],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stdout + made.stderr
    extra = {"stock_monitoring_db_migrations_dir": str(folder), "stock_monitoring_db_schema_file": str(schema_file)}
    assert play(tmp_path, db, extra=extra).rc == 0
    return extra


@pytest.mark.every_major
def test_a_changed_function_body_or_view_is_named(tmp_path, db):
    """The schema file is made on the machine's major (make schema), the database may be of any other."""
    more = {"024_normalise.sql": "CREATE FUNCTION stock_monitoring.normalise_symbol(s text) RETURNS text "
                                 "LANGUAGE sql IMMUTABLE RETURN upper(s);\n"
                                 "CREATE VIEW stock_monitoring.enabled_alerts AS SELECT id, symbol "
                                 "FROM stock_monitoring.alerts WHERE enabled;\n"}
    extra = deployed_with(tmp_path, db, more)
    res = play(tmp_path, db, "verify-db.yml", extra=extra)
    assert res.rc == 0 and "schema: matches the schema file" in res.output, res.output
    db.query("CREATE OR REPLACE FUNCTION stock_monitoring.normalise_symbol(s text) RETURNS text "
             "LANGUAGE sql IMMUTABLE RETURN lower(s)")
    db.query("CREATE OR REPLACE VIEW stock_monitoring.enabled_alerts AS SELECT id, symbol "
             "FROM stock_monitoring.alerts WHERE NOT enabled")
    res = play(tmp_path, db, "verify-db.yml", extra=extra)
    assert res.rc != 0 and "function stock_monitoring.normalise_symbol(text): definition differs" in res.output, res.output
    assert "view enabled_alerts: definition differs" in res.output, res.output


@pytest.mark.every_major
def test_adopting_a_database_migrated_by_hand_says_whether_it_matches_the_schema_file(tmp_path, db):
    db.create().psql_files(*sorted(MIGRATIONS.glob("*.sql")))
    db.query("ALTER TABLE stock_monitoring.alerts ADD COLUMN bars_hotfix int")
    res = play(tmp_path, db)
    assert res.rc == 0 and "adopted a schema that was migrated by hand" in res.output, res.output
    assert "schema: differs from the schema file (1): alerts.bars_hotfix: column not in the schema file" in said(res.output)


def test_a_database_with_other_migrations_is_not_compared_and_says_why(tmp_path, db):
    folder = write_migrations(tmp_path / "m", {"024_more.sql": "CREATE TABLE stock_monitoring.more (id int);\n"},
                              with_real=True)
    res = play(tmp_path, db, extra={"stock_monitoring_db_migrations_dir": str(folder)})
    assert res.rc == 0 and "schema: not compared: the migrations applied are not those the schema file was made from " \
        "(024_more.sql: not in the schema file)" in said(res.output), res.output


def test_lint_fails_when_the_schema_file_is_stale_naming_the_migration(tmp_path):
    folder = write_migrations(tmp_path / "m", {"024_more.sql": "CREATE TABLE stock_monitoring.more (id int);\n"},
                              with_real=True)
    check = [sys.executable, str(SCHEMA_SCRIPT), "--check", "--migrations", str(folder)]
    res = subprocess.run(check, capture_output=True, text=True)
    assert res.returncode != 0 and "is stale (024_more.sql: not in the schema file): run make schema" in res.stderr
    res = subprocess.run([*check[:-1], str(MIGRATIONS)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    described = json.loads((ROOT / "roles" / "stock_monitoring_db" / "files" / "schema.json").read_text())
    assert sorted(described["migrations"]) == sorted(p.name for p in MIGRATIONS.glob("*.sql"))


def test_a_table_held_by_maintenance_neither_hides_what_was_applied_nor_passes_verify(tmp_path, db):
    """The comparison reads definitions with PostgreSQL's deparse functions, which take ACCESS SHARE on each
    table: with one held (VACUUM FULL, a long ALTER), the deploy still reports what it applied, and says it
    could not compare and who holds the table; verify, whose job the comparison is, fails saying so."""
    only_022 = write_migrations(tmp_path / "m", {}, with_real=True)
    (only_022 / "023_stock_monitoring_notifications.sql").unlink()
    assert play(tmp_path, db, extra={"stock_monitoring_db_migrations_dir": str(only_022),
                                     "stock_monitoring_db_expected_tables": ["alerts", "audit_log", "watchlist_items",
                                                                             "watchlists"]}).rc == 0
    holder = db.connect(autocommit=False)
    holder.cursor().execute("SET application_name = 'maintenance'; "
                            "LOCK TABLE stock_monitoring.audit_log IN ACCESS EXCLUSIVE MODE")
    pid = holder.get_backend_pid()
    try:
        res = play(tmp_path, db)
        out = said(res.output)
        assert res.rc == 0 and "applied: 023_stock_monitoring_notifications.sql" in out, res.output
        assert "schema: not compared: table audit_log is locked" in out and f"pid {pid}" in out, res.output
        assert [r[0] for r in db.history()] == [22, 23]
        res = play(tmp_path, db, "verify-db.yml")
        out = said(res.output)
        assert res.rc != 0 and "schema not compared: table audit_log is locked" in out and f"pid {pid}" in out, out
    finally:
        holder.close()
    assert play(tmp_path, db, "verify-db.yml").rc == 0


BEHAVIOUR = {
    "CREATE RULE discard AS ON INSERT TO stock_monitoring.alerts DO INSTEAD NOTHING":
        "rule alerts.discard: not in the schema file",
    "ALTER TABLE stock_monitoring.watchlist_items DISABLE TRIGGER ALL":
        "table watchlist_items: triggers that enforce foreign keys differ: enabled in the schema file, disabled in "
        "the database",
    "ALTER TABLE stock_monitoring.audit_log SET UNLOGGED":
        "table audit_log: persistence differs: logged in the schema file, unlogged in the database",
    'ALTER TABLE stock_monitoring.alerts ALTER COLUMN symbol TYPE text COLLATE "C"':
        'alerts.symbol: collation differs: none in the schema file, "C" in the database',
    "ALTER TABLE stock_monitoring.alerts SET (autovacuum_enabled = false)":
        "table alerts: options differ: none in the schema file, autovacuum_enabled=false in the database",
    "ALTER TABLE stock_monitoring.notifications ENABLE ROW LEVEL SECURITY":
        "table notifications: row level security differs: off in the schema file, on in the database",
    "CREATE TYPE stock_monitoring.mood AS ENUM ('calm')":
        "type stock_monitoring.mood: not in the schema file",
}


@pytest.mark.every_major
def test_verify_names_what_the_migrations_did_not_create_and_each_change_of_behaviour(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    db.query("; ".join(BEHAVIOUR))
    res = play(tmp_path, db, "verify-db.yml")
    assert res.rc != 0 and "schema differs from the schema file" in res.output, res.output
    for expected in BEHAVIOUR.values():
        assert expected in said(res.output), f"{expected!r} not in:\n{said(res.output)}"


@pytest.mark.every_major
def test_an_operator_planted_by_a_role_with_create_on_the_schema_is_drift_and_so_is_that_role(tmp_path, db):
    """The search_path attack (CVE-2018-1058): a role with USAGE and CREATE on the schema adds
    stock_monitoring.=(text, text) meaning "not equal", which queries under search_path = stock_monitoring,
    pg_catalog then use instead of pg_catalog's."""
    assert play(tmp_path, db).rc == 0
    mallory = f"mallory_{uuid.uuid4().hex[:8]}"
    db.query(f"CREATE ROLE {mallory} LOGIN PASSWORD 'Ma-{uuid.uuid4().hex}'; "
             f"GRANT USAGE, CREATE ON SCHEMA stock_monitoring TO {mallory}")
    try:
        db.query(f"SET ROLE {mallory}; CREATE FUNCTION stock_monitoring.neq(text, text) RETURNS boolean LANGUAGE sql "
                 "IMMUTABLE AS 'SELECT $1 <> $2'; CREATE OPERATOR stock_monitoring.= (LEFTARG = text, RIGHTARG = text, "
                 "FUNCTION = stock_monitoring.neq)")
        db.query("INSERT INTO stock_monitoring.watchlists (user_id, name) VALUES ('alice', 'a'), ('bob', 'b')")
        rows = db.query("SET search_path = stock_monitoring, pg_catalog; SELECT user_id FROM watchlists "
                        "WHERE user_id = 'alice'")
        assert rows == [("bob",)]  # the attack works: what verify must catch
        res = play(tmp_path, db, "verify-db.yml")
        out = said(res.output)
        assert res.rc != 0, out
        assert "operator stock_monitoring.=(pg_catalog.text,pg_catalog.text): not in the schema file" in out, out
        assert "function stock_monitoring.neq(text,text): not in the schema file" in out, out
        assert f"schema stock_monitoring: role {mallory} can CREATE in it and is not its owner" in out, out
    finally:
        db.query(f"DROP OWNED BY {mallory}; DROP ROLE {mallory}")


@pytest.mark.every_major
def test_a_disabled_trigger_of_a_migration_is_drift(tmp_path, db):
    more = {"024_touch.sql": "CREATE FUNCTION stock_monitoring.touch() RETURNS trigger LANGUAGE plpgsql AS "
                             "$$BEGIN NEW.updated_at := now(); RETURN NEW; END$$;\n"
                             "CREATE TRIGGER alerts_touch BEFORE UPDATE ON stock_monitoring.alerts "
                             "FOR EACH ROW EXECUTE FUNCTION stock_monitoring.touch();\n"}
    extra = deployed_with(tmp_path, db, more)
    assert play(tmp_path, db, "verify-db.yml", extra=extra).rc == 0
    db.query("ALTER TABLE stock_monitoring.alerts DISABLE TRIGGER USER")
    res = play(tmp_path, db, "verify-db.yml", extra=extra)
    assert res.rc != 0 and "trigger alerts.alerts_touch: enabled differs: yes in the schema file, no (DISABLE TRIGGER) " \
        "in the database" in said(res.output), res.output


def test_a_schema_file_with_keys_make_schema_does_not_write_is_refused(tmp_path, db):
    content = json.loads((ROOT / "roles" / "stock_monitoring_db" / "files" / "schema.json").read_text())
    content["objects"]["indexs"] = {}  # a typo: the comparison would ignore it
    edited = tmp_path / "schema.json"
    edited.write_text(json.dumps(content))
    res = play(tmp_path, db, extra={"stock_monitoring_db_schema_file": str(edited)})
    assert res.rc != 0 and "stock_monitoring_db_schema_file: it holds keys that make schema does not write " \
        "(objects.indexs)" in said(res.output), res.output
    assert not db.exists()


def test_a_large_schema_file_travels_as_a_file_and_costs_little(tmp_path, db):
    """20 MB of schema file inline is Python source the target reads at about 0.5 s per MB."""
    assert play(tmp_path, db).rc == 0
    content = json.loads((ROOT / "roles" / "stock_monitoring_db" / "files" / "schema.json").read_text())
    content["comment"] = "x" * (20 << 20)
    big = tmp_path / "schema.json"
    big.write_text(json.dumps(content))
    small, large = [], []
    for _ in range(2):  # alternating, the best of each: load on the machine weighs on both alike
        began = time.monotonic()
        assert play(tmp_path, db, "verify-db.yml").rc == 0
        small.append(time.monotonic() - began)
        began = time.monotonic()
        res = play(tmp_path, db, "verify-db.yml", extra={"stock_monitoring_db_schema_file": str(big)})
        large.append(time.monotonic() - began)
        assert res.rc == 0 and "schema: matches the schema file" in res.output, res.output
    small, large = min(small), min(large)
    # Inline it was 3.1 times a run without it here (+3.8 s; +13 s on a slower host); as a file, 1.4 times.
    assert large < 2 * small + 1, (small, large)
