# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""Locks: the migration lock that serialises runs, the retries of a file that lost a race for its table
locks, and who holds what, for the messages."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from ansible.module_utils.pg_migrate_plan import Attempt, MigrationError, option

if TYPE_CHECKING:  # the driver imports the progress, which asks SCHEMA_LOCKS: no import at run time
    from ansible.module_utils.pg_migrate_connect import Database

T = TypeVar("T")


class LockRace(Exception):
    """An attempt lost a race for a lock (lock_timeout, deadlock victim) and left nothing: try again."""


def with_lock_retries(schedule: list[Attempt], attempt_once: Callable[[int, Attempt, bool], T],
                      pausing: Callable[[], None]) -> T:
    """attempt_once(attempt, step, last) for each step of the schedule until it returns; it raises LockRace,
    when it lost a lock race and this was not the last attempt, for another one after the step's pause
    (`pausing` says when it starts)."""
    for attempt, step in enumerate(schedule, 1):
        try:
            return attempt_once(attempt, step, attempt == len(schedule))
        except LockRace:
            pausing()
            time.sleep(step.pause)
    raise AssertionError("the last attempt never raises LockRace")


def acquire_lock(db: Database, key: int, what: str) -> float:
    """Take a session advisory lock, polling until lock_wait_timeout; return the wait in ms."""
    began = time.monotonic()
    deadline = began + db.p["lock_wait_timeout"]
    delay = 0.05
    while not db.query("SELECT pg_try_advisory_lock(%s)", (key,))[0][0]:
        if time.monotonic() >= deadline:
            raise MigrationError(f"Another run holds the lock of {what} after waiting "
                                 f"{db.p['lock_wait_timeout']} s ({option('lock_wait_timeout')}): "
                                 f"{lock_holders(db, key)}. Wait for it to finish, or end that session")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    return (time.monotonic() - began) * 1000


def lock_holders(db: Database, key: int) -> str:
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    rows = db.query(
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


def catalog_lock_holders(db: Database) -> str:
    rows = db.query(
        "SELECT DISTINCT a.pid, a.usename, a.application_name, a.state, l.mode FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.granted AND l.pid <> pg_backend_pid() "
        "AND l.relation = 'pg_catalog.pg_database'::regclass ORDER BY 1")
    return "; ".join(f"pid {pid} (user {user}, application {app!r}, {state}, {mode})"
                     for pid, user, app, state, mode in rows) or "the holder has just released it"


# Each lock that a session other than `ours` (by default the one asking) holds on a table of the managed
# schema in this database, of one `mode` when given, by pid then table: for the failure messages, and for
# the progress lines between two lock retries (asked on another connection, see pg_migrate_progress).
SCHEMA_LOCKS = (
    'SELECT DISTINCT a.pid, a.usename AS "user", a.application_name, a.state, l.mode, c.relname AS relation, '
    "round(extract(epoch FROM now() - a.xact_start)) AS transaction_open_s "
    "FROM pg_locks l JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace "
    "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.granted AND l.pid <> coalesce(%(ours)s, pg_backend_pid()) "
    "AND n.nspname = %(schema)s AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND (%(mode)s::text IS NULL OR l.mode = %(mode)s) ORDER BY 1, 6")


def schema_locks(db: Database, mode: str | None = None) -> list[tuple]:
    """(pid, user, application, state, mode, table, seconds its transaction is open or '?') of SCHEMA_LOCKS."""
    return [(*row[:6], "?" if row[6] is None else f"{row[6]:.0f}")
            for row in db.query(SCHEMA_LOCKS, {"ours": None, "schema": db.schema, "mode": mode})]


def relation_lock_holders(db: Database) -> str:
    rows = schema_locks(db)
    if not rows:
        return "no session holds a lock in that schema any more"
    return "blocked by " + "; ".join(
        f"pid {pid} (user {user}, application {app!r}, {state}, {mode} on {rel}, transaction open {age} s)"
        for pid, user, app, state, mode, rel, age in rows)


def exclusive_lock_holders(db: Database) -> str:
    """Who holds a table of the managed schema in ACCESS EXCLUSIVE mode, which even reading its definition waits for."""
    rows = schema_locks(db, "AccessExclusiveLock")
    if not rows:
        return "a table was locked while its definition was read (the holder has released it since)"
    return "; ".join(f"table {rel} is locked by pid {pid} (user {user}, application {app!r}, {state}, "
                     f"transaction open {age} s)" for pid, user, app, state, _mode, rel, age in rows)
