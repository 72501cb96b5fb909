# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""One run of pg_migrate against one database, top to bottom: ensure the database, lock, read the history,
plan, apply the pending files, compare the schema. A plan (check mode) and a verify stop before writing."""

from __future__ import annotations

from ansible.module_utils.pg_migrate_apply import apply
from ansible.module_utils.pg_migrate_connect import Database
from ansible.module_utils.pg_migrate_database import can_create_databases, create_database, no_createdb
from ansible.module_utils.pg_migrate_history import (
    accept,
    add_columns,
    check_privileges,
    inspect,
    read_history,
    tables,
)
from ansible.module_utils.pg_migrate_locks import acquire_lock, exclusive_lock_holders
from ansible.module_utils.pg_migrate_plan import (
    Migration,
    MigrationError,
    Plan,
    advisory_key,
    check_runnable,
    first_line,
    lock_schedule,
    make_plan,
    option,
)
from ansible.module_utils.pg_migrate_reviewed import (
    file_differences,
    follow,
    identity,
    left_out,
    plan_entry,
    refuse,
    schema_objects,
    server_differences,
)
from ansible.module_utils.pg_migrate_schema import SNAPSHOT, differences, not_compared

try:
    import psycopg2
    from psycopg2 import sql as pgsql
except ImportError:  # pg_migrate reports it through missing_required_lib
    psycopg2 = None


def migrate(db: Database, migrations: list[Migration]) -> tuple[dict, list[Migration]]:
    """The result, and the files that ran (or would run, in a plan). With plan_out, a plan also returns its
    entry of the reviewed plan; with expected_plan, a deploy applies that plan or refuses it."""
    reviewed = db.p["expected_plan"]
    result: dict = {"changed": False, "database_exists": True, "database_created": False, "adopting": False,
                    "applied": [], "pending": [], "already_applied": [], "accepted": [], "drift": [],
                    "lock_wait_ms": 0.0, "history_table": db.history}
    if reviewed:  # a planned file edited since: refused before connecting, or creating the database
        refuse(db, reviewed, file_differences(reviewed, migrations))
    if not ensure_database(db, result):  # a plan or a verify of a missing database
        check_runnable(migrations)  # a broken file shows in the plan already
        result.update(pending=[m.summary() for m in migrations],
                      changed=db.mode == "plan" and db.p["on_missing_database"] == "create")
        if db.p["expected_tables"] is not None:
            result.update(tables=[], missing_tables=sorted(db.p["expected_tables"]), unexpected_tables=[])
        if db.p["plan_out"]:
            result["plan"] = plan_entry(identity(db, database_exists=False), {}, migrations, [], {})
        return result, migrations
    result["server_version"] = db.server_version()
    if not db.check:
        result["lock_wait_ms"] = round(migration_lock(db), 3)
    state = inspect(db)
    rows = read_history(db, state["history_has_plan"]) if state["history_exists"] else {}
    result["adopting"] = state["adopting"]
    ident = identity(db) if reviewed or db.p["plan_out"] else None
    # The schema as the plan saw it, or as applying finds it: read under the lock, before anything is written.
    objects = schema_objects(db) if db.p["plan_out"] or (reviewed and not db.verify) else None
    considered = left_out(db, reviewed, migrations, rows, result) if reviewed else migrations
    plan = make_plan(considered, rows, db.p["accepted_changes"], db.p["unknown_versions"], db.p["out_of_order"])
    if reviewed:
        plan = follow(db, reviewed, ident, rows, plan, objects, result)
    if db.p["plan_out"]:
        result["plan"] = plan_entry(ident, rows, plan.pending, plan.accepted, objects)
    result.update(already_applied=[{"version": m.version, "name": m.name} for m in plan.already_applied],
                  accepted=plan.accepted, drift=plan.drift)
    check_plan(db, plan, state)
    if db.check:
        result.update(pending=[m.summary() for m in plan.pending],
                      changed=bool(plan.pending or plan.accepted) and not db.verify)
    else:
        apply_plan(db, plan, state, result)
    compare(db, rows, plan, result)
    return result, plan.pending


def ensure_database(db: Database, result: dict) -> bool:
    """Connect to login_db, creating it when missing and the run may; False when it is missing and stays so
    (a plan, a verify). A deploy fails unless on_missing_database is create."""
    try:
        db.connect(db.p["login_db"], read_only=db.check)
        return True
    except psycopg2.OperationalError as exc:
        # The server answered and the login is good, but the database is missing there: confirm on the
        # maintenance database, so that a typo in the host is not reported as a missing database. With
        # several hosts, that is the primary's; a standby listed first may not have replayed the database yet.
        missing = exc
    creating = db.p["on_missing_database"] == "create" and not db.verify
    db.connect(db.p["maintenance_db"], read_only=db.check or not creating)
    result["server_version"] = db.server_version()
    server = (db.conn.info.host, db.conn.info.port)
    if not db.query("SELECT 1 FROM pg_database WHERE datname = %s", (db.p["login_db"],)):
        if db.p["on_missing_database"] == "fail" and not db.verify:
            raise MigrationError(f"Database {db.p['login_db']!r} does not exist on {db.where}: create it first, "
                                 f"or set {option('on_missing_database')}=create") from missing
        if db.mode == "plan" and creating and not can_create_databases(db):
            raise no_createdb(db) from None  # the plan predicts the failure the deploy would have
        # A reviewed plan must be for this server, and for a database it found missing too.
        if db.p["expected_plan"] and db.p["expected_plan"]["database"]:
            found = server_differences(db.p["expected_plan"], identity(db, database_exists=False))
            if db.p["expected_plan"]["database"]["database_oid"] is not None:
                found.append(f"database {db.p['login_db']!r} does not exist, and did when the plan was made")
            refuse(db, db.p["expected_plan"], found)
        if db.check or not creating:
            result["database_exists"] = False
            return False
        result["database_created"] = result["changed"] = create_database(db)
    db.close()
    db.connect(db.p["login_db"], read_only=db.check, on=server)
    return True


def migration_lock(db: Database) -> float:
    """The session lock that serialises every run that writes to this history table; the wait in ms."""
    return acquire_lock(db, advisory_key(db.schema, db.table), f"{db.history} in database {db.p['login_db']!r}")


def check_plan(db: Database, plan: Plan, state: dict) -> None:
    """What would make a pending file fail, found before any of them runs (in a plan too)."""
    check_runnable(plan.pending)
    escaped = [m.name for m in plan.pending if "\\" in m.text]
    if state["standard_strings"] == "off" and escaped:
        raise MigrationError(
            f"Database {db.p['login_db']!r} reads strings with standard_conforming_strings = off (from the "
            f"server's configuration, the database or role {db.p['login_user']!r}), where a backslash in "
            f"'...' escapes the next character; pg_migrate read {', '.join(escaped)} with it on, as PostgreSQL's "
            "default, so the server would split and run them differently. Nothing was run: write backslash "
            "escapes as E'...' strings and set the database back to on (ALTER DATABASE ... RESET "
            "standard_conforming_strings)",
            failed_migration=escaped[0])
    for d in plan.drift:
        if d["kind"] == "unknown":
            db.warn(f"Version {d['version']} ({d['name']}) is in the history but has no file")
    if plan.pending and not db.verify:
        check_privileges(db, state)


def apply_plan(db: Database, plan: Plan, state: dict, result: dict) -> None:
    """Accept the changed checksums the user listed, then apply the pending files in order."""
    if plan.pending and state["history_exists"]:
        add_columns(db, state)
    for change in plan.accepted:
        accept(db, change)
        result["changed"] = True
    schedule = lock_schedule(db.p["lock_retries"])
    for index, mig in enumerate(plan.pending):
        try:
            result["applied"].append(apply(db, mig, schedule, not state["history_exists"] and index == 0,
                                           state["adopting"]))
        except MigrationError as exc:
            exc.details.update(applied=result["applied"], pending=[m.summary() for m in plan.pending[index:]])
            raise
        result["changed"] = True


def compare(db: Database, rows: dict[int, dict], plan: Plan, result: dict) -> None:
    """The tables, and the whole schema against the canonical file, as they are after the run."""
    try:
        if db.p["expected_tables"] is not None:
            actual = tables(db)
            expected = set(db.p["expected_tables"])
            result.update(tables=actual, missing_tables=sorted(expected - set(actual)),
                          unexpected_tables=sorted(set(actual) - expected))
        if db.p["expected_schema"] is not None:
            after = {row["name"]: row["checksum"] for row in rows.values()}
            after.update({a["name"]: a["new_checksum"] for a in plan.accepted})
            after.update({a["name"]: a["checksum"] for a in result["applied"]})
            result.update(compare_schema(db, after))
    except psycopg2.Error as exc:  # what was applied stays applied, and is reported as such
        raise MigrationError(
            f"Reading the schema of database {db.p['login_db']!r} on {db.where} failed after the migrations: "
            f"SQLSTATE {exc.pgcode}: {first_line(str(exc))}. "
            + (f"{len(result['applied'])} applied and recorded; " if result["applied"] else "")
            + "run verify to compare the schema", applied=result["applied"], pending=[]) from None


def compare_schema(db: Database, applied: dict[str, str]) -> dict:
    """The schema against the canonical file, when the database has exactly the file's migrations."""
    expected = db.p["expected_schema"]
    reason = not_compared(expected.get("migrations", {}), applied)
    unusable = None  # the file cannot describe this database at all: verify fails on it
    if expected.get("schema", db.schema) != db.schema:
        unusable = f"the schema file describes schema {expected['schema']!r}, not {db.schema!r}"
    if unusable or reason:
        return {"schema_compared": False, "schema_not_compared": unusable or reason,
                "schema_file_unusable": bool(unusable), "schema_differences": []}
    try:
        actual = db.query(SNAPSHOT, {"schema": db.schema, "table": db.table})[0][0]
    except psycopg2.Error as exc:
        # PostgreSQL's deparse functions (pg_get_expr, pg_get_indexdef, ...) take ACCESS SHARE on each table,
        # which is harmless to the application's queries but waits for a session that holds the table.
        if exc.pgcode != "55P03":
            raise
        held = exclusive_lock_holders(db)
        return {"schema_compared": False, "schema_compare_blocked": True, "schema_differences": [],
                "schema_not_compared": f"{held} (waited {option('lock_timeout')}, {db.p['lock_timeout']}): run verify "
                                       "again when it is free"}
    return {"schema_compared": True, "schema_differences": differences(expected.get("objects", {}), actual)}


def drop_schema(db: Database) -> dict:
    """Drop the managed schema with everything in it, the history table too (a development rollback),
    under the migration lock, so that it never interleaves with a deploy."""
    result = {"changed": False, "dropped": False, "database_exists": True, "history_table": db.history}
    try:
        db.connect(db.p["login_db"], read_only=db.check)
    except psycopg2.OperationalError:  # the database is missing: nothing to drop
        result["database_exists"] = False
        return result
    result["server_version"] = db.server_version()
    if db.query("SELECT 1 FROM pg_namespace WHERE nspname = %s", (db.schema,)):
        if not db.check:
            migration_lock(db)
            db.query(pgsql.SQL("DROP SCHEMA {} CASCADE").format(pgsql.Identifier(db.schema)))
        result.update(changed=True, dropped=True)
    return result
