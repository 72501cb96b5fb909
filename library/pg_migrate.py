#!/usr/bin/python
# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_migrate
short_description: Apply versioned SQL migration files to a PostgreSQL database, once each
description:
  - Applies an ordered set of C(NNN_name.sql) migrations to one database and records each in a
    history table, the way Flyway, dbmate or golang-migrate do, from inside Ansible.
  - Each file runs in its own transaction together with its history row, so a failing file leaves
    no trace. A file whose first lines hold the marker C(-- pg_migrate:no-transaction) runs one
    statement at a time outside a transaction (for C(CREATE INDEX CONCURRENTLY)); when such a file
    fails, the statements before the failing one stay committed and the file is not recorded, so it
    runs again from its first statement next time and must be written to be re-runnable.
  - The history table lives inside O(schema), so C(DROP SCHEMA ... CASCADE) resets it too.
  - Files already applied are compared by checksum (SHA-256 of the text with line endings
    normalised to LF, a leading BOM and trailing white space removed). An edited file stops the run
    unless that exact change is listed in O(accepted_changes).
  - Runs are serialised by a session-level advisory lock on the module's own connection, released
    when the connection ends (also when the process is killed). The plan is made under the lock, so
    concurrent runs never apply a file twice; a run that cannot get the lock within
    O(lock_wait_timeout) fails and names the session that holds it.
  - A database that already holds the schema from before (applied by hand with psql) but has no
    history table is adopted, when its files are re-runnable (C(CREATE ... IF NOT EXISTS)). Each
    file runs, and one that created no catalog object is recorded with C(adopted=true).
  - In check mode nothing is executed but read-only catalog queries on a read-only connection; the
    result is the exact plan. It works when the database does not exist yet (the plan is then
    every file), and fails as the run would when the login lacks the privilege to create the
    database or the schema. With C(--diff) the SQL of the files that would run is shown.
version_added: "1.0.0"
author:
  - Stock Monitoring team (@stock-monitoring)
options:
  login_host:
    description: Host of the PostgreSQL server (a name, an address, or a Unix socket directory).
    type: str
    default: localhost
  login_port:
    description: Port of the PostgreSQL server.
    type: int
    default: 5432
  login_user:
    description: Role to log in as. It owns what the migrations create.
    type: str
    default: postgres
  login_password:
    description:
      - Password of O(login_user). Never returned, logged or stored in the history table.
    type: str
    default: ""
  login_db:
    description: The database the migrations apply to.
    type: str
    required: true
  maintenance_db:
    description:
      - Database used when O(login_db) does not exist, to tell a missing database from a server or
        login problem and to plan in check mode.
    type: str
    default: postgres
  ssl_mode:
    description: libpq C(sslmode) of the connection.
    type: str
    default: prefer
    choices: [allow, disable, prefer, require, verify-ca, verify-full]
  ca_cert:
    description: CA certificate file for O(ssl_mode=verify-ca) and O(ssl_mode=verify-full).
    type: path
  connect_timeout:
    description: Seconds one connection attempt may take.
    type: int
    default: 10
  wait_timeout:
    description:
      - Seconds to keep retrying while the server is down or starting up, before failing.
      - A wrong password, a refused login or a missing database are not retried.
    type: int
    default: 0
  migrations:
    description:
      - The migration files, as a mapping of file name (C(NNN_name.sql), V(NNN) the version) to the
        file's SQL text. They run in numeric order of version.
      - The files live on the controller; the role reads them there, so nothing is copied to the
        target host.
    type: dict
    required: true
  schema:
    description:
      - Schema the migrations manage. It holds the history table and is the schema whose tables
        O(expected_tables) is checked against.
    type: str
    default: public
  history_table:
    description: Name of the history table inside O(schema).
    type: str
    default: pg_migrate_history
  expected_tables:
    description:
      - Tables that O(schema) must hold once the migrations are applied. The result lists
        RV(missing_tables) and RV(unexpected_tables); deciding what to do with them is the caller's.
    type: list
    elements: str
  on_missing_database:
    description:
      - What to do when O(login_db) does not exist.
      - V(fail) fails with a message naming it; V(report) returns RV(database_exists=false) with
        every file pending.
      - V(create) creates it (C(ENCODING 'UTF8' TEMPLATE template0), the name quoted as an
        identifier) and applies the migrations. Concurrent runs serialise on an advisory lock in
        O(maintenance_db), so exactly one creates it. In check mode it is reported, not created.
    type: str
    default: fail
    choices: [fail, report, create]
  unknown_versions:
    description:
      - Policy for versions recorded in the history that have no file (the database is newer than
        the checkout, or a file was deleted).
      - V(fail) stops before applying anything; V(warn) reports them and goes on.
    type: str
    default: fail
    choices: [fail, warn]
  out_of_order:
    description:
      - Policy for a pending file whose version is lower than the highest applied one (for example
        a branch merged late).
      - V(fail) stops before applying anything; V(apply) applies it.
    type: str
    default: fail
    choices: [fail, apply]
  accepted_changes:
    description:
      - Edits of already applied files that are accepted. Each entry names the version and the
        exact old and new checksums (the failure message of an edited file prints them). The
        history row then takes the new checksum and keeps the old one in C(previous_checksum).
    type: list
    elements: dict
    default: []
    suboptions:
      version:
        description: Version of the edited file.
        type: int
        required: true
      old_checksum:
        description: Checksum recorded in the history table.
        type: str
        required: true
      new_checksum:
        description: Checksum of the file as it is now.
        type: str
        required: true
  lock_timeout:
    description:
      - PostgreSQL C(lock_timeout) of the migration session. A migration statement that waits
        longer than this for a table lock fails (and names the sessions holding locks), instead of
        queueing every reader of that table behind it. V(0) disables it.
    type: str
    default: 5s
  statement_timeout:
    description: PostgreSQL C(statement_timeout) of the migration session. V(0) disables it.
    type: str
    default: 15min
  lock_wait_timeout:
    description:
      - Seconds to wait for the migration lock held by another run of this module.
    type: int
    default: 300
  application_name:
    description: C(application_name) of the session, as a DBA sees it in C(pg_stat_activity).
    type: str
    default: pg_migrate
  source:
    description:
      - Where the run comes from (for example the play and the controller), stored in the history.
    type: str
    default: ""
