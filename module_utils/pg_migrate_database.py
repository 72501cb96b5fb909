# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""The database itself: created from the maintenance database when missing, once, whoever else is trying."""

from __future__ import annotations

from ansible.module_utils.pg_migrate_connect import Database
from ansible.module_utils.pg_migrate_locks import acquire_lock, catalog_lock_holders
from ansible.module_utils.pg_migrate_plan import MigrationError, advisory_key, option

try:
    import psycopg2.errors
    from psycopg2 import sql as pgsql
except ImportError:  # pg_migrate reports it through missing_required_lib
    pgsql = None


def no_createdb(db: Database) -> MigrationError:
    user, name = db.p["login_user"], db.p["login_db"]
    return MigrationError(
        f"Role {user!r} lacks the CREATEDB privilege needed to create database {name!r} on {db.where}: "
        f"run 'ALTER ROLE {user} CREATEDB', or have a DBA create the database (UTF8) and grant {user} "
        "CREATE on it")


def can_create_databases(db: Database) -> bool:
    return bool(db.query("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")[0][0])


def create_database(db: Database) -> bool:
    """Create login_db from the maintenance database, once, whoever else is trying; True if this run did."""
    name = db.p["login_db"]
    key = advisory_key("create-database", name)
    acquire_lock(db, key, f"the creation of database {name!r}")
    try:
        if db.query("SELECT 1 FROM pg_database WHERE datname = %s", (name,)):
            return False
        # Creating a database blocks no application query: wait for pg_database as long as for the
        # migration lock, not lock_timeout (another database being created or dropped holds it).
        db.query("SELECT set_config('lock_timeout', %s, false)", (f"{db.p['lock_wait_timeout']}s",))
        try:
            db.query(pgsql.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0").format(
                pgsql.Identifier(name)))
        except psycopg2.errors.InsufficientPrivilege:
            raise no_createdb(db) from None
        except psycopg2.errors.LockNotAvailable:
            raise MigrationError(
                f"Creating database {name!r} on {db.where} waited {db.p['lock_wait_timeout']} s "
                f"({option('lock_wait_timeout')}) for the "
                f"catalog pg_database: {catalog_lock_holders(db)}. Retry once that session is done") from None
        return True
    finally:
        db.query("SELECT pg_advisory_unlock(%s)", (key,))
