"""Hostile input: a fuzzed .env parser, identifiers from input, broken migration sets, secrets."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import struct
import threading
import time
import uuid

import pytest
from conftest import (
    LOCAL,
    MIGRATIONS,
    ROOT,
    Db,
    env_text,
    module_params,
    play,
    run_module,
    run_playbook,
    write_migrations,
)

# --- Identifiers from input are quoted -------------------------------------------------------------

HOSTILE = ['we"ird; DROP TABLE x; --', "spa ce", "ünïcødé", "semi;colon", "q'uote"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_identifiers_are_quoted(tmp_path, cluster, name):
    db = Db(cluster, f"{name} {uuid.uuid4().hex[:6]}").create()
    try:
        schema, table = f"s {name}", f"h {name}"
        quoted = '"{}"'.format(schema.replace('"', '""'))
        files = {"001_t.sql": f"CREATE SCHEMA IF NOT EXISTS {quoted};\nCREATE TABLE {quoted}.t (id int);\n"}
        res, run = run_module(tmp_path, "pg_migrate", module_params(db, schema=schema, history_table=table,
                                                                    migrations=files, expected_tables=["t"]))
        assert run.rc == 0, run.output
        assert res["tables"] == ["t"] and res["missing_tables"] == []
        rows = db.query("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 2")
        assert rows == sorted([(schema, table), (schema, "t")], key=lambda r: r[1])
        again, _ = run_module(tmp_path, "pg_migrate", module_params(db, schema=schema, history_table=table,
                                                                   migrations=files))
        assert again["changed"] is False
    finally:
        db.drop()


def test_hostile_database_name_through_the_role(tmp_path, cluster):
    db = Db(cluster, f'stock "monitoring"; DROP DATABASE postgres; -- {uuid.uuid4().hex[:6]}')
    try:
        res = play(tmp_path, db, env=env_text(db, POSTGRES_DB=f"'{db.name}'"))
        assert res.rc == 0, res.output
        assert db.exists() and db.tables()
        assert db.query("SELECT 1 FROM pg_database WHERE datname = 'postgres'", dbname="postgres")
    finally:
        db.drop()


# --- Migration sets --------------------------------------------------------------------------------

@pytest.mark.parametrize("files, message", [
    ({"001_latin1.sql": b"CREATE TABLE t (v text DEFAULT '\xe9t\xe9');\n"},
     "001_latin1.sql is not UTF-8 text (invalid byte at offset 32): save it as UTF-8"),
    ({"001_open.sql": "CREATE SCHEMA stock_monitoring;\n/* never closed\n"},
     "Migration 001_open.sql, line 2: unterminated /* comment"),
    ({"001_a.sql": "SELECT 1;", "1_b.sql": "SELECT 2;"}, "Migrations 001_a.sql and 1_b.sql have the same version 1"),
    ({"first.sql": "SELECT 1;"}, "Migration file name 'first.sql' does not match NNN_name.sql"),
    ({"README.txt": "not a migration"}, "holds no .sql file"),
])
def test_broken_migration_sets_fail_clearly_and_change_nothing(tmp_path, db, files, message):
    res = play(tmp_path, db, extra={"stock_monitoring_db_migrations_dir": str(write_migrations(tmp_path / "m", files))})
    assert res.rc != 0 and message in res.output, res.output
    assert "Traceback" not in res.output
    assert not db.exists() or not db.tables()


def test_gaps_in_numbering_apply_in_numeric_order(tmp_path, db):
    folder = write_migrations(tmp_path / "m", {"9_a.sql": "CREATE SCHEMA stock_monitoring;",
                                    "10_b.sql": "CREATE TABLE stock_monitoring.b (id int);",
                                    "100_c.sql": "CREATE TABLE stock_monitoring.c (id int);"})
    res = play(tmp_path, db, extra={"stock_monitoring_db_migrations_dir": str(folder),
                                    "stock_monitoring_db_expected_tables": ["b", "c"]})
    assert res.rc == 0, res.output
    assert [r[0] for r in db.history()] == [9, 10, 100]


# --- Secrets in every output ---------------------------------------------------------------------

def secrets_of(password: str) -> list[str]:
    return [password, base64.b64encode(password.encode()).decode()]


@pytest.mark.parametrize("case", ["check", "deploy", "failing-migration", "server-down", "missing-key", "verify-drift"])
def test_password_never_appears_at_vvvv(tmp_path, db, case):
    report = tmp_path / "report.json"
    extra: dict = {"stock_monitoring_db_report_file": str(report)}
    args, env = ["-vvvv", "--diff"], env_text(db)
    if case == "check":
        args.append("--check")
    elif case == "failing-migration":
        extra["stock_monitoring_db_migrations_dir"] = str(write_migrations(tmp_path / "m", {
            "022_stock_monitoring_schema.sql": (MIGRATIONS / "022_stock_monitoring_schema.sql").read_text(),
            "023_bad.sql": "SELECT * FROM nowhere;"}))
    elif case == "server-down":
        env = env_text(db, POSTGRES_PORT="1")
        extra["stock_monitoring_db_wait_timeout"] = 1
    elif case == "missing-key":
        env = env_text(db, POSTGRES_DB=None)
    elif case == "verify-drift":
        assert play(tmp_path, db).rc == 0
        db.query("UPDATE stock_monitoring.pg_migrate_history SET checksum = 'edited' WHERE version = 22")
        res = play(tmp_path, db, "verify-db.yml", env=env, args=args, extra=extra)
        assert res.rc != 0 and "022_stock_monitoring_schema.sql (recorded edited" in res.output
    res = play(tmp_path, db, env=env, args=args, extra=extra) if case != "verify-drift" else res
    assert (res.rc == 0) == (case in ("check", "deploy")), res.output
    texts = [res.output]
    if report.exists():
        texts.append(report.read_text())
        json.loads(report.read_text())
    if db.exists() and db.query("SELECT to_regclass('stock_monitoring.pg_migrate_history')")[0][0]:
        texts.append(repr(db.query("SELECT * FROM stock_monitoring.pg_migrate_history")))
    for text in texts:
        for secret in secrets_of(db.cluster.password):
            assert secret not in text


class FakeListener:
    """Whatever binds the server's port while it is down (a restart): it refuses TLS, asks every client for
    its password in clear text (AuthenticationCleartextPassword) or with MD5, and keeps what comes back."""

    def __init__(self, method: str) -> None:
        self.method, self.received = method, b""
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.sock.accept()
                with client:
                    client.settimeout(2)
                    length, code = struct.unpack("!ii", client.recv(8))
                    while code in (80877103, 80877104):  # SSLRequest, GSSENCRequest: not here
                        client.sendall(b"N")
                        length, code = struct.unpack("!ii", client.recv(8))
                    client.recv(length - 8)  # the startup message: user, database, options
                    ask = struct.pack("!ii", 8, 3) if self.method == "password" else struct.pack("!ii4s", 12, 5, b"salt")
                    client.sendall(b"R" + ask)
                    with contextlib.suppress(OSError):
                        while chunk := client.recv(65536):
                            self.received += chunk

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("method", ["password", "md5"])
def test_the_password_never_goes_to_a_listener_that_asks_for_it_in_clear_text_or_md5(tmp_path, db, method):
    fake = FakeListener(method)
    password = "Fake-" + uuid.uuid4().hex
    try:
        res = play(tmp_path, db, env=env_text(db, password=password, POSTGRES_PORT=str(fake.port)),
                   extra={"stock_monitoring_db_wait_timeout": 1})
    finally:
        fake.close()
    assert fake.received == b"", fake.received  # not the password, not an MD5 answer: nothing
    assert res.rc != 0 and "stock_monitoring_db_require_auth" in res.output and password not in res.output, res.output


def test_tls_that_cannot_be_set_up_fails_at_once_naming_tls_not_a_server_that_is_down(tmp_path, db):
    began = time.monotonic()
    res = play(tmp_path, db, extra={"stock_monitoring_db_ssl_mode": "verify-full", "stock_monitoring_db_wait_timeout": 30})
    assert res.rc != 0 and time.monotonic() - began < 25, res.output
    assert "TLS" in res.output and "not reachable" not in res.output, res.output


@pytest.mark.parametrize("key", ["POSTGRES_PASSWORD", "POSTGRES_USER", "POSTGRES_DB"])
def test_a_nul_character_in_a_connection_setting_is_named_before_connecting(tmp_path, db, key):
    values = {"POSTGRES_PASSWORD": "pa\0ss", "POSTGRES_USER": "post\0gres", "POSTGRES_DB": "stock\0db"}
    res = play(tmp_path, db, env=env_text(db, **{key: values[key]}))
    assert res.rc != 0 and "bug in pg_migrate" not in res.output and "Traceback" not in res.output, res.output
    assert f"{key} in {tmp_path / '.env'} (or the role variable that overrides it) holds a NUL character" \
        in " ".join(res.output.split()), res.output


@pytest.mark.parametrize("statement", [
    "CREATE UNIQUE INDEX watchlists_one_per_user ON stock_monitoring.watchlists (user_id);",
    "UPDATE stock_monitoring.watchlists SET name = repeat(name, 500) WHERE user_id LIKE 'alice%';",
])
def test_a_failing_row_s_values_stay_out_of_the_output_and_the_report(tmp_path, db, statement):
    """A constraint's error detail repeats the row ("Key (user_id, name)=(...)", "Failing row contains (...)"):
    personal data, which would go into CI logs and the uploaded report."""
    assert play(tmp_path, db).rc == 0
    db.query("INSERT INTO stock_monitoring.watchlists (user_id, name) VALUES ('alice@example.com', 'a'), "
             "('alice@example.com', 'b')")  # the application's rows, which the migration's SQL does not hold
    report = tmp_path / "report.json"
    folder = write_migrations(tmp_path / "m", {"024_rows.sql": statement + "\n"}, with_real=True)
    res = play(tmp_path, db, extra={"stock_monitoring_db_migrations_dir": str(folder),
                                    "stock_monitoring_db_report_file": str(report)}, args=["-vvv"])
    assert res.rc != 0 and "Migration 024_rows.sql failed" in res.output, res.output
    assert "constraint: watchlists_" in res.output, res.output
    assert "alice@example.com" not in res.output and "alice@example.com" not in report.read_text(), res.output


def test_no_controller_variable_holds_the_env_password_after_a_deploy(tmp_path, db):
    """The .env is read on the host by pg_migrate itself: nothing of its password comes back, so no host
    variable, callback or debug task on the controller can reach it."""
    book = tmp_path / "deploy-and-dump.yml"
    dump = tmp_path / "hostvars.json"
    book.write_text(json.dumps([{
        "name": "Deploy, then dump every variable of the host", "hosts": "stock_monitoring_db", "gather_facts": False,
        "roles": [{"role": str(ROOT / "roles" / "stock_monitoring_db")}],
        "tasks": [{"name": "Dump", "ansible.builtin.copy": {
            "content": "{{ hostvars[inventory_hostname] | to_json }}\n{{ vars | to_json }}", "dest": str(dump)},
            "delegate_to": "localhost", "vars": {"role_path": str(ROOT / "roles" / "stock_monitoring_db")}}]}]))
    env_file = tmp_path / ".env"
    env_file.write_text(env_text(db))
    res = run_playbook(book, inventory=LOCAL, env={"STOCK_MONITORING_DB_ENV_FILE": str(env_file)})
    assert res.rc == 0 and "applied: 022_stock_monitoring_schema.sql" in res.output, res.output
    assert dump.exists() and db.cluster.password not in dump.read_text()
