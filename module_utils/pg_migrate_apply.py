# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""Applying one migration file: from a clean session, with lock retries, recorded in the history table
in the file's own transaction when it has one."""

from __future__ import annotations

import contextlib
import time

from ansible.module_utils.pg_migrate_connect import TIMEOUTS, Database
from ansible.module_utils.pg_migrate_errors import statement_error
from ansible.module_utils.pg_migrate_history import catalog_counts, catalog_writes, create_history, record
from ansible.module_utils.pg_migrate_locks import LockRace, with_lock_retries
from ansible.module_utils.pg_migrate_plan import LOCK_CONFLICTS, Attempt, Migration, MigrationError, first_line, option

try:
    import psycopg2
    import psycopg2.extensions
except ImportError:  # pg_migrate reports it through missing_required_lib
    psycopg2 = None


# What a file may leave behind in the session; the next file starts without it, as with `psql -f` per file,
# then the run's timeouts again. (DISCARD ALL would also release the migration lock.)
RESET_SESSION = ("SET SESSION AUTHORIZATION DEFAULT; RESET ROLE; RESET ALL; DEALLOCATE ALL; CLOSE ALL; "
                 "UNLISTEN *; DISCARD TEMP; DISCARD SEQUENCES; SELECT " + TIMEOUTS)
ONE_ATTEMPT = [Attempt(None, 0.0)]


def apply(db: Database, mig: Migration, schedule: list[Attempt], first_file: bool, adopting: bool) -> dict:
    """Run one file from the session's defaults, then record it; a transactional file and its row commit
    together, and the whole file is what lock retries repeat.

    The history table is created after the file's statements, so that a first migration may create the
    managed schema itself without IF NOT EXISTS.
    """
    began = time.monotonic()
    if not mig.transactional:  # reported on statement by statement (run_statements)
        return apply_once(db, mig, schedule, first_file, adopting, began, 1, ONE_ATTEMPT[0], True)
    db.progress.begin(mig.name, None, len(schedule))
    ok = False
    try:
        applied = with_lock_retries(schedule, lambda attempt, step, last: apply_once(
            db, mig, schedule, first_file, adopting, began, attempt, step, last), db.progress.pause)
        ok = True
        return applied
    finally:
        db.progress.end(ok)


def apply_once(db: Database, mig: Migration, schedule: list[Attempt], first_file: bool, adopting: bool,
               began: float, attempt: int, step: Attempt, last: bool) -> dict:
    cur = db.conn.cursor()
    db.progress.at(attempt=attempt)
    try:
        if step.lock_timeout:  # one round trip: the attempt's lock_timeout, local to the file's transaction
            cur.execute(RESET_SESSION + "; BEGIN; SELECT set_config('lock_timeout', %(attempt)s, true)",
                        {**db.timeouts(), "attempt": step.lock_timeout})
        else:
            cur.execute(RESET_SESSION + ("; BEGIN" if mig.transactional else ""), db.timeouts())
        before = (catalog_writes(db) if mig.transactional else catalog_counts(db)) if adopting else None
        if mig.transactional:
            attempt = run_transactional(db, mig, attempt, step, last)
            adopted = adopting and before == catalog_writes(db)
        else:
            attempt = run_statements(db, mig, schedule)  # the attempts of its most retried statement or block
            adopted = adopting and before == catalog_counts(db)
        # The history row is written by the login, whatever role or settings the file chose.
        cur.execute("SET LOCAL SESSION AUTHORIZATION DEFAULT; SET LOCAL ROLE NONE" if mig.transactional
                    else "SET SESSION AUTHORIZATION DEFAULT; RESET ROLE")
        if first_file:  # the history table comes after its statements (see apply)
            create_history(db)
        duration = (time.monotonic() - began) * 1000
        record(db, mig, duration, adopted, attempt)
        if mig.transactional:
            cur.execute("COMMIT")
    except psycopg2.Error as exc:
        rollback(db)
        raise MigrationError(f"Recording migration {mig.name} in {db.history} failed: "
                             f"SQLSTATE {exc.pgcode}: {first_line(str(exc))}. The file was not recorded"
                             + (" (its statements stayed committed)" if not mig.transactional else
                                " and nothing of it was applied")) from None
    return {**mig.summary(), "duration_ms": round(duration, 3), "adopted": adopted, "attempts": attempt}


def in_transaction(db: Database) -> bool:
    """In a transaction block (a failed one too); not on a broken connection (unknown)."""
    return db.conn.info.transaction_status in (psycopg2.extensions.TRANSACTION_STATUS_INTRANS,
                                               psycopg2.extensions.TRANSACTION_STATUS_INERROR)


def rollback(db: Database) -> None:
    """End the transaction a failed file left open (its own, or one it began itself); a lost connection
    needs nothing (the server rolls back)."""
    if not db.conn.closed and in_transaction(db):
        with contextlib.suppress(psycopg2.OperationalError):  # the connection died with the statement
            db.conn.cursor().execute("ROLLBACK")