attributes:
  check_mode:
    description: Can run in check mode and return a changed status prediction without modifying the target.
    support: full
  diff_mode:
    description: Returns details on what has changed (or would change in check mode) when in diff mode.
    support: full
requirements:
  - psycopg2 >= 2.8
notes:
  - Connect directly or through a session-pooling proxy. PgBouncer in transaction pooling mode
    cannot hold the session-level migration lock.
  - The migration files must not contain their own C(BEGIN)/C(COMMIT), nor psql meta-commands.
"""

EXAMPLES = r"""
- name: Apply the migrations of this checkout
  pg_migrate:
    login_host: db.example.com
    login_user: stock_monitoring
    login_password: "{{ vault_db_password }}"
    login_db: app
    schema: stock_monitoring
    migrations: >-
      {{ dict(files | map('basename') | zip(query('ansible.builtin.file', *files, rstrip=false))) }}
    expected_tables: [alerts, audit_log, notifications, watchlist_items, watchlists]
    application_name: stock-monitoring-db deploy
  vars:
    files: "{{ query('ansible.builtin.fileglob', 'migrations/*.sql') | sort }}"
  no_log: true
  register: migrate

- name: Accept an edit of an applied file, naming the exact change
  pg_migrate:
    login_db: app
    migrations: "{{ migration_files }}"
    accepted_changes:
      - version: 22
        old_checksum: 3f1c...e0
        new_checksum: 9a0b...41
"""

RETURN = r"""
database_exists:
  description:
    - Whether O(login_db) exists after this run (created by it or by a concurrent run); in check
      mode and with O(on_missing_database=report), whether it exists now.
  returned: always
  type: bool
database_created:
  description: Whether this run created O(login_db) (O(on_missing_database=create)).
  returned: always
  type: bool
history_table:
  description: Qualified name of the history table.
  returned: always
  type: str
  sample: stock_monitoring.pg_migrate_history
adopting:
  description: The database had objects in O(schema) but no history table (migrated by hand).
  returned: always
  type: bool
applied:
  description: Files applied by this run (in check mode, none).
  returned: always
  type: list
  elements: dict
  sample: [{version: 23, name: 023_stock_monitoring_notifications.sql, checksum: 9a0b41, duration_ms: 12.5,
            transactional: true, adopted: false}]
pending:
  description: Files not applied after this run (in check mode, those that would be applied).
  returned: always
  type: list
  elements: dict
  sample: [{version: 23, name: 023_stock_monitoring_notifications.sql, checksum: 9a0b41, transactional: true}]
already_applied:
  description:
    - Files that were already applied, unchanged. (Not called C(skipped), a key Ansible reserves.)
  returned: always
  type: list
  elements: dict
  sample: [{version: 22, name: 022_stock_monitoring_schema.sql}]
accepted:
  description: Accepted edits written to the history (O(accepted_changes)).
  returned: always
  type: list
  elements: dict
drift:
  description:
    - Differences between the files and the history - C(edited) (checksum differs),
      C(unknown) (in the history, no file), C(out_of_order) (pending below the highest applied).
  returned: always
  type: list
  elements: dict
  sample: [{version: 22, name: 022_stock_monitoring_schema.sql, kind: edited, old_checksum: 3f1c, new_checksum: 9a0b}]
tables:
  description: Tables in O(schema) after the run, the history table excluded.
  returned: when O(expected_tables) is set
  type: list
  elements: str
missing_tables:
  description: Tables of O(expected_tables) that O(schema) lacks.
  returned: when O(expected_tables) is set
  type: list
  elements: str
unexpected_tables:
  description: Tables in O(schema) that O(expected_tables) does not list.
  returned: when O(expected_tables) is set
  type: list
  elements: str
lock_wait_ms:
  description: Milliseconds spent waiting for the migration lock.
  returned: always
  type: float
duration_ms:
  description: Milliseconds the whole run took, connection included.
  returned: always
  type: float
server_version:
  description: Version of the PostgreSQL server.
  returned: when the server was reached
  type: str
  sample: "15.18"
