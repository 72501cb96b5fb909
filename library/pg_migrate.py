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
  - The SQL is read on the controller by the module's action plugin with pglast (PostgreSQL's own
    scanner, and its parser where it reads the file); the target host needs only psycopg2. Whether the
    SQL is valid is the server's to judge.
  - Each file runs in its own transaction together with its history row, so a failing file leaves
    no trace. Its text goes to the server whole, as one query, so PostgreSQL's own parser reads it;
    a failure names the line from the server's error position. A file holding transaction control
    (C(BEGIN), C(COMMIT), ...), a statement PostgreSQL refuses in a transaction block (C(CREATE INDEX
    CONCURRENTLY), C(VACUUM), ...), C(COPY ... FROM stdin), a psql meta-command, a change of
    C(standard_conforming_strings) or a NUL character is refused before anything runs, every such file
    named in one message. A file of comments only is a no-op, recorded as applied.
  - A file whose leading comments (before any SQL; C(--) lines or a C(/* ... */) block) hold the marker
    C(-- pg_migrate:no-transaction) runs one statement at a time outside a transaction (for C(CREATE INDEX
    CONCURRENTLY)), split where psql would end each statement. After such a file, an INVALID index in
    O(schema) (left by a failed concurrent build) fails the run, naming it. When such a file fails, the statements before the
    failing one stay committed and the file is not recorded, so it runs again from its first
    statement next time and must be written to be re-runnable.
  - Every file starts from the session's defaults (settings, role, temporary tables), as with one
    C(psql -f) per file.
  - The managed schema and the history table must belong to the login, a role it belongs to, or a
    superuser, and the history table must have no trigger, rule or policy; otherwise the run is
    refused, since it would run code that another role controls.
  - When the controller goes away (Ctrl-C, a cancelled job, a closed SSH session), the running
    statement is cancelled and the file rolled back within a second.
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
  - With O(verify), the run only reports the state, for a read-only monitoring login (CONNECT,
    USAGE, SELECT). It reads as in check mode, and a missing database is reported, not a failure.
version_added: "1.0.0"
author:
  - Stock Monitoring team (@stock-monitoring)
