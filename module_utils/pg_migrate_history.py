# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""The history table and the schema it lives in: whether the login may trust them, what they record."""

from __future__ import annotations

import socket

from ansible.module_utils.pg_migrate_connect import Database
from ansible.module_utils.pg_migrate_plan import Migration, MigrationError

try:
    from psycopg2 import sql as pgsql
except ImportError:  # pg_migrate reports it through missing_required_lib
    pgsql = None


# One round trip: the managed schema and history table, who owns them, whether the login may trust and
# use them, and whether the schema already holds tables (a database migrated by hand).
INSPECT = """
WITH RECURSIVE mine(oid) AS (
  SELECT oid FROM pg_roles WHERE rolname = session_user
  UNION SELECT m.roleid FROM pg_auth_members m JOIN mine ON m.member = mine.oid),
-- Owners the login may trust: itself, the roles it was granted, superusers, and pg_database_owner
-- (owner of schema public) when the database's owner is one of those.
trusted(oid) AS (
  SELECT oid FROM mine UNION SELECT oid FROM pg_roles WHERE rolsuper
  UNION SELECT 'pg_database_owner'::regrole FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba
  WHERE d.datname = current_database() AND (r.rolsuper OR r.oid IN (SELECT oid FROM mine)))
SELECT n.oid IS NOT NULL, pg_get_userbyid(n.nspowner), n.oid IS NULL OR n.nspowner IN (SELECT oid FROM trusted),
       c.oid IS NOT NULL, pg_get_userbyid(c.relowner), c.oid IS NULL OR c.relowner IN (SELECT oid FROM trusted),
       c.relkind,
       ARRAY(SELECT 'trigger ' || tgname FROM pg_trigger WHERE tgrelid = c.oid AND NOT tgisinternal
             UNION ALL SELECT 'rule ' || rulename FROM pg_rewrite WHERE ev_class = c.oid
             UNION ALL SELECT 'policy ' || polname FROM pg_policy WHERE polrelid = c.oid
             UNION ALL SELECT 'row level security' WHERE c.relrowsecurity),
       EXISTS (SELECT 1 FROM pg_class t WHERE t.relnamespace = n.oid AND t.relkind IN ('r', 'p')
               AND t.relname <> %(table)s),
       has_database_privilege(current_database(), 'CREATE'),
       n.oid IS NOT NULL AND has_schema_privilege(n.oid, 'CREATE'),
       EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = c.oid AND attname = 'attempts' AND NOT attisdropped),
       EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = c.oid AND attname = 'plan' AND NOT attisdropped),
       current_setting('standard_conforming_strings')
FROM (SELECT 1) one
LEFT JOIN pg_namespace n ON n.nspname = %(schema)s
LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = %(table)s
"""


def inspect(db: Database) -> dict:
    """The managed schema and history table as they are, refused when the login cannot trust them.

    A role with CREATE on the database could plant the schema, or a history table with a trigger,
    before the first deploy; the deploy (as its owner or a superuser) would then run that role's code.
    """
    row = db.query(INSPECT, {"schema": db.schema, "table": db.table})[0]
    (schema_exists, schema_owner, schema_trusted, history_exists, table_owner, table_trusted, relkind,
     attachments, has_tables, can_create_schema, can_create_in_schema, has_attempts, has_plan,
     standard_strings) = row
    user = db.p["login_user"]
    for exists, trusted, kind, name, owner in (
            (schema_exists, schema_trusted, "Schema", db.schema, schema_owner),
            (history_exists, table_trusted, "History table", f"{db.schema}.{db.table}", table_owner)):
        if exists and not trusted and not db.verify:  # reading runs nothing of the owner's
            raise MigrationError(
                f"{kind} {name} is owned by role {owner!r}, which is neither {user!r} (the login), nor a role "
                f"{user!r} belongs to, nor a superuser: running migrations there would run what {owner!r} put "
                f"in it with {user!r}'s privileges. pg_migrate refuses. If {owner!r} is trusted, make the owner "
                f"{user!r} (ALTER ... OWNER TO) or GRANT {owner!r} TO {user!r}; otherwise investigate")
    if history_exists and (relkind != "r" or attachments):
        what = ", ".join(attachments) if attachments else f"relkind {relkind!r}, not a plain table"
        raise MigrationError(
            f"History table {db.schema}.{db.table} has {what}: pg_migrate writes to it only when it is a "
            "plain table with no trigger, rule or policy, since those would run code on every deploy. Remove "
            "them, after finding out who added them")
    return {"schema_exists": schema_exists, "history_exists": history_exists,
            "adopting": not history_exists and has_tables,
            "can_create_schema": can_create_schema, "can_create_in_schema": can_create_in_schema,
            "history_has_attempts": has_attempts, "history_has_plan": has_plan, "standard_strings": standard_strings}


