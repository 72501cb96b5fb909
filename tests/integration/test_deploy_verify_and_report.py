"""The role through its playbooks, against a real PostgreSQL, as an operator runs them."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest
from conftest import (
    EXPECTED,
    LOCAL,
    MIGRATIONS,
    ROOT,
    env_text,
    play,
    python_without_psycopg2,
    recap,
    run_playbook,
    write_migrations,
)


@pytest.mark.every_major
def test_first_deploy_then_second_changes_nothing(tmp_path, db):
    first = play(tmp_path, db)
    assert first.rc == 0, first.output
    assert recap(first.output)["localhost"]["changed"] == 1  # pg_migrate: database created, migrations applied
    assert "database: created" in first.output
    assert "applied: 022_stock_monitoring_schema.sql in" in first.output
    assert db.tables() == sorted([*EXPECTED, "pg_migrate_history"])
    assert db.query("SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = %s", (db.name,),
                    dbname="postgres") == [("UTF8",)]
    second = play(tmp_path, db)
    assert second.rc == 0, second.output
    assert recap(second.output)["localhost"]["changed"] == 0
    assert "already applied: 022_stock_monitoring_schema.sql, 023_stock_monitoring_notifications.sql" in second.output


@pytest.mark.every_major
def test_check_mode_on_an_empty_server_changes_nothing_and_says_what_it_would_do(tmp_path, db):
    res = play(tmp_path, db, args=["--check", "--diff"])
    assert res.rc == 0, res.output
    assert "database: would be created" in res.output
    assert "pending (would apply): 022_stock_monitoring_schema.sql, 023_stock_monitoring_notifications.sql" in res.output
    assert "CREATE TABLE IF NOT EXISTS stock_monitoring.notifications" in res.output  # --diff shows the SQL
    assert not db.exists()


def test_check_mode_set_on_the_play_is_a_plan_that_changes_nothing(tmp_path, db):
    """check_mode on the play, not --check: pg_migrate runs in check mode as every task does, and the
    summary and the JSON report call it a plan."""
    book = tmp_path / "plan-db.yml"
    book.write_text(json.dumps([{"name": "Plan the database", "hosts": "stock_monitoring_db", "gather_facts": False,
                                 "check_mode": True, "roles": [{"role": "stock_monitoring_db"}]}]))
    (tmp_path / ".env").write_text(env_text(db))
    report = tmp_path / "report.json"
    res = run_playbook(book, inventory=LOCAL, extra_vars={"stock_monitoring_db_report_file": str(report)},
                       env={"STOCK_MONITORING_DB_ENV_FILE": str(tmp_path / ".env")})
    assert res.rc == 0, res.output
    assert not db.exists(), "a play in check mode created the database"
    assert f"PLAN {db.name}.stock_monitoring on " in res.output, res.output
    assert json.loads(report.read_text())[0]["mode"] == "plan"


@pytest.mark.parametrize("template", [
    # export prefix, comments, quotes, escapes, duplicates (last wins), expansion
    "# backend settings\nexport POSTGRES_HOST={host}\nPOSTGRES_PORT='{port}' # inline comment\n"
    "POSTGRES_USER=\"{user}\"\nPOSTGRES_PASSWORD='{password}'\nPOSTGRES_DB=wrong\nDB_NAME={db}\nPOSTGRES_DB=${{DB_NAME}}\n",
    # CRLF line endings and a BOM
    "\ufeffPOSTGRES_HOST={host}\r\nPOSTGRES_PORT={port}\r\nPOSTGRES_USER={user}\r\nPOSTGRES_PASSWORD=\"{password}\"\r\n"
    "POSTGRES_DB={db}\r\n",
])
def test_env_file_dialects(tmp_path, db, template):
    text = template.format(host=db.cluster.host, port=db.cluster.port, user=db.cluster.user,
                           password=db.cluster.password, db=db.name)
    res = play(tmp_path, db, env=text)
    assert res.rc == 0, res.output
    assert db.tables()


def test_missing_env_file_is_named(tmp_path, db):
    res = run_playbook(ROOT / "playbooks" / "deploy-db.yml", inventory=LOCAL,
                       env={"STOCK_MONITORING_DB_ENV_FILE": str(tmp_path / "nope.env")})
    assert res.rc != 0
    assert f"The .env file {tmp_path / 'nope.env'} does not exist on this host" in res.output
    assert "Traceback" not in res.output


def test_missing_keys_are_named_and_no_value_is_shown(tmp_path, db):
    res = play(tmp_path, db, env=env_text(db, POSTGRES_USER=None, POSTGRES_DB=""))
    assert res.rc != 0
    assert "does not set POSTGRES_USER, POSTGRES_DB (missing or empty)" in res.output
    assert db.cluster.password not in res.output


def test_unparseable_env_line_is_named_not_shown(tmp_path, db):
    res = play(tmp_path, db, env=env_text(db) + "BROKEN=\"never closed s3cr3t-value\n")
    assert res.rc != 0 and "line 6 cannot be parsed" in res.output
    assert "s3cr3t-value" not in res.output and db.cluster.password not in res.output


def test_role_variables_override_the_env_file(tmp_path, db):
    res = play(tmp_path, db, env=env_text(db, POSTGRES_PORT="1", POSTGRES_DB="not_this_one"),
               extra={"stock_monitoring_db_postgres_port": db.cluster.port, "stock_monitoring_db_postgres_db": db.name})
    assert res.rc == 0, res.output
    assert db.tables()


@pytest.mark.every_major
def test_verify_catches_a_dropped_table_and_pending_migrations(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    ok = play(tmp_path, db, "verify-db.yml")
    assert ok.rc == 0 and recap(ok.output)["localhost"]["changed"] == 0, ok.output
    db.query("DROP TABLE stock_monitoring.notifications")
    res = play(tmp_path, db, "verify-db.yml")
    assert res.rc != 0 and "missing tables: notifications" in res.output
    # A pending migration: verify reports it and applies nothing.
    extra = tmp_path / "migrations"
    extra.mkdir()
    for f in MIGRATIONS.glob("*.sql"):
        (extra / f.name).write_text(f.read_text())
    (extra / "024_more.sql").write_text("CREATE TABLE stock_monitoring.more (id int);\n")
    res = play(tmp_path, db, "verify-db.yml", extra={"stock_monitoring_db_migrations_dir": str(extra)})
    assert res.rc != 0 and "pending migrations: 024_more.sql" in res.output
    assert "more" not in db.tables()


@pytest.mark.every_major
def test_verify_with_a_read_only_monitoring_login_on_an_up_to_date_database(tmp_path, db):
    """CONNECT, USAGE and SELECT only: the trust and privilege checks read the catalog, nothing more."""
    assert play(tmp_path, db).rc == 0
    role, password = f"monitor_{uuid.uuid4().hex[:8]}", "Mon-" + uuid.uuid4().hex[:10]
    db.query(f"CREATE ROLE {role} LOGIN PASSWORD %s", (password,), dbname="postgres")
    try:
        db.query(f"GRANT USAGE ON SCHEMA stock_monitoring TO {role}; "
                 f"GRANT SELECT ON ALL TABLES IN SCHEMA stock_monitoring TO {role}")
        res = play(tmp_path, db, "verify-db.yml", env=env_text(db, password=password, POSTGRES_USER=role))
        assert res.rc == 0 and recap(res.output)["localhost"]["changed"] == 0, res.output
        assert "already applied: 022_stock_monitoring_schema.sql, 023_stock_monitoring_notifications.sql" in res.output
        assert "schema: matches the schema file" in res.output  # the whole schema, from the catalog alone
    finally:
        db.drop()
        db.query(f"DROP ROLE {role}", dbname="postgres")


def monitoring_login(db) -> tuple[str, str]:
    """A read-only login as a monitoring job has it: CONNECT, USAGE and SELECT; no CREATE, no CREATEDB."""
    role, password = f"monitor_{uuid.uuid4().hex[:8]}", "Mon-" + uuid.uuid4().hex[:10]
    db.query(f"CREATE ROLE {role} LOGIN PASSWORD %s", (password,), dbname="postgres")
    return role, password


@pytest.mark.every_major
def test_verify_with_a_read_only_login_reports_pending_files_without_predicting_privileges(tmp_path, db):
    """The schema belongs to a non-superuser deploy role, so the monitor neither owns nor may create in it."""
    assert play(tmp_path, db).rc == 0
    role, password = monitoring_login(db)
    owner = f"deployer_{uuid.uuid4().hex[:8]}"
    db.query(f"CREATE ROLE {owner}", dbname="postgres")
    try:
        db.query(f"ALTER SCHEMA stock_monitoring OWNER TO {owner}; "
                 f"ALTER TABLE stock_monitoring.pg_migrate_history OWNER TO {owner}; "
                 f"GRANT USAGE ON SCHEMA stock_monitoring TO {role}; "
                 f"GRANT SELECT ON ALL TABLES IN SCHEMA stock_monitoring TO {role}")
        extra = write_migrations(tmp_path / "migrations", {"024_more.sql": "CREATE TABLE stock_monitoring.more (id int);\n"},
                                 with_real=True)
        res = play(tmp_path, db, "verify-db.yml", env=env_text(db, password=password, POSTGRES_USER=role),
                   extra={"stock_monitoring_db_migrations_dir": str(extra)})
        assert res.rc != 0 and "pending migrations: 024_more.sql" in res.output, res.output
        assert "lacks the" not in res.output and "owned by role" not in res.output
        assert "already applied: 022_stock_monitoring_schema.sql, 023_stock_monitoring_notifications.sql" in res.output
        assert recap(res.output)["localhost"]["changed"] == 0
    finally:
        db.drop()
        db.query(f"DROP ROLE {role}; DROP ROLE {owner}", dbname="postgres")


def test_verify_with_a_read_only_login_reports_a_missing_database(tmp_path, db):
    role, password = monitoring_login(db)
    try:
        res = play(tmp_path, db, "verify-db.yml", env=env_text(db, password=password, POSTGRES_USER=role))
        assert res.rc != 0 and "the database does not exist" in res.output, res.output
        assert "CREATEDB" not in res.output and recap(res.output)["localhost"]["changed"] == 0
        assert not db.exists()
    finally:
        db.query(f"DROP ROLE {role}", dbname="postgres")


def test_verify_never_creates_a_missing_database(tmp_path, db):
    res = play(tmp_path, db, "verify-db.yml")
    assert res.rc != 0 and "the database does not exist" in res.output
    assert not db.exists()


def test_unexpected_table_is_reported_not_fatal(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    db.query("CREATE TABLE stock_monitoring.scratch (id int)")
    res = play(tmp_path, db)
    assert res.rc == 0 and "unexpected: scratch" in res.output


def test_several_hosts_sharing_one_database_apply_once(tmp_path, db):
    inv = tmp_path / "hosts.yml"
    inv.write_text(json.dumps({"stock_monitoring_db": {"hosts": {f"app{i}": {
        "ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}",
        "stock_monitoring_db_env_file": str(tmp_path / ".env")} for i in range(3)}}}))
    report = tmp_path / "report.json"
    res = play(tmp_path, db, inventory=inv, extra={"stock_monitoring_db_report_file": str(report)})
    assert res.rc == 0, res.output
    hosts = json.loads(report.read_text())
    assert sorted(len(h["applied"]) for h in hosts) == [0, 0, 2]
    assert [r[0] for r in db.history()] == [22, 23]
    assert db.cluster.password not in report.read_text()


def test_drop_schema_refuses_production_and_unconfirmed_runs(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    res = play(tmp_path, db, "drop-schema.yml")
    assert res.rc != 0 and "-e stock_monitoring_db_confirm_drop=stock_monitoring" in res.output
    res = play(tmp_path, db, "drop-schema.yml", extra={"stock_monitoring_db_confirm_drop": "stock_monitoring",
                                                       "stock_monitoring_db_environment": "production"})
    assert res.rc != 0 and "refuses hosts whose" in res.output
    assert db.tables()
    res = play(tmp_path, db, "drop-schema.yml", extra={"stock_monitoring_db_confirm_drop": "stock_monitoring"})
    assert res.rc == 0, res.output
    assert db.tables() == []
    # The history went with the schema, so the next deploy rebuilds everything.
    res = play(tmp_path, db)
    assert res.rc == 0 and "applied: 022_stock_monitoring_schema.sql" in res.output


def test_missing_psycopg2_fails_clearly_when_installing_is_off(tmp_path, db):
    inv = tmp_path / "hosts.yml"
    inv.write_text(json.dumps({"stock_monitoring_db": {"hosts": {"bare": {
        "ansible_connection": "local", "ansible_python_interpreter": str(python_without_psycopg2(tmp_path / "bare")),
        "stock_monitoring_db_env_file": str(tmp_path / ".env")}}}}))
    res = play(tmp_path, db, inventory=inv, extra={"stock_monitoring_db_install_psycopg2": False})
    assert res.rc != 0
    assert "psycopg2 is not installed for the Python of bare" in res.output
    assert "stock_monitoring_db_install_psycopg2 is false" in res.output


def test_missing_migrations_directory_is_named(tmp_path, db):
    res = play(tmp_path, db, extra={"stock_monitoring_db_migrations_dir": str(tmp_path / "none")})
    assert res.rc != 0 and f"The migrations directory {tmp_path / 'none'} does not exist on the controller" in res.output


def test_env_in_json_report_and_history_have_no_secret(tmp_path, db):
    report = tmp_path / "r.json"
    assert play(tmp_path, db, extra={"stock_monitoring_db_report_file": str(report)}).rc == 0
    text = report.read_text() + repr(db.query("SELECT * FROM stock_monitoring.pg_migrate_history"))
    assert db.cluster.password not in text and base64.b64encode(db.cluster.password.encode()).decode() not in text
    assert Path(report).exists()


def test_port_that_is_not_a_number_is_named(tmp_path, db):
    res = play(tmp_path, db, env=env_text(db, POSTGRES_PORT="54x2"))
    assert res.rc != 0
    assert f"POSTGRES_PORT in {tmp_path / '.env'} is not a port number (digits only, e.g. 5432)" in res.output


def test_messages_name_the_role_variables_a_user_sets(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    edited = write_migrations(tmp_path / "edited", {"022_stock_monitoring_schema.sql": (
        MIGRATIONS / "022_stock_monitoring_schema.sql").read_text() + "\n-- edited\n"}, with_real=False)
    (edited / "023_stock_monitoring_notifications.sql").write_text(
        (MIGRATIONS / "023_stock_monitoring_notifications.sql").read_text())
    res = play(tmp_path, db, extra={"stock_monitoring_db_migrations_dir": str(edited)})
    assert res.rc != 0 and "stock_monitoring_db_accepted_changes: [{version: 22, old_checksum:" in res.output, res.output
    only_022 = write_migrations(tmp_path / "only-022", {"022_stock_monitoring_schema.sql": (
        MIGRATIONS / "022_stock_monitoring_schema.sql").read_text()})
    res = play(tmp_path, db, extra={"stock_monitoring_db_migrations_dir": str(only_022)})
    assert res.rc != 0 and "set stock_monitoring_db_unknown_versions=warn" in res.output, res.output
    slow = write_migrations(tmp_path / "slow", {"024_slow.sql": "SELECT pg_sleep(5);\n"}, with_real=True)
    res = play(tmp_path, db, extra={"stock_monitoring_db_migrations_dir": str(slow),
                                    "stock_monitoring_db_statement_timeout": "1s"})
    assert res.rc != 0 and "stock_monitoring_db_statement_timeout is 1s" in res.output, res.output


def test_a_history_row_deleted_by_hand_is_not_answered_with_renumber(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    db.query("DELETE FROM stock_monitoring.pg_migrate_history WHERE version = 22")
    res = play(tmp_path, db)
    assert res.rc != 0 and "022_stock_monitoring_schema.sql" in res.output
    assert "its history row was deleted" in res.output and "stock_monitoring_db_out_of_order=apply" in res.output, \
        res.output


def test_a_schema_file_that_does_not_exist_is_named_not_ignored(tmp_path, db):
    res = play(tmp_path, db, "verify-db.yml", extra={"stock_monitoring_db_schema_file": str(tmp_path / "nope.json")})
    assert res.rc != 0 and f"The schema file {tmp_path / 'nope.json'} does not exist on the controller" in res.output


@pytest.mark.parametrize("retries, words", [
    ([{"lock_timeout": "20ms", "sleep": "1s", "times": 1000000000000}], "times is 1000000000000"),
    ([{"lock_timeout": "0", "sleep": "1s", "times": 3}], "lock_timeout '0' in an entry: more than 0"),
])
def test_a_lock_schedule_out_of_bounds_is_refused_before_anything_runs(tmp_path, db, retries, words):
    for playbook in ("deploy-db.yml", "verify-db.yml"):
        res = play(tmp_path, db, playbook, extra={"stock_monitoring_db_lock_retries": retries})
        assert res.rc != 0 and f"stock_monitoring_db_lock_retries: {words}" in res.output, res.output
    assert not db.exists()


def test_a_timeout_longer_than_postgresql_takes_is_refused_by_name(tmp_path, db):
    res = play(tmp_path, db, extra={"stock_monitoring_db_lock_timeout": "30d"})
    assert res.rc != 0 and "stock_monitoring_db_lock_timeout='30d' is longer than PostgreSQL takes" in res.output
    assert not db.exists()


@pytest.mark.parametrize("where", ["a directory that does not exist", "a directory"])
def test_a_report_file_that_cannot_be_written_fails_before_anything_runs(tmp_path, db, where):
    path = tmp_path / "missing" / "report.json" if where != "a directory" else tmp_path
    res = play(tmp_path, db, extra={"stock_monitoring_db_report_file": str(path)})
    assert res.rc != 0 and f"The JSON report {path} cannot be written" in " ".join(res.output.split()), res.output
    assert not db.exists()


def test_drop_schema_in_check_mode_changes_nothing_and_a_second_drop_is_not_a_change(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    confirm = {"stock_monitoring_db_confirm_drop": "stock_monitoring"}
    res = play(tmp_path, db, "drop-schema.yml", extra=confirm, args=["--check"])
    assert res.rc == 0 and recap(res.output)["localhost"]["changed"] == 1 and db.tables(), res.output
    assert play(tmp_path, db, "drop-schema.yml", extra=confirm).rc == 0 and db.tables() == []
    res = play(tmp_path, db, "drop-schema.yml", extra=confirm)
    assert res.rc == 0 and recap(res.output)["localhost"]["changed"] == 0, res.output