"""

import contextlib
import hashlib
import re
import socket
import time
import traceback
from dataclasses import dataclass
from functools import cached_property

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    import psycopg2
    import psycopg2.errorcodes
    import psycopg2.errors
    import psycopg2.extensions
    from psycopg2 import sql as pgsql
except ImportError:
    PSYCOPG2_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    PSYCOPG2_IMPORT_ERROR = None

NAME_RE = re.compile(r"^(\d+)_([A-Za-z0-9][A-Za-z0-9_.-]*)\.sql$")
TIMEOUT_RE = re.compile(r"^\d+(us|ms|s|min|h|d)?$")
NO_TRANSACTION_MARKER = re.compile(r"^\s*--\s*pg_migrate:no-transaction\s*$", re.MULTILINE)
TRANSACTION_CONTROL = {"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "PREPARE"}
# Connection failures worth retrying while waiting for the server: it is down or not ready yet.
SERVER_DOWN_PATTERNS = ("could not connect", "connection refused", "timeout expired", "could not translate host",
                        "no such file or directory", "the database system is starting up",
                        "the database system is shutting down", "the database system is in recovery mode",
                        "server closed the connection unexpectedly", "connection to server")


class MigrationError(Exception):
    """A problem to report to the user as one message; `details` go into the failed result."""

    def __init__(self, msg: str, **details: object) -> None:
        super().__init__(msg)
        self.msg = msg
        self.details = details


# --- Plain functions: files, checksums, SQL splitting, planning (tested without a server) -------

def normalise(text: str) -> str:
    """The text that checksums cover: no BOM, LF line endings, no trailing white space."""
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").rstrip()


def checksum(text: str) -> str:
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


@dataclass
class Statement:
    line: int
    text: str


@dataclass
class Migration:
    version: int
    name: str
    text: str
    checksum: str
    transactional: bool

    @cached_property
    def statements(self) -> list[Statement]:
        """The file's statements, split (and checked) only when the file is about to run."""
        statements = split_statements(self.text, self.name)
        if not statements:
            raise MigrationError(f"Migration {self.name} holds no SQL statement: add its SQL or remove the file")
        if self.transactional:
            for st in statements:
                keyword = st.text.split(None, 1)[0].upper().rstrip(";")
                if keyword in TRANSACTION_CONTROL:
                    raise MigrationError(
                        f"Migration {self.name}: line {st.line} starts with {keyword}; each file already runs in "
                        "one transaction that pg_migrate commits with its history row. Remove it, or mark the file "
                        "with '-- pg_migrate:no-transaction'")
        return statements

    def summary(self) -> dict:
        return {"version": self.version, "name": self.name, "checksum": self.checksum,
                "transactional": self.transactional}