options:
  env_file:
    description:
      - A C(.env) file on the target host, read as python-dotenv (1.2) reads it, whose C(POSTGRES_HOST),
        C(POSTGRES_PORT), C(POSTGRES_USER), C(POSTGRES_PASSWORD) and C(POSTGRES_DB) are the connection
        settings, each replaced by its O(login_host), O(login_port), O(login_user), O(login_password) or
        O(login_db) option when that is set. The keys without such an option must be in the file.
      - Read on the host by the module itself, so that the password never travels to the controller.
        A problem names the file, the line or the key, never a value.
      - Without it, the options or their defaults (C(localhost), C(5432), C(postgres), no password) are used,
        and O(login_db) is required.
    type: path
  login_host:
    description: Host of the PostgreSQL server (a name, an address, or a Unix socket directory).
    type: str
  login_port:
    description: Port of the PostgreSQL server.
    type: int
  login_user:
    description: Role to log in as. It owns what the migrations create.
    type: str
  login_password:
    description:
      - Password of O(login_user). Never returned, logged or stored in the history table.
    type: str
  login_db:
    description: The database the migrations apply to; required without O(env_file).
    type: str
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
  require_auth:
    description:
      - libpq C(require_auth), the authentication methods accepted from the server, for example
        C(scram-sha-256) so that the password is never sent in clear text or as an MD5 answer to
        whatever answers on the port. Empty for libpq's default, any method.
      - Needs libpq 16 or newer; with an older one the module warns that it is not enforced.
    type: str
    default: ""
  channel_binding:
    description: libpq C(channel_binding) (SCRAM over TLS).
    type: str
    default: prefer
    choices: [disable, prefer, require]
  connect_timeout:
    description:
      - Seconds one connection attempt may take.
      - While a statement runs longer than this, the module asks the server on a second connection whether
        it still answers; when it gets no answer twice in a row, it closes the connection and fails naming
        the server, rather than wait on a hung host that no timeout on the server can end. Each check waits
        at least 5 s. 0 is libpq's "no limit", and turns the check off.
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
      - The module's action plugin reads them on the controller with PostgreSQL's parser. Large sets
        travel as a temporary file on the target host, removed after the run; they hold no secret.
      - Required, unless O(drop_schema) is set.
    type: dict
    default: {}
  drop_schema:
    description:
      - Instead of migrating, drop O(schema) with everything in it, its history table included, under the
        migration lock (C(DROP SCHEMA ... CASCADE)), as a development rollback. In check mode, only says
        whether it would.
    type: bool
    default: false
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
  progress_interval:
    description:
      - While a statement (a transactional file, or one statement of a no-transaction file) runs longer
        than this many seconds, ask PostgreSQL what the session is doing, every this many seconds, on a
        second read-only connection (named O(application_name) followed by C(progress)). Index builds
        report their phase and share done from C(pg_stat_progress_create_index), C(CLUSTER) and
        C(VACUUM FULL) from C(pg_stat_progress_cluster), C(VACUUM) and C(ANALYZE) from their views; a lock
        wait names the lock and each blocking session (C(pg_blocking_pids)), with the attempt under
        O(lock_retries); otherwise the session's C(wait_event).
      - The action plugin prints each event on the controller while the module runs (on its standard error),
        at the default verbosity, locally and over SSH; not in check mode, with O(verify), with C(no_log),
        or over a connection other than C(local), C(ssh), C(paramiko_ssh) and C(docker). The events and the
        statement's duration are returned in RV(progress) in every case.
      - V(0) turns it off. No query is made and no connection opened for a shorter statement.
    type: int
    default: 5
  source:
    description:
      - Where the run comes from (for example the play and the controller), stored in the history.
    type: str
    default: ""
  lock_retries:
    description:
      - How a transactional file that loses a race for a lock is retried, as GitLab's C(with_lock_retries)
        does. Each entry is one attempt (or O(lock_retries[].times) attempts). The file runs with that
        attempt's C(lock_timeout); when it fails on C(lock_timeout) (SQLSTATE 55P03) or is chosen as a
        deadlock victim (40P01), it was rolled back whole, and runs again from its start after
        O(lock_retries[].sleep). Queries queued behind its lock wait at most one attempt's lock_timeout.
      - When the last attempt fails, the run fails naming the sessions that hold locks in the schema.
      - A no-transaction file runs each statement in its own transaction, so a statement that loses a
        lock race left nothing and is retried alone with the same schedule; the statements before it
        stay applied. A C(CONCURRENTLY) statement (but C(REFRESH MATERIALIZED VIEW CONCURRENTLY)) is not
        retried, since a failed one leaves an invalid index or a pending detach, nor is a C(DO) block or a
        C(CALL), which may have committed part of its work; they run once, under O(lock_timeout).
      - The schedule's lock_timeout is set before the file's own statements, so a file that sets
        C(lock_timeout) itself overrides it in a transactional file (not in a no-transaction one).
      - Empty (the default) means no retry, one attempt under O(lock_timeout).
    type: list
    elements: dict
    default: []
    suboptions:
      lock_timeout:
        description: The attempt's lock_timeout, a PostgreSQL duration (V(100ms), V(1s)).
        type: str
        required: true
      sleep:
        description: The pause after the attempt lost a lock race, a duration (V(50ms), V(2s)).
        type: str
        required: true
      times:
        description: How many attempts this entry stands for.
        type: int
        default: 1
  expected_schema:
    description:
      - The canonical schema, as C(make schema) writes it (C(migrations), the file names and checksums
        it was made from; C(objects), the tables, columns, indexes, constraints, sequences, views,
        functions and triggers of O(schema)). After the run, the schema is compared with it, in the
        same module execution and one query, when the database has exactly those migrations applied;
        otherwise RV(schema_not_compared) says why.
      - Only definitions are compared (types, nullability, defaults, identity, index and constraint
        definitions, function bodies, comments), never data, statistics, OIDs or column order. The
        history table is left out.
    type: dict
  verify:
    description:
      - Report the state only, as a monitoring job needs it, never C(changed), with check mode or without.
      - The deploy's privilege failures (CREATE, CREATEDB) and the ownership of the schema and the
        history table are not checked, since the login verifying is not the one that deploys.
      - A missing database is reported (RV(database_exists) false) whatever O(on_missing_database) says.
    type: bool
    default: false
  plan_out:
    description:
      - In check mode, also return RV(plan), this database's entry of a reviewed plan, for O(expected_plan) to
        apply later. It costs three catalog queries (the database's identity and the managed schema).
      - Only with check mode, and not with O(verify).
    type: bool
    default: false
  expected_plan:
    description:
      - Apply exactly this reviewed plan (an RV(plan) entry, with the plan's C(id), C(created_at) and C(file)),
        as C(terraform apply PLANFILE) does.
      - Under the migration lock and before writing anything, the run compares the database's identity, its
        history rows, the managed schema and the planned files' checksums with what the plan saw. On any
        difference it fails naming each one, and nothing is applied or recorded (RV(plan_differences)).
      - Only the planned files run; a file added since is not applied (RV(left_out), and a warning). Each
        history row records the plan's id in a C(plan) column (added to an older history table). A plan
        whose files are all recorded with its id was applied before, and nothing runs.
      - In check mode, the same comparison, and the plan it would apply. Not with O(verify) or O(plan_out).
    type: dict
attributes:
  check_mode:
    description: Can run in check mode and return a changed status prediction without modifying the target.
    support: full
  diff_mode:
    description: Returns details on what has changed (or would change in check mode) when in diff mode.
    support: full
requirements:
  - psycopg2 >= 2.8 (on the target host)
  - pglast >= 8 (on the controller)
  - PostgreSQL 14 to 18 (an older server is refused before anything runs)
notes:
  - Connect directly or through a session-pooling proxy. Behind a pooler that hands the session's
    server connection to other clients between transactions (PgBouncer's transaction or statement
    pooling), a run that writes, and its check mode, are refused before anything is set; O(verify) reads
    through it. Nothing goes in the C(options) startup parameter, which PgBouncer refuses or drops; the
    timeouts are set by SQL, and in check mode and O(verify) each query carries its own C(READ ONLY)
    and timeouts, local to its transaction.
  - With several hosts in O(login_host), the run goes to the one that takes writes; a missing database
    is created there, and the run then connects to that host.
  - The migration files must not contain their own C(BEGIN)/C(COMMIT) (unless marked no-transaction),
    nor psql meta-commands.
  - A runtime error in a transactional file (a unique violation, a division by zero) comes without a
    position from the server; the failure then names the table and constraint the server names.
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
mode:
  description:
    - What the run did, V(deploy); V(plan) in check mode (nothing written); V(verify) with O(verify).
      A O(drop_schema) run is V(deploy), or V(plan) in check mode.
  returned: always
  type: str
  sample: deploy
login:
  description:
    - The connection settings used, from O(env_file) and the options, without the password.
  returned: always, once the settings are known
  type: dict
  sample: {host: db.internal, port: 5432, user: app, database: stock_monitoring}
dropped:
  description: Whether O(schema) was dropped (in check mode, would be).
  returned: when O(drop_schema) is set
  type: bool
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
  description:
    - Files applied by this run (in check mode, none).
    - C(attempts) counts the file's runs under O(lock_retries); it is also recorded in the history table.
  returned: always
  type: list
  elements: dict
  sample: [{version: 23, name: 023_stock_monitoring_notifications.sql, checksum: 9a0b41, duration_ms: 12.5,
            transactional: true, adopted: false, attempts: 1}]
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
schema_compared:
  description: Whether the schema was compared with O(expected_schema).
  returned: when O(expected_schema) is given and the database exists
  type: bool
schema_differences:
  description: Each difference from O(expected_schema), in a DBA's words; empty when it matches.
  returned: when O(expected_schema) is given and the database exists
  type: list
  elements: str
  sample: ["alerts.bars_hotfix: column not in the schema file", "index alerts_user_id_idx: missing"]
schema_not_compared:
  description:
    - Why the schema was not compared - the database does not have exactly the file's migrations, or a
      session holds one of its tables in ACCESS EXCLUSIVE mode, which reading a definition waits for.
  returned: when the schema was not compared
  type: str
schema_compare_blocked:
  description: Whether the comparison was not made because a table was locked (see RV(schema_not_compared)).
  returned: when a locked table stopped the comparison
  type: bool
missing_library:
  description: C(psycopg2) when the target's Python lacks it; the run then failed before connecting.
  returned: when psycopg2 is missing
  type: str
  sample: psycopg2
files:
  description: The names of the migration files, none of them compared with the database.
  returned: when psycopg2 is missing
  type: list
  elements: str
  sample: [022_stock_monitoring_schema.sql]
plan:
  description:
    - This database's entry of a reviewed plan (O(plan_out)). C(database) is its identity (C(system_identifier)
      where the login may read it, else null; C(database), C(database_oid), null when it is missing; C(host),
      C(port)); C(pending) the files to apply with their checksums; C(accepted) the accepted edits; C(history)
      and C(history_sha256) the history rows read; C(schema_objects) and C(schema_sha256) a digest of each
      object of O(schema). Nothing of it is secret.
  returned: in check mode with O(plan_out)
  type: dict
applied_plan:
  description:
    - The reviewed plan applied (O(expected_plan)), its C(id) and C(created_at); C(applied_before) when it had
      been applied already and nothing ran.
  returned: with O(expected_plan), when it matched
  type: dict
left_out:
  description: Pending files that are not in the reviewed plan, so not applied.
  returned: with O(expected_plan), when it matched
  type: list
  elements: dict
plan_differences:
  description: Each way the database or the files differ from the reviewed plan; the run then applied nothing.
  returned: when O(expected_plan) was refused
  type: list
  elements: str
progress:
  description:
    - Each statement that ran longer than O(progress_interval), with its duration and what PostgreSQL
      said it was doing every interval (RV(progress[].events)). C(statement) counts the statements of a
      no-transaction file from 0; it is null for a transactional file, which runs whole. The action plugin
      adds the C(line) and the statement's first words (C(sql)) from the file as read on the controller.
  returned: when a statement ran longer than O(progress_interval)
  type: list
  elements: dict
  contains:
    events:
      description:
        - C(seq), C(elapsed_s) since the statement started, C(attempt) of C(attempts), C(text) as printed,
          C(line) and C(sql) (or C(lines)), and the view's facts; C(view), C(command), C(relation),
          C(phase), C(done) of C(total) C(unit) and C(percent); C(waiting_for) and C(blockers) (pid,
          application_name, user, state, transaction_open_s); between lock retries C(holders); or
          C(wait_event). The last is C(finished) with C(ok).
        - At most 720 a statement, the first 60 and the latest; C(events_left_out) counts the others.
      type: list
      elements: dict
  sample: [{migration: 024_alerts_symbol_index.sql, statement: 0, line: 3, duration_ms: 41210.5, ok: true,
            sql: CREATE INDEX CONCURRENTLY alerts_symbol_idx ON stock_monitoring.alerts (symbol),
            events: [{elapsed_s: 5.0, attempt: 1, attempts: 1, command: CREATE INDEX CONCURRENTLY,
                      phase: "building index: scanning table", done: 1204, total: 4425, unit: blocks,
                      percent: 27.2, text: "CREATE INDEX CONCURRENTLY on stock_monitoring.alerts ..."}]}]
server_version:
  description: Version of the PostgreSQL server.
  returned: when the server was reached
  type: str
  sample: "15.18"
"""

import contextlib
import hashlib
import json
import os
import time
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible.module_utils.pg_migrate_connect import PSYCOPG2_IMPORT_ERROR, Database, psycopg2
from ansible.module_utils.pg_migrate_dotenv import DotenvError, read_login
from ansible.module_utils.pg_migrate_plan import (
    MigrationError,
    first_line,
    load_migrations,
    lock_schedule,
    name_problem,
    option,
    seconds,
)
from ansible.module_utils.pg_migrate_reviewed import plan_entry
from ansible.module_utils.pg_migrate_run import drop_schema, migrate
from ansible.module_utils.pg_migrate_schema import schema_file_problem
from ansible.module_utils.pg_migrate_watchdog import watch_controller

DURATION_OPTIONS = ("lock_timeout", "statement_timeout")
ARGUMENT_SPEC = {
    "env_file": {"type": "path"},
    "login_host": {"type": "str"},
    "login_port": {"type": "int"},
    "login_user": {"type": "str"},
    "login_password": {"type": "str", "no_log": True},
    "login_db": {"type": "str"},
    "maintenance_db": {"type": "str", "default": "postgres"},
    "ssl_mode": {"type": "str", "default": "prefer",
                 "choices": ["allow", "disable", "prefer", "require", "verify-ca", "verify-full"]},
    "ca_cert": {"type": "path"},
    "require_auth": {"type": "str", "default": ""},
    "channel_binding": {"type": "str", "default": "prefer", "choices": ["disable", "prefer", "require"]},
    "connect_timeout": {"type": "int", "default": 10},
    "wait_timeout": {"type": "int", "default": 0},
    "migrations": {"type": "dict", "default": {}},
    "drop_schema": {"type": "bool", "default": False},
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
    "progress_interval": {"type": "int", "default": 5},
    "source": {"type": "str", "default": ""},
    "lock_retries": {"type": "list", "elements": "dict", "default": [], "options": {
        "lock_timeout": {"type": "str", "required": True},
        "sleep": {"type": "str", "required": True},
        "times": {"type": "int", "default": 1}}},
    "expected_schema": {"type": "dict"},
    "verify": {"type": "bool", "default": False},
    "plan_out": {"type": "bool", "default": False},
    "expected_plan": {"type": "dict"},
    # Set by the action plugin on the controller, never by a task (it drops them from the task's arguments):
    # what the SQL parser found in each file; the file the migrations travel in when large, and its SHA-256;
    # on a local connection, the ansible-playbook worker the watchdog watches (see pg_migrate_watchdog); the
    # name of the progress file it reads while the module runs (see pg_migrate_progress).
    "_findings": {"type": "dict"},
    "_migrations_path": {"type": "str"},
    "_migrations_sha256": {"type": "str"},
    "_controller_pid": {"type": "int"},
    "_progress_token": {"type": "str", "no_log": True},  # not shown: the file it names is for the plugin alone
}
PG_MAX_MILLISECONDS = 2147483647  # lock_timeout and statement_timeout are int milliseconds


AUTH_METHODS = ("password", "md5", "gss", "sspi", "scram-sha-256", "oauth", "none")


def require_auth_problem(value: str) -> str | None:
    """What libpq would refuse in a require_auth list, said before connecting."""
    if not value:
        return None
    methods = value.split(",")
    negated = [m.startswith("!") for m in methods]
    if any(negated) and not all(negated):
        return "methods are either all allowed or all refused with '!', not mixed"
    unknown = [m for m in methods if m.removeprefix("!") not in AUTH_METHODS]
    if unknown:
        return f"{', '.join(unknown)} is not a libpq method ({', '.join(AUTH_METHODS)}, each with or without '!')"
    return None


LOGIN_OPTIONS = {"POSTGRES_HOST": "login_host", "POSTGRES_PORT": "login_port", "POSTGRES_USER": "login_user",
                 "POSTGRES_PASSWORD": "login_password", "POSTGRES_DB": "login_db"}
LOGIN_DEFAULTS = {"login_host": "localhost", "login_port": 5432, "login_user": "postgres", "login_password": ""}


def resolve_login(params: dict) -> str | None:
    """Fill the login options from env_file (or their defaults) in params; what is wrong, or None."""
    if params["env_file"]:
        try:
            login = read_login(params["env_file"], {key: params[option] for key, option in LOGIN_OPTIONS.items()})
        except DotenvError as exc:
            return str(exc)
        params.update({option: login[key] for key, option in LOGIN_OPTIONS.items()})
        params["login_port"] = int(params["login_port"])
    else:
        if not params["login_db"]:
            return f"{option('login_db')} is required when {option('env_file')} is not given"
        params.update({option: value for option, value in LOGIN_DEFAULTS.items() if params[option] is None})
    return None


def login_of(params: dict) -> dict:
    """The connection settings that are not secret, as the result reports them."""
    return {"host": params["login_host"], "port": params["login_port"], "user": params["login_user"],
            "database": params["login_db"]}


PLAN_KEYS = {"id": str, "created_at": str, "file": str, "database": (dict, type(None)), "pending": list,
             "accepted": list, "history": (list, type(None)), "schema_objects": (dict, type(None))}


DATABASE_KEYS = {"system_identifier", "database", "database_oid", "host", "port"}


def plan_problem(params: dict, check_mode: bool) -> str | None:
    """A reviewed plan is written by a plan and applied by a deploy, one at a time."""
    if params["plan_out"] and (not check_mode or params["verify"] or params["expected_plan"]):
        return (f"{option('plan_out')} is written by a plan: run in check mode (--check), without "
                f"{option('expected_plan')}, and not as a verify")
    expected = params["expected_plan"]
    if expected is None:
        return None
    if params["verify"] or params["drop_schema"]:
        return f"{option('expected_plan')} is applied by a deploy, not by a verify or a drop of the schema"
    wrong = [key for key, kind in PLAN_KEYS.items() if not isinstance(expected.get(key), kind)]
    database = expected.get("database")
    if isinstance(database, dict) and not set(database) >= DATABASE_KEYS:
        wrong.append("database")
    if database is not None and (expected.get("history") is None or expected.get("schema_objects") is None):
        wrong.append("history or schema_objects")
    if wrong:
        return f"{option('expected_plan')} is not a plan entry (missing or wrong: {', '.join(wrong)})"
    return None


def input_problem(params: dict, check_mode: bool = False) -> str | None:
    """What is wrong with the options before any connection, in the words of the option."""
    for key in DURATION_OPTIONS:
        try:
            duration = seconds(params[key])
        except ValueError:
            return f"{option(key)}={params[key]!r} is not a PostgreSQL duration such as 5s, 500ms or 15min"
        if duration * 1000 > PG_MAX_MILLISECONDS:
            return f"{option(key)}={params[key]!r} is longer than PostgreSQL takes (at most 2147483647ms, about 24 days)"
    try:
        lock_schedule(params["lock_retries"])
    except ValueError as exc:
        return f"{option('lock_retries')}: {exc}"
    for key in ("login_host", "login_user", "login_password", "login_db", "maintenance_db", "application_name"):
        if "\0" in params[key]:  # libpq takes C strings: the value would end there, or psycopg2 raise
            return f"{option(key)} holds a NUL character, which no connection can carry"
    if params["connect_timeout"] < 0:
        return f"{option('connect_timeout')} must be 0 (no limit) or more seconds"
    if params["progress_interval"] < 0:
        return f"{option('progress_interval')} must be 0 (off) or more seconds"
    problem = plan_problem(params, check_mode)
    if problem:
        return problem
    problem = require_auth_problem(params["require_auth"])
    if problem:
        return f"{option('require_auth')}={params['require_auth']!r}: {problem}"
    for key, what in (("login_db", "Database name"), ("maintenance_db", "Maintenance database name"),
                      ("schema", "Schema name"), ("history_table", "History table name")):
        problem = name_problem(what, params[key])
        if problem:
            return f"{problem} ({option(key)})"
    return None


def read_migrations(params: dict) -> tuple[dict, dict | None]:
    """The migrations and the action plugin's findings: in the arguments, or in a file when large (with
    expected_schema, which it then sets in params).

    The file is in the target's temporary directory, which may be shared (remote_tmp under /tmp): it is
    read once, removed, and used only if it is what the controller wrote, so that another local user who
    swapped it cannot have her SQL run as the database login."""
    path = params["_migrations_path"]
    if not path:
        return params["migrations"], params["_findings"]
    try:
        with open(path, "rb") as prepared:
            data = prepared.read()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    if not params["_migrations_sha256"] or hashlib.sha256(data).hexdigest() != params["_migrations_sha256"]:
        raise MigrationError(
            f"The migrations file {path} does not hold what the controller sent (its SHA-256 differs): another "
            "user of the host's temporary directory may have replaced it. Nothing was run. Set remote_tmp to a "
            "directory only the deploy user can write (Ansible's default, ~/.ansible/tmp), and run the deploy again")
    sent = json.loads(data)
    params["expected_schema"] = sent.get("expected_schema")
    return sent["migrations"], sent["findings"]


def diff_of(result: dict, ran: list) -> dict:
    """Before/after history listing, plus the SQL that runs (or would run)."""
    before = [f"{s['version']:>4} {s['name']}\n" for s in result["already_applied"]]
    after = before + [f"{m.version:>4} {m.name}\n" for m in ran]
    return {"before_header": f"{result['history_table']} (applied)", "after_header": f"{result['history_table']} (after)",
            "before": "".join(before), "after": "".join(after),
            "prepared": "".join(f"-- {m.name}\n{m.text.rstrip()}\n" for m in ran)}


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    # The run's mode, decided here once and returned in every result, for the role and its report.
    mode = "verify" if module.params["verify"] else "plan" if module.check_mode else "deploy"
    problem = resolve_login(module.params)
    if problem:
        module.fail_json(msg=problem, mode=mode)
    if module.params["login_password"]:  # read from the .env after Ansible took the no_log values: add it
        module.no_log_values.add(module.params["login_password"])
    common = {"login": login_of(module.params), "mode": mode}
    if psycopg2 is None:
        # Nothing can be compared with the database: name the files, so that a plan can list them.
        try:
            sent = read_migrations(module.params)
            if module.params["plan_out"] and module.check_mode:  # a plan of the files alone: see plan_entry
                common["plan"] = plan_entry(None, None, load_migrations(*sent), [], None)
        except MigrationError as exc:
            module.fail_json(msg=exc.msg, **common)
        files = sorted(sent[0])
        module.fail_json(msg=missing_required_lib("psycopg2"), missing_library="psycopg2", files=files,
                         exception=PSYCOPG2_IMPORT_ERROR, **common)
    problem = input_problem(module.params, module.check_mode)
    if problem:
        module.fail_json(msg=problem, **common)
    began = time.monotonic()
    db = Database(module.params, mode, module.warn)
    watch_controller(lambda: db.conn, module.params["_controller_pid"], db.watch_server, db.progress.close)
    db.progress.start()
    ran = []
    try:
        if module.params["drop_schema"]:
            result = drop_schema(db)
        else:
            migrations = load_migrations(*read_migrations(module.params))
            problem = schema_file_problem(module.params["expected_schema"])
            if problem:
                raise MigrationError(f"{option('expected_schema')}: {problem}")
            result, ran = migrate(db, migrations)
    except MigrationError as exc:
        module.fail_json(msg=exc.msg, **common, **db.progress.result(), **exc.details)
    except psycopg2.Error as exc:
        # Anything the server refused outside a migration file: name what was being done.
        module.fail_json(msg=f"PostgreSQL at {db.where} (database {module.params['login_db']!r}) failed: "
                             + (db.stalled or f"SQLSTATE {exc.pgcode}: {first_line(str(exc))}"),
                         **common, **db.progress.result())
    except Exception as exc:
        module.fail_json(msg=f"pg_migrate failed unexpectedly ({type(exc).__name__}: {first_line(str(exc))}); "
                             "this is a bug in pg_migrate: please report it with this message",
                         exception=traceback.format_exc(), **common, **db.progress.result())
    finally:
        db.progress.close()
        db.close()
    result["duration_ms"] = round((time.monotonic() - began) * 1000, 3)
    if module._diff and not module.params["drop_schema"]:
        result["diff"] = diff_of(result, ran)
    module.exit_json(**common, **db.progress.result(), **result)


if __name__ == "__main__":
    main()