def run_transactional(db: Database, mig: Migration, attempt: int, step: Attempt, last: bool) -> int:
    """The file goes to the server whole (its parser reads it), in the transaction apply_once opened, under
    the lock_timeout of this attempt (see with_lock_retries)."""
    if mig.statements == []:  # comments only: psql runs it as a no-op, and so does this
        return attempt
    with db.conn.cursor() as cur:
        try:
            cur.execute(mig.text)
        except psycopg2.Error as exc:
            rollback(db)
            if exc.pgcode in LOCK_CONFLICTS and not last:
                raise LockRace from None
            raise statement_error(db, mig, exc, 0, None, attempt, step.lock_timeout) from None
    return attempt


def run_statements(db: Database, mig: Migration, schedule: list[Attempt]) -> int:
    """A no-transaction file, one statement at a time, each its own transaction, as psql runs it; a block
    the file opens itself (BEGIN ... COMMIT) runs as one unit. A unit that loses a race for a lock left
    nothing, so it alone is retried by the schedule; the attempts of the most retried one."""
    attempts, index = 1, 0
    while index < len(mig.statements):
        first = index
        # A statement the action plugin marked `once` (a CONCURRENTLY build leaves an invalid index; a DO
        # block or a CALL may have committed) runs once, under the session's lock_timeout.
        steps = ONE_ATTEMPT if mig.statements[first][3] else schedule
        db.progress.begin(mig.name, first, len(steps))
        ok = False
        try:
            index, used = with_lock_retries(
                steps, lambda attempt, step, last, first=first: run_unit(db, mig, first, attempt, step, last),
                db.progress.pause)
            ok = True
        finally:
            db.progress.end(ok)
        attempts = max(attempts, used)
    if in_transaction(db):
        block = opened_at(mig, first)
        rollback(db)
        raise MigrationError(
            f"Migration {mig.name} ends inside the transaction it opened at line {block} (a BEGIN without COMMIT): "
            "psql would roll it back when the file ends, and so did pg_migrate. Its statements before that line "
            "stayed committed, and it was not recorded: end the block with COMMIT", failed_migration=mig.name,
            line=block)
    refuse_invalid_indexes(db, mig)
    return attempts


def opened_at(mig: Migration, index: int) -> int:
    return mig.statements[index][2]


def run_unit(db: Database, mig: Migration, first: int, attempt: int, step: Attempt, last: bool) -> tuple[int, int]:
    """From statement `first`: that one statement, or, when it opens a block, every statement to the end of
    the block. The index after it, and the attempt."""
    with db.conn.cursor() as cur:
        index = first
        start = mig.statements[first][0]
        once = mig.statements[first][3]
        try:
            if step.lock_timeout:
                cur.execute("SELECT set_config('lock_timeout', %s, false)", (step.lock_timeout,))
            while True:
                start, end, _line, once = mig.statements[index]
                db.progress.at(statement=index, attempt=attempt)
                cur.execute(mig.text[start:end])
                index += 1
                if index == len(mig.statements) or not in_transaction(db):
                    return index, attempt
        except psycopg2.Error as exc:
            block = index > first or (not db.conn.closed and in_transaction(db))  # the file's own BEGIN was open
            rollback(db)
            if exc.pgcode in LOCK_CONFLICTS and not last:
                raise LockRace from None
            error = statement_error(db, mig, exc, start, index + 1, attempt, step.lock_timeout,
                                    block=opened_at(mig, first) if block else None)
            if once == "may_commit" and not block and exc.pgcode in LOCK_CONFLICTS:
                error.msg += (" This statement (a DO block or a CALL) may have committed part of its work, so it "
                              f"was not retried ({option('lock_retries')}): check what it left, and make it "
                              "safe to run again before the next deploy")
            raise error from None
        finally:
            if step.lock_timeout and not db.conn.closed and not in_transaction(db):
                with contextlib.suppress(psycopg2.Error):  # the connection may have died with the statement
                    cur.execute("SELECT set_config('lock_timeout', %s, false)", (db.p["lock_timeout"],))


def refuse_invalid_indexes(db: Database, mig: Migration) -> None:
    """A CREATE INDEX CONCURRENTLY that failed leaves an INVALID index, which CREATE INDEX CONCURRENTLY IF NOT
    EXISTS then skips: after a no-transaction file, any INVALID index in the managed schema fails the run."""
    invalid = [r[0] for r in db.query(
        "SELECT c.relname FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = %s AND NOT x.indisvalid ORDER BY 1", (db.schema,))]
    if invalid:
        names = ", ".join(f"{db.schema}.{name}" for name in invalid)
        raise MigrationError(
            f"Migration {mig.name} ran, but the managed schema has INVALID indexes: {names} (an index build with "
            "CONCURRENTLY that failed leaves one, not enforced and not used by queries, and IF NOT EXISTS then "
            f"skips it). The file was not recorded: drop each (DROP INDEX CONCURRENTLY {names.split(', ')[0]}), "
            "fix what made the build fail, and run the deploy again", failed_migration=mig.name,
            invalid_indexes=invalid)