def split_statements(text: str, name: str = "<sql>") -> list[Statement]:
    """Split SQL into statements at top-level semicolons, as psql does.

    Quotes ('', E'', ""), dollar quotes, -- and nested /* */ comments and SQL-standard function
    bodies (BEGIN ATOMIC ... END) are honoured. Each statement carries the line it starts on.
    """
    statements: list[Statement] = []
    i, n, line = 0, len(text), 1
    start: int | None = None  # index of the current statement's first significant character
    start_line = 1
    words: list[str] = []  # leading keywords of the current statement
    atomic_depth = 0
    at_line_start = True

    def flush(end: int) -> None:
        nonlocal start, words, atomic_depth
        if start is not None:
            statements.append(Statement(start_line, text[start:end].strip()))
        start, words, atomic_depth = None, [], 0

    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            at_line_start = True
            i += 1
            continue
        if c in " \t\r\f\ufeff":
            i += 1
            continue
        if c == "\\" and at_line_start and start is None:
            raise MigrationError(f"Migration {name}: line {line} is a psql meta-command ({text[i:i + 3]}...); "
                                 "only SQL is supported: remove it")
        at_line_start = False
        if text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            if depth:
                raise MigrationError(f"Migration {name}: the comment opened at line {line} is never closed")
            line += text.count("\n", i, j)
            i = j
            continue
        if start is None:
            start, start_line = i, line
        if c == ";" and atomic_depth == 0:
            flush(i + 1)
            i += 1
            continue
        if c == "'" or c == '"':
            # E'...' strings take backslash escapes; the E must not end a longer identifier.
            prefix_e = i > 0 and text[i - 1] in "eE"
            escapes = c == "'" and prefix_e and (i < 2 or not (text[i - 2].isalnum() or text[i - 2] == "_"))
            j = i + 1
            while True:
                if j >= n:
                    raise MigrationError(f"Migration {name}: the quote opened at line {line} is never closed")
                if escapes and text[j] == "\\":
                    j += 2
                    continue
                if text[j] == c:
                    if j + 1 < n and text[j + 1] == c:
                        j += 2
                        continue
                    break
                j += 1
            line += text.count("\n", i, j)
            i = j + 1
            continue
        if c == "$" and not (i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$", text[i:])
            if m:
                tag = m.group(0)
                j = text.find(tag, i + len(tag))
                if j < 0:
                    raise MigrationError(f"Migration {name}: the dollar quote {tag} opened at line {line} is never closed")
                line += text.count("\n", i, j)
                i = j + len(tag)
                continue
        if c.isalpha() or c == "_":
            m = re.match(r"[A-Za-z_][A-Za-z0-9_$]*", text[i:])
            word = m.group(0).upper()
            if len(words) < 4:
                words.append(word)
            # BEGIN ATOMIC ... END bodies of CREATE FUNCTION/PROCEDURE contain semicolons.
            if words[:1] == ["CREATE"] and ("FUNCTION" in words or "PROCEDURE" in words):
                if word == "ATOMIC" or (word == "CASE" and atomic_depth):
                    atomic_depth += 1
                elif word == "END" and atomic_depth:
                    atomic_depth -= 1
            i += len(m.group(0))
            continue
        i += 1
    flush(n)
    return statements


def load_migrations(files: dict) -> list[Migration]:
    """Validate the names and order the files by version (their SQL is checked when they are pending)."""
    if not files:
        raise MigrationError("No migration files were given: check the migrations directory")
    by_version: dict[int, Migration] = {}
    for name in sorted(files):
        m = NAME_RE.match(name)
        if not m:
            raise MigrationError(f"Migration file name {name!r} does not match NNN_name.sql "
                                 "(digits, an underscore, letters, digits, '_', '.' or '-', then .sql): rename it")
        text = files[name]
        if not isinstance(text, str):
            raise MigrationError(f"Migration {name}: its content must be text")
        version = int(m.group(1))
        if version in by_version:
            raise MigrationError(f"Migrations {by_version[version].name} and {name} have the same version {version}: "
                                 "renumber one of them")
        transactional = not NO_TRANSACTION_MARKER.search(text)
        by_version[version] = Migration(version, name, text, checksum(text), transactional)
    return [by_version[v] for v in sorted(by_version)]


@dataclass
class Plan:
    pending: list[Migration]
    already_applied: list[Migration]
    accepted: list[dict]
    drift: list[dict]


def make_plan(migrations: list[Migration], history: dict[int, dict], accepted_changes: list[dict],
              unknown_versions: str, out_of_order: str) -> Plan:
    """Compare the files with the history rows ({version: {"name", "checksum"}}) and apply the policies."""
    accept = {(a["version"], a["old_checksum"], a["new_checksum"]) for a in accepted_changes}
    pending, already_applied, accepted, drift = [], [], [], []
    highest = max(history, default=None)
    for mig in migrations:
        row = history.get(mig.version)
        if row is None:
            pending.append(mig)
            if highest is not None and mig.version < highest:
                drift.append({"version": mig.version, "name": mig.name, "kind": "out_of_order",
                              "highest_applied": highest})
        elif row["checksum"] == mig.checksum:
            already_applied.append(mig)
        elif (mig.version, row["checksum"], mig.checksum) in accept:
            accepted.append({"version": mig.version, "name": mig.name,
                             "old_checksum": row["checksum"], "new_checksum": mig.checksum})
            already_applied.append(mig)
        else:
            drift.append({"version": mig.version, "name": mig.name, "kind": "edited",
                          "old_checksum": row["checksum"], "new_checksum": mig.checksum})
    files = {m.version for m in migrations}
    for version in sorted(set(history) - files):
        drift.append({"version": version, "name": history[version]["name"], "kind": "unknown"})

    edited = [d for d in drift if d["kind"] == "edited"]
    if edited:
        lines = "; ".join(f"{d['name']} (recorded {d['old_checksum']}, now {d['new_checksum']})" for d in edited)
        first = edited[0]
        raise MigrationError(
            f"Applied migration edited after it was applied: {lines}. Restore the file as applied, or accept "
            f"the change explicitly, e.g. accepted_changes: [{{version: {first['version']}, "
            f"old_checksum: {first['old_checksum']}, new_checksum: {first['new_checksum']}}}]", drift=drift)
    unknown = [d for d in drift if d["kind"] == "unknown"]
    if unknown and unknown_versions == "fail":
        names = ", ".join(d["name"] for d in unknown)
        raise MigrationError(
            f"The database has applied migrations that this checkout does not have: {names}. Deploy from a "
            "checkout that has them, or set unknown_versions=warn to go on", drift=drift)
    late = [d for d in drift if d["kind"] == "out_of_order"]
    if late and out_of_order == "fail":
        names = ", ".join(d["name"] for d in late)
        raise MigrationError(
            f"Pending migrations are older than the newest applied one ({late[0]['highest_applied']}): {names}. "
            "Renumber them above it, or set out_of_order=apply to apply them anyway", drift=drift)
    return Plan(pending, already_applied, accepted, drift)


def advisory_key(*parts: str) -> int:
    """A stable signed 64-bit advisory lock key, e.g. for one history table (schema, table)."""
    digest = hashlib.sha256(("pg_migrate:" + ".".join(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def classify_connect_error(message: str) -> str:
    """Tell apart the reasons a connection fails: 'down', 'auth', 'no_database' or 'other'."""
    low = message.lower()
    if "does not exist" in low and "database" in low:
        return "no_database"
    if any(p in low for p in ("password authentication failed", "no pg_hba.conf entry", "authentication failed",
                              "role \"", "no password supplied", "permission denied for database")):
        return "auth"
    if any(p in low for p in SERVER_DOWN_PATTERNS):
        return "down"
    return "other"


def first_line(message: str) -> str:
    return (message or "").strip().splitlines()[0] if (message or "").strip() else "unknown error"


# --- The database side ----------------------------------------------------------------------------

class Migrator:
    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.p = module.params
        self.schema = self.p["schema"]
        self.table = self.p["history_table"]
        self.conn = None
        self.to_run: list[Migration] = []  # what ran, or in check mode what would run (for --diff)
        self.where = f"{self.p['login_host']}:{self.p['login_port']}"

    # Connections ---------------------------------------------------------------------------------
    def _connect_once(self, dbname: str, read_only: bool) -> psycopg2.extensions.connection:
        options = f"-c lock_timeout={self.p['lock_timeout']} -c statement_timeout={self.p['statement_timeout']}"
        if read_only:
            options += " -c default_transaction_read_only=on"
        kwargs = {"host": self.p["login_host"], "port": self.p["login_port"], "user": self.p["login_user"],
                  "dbname": dbname, "connect_timeout": self.p["connect_timeout"], "sslmode": self.p["ssl_mode"],
                  "application_name": self.p["application_name"], "options": options}
        if self.p["login_password"]:
            kwargs["password"] = self.p["login_password"]
        if self.p["ca_cert"]:
            kwargs["sslrootcert"] = self.p["ca_cert"]
        return psycopg2.connect(**kwargs)

    def connect(self, dbname: str, read_only: bool) -> psycopg2.extensions.connection:
        """Connect, retrying while the server is down until wait_timeout; raise a named failure otherwise."""
        deadline = time.monotonic() + self.p["wait_timeout"]
        while True:
            try:
                conn = self._connect_once(dbname, read_only)
                conn.autocommit = True
                return conn
            except psycopg2.OperationalError as exc:
                reason = classify_connect_error(str(exc))
                if reason == "down" and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                if reason == "no_database":
                    raise
                raise MigrationError(self._connect_message(reason, dbname, str(exc)), reason=reason) from None

    def _connect_message(self, reason: str, dbname: str, error: str) -> str:
        user, where = self.p["login_user"], self.where
        if reason == "down":
            waited = f" (waited {self.p['wait_timeout']} s)" if self.p["wait_timeout"] else ""
            return (f"PostgreSQL server at {where} is not reachable{waited}: {first_line(error)}. "
                    "Check that it is running and that POSTGRES_HOST/POSTGRES_PORT are right")
        if reason == "auth":
            return (f"Login to PostgreSQL at {where} as {user!r} (database {dbname!r}) was refused: {first_line(error)}. "
                    "Check POSTGRES_USER/POSTGRES_PASSWORD and the server's pg_hba.conf")
        return f"Cannot connect to PostgreSQL at {where} (database {dbname!r}): {first_line(error)}"

    # Queries ---------------------------------------------------------------------------------------
    def query(self, statement: str | pgsql.Composable, args: tuple = ()) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(statement, args)
            return cur.fetchall() if cur.description else []

    def history_ident(self) -> pgsql.Composable:
        return pgsql.SQL("{}.{}").format(pgsql.Identifier(self.schema), pgsql.Identifier(self.table))

    def history_exists(self) -> bool:
        return bool(self.query("SELECT to_regclass(%s) IS NOT NULL",
                               (self.history_ident().as_string(self.conn),))[0][0])

    def read_history(self) -> dict[int, dict]:
        rows = self.query(pgsql.SQL("SELECT version, name, checksum FROM {}").format(self.history_ident()))
        return {int(v): {"name": n, "checksum": c} for v, n, c in rows}

    def schema_has_tables(self) -> bool:
        return bool(self.query("SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                               "WHERE n.nspname = %s AND c.relkind IN ('r', 'p'))", (self.schema,))[0][0])

    def tables(self) -> list[str]:
        rows = self.query("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                          "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND c.relname <> %s ORDER BY 1",
                          (self.schema, self.table))
        return [r[0] for r in rows]

    def catalog_fingerprint(self) -> tuple:
        """Counts of catalog rows: equal before and after a file means it created nothing."""
        return self.query("SELECT (SELECT count(*) FROM pg_class), (SELECT count(*) FROM pg_attribute), "
                          "(SELECT count(*) FROM pg_constraint), (SELECT count(*) FROM pg_namespace), "
                          "(SELECT count(*) FROM pg_proc), (SELECT count(*) FROM pg_type), "
                          "(SELECT count(*) FROM pg_trigger), (SELECT count(*) FROM pg_policy)")[0]

    def check_privileges(self) -> None:
        """Fail before running anything when the login cannot create what the run needs."""
        user, db = self.p["login_user"], self.p["login_db"]
        exists = self.query("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)", (self.schema,))[0][0]
        if not exists:
            if not self.query("SELECT has_database_privilege(current_user, current_database(), 'CREATE')")[0][0]:
                raise MigrationError(
                    f"Role {user!r} lacks the CREATE privilege on database {db!r}, needed to create schema "
                    f"{self.schema!r}: run 'GRANT CREATE ON DATABASE {db} TO {user}' as its owner, or create the "
                    "schema for it")
        elif not self.query("SELECT has_schema_privilege(current_user, %s, 'CREATE')", (self.schema,))[0][0]:
            raise MigrationError(
                f"Role {user!r} lacks the CREATE privilege on schema {self.schema!r}: run "
                f"'GRANT CREATE ON SCHEMA {self.schema} TO {user}' or 'ALTER SCHEMA {self.schema} OWNER TO {user}'")

    def create_history(self) -> None:
        self.query(pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(pgsql.Identifier(self.schema)))
        self.query(pgsql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " version bigint PRIMARY KEY,"
            " name text NOT NULL,"
            " checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now(),"
            " applied_by text NOT NULL DEFAULT current_user,"
            " duration_ms numeric(12,3) NOT NULL,"
            " transactional boolean NOT NULL,"
            " adopted boolean NOT NULL DEFAULT false,"
            " host text NOT NULL,"
            " source text NOT NULL DEFAULT '',"
            " previous_checksum text,"
            " checksum_accepted_at timestamptz)").format(self.history_ident()))

    # The lock ----------------------------------------------------------------------------------------
    def acquire_lock(self, key: int, what: str) -> float:
        """Take a session advisory lock, polling until lock_wait_timeout; return the wait in ms."""
        began = time.monotonic()
        deadline = began + self.p["lock_wait_timeout"]
        delay = 0.05
        while not self.query("SELECT pg_try_advisory_lock(%s)", (key,))[0][0]:
            if time.monotonic() >= deadline:
                raise MigrationError(f"Another run holds the lock of {what} after waiting "
                                     f"{self.p['lock_wait_timeout']} s: {self.lock_holders(key)}. "
                                     "Wait for it to finish, or end that session")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        return (time.monotonic() - began) * 1000

    def no_createdb(self) -> MigrationError:
        user, name = self.p["login_user"], self.p["login_db"]
        return MigrationError(
            f"Role {user!r} lacks the CREATEDB privilege needed to create database {name!r} on {self.where}: "
            f"run 'ALTER ROLE {user} CREATEDB', or have a DBA create the database (UTF8) and grant {user} "
            "CREATE on it")

    def can_create_databases(self) -> bool:
        return bool(self.query("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")[0][0])

    def create_database(self) -> bool:
        """Create login_db from the maintenance database, once, whoever else is trying; True if this run did."""
        name = self.p["login_db"]
        key = advisory_key("create-database", name)
        self.acquire_lock(key, f"the creation of database {name!r}")
        try:
            if self.query("SELECT 1 FROM pg_database WHERE datname = %s", (name,)):
                return False
            try:
                self.query(pgsql.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0").format(
                    pgsql.Identifier(name)))
            except psycopg2.errors.InsufficientPrivilege:
                raise self.no_createdb() from None
            return True
        finally:
            self.query("SELECT pg_advisory_unlock(%s)", (key,))

    def lock_holders(self, key: int) -> str:
        unsigned = key & 0xFFFFFFFFFFFFFFFF
        rows = self.query(
            "SELECT a.pid, a.usename, a.application_name, coalesce(host(a.client_addr), 'local'), "
            "to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS TZ') FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.objsubid = 1",
            (unsigned >> 32, unsigned & 0xFFFFFFFF))
        if not rows:
            return "the holder has just released it"
        return "; ".join(f"pid {pid} (user {user}, application {app!r}, from {addr}, connected since {since})"
                         for pid, user, app, addr, since in rows)

    def relation_lock_holders(self) -> str:
        rows = self.query(
            "SELECT DISTINCT a.pid, a.usename, a.application_name, a.state, l.mode, c.relname, "
            "coalesce(round(extract(epoch FROM now() - a.xact_start))::text, '?') "
            "FROM pg_locks l JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.granted AND l.pid <> pg_backend_pid() "
            "AND n.nspname = %s ORDER BY 1", (self.schema,))
        if not rows:
            return "no session holds a lock in that schema any more"
        return "blocked by " + "; ".join(
            f"pid {pid} (user {user}, application {app!r}, {state}, {mode} on {rel}, transaction open {age} s)"
            for pid, user, app, state, mode, rel, age in rows)

    # Applying ------------------------------------------------------------------------------------------
    def statement_error(self, mig: Migration, st: Statement, index: int, exc: psycopg2.Error) -> MigrationError:
        line = st.line
        pos = getattr(exc.diag, "statement_position", None)
        if pos and pos.isdigit():
            line += st.text[: int(pos) - 1].count("\n")
        message = first_line(exc.diag.message_primary or str(exc))
        where = f"Migration {mig.name} failed at line {line} (statement {index})"
        if self.conn.closed or exc.pgcode in (None, "57P01", "57P02"):
            kept = "all of this file" if mig.transactional else "this file's earlier statements stay"
            return MigrationError(
                f"{where}: the connection to the server was lost ({message}). The server rolls back what was not "
                f"committed ({kept}) and the file was not recorded. Run the deploy again when the server is back.",
                failed_migration=mig.name, line=line)
        code = exc.pgcode
        if mig.transactional:
            effect = "The file was rolled back and not recorded: nothing of it was applied."
        else:
            effect = (f"The file runs outside a transaction: its statements before statement {index} stayed "
                      "committed, and it was not recorded, so it runs again from the top next time.")
        msg = f"{where}: SQLSTATE {code} {psycopg2.errorcodes.lookup(code).lower()}: {message}. {effect}"
        if code == "25001":
            msg += " Mark the file with '-- pg_migrate:no-transaction' to run it outside a transaction."
        if code == "55P03":
            msg += f" lock_timeout ({self.p['lock_timeout']}) expired: {self.relation_lock_holders()}."
        if code == "42501":
            msg += f" Grant role {self.p['login_user']!r} the privilege named above."
        return MigrationError(msg, failed_migration=mig.name, sqlstate=code, line=line)

    def apply(self, mig: Migration, create_history: bool, adopting: bool) -> dict:
        """Run one file, then record it; a transactional file and its history row commit together.

        The history table is created after the file's statements, so that a first migration may
        create the managed schema itself without IF NOT EXISTS.
        """
        began = time.monotonic()
        cur = self.conn.cursor()
        if mig.transactional:
            cur.execute("BEGIN")
        try:
            before = self.catalog_fingerprint() if adopting else None
            for index, st in enumerate(mig.statements, 1):
                try:
                    cur.execute(st.text)
                except psycopg2.Error as exc:
                    self.rollback(mig)
                    raise self.statement_error(mig, st, index, exc) from None
            adopted = adopting and before == self.catalog_fingerprint()
            if create_history:
                self.create_history()
            duration = (time.monotonic() - began) * 1000
            cur.execute(pgsql.SQL("INSERT INTO {} (version, name, checksum, duration_ms, transactional, adopted, host, "
                                  "source) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)").format(self.history_ident()),
                        (mig.version, mig.name, mig.checksum, round(duration, 3), mig.transactional, adopted,
                         socket.gethostname(), self.p["source"]))
            if mig.transactional:
                cur.execute("COMMIT")
        except psycopg2.Error as exc:
            self.rollback(mig)
            raise MigrationError(f"Recording migration {mig.name} in {self.schema}.{self.table} failed: "
                                 f"SQLSTATE {exc.pgcode}: {first_line(str(exc))}. The file was not recorded"
                                 + (" (its statements stayed committed)" if not mig.transactional else
                                    " and nothing of it was applied")) from None
        return {**mig.summary(), "duration_ms": round(duration, 3), "adopted": adopted}

    def rollback(self, mig: Migration) -> None:
        """End a failed file's transaction; a lost connection needs nothing (the server rolls back)."""
        if mig.transactional and not self.conn.closed and \
                self.conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            with contextlib.suppress(psycopg2.OperationalError):  # the connection died with the statement
                self.conn.cursor().execute("ROLLBACK")

    def accept(self, change: dict) -> None:
        self.query(pgsql.SQL("UPDATE {} SET checksum = %s, previous_checksum = %s, checksum_accepted_at = now() "
                             "WHERE version = %s AND checksum = %s").format(self.history_ident()),
                   (change["new_checksum"], change["old_checksum"], change["version"], change["old_checksum"]))

    # The run -------------------------------------------------------------------------------------------
    def run(self, migrations: list[Migration]) -> dict:
        check = self.module.check_mode
        result: dict = {"changed": False, "database_exists": True, "database_created": False, "adopting": False,
                        "applied": [], "pending": [], "already_applied": [], "accepted": [], "drift": [],
                        "lock_wait_ms": 0.0, "history_table": f"{self.schema}.{self.table}"}
        mode = self.p["on_missing_database"]
        try:
            self.conn = self.connect(self.p["login_db"], read_only=check)
        except psycopg2.OperationalError as exc:
            # The server answered and the login is good, but the database is missing: confirm on the
            # maintenance database, so that a typo in the host is not reported as a missing database.
            self.conn = self.connect(self.p["maintenance_db"], read_only=check or mode != "create")
            result["server_version"] = self.server_version()
            if mode == "fail":
                raise MigrationError(f"Database {self.p['login_db']!r} does not exist on {self.where}: "
                                     "create it first, or set on_missing_database=create") from exc
            if check and mode == "create" and not self.can_create_databases():
                raise self.no_createdb() from None  # the plan predicts the failure the deploy would have
            if check or mode == "report":
                for mig in migrations:
                    mig.statements  # noqa: B018 - a broken file shows in the plan already
                result.update(database_exists=False, pending=[m.summary() for m in migrations],
                              changed=check and mode == "create")
                self.to_run = migrations
                if self.p["expected_tables"] is not None:
                    result.update(tables=[], missing_tables=sorted(self.p["expected_tables"]), unexpected_tables=[])
                return result
            result["database_created"] = result["changed"] = self.create_database()
            self.conn.close()
            self.conn = self.connect(self.p["login_db"], read_only=False)

        result["server_version"] = self.server_version()
        if not check:
            result["lock_wait_ms"] = round(self.acquire_lock(
                advisory_key(self.schema, self.table),
                f"{self.schema}.{self.table} in database {self.p['login_db']!r}"), 3)
        history_exists = self.history_exists()
        history = self.read_history() if history_exists else {}
        adopting = not history_exists and self.schema_has_tables()
        result["adopting"] = adopting
        plan = make_plan(migrations, history, self.p["accepted_changes"], self.p["unknown_versions"],
                         self.p["out_of_order"])
        result.update(already_applied=[{"version": m.version, "name": m.name} for m in plan.already_applied],
                      accepted=plan.accepted, drift=plan.drift)
        for mig in plan.pending:
            mig.statements  # noqa: B018 - parse every pending file before running any of them
        for d in plan.drift:
            if d["kind"] == "unknown":
                self.module.warn(f"Version {d['version']} ({d['name']}) is in the history but has no file")
        if plan.pending:
            self.check_privileges()  # in check mode too: the plan predicts the failure
        if check:
            result["pending"] = [m.summary() for m in plan.pending]
            self.to_run = plan.pending
            result["changed"] = bool(plan.pending or plan.accepted)
        else:
            for change in plan.accepted:
                self.accept(change)
                result["changed"] = True
            for index, mig in enumerate(plan.pending):
                try:
                    result["applied"].append(self.apply(mig, not history_exists and index == 0, adopting))
                except MigrationError as exc:
                    exc.details.update(applied=result["applied"], pending=[m.summary() for m in plan.pending[index:]])
                    raise
                self.to_run.append(mig)
                result["changed"] = True
        if self.p["expected_tables"] is not None:
            actual = self.tables()
            expected = set(self.p["expected_tables"])
            result.update(tables=actual, missing_tables=sorted(expected - set(actual)),
                          unexpected_tables=sorted(set(actual) - expected))
        return result

    def server_version(self) -> str:
        version = self.conn.server_version
        return f"{version // 10000}.{version % 10000}"

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def diff_of(result: dict, ran: list[Migration]) -> dict:
    """Before/after history listing, plus the SQL that runs (or would run)."""
    before = [f"{s['version']:>4} {s['name']}\n" for s in result["already_applied"]]
    after = before + [f"{m.version:>4} {m.name}\n" for m in ran]
    return {"before_header": f"{result['history_table']} (applied)", "after_header": f"{result['history_table']} (after)",
            "before": "".join(before), "after": "".join(after),
            "prepared": "".join(f"-- {m.name}\n{normalise(m.text)}\n" for m in ran)}


def main() -> None:
    argument_spec = {
        "login_host": {"type": "str", "default": "localhost"},
        "login_port": {"type": "int", "default": 5432},
        "login_user": {"type": "str", "default": "postgres"},
        "login_password": {"type": "str", "default": "", "no_log": True},
        "login_db": {"type": "str", "required": True},
        "maintenance_db": {"type": "str", "default": "postgres"},
        "ssl_mode": {"type": "str", "default": "prefer",
                     "choices": ["allow", "disable", "prefer", "require", "verify-ca", "verify-full"]},
        "ca_cert": {"type": "path"},
        "connect_timeout": {"type": "int", "default": 10},
        "wait_timeout": {"type": "int", "default": 0},
        "migrations": {"type": "dict", "required": True},
        "schema": {"type": "str", "default": "public"},
        "history_table": {"type": "str", "default": "pg_migrate_history"},
        "expected_tables": {"type": "list", "elements": "str"},
        "on_missing_database": {"type": "str", "default": "fail", "choices": ["fail", "report", "create"]},
        "unknown_versions": {"type": "str", "default": "fail", "choices": ["fail", "warn"]},
        "out_of_order": {"type": "str", "default": "fail", "choices": ["fail", "apply"]},
        "accepted_changes": {"type": "list", "elements": "dict", "default": [], "options": {
            "version": {"type": "int", "required": True},
            "old_checksum": {"type": "str", "required": True},
            "new_checksum": {"type": "str", "required": True}}},
        "lock_timeout": {"type": "str", "default": "5s"},
        "statement_timeout": {"type": "str", "default": "15min"},
        "lock_wait_timeout": {"type": "int", "default": 300},
        "application_name": {"type": "str", "default": "pg_migrate"},
        "source": {"type": "str", "default": ""},
    }
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    if PSYCOPG2_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("psycopg2"), missing_library="psycopg2", exception=PSYCOPG2_IMPORT_ERROR)

    for option in ("lock_timeout", "statement_timeout"):
        if not TIMEOUT_RE.match(module.params[option]):
            module.fail_json(msg=f"{option}={module.params[option]!r} is not a PostgreSQL duration "
                                 "such as 5s, 500ms or 15min")
    began = time.monotonic()
    migrator = Migrator(module)
    try:
        migrations = load_migrations(module.params["migrations"])
        result = migrator.run(migrations)
    except MigrationError as exc:
        module.fail_json(msg=exc.msg, **exc.details)
    except psycopg2.Error as exc:
        # Anything the server refused outside a migration file: name what was being done.
        module.fail_json(msg=f"PostgreSQL at {migrator.where} (database {module.params['login_db']!r}) failed: "
                             f"SQLSTATE {exc.pgcode}: {first_line(str(exc))}")
    finally:
        migrator.close()
    result["duration_ms"] = round((time.monotonic() - began) * 1000, 3)
    if module._diff:
        result["diff"] = diff_of(result, migrator.to_run)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