def read_history(db: Database, with_plan: bool = False) -> dict[int, dict]:
    """{version: {name, checksum, plan}}: plan is the reviewed plan a row was applied from (None: none)."""
    rows = db.query(pgsql.SQL("SELECT version, name, checksum, {} FROM {}").format(
        pgsql.SQL("plan" if with_plan else "NULL"), db.history_ident()))
    return {int(v): {"name": n, "checksum": c, "plan": p} for v, n, c, p in rows}


def tables(db: Database) -> list[str]:
    rows = db.query("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND c.relname <> %s ORDER BY 1",
                    (db.schema, db.table))
    return [r[0] for r in rows]


def catalog_writes(db: Database) -> int:
    """Rows this session has inserted, updated or deleted in the system catalogs, its open transaction's
    (subtransactions included) among them: the same before and after a transactional file means the file
    created, changed and dropped nothing. Other sessions, their temporary tables too, count apart."""
    return db.query("SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) "
                    "FROM pg_catalog.pg_stat_xact_sys_tables WHERE schemaname = 'pg_catalog'")[0][0]


def catalog_counts(db: Database) -> tuple:
    """Counts of catalog rows, without temporary objects (another session's come and go): equal before and
    after a no-transaction file means it created and dropped nothing (its statements commit one by one,
    which catalog_writes cannot follow)."""
    temporary = "nspname ~ '^pg_(toast_)?temp_'"
    lasting = f"(SELECT oid FROM pg_namespace WHERE NOT ({temporary}))"
    relations = f"(SELECT oid FROM pg_class WHERE relnamespace IN {lasting})"
    return db.query(
        f"SELECT (SELECT count(*) FROM pg_class WHERE relnamespace IN {lasting}), "
        f"(SELECT count(*) FROM pg_attribute WHERE attrelid IN {relations}), "
        f"(SELECT count(*) FROM pg_constraint WHERE connamespace IN {lasting}), "
        f"(SELECT count(*) FROM pg_namespace WHERE NOT ({temporary})), "
        f"(SELECT count(*) FROM pg_proc WHERE pronamespace IN {lasting}), "
        f"(SELECT count(*) FROM pg_type WHERE typnamespace IN {lasting}), "
        f"(SELECT count(*) FROM pg_trigger WHERE tgrelid IN {relations}), "
        f"(SELECT count(*) FROM pg_policy WHERE polrelid IN {relations})")[0]


def check_privileges(db: Database, state: dict) -> None:
    """Fail before running anything when the login cannot create what the run needs."""
    user, name = db.p["login_user"], db.p["login_db"]
    if not state["schema_exists"] and not state["can_create_schema"]:
        raise MigrationError(
            f"Role {user!r} lacks the CREATE privilege on database {name!r}, needed to create schema "
            f"{db.schema!r}: run 'GRANT CREATE ON DATABASE {name} TO {user}' as its owner, or create the "
            "schema for it")
    if state["schema_exists"] and not state["can_create_in_schema"]:
        raise MigrationError(
            f"Role {user!r} lacks the CREATE privilege on schema {db.schema!r}: run "
            f"'GRANT CREATE ON SCHEMA {db.schema} TO {user}' or 'ALTER SCHEMA {db.schema} OWNER TO {user}'")


def create_history(db: Database) -> None:
    db.query(pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(pgsql.Identifier(db.schema)))
    db.query(pgsql.SQL(
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
        " attempts integer NOT NULL DEFAULT 1,"
        " previous_checksum text,"
        " checksum_accepted_at timestamptz,"
        " plan text)").format(db.history_ident()))


def add_columns(db: Database, state: dict) -> None:
    """A history table made before attempts, or the reviewed plan of a row, were recorded gets the column."""
    if not state["history_has_attempts"]:
        db.query(pgsql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS attempts integer NOT NULL DEFAULT 1").format(
            db.history_ident()))
    if not state["history_has_plan"] and db.p["expected_plan"]:
        db.query(pgsql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS plan text").format(db.history_ident()))


def record(db: Database, mig: Migration, duration_ms: float, adopted: bool, attempts: int) -> None:
    """The file's history row; with a reviewed plan, the plan's id too (the column is there then)."""
    plan = db.p["expected_plan"]
    db.query(pgsql.SQL("INSERT INTO {} (version, name, checksum, duration_ms, transactional, adopted, host, source, "
                       "attempts{}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s{})").format(
        db.history_ident(), pgsql.SQL(", plan" if plan else ""), pgsql.SQL(", %s" if plan else "")),
             (mig.version, mig.name, mig.checksum, round(duration_ms, 3), mig.transactional, adopted,
              socket.gethostname(), db.p["source"], attempts) + ((plan["id"],) if plan else ()))


def accept(db: Database, change: dict) -> None:
    db.query(pgsql.SQL("UPDATE {} SET checksum = %s, previous_checksum = %s, checksum_accepted_at = now() "
                       "WHERE version = %s AND checksum = %s").format(db.history_ident()),
             (change["new_checksum"], change["old_checksum"], change["version"], change["old_checksum"]))
