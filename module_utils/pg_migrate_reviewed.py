# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""A reviewed plan: what a plan records of the database, and what applying that plan checks first.

A plan (check mode with plan_out) returns an entry for its database: its identity, the pending files
with their checksums, the history rows it read and a fingerprint of the managed schema. Applying the
plan (expected_plan) compares each of those under the migration lock, before anything is written,
refuses with every difference named, and runs only the planned files. Plain functions, but identity()
and schema_objects(), which read the server.
"""

from __future__ import annotations

import hashlib
import json

from ansible.module_utils.pg_migrate_connect import Database
from ansible.module_utils.pg_migrate_locks import exclusive_lock_holders
from ansible.module_utils.pg_migrate_plan import Migration, MigrationError, Plan, option
from ansible.module_utils.pg_migrate_schema import KINDS, SNAPSHOT

try:
    import psycopg2
except ImportError:  # pg_migrate reports it through missing_required_lib
    psycopg2 = None

# The cluster's system_identifier where the login may read it (any login by default, unless a DBA revoked
# EXECUTE on pg_control_system()), and the database's oid: a database dropped and created again, or
# restored elsewhere, has another. A promoted standby keeps both, so a plan survives a failover.
# PostgreSQL checks EXECUTE on every function of a query when it starts, whatever a CASE would run: a
# revoked pg_control_system() is asked about first, and called in a query of its own.
IDENTITY = """SELECT has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE'),
  (SELECT oid::bigint FROM pg_catalog.pg_database WHERE datname = current_database())"""


def identity(db: Database, database_exists: bool = True) -> dict:
    """The server and database this connection reaches (on the maintenance database: the server only)."""
    readable, oid = db.query(IDENTITY)[0]
    system_identifier = (db.query("SELECT system_identifier::text FROM pg_catalog.pg_control_system()")[0][0]
                         if readable else None)
    return {"system_identifier": system_identifier, "database": db.p["login_db"],
            "database_oid": oid if database_exists else None, "host": db.p["login_host"], "port": db.p["login_port"],
            "history_table": db.history}


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def schema_objects(db: Database) -> dict[str, str]:
    """Each object of the managed schema ("table alerts", "column alerts.symbol", "index ...") and a digest
    of its definition, from the query that the schema file comparison uses."""
    try:
        snapshot = db.query(SNAPSHOT, {"schema": db.schema, "table": db.table})[0][0]
    except psycopg2.Error as exc:  # deparsing takes ACCESS SHARE on each table (see compare_schema)
        if exc.pgcode != "55P03":
            raise
        raise MigrationError(f"The managed schema could not be read for the reviewed plan: {exclusive_lock_holders(db)} "
                             f"(waited {option('lock_timeout')}, {db.p['lock_timeout']}). Nothing was applied: run "
                             "again when it is free") from None
    objects: dict[str, str] = {}
    for name, table in snapshot.get("tables", {}).items():
        objects[f"table {name}"] = digest({k: v for k, v in table.items() if k != "columns"})
        objects.update({f"column {name}.{column}": digest(spec) for column, spec in table["columns"].items()})
    for kind, label in KINDS:
        objects.update({f"{label} {name}": digest(spec) for name, spec in snapshot.get(kind, {}).items()})
    objects.update({f"trigger {name} enabled": digest(spec)
                    for name, spec in snapshot.get("disabled_triggers", {}).items()})
    objects.update({name: digest(spec) for name, spec in snapshot.get("objects", {}).items()})
    objects.update({f"role {role} may CREATE in the schema": "" for role in snapshot.get("creators") or []})
    return objects


def history_list(rows: dict[int, dict]) -> list[dict]:
    return [{"version": v, "name": rows[v]["name"], "checksum": rows[v]["checksum"]} for v in sorted(rows)]


def plan_entry(ident: dict | None, rows: dict[int, dict] | None, pending: list[Migration], accepted: list[dict],
               objects: dict[str, str] | None) -> dict:
    """What a plan records for this database: without a secret, or a value of the .env beyond its names.
    A plan that could not read the database (psycopg2 missing on the host) records the files only."""
    history = history_list(rows) if rows is not None else None
    return {"database": ident,
            "pending": [{"version": m.version, "name": m.name, "checksum": m.checksum} for m in pending],
            "accepted": accepted,
            "history": history, "history_sha256": digest(history) if history is not None else None,
            "schema_objects": objects, "schema_sha256": digest(objects) if objects is not None else None}


def server_differences(expected: dict, ident: dict) -> list[str]:
    """Whether this is the server the plan was made for."""
    planned = expected["database"]
    if planned["system_identifier"] and ident["system_identifier"]:
        if planned["system_identifier"] != ident["system_identifier"]:
            return [f"the server is another one: system identifier {ident['system_identifier']}, the plan's "
                    f"{planned['system_identifier']} ({planned['host']}:{planned['port']})"]
    elif (planned["host"], planned["port"]) != (ident["host"], ident["port"]):
        return [f"the server is {ident['host']}:{ident['port']}, the plan was made for {planned['host']}:"
                f"{planned['port']} (the login cannot read the system identifier that would tell them apart)"]
    if planned["database"] != ident["database"]:
        return [f"the database is {ident['database']!r}, the plan was made for {planned['database']!r}"]
    if planned.get("history_table") != ident["history_table"]:
        return [f"the history table is {ident['history_table']}, the plan was made for {planned.get('history_table')} "
                f"({option('schema')})"]
    return []


def database_differences(expected: dict, ident: dict) -> list[str]:
    """Whether this is the database the plan was made for. One missing then may exist now (created by this run,
    or by another host sharing it): the history and the schema, empty in the plan, then judge it."""
    found = server_differences(expected, ident)
    planned_oid = expected["database"]["database_oid"]
    if planned_oid is None:
        return found
    if not found and ident["database_oid"] is None:
        found.append(f"database {ident['database']!r} does not exist, and did when the plan was made")
    elif not found and planned_oid != ident["database_oid"]:
        found.append(f"database {ident['database']!r} was created again since the plan (oid {ident['database_oid']}, "
                     f"the plan's {planned_oid})")
    return found


def history_differences(expected: dict, rows: dict[int, dict]) -> list[str]:
    planned = {h["version"]: h for h in expected["history"]}
    found = []
    for version in sorted(set(planned) | set(rows)):
        if version not in planned:
            found.append(f"{rows[version]['name']} was applied since the plan (another deploy ran)")
        elif version not in rows:
            found.append(f"the history row of {planned[version]['name']} was removed since the plan")
        elif rows[version]["checksum"] != planned[version]["checksum"]:
            found.append(f"the history row of {planned[version]['name']} has checksum {rows[version]['checksum']}, "
                         f"{planned[version]['checksum']} in the plan")
    return found


def file_differences(expected: dict, migrations: list[Migration]) -> list[str]:
    files = {m.version: m for m in migrations}
    found = []
    for planned in expected["pending"]:
        mig = files.get(planned["version"])
        if mig is None:
            found.append(f"planned file {planned['name']} is not in the migrations")
        elif mig.name != planned["name"]:
            found.append(f"version {planned['version']} is {mig.name}, {planned['name']} in the plan")
        elif mig.checksum != planned["checksum"]:
            found.append(f"planned file {mig.name} was edited since the plan: checksum {mig.checksum}, "
                         f"{planned['checksum']} in the plan")
    return found


def schema_differences(expected: dict, objects: dict[str, str]) -> list[str]:
    planned = expected["schema_objects"]
    found = []
    for name in sorted(set(planned) | set(objects)):
        if name not in objects:
            found.append(f"{name}: gone since the plan")
        elif name not in planned:
            found.append(f"{name}: added since the plan")
        elif planned[name] != objects[name]:
            found.append(f"{name}: changed since the plan")
    return found


def refuse(db: Database, expected: dict, found: list[str]) -> None:
    if found:
        raise MigrationError(
            f"The reviewed plan {expected['file']} (made {expected['created_at']}) no longer matches database "
            f"{db.p['login_db']!r} on {db.where}, so nothing was applied or recorded: " + "; ".join(found)
            + f". Make a new plan and review it (run the workflow again, or --check with {option('plan_out')})",
            plan_differences=found)


def applied_before(expected: dict, rows: dict[int, dict]) -> bool:
    """Every planned file is recorded with this plan, over the history the plan saw with its accepted edits
    written: it was applied."""
    planned = {p["version"] for p in expected["pending"]}
    if not (planned or expected["accepted"]) or any(rows.get(v, {}).get("plan") != expected["id"] for v in planned):
        return False
    if expected["history"] is None:
        return True
    new = {a["version"]: a["new_checksum"] for a in expected["accepted"]}
    after = [{**h, "checksum": new.get(h["version"], h["checksum"])} for h in expected["history"]]
    return history_list({v: r for v, r in rows.items() if v not in planned}) == after


def follow(db: Database, expected: dict, ident: dict, rows: dict[int, dict], plan: Plan,
           objects: dict[str, str] | None, result: dict) -> Plan:
    """The plan to run: the reviewed one, refused when the database or the files differ from what it saw.
    A plan applied before runs nothing."""
    result["applied_plan"] = {"id": expected["id"], "created_at": expected["created_at"], "applied_before": False}
    if applied_before(expected, rows):
        result["applied_plan"]["applied_before"] = True
        return Plan([], plan.already_applied, [], plan.drift)
    # The files were compared before connecting (see migrate).
    if expected["database"] is None:  # the plan read the files only: it holds for a database with nothing yet
        if rows or objects:
            refuse(db, expected, ["the plan did not read the database (psycopg2 was missing on the host when it was "
                                  "made), and the database already holds " + ("a history" if rows else "objects")
                                  + ": make a new plan now that psycopg2 is installed"])
        db.warn(f"The reviewed plan {expected['file']} did not read the database (psycopg2 was missing on the host "
                "when it was made); the database was empty, as a first deploy finds it")
    else:
        found = database_differences(expected, ident) + history_differences(expected, rows)
        if plan.accepted != expected["accepted"]:
            found.append(f"the accepted edits are {plan.accepted or 'none'}, {expected['accepted'] or 'none'} in the "
                         f"plan ({option('accepted_changes')})")
        if objects is not None:
            found += schema_differences(expected, objects)
        refuse(db, expected, found)
    planned = {p["version"] for p in expected["pending"]}
    accepted = plan.accepted if expected["database"] else []
    return Plan([m for m in plan.pending if m.version in planned], plan.already_applied, accepted, plan.drift)


def left_out(db: Database, expected: dict, migrations: list[Migration], rows: dict[int, dict],
             result: dict) -> list[Migration]:
    """The files the deploy considers: those of the plan and of the history. A file added since the plan
    (an older-numbered one too, which the out-of-order policy would otherwise stop) waits for the next plan."""
    planned = {p["version"] for p in expected["pending"]}
    late = [m for m in migrations if m.version not in rows and m.version not in planned]
    result["left_out"] = [m.summary() for m in late]
    for mig in late:
        db.warn(f"{mig.name} is not in the reviewed plan (added after it was made) and was left out: the next "
                "plan has it")
    return [m for m in migrations if m not in late]
