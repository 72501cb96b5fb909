# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""What a failed statement becomes: one message naming the file, the line, the SQLSTATE, what became of the
file, and what to do."""

from __future__ import annotations

from ansible.module_utils.pg_migrate_connect import Database
from ansible.module_utils.pg_migrate_locks import relation_lock_holders
from ansible.module_utils.pg_migrate_plan import LOCK_CONFLICTS, Migration, MigrationError, first_line, line_of, option

try:
    import psycopg2.errorcodes
except ImportError:  # pg_migrate reports it through missing_required_lib
    psycopg2 = None


def statement_error(db: Database, mig: Migration, exc: psycopg2.Error, offset: int, index: int | None,
                    attempts: int = 1, lock_timeout: str | None = None, block: int | None = None) -> MigrationError:
    """Name the file, the line (from the server's error position) and what became of the file; `block` is
    the line of the BEGIN of a no-transaction file's own block that the statement ran in."""
    pos = getattr(exc.diag, "statement_position", None)
    line = None
    if pos and pos.isdigit():
        line = line_of(mig.text, offset + int(pos) - 1)
    elif index is not None:
        line = line_of(mig.text, offset)
    at = f"at line {line}" if line else "(the server gives no position for this error)"
    message = first_line(exc.diag.message_primary or str(exc))
    detail = exc.diag.message_detail
    if detail and (exc.pgcode or "").startswith("23"):
        # An integrity violation's detail repeats the row ("Key (...)=(...)", "Failing row contains (...)"),
        # which may be personal data: not for CI logs and reports. The server's log has it.
        detail = "withheld (it holds the row's values; the server's log has it)"
    for label, value in (("detail", detail), ("hint", exc.diag.message_hint),
                         ("table", exc.diag.table_name), ("constraint", exc.diag.constraint_name)):
        if value:
            message += f"; {label}: {first_line(value)}"
    where = f"Migration {mig.name} failed {at}" + (f" (statement {index})" if index else "")
    if db.conn.closed or exc.pgcode in (None, "57P01", "57P02"):
        kept = ("all of this file" if mig.transactional else
                f"its block from line {block}; the statements before stay" if block else
                "this file's earlier statements stay")
        return MigrationError(
            f"{where}: the connection to the server was lost ({db.stalled or message}). The server rolls back "
            "what was not "
            f"committed ({kept}) and the file was not recorded. Run the deploy again when the server is back.",
            failed_migration=mig.name, line=line)
    code = exc.pgcode
    if mig.transactional:
        effect = "The file was rolled back and not recorded: nothing of it was applied."
    elif block:
        effect = (f"The file runs outside a transaction, and this statement ran in the block it opened at line "
                  f"{block}: that block was rolled back, its statements before the block stayed committed, and "
                  "it was not recorded, so it runs again from the top next time.")
    else:
        effect = (f"The file runs outside a transaction: its statements before statement {index} stayed "
                  "committed, and it was not recorded, so it runs again from the top next time.")
    msg = f"{where}: SQLSTATE {code} {psycopg2.errorcodes.lookup(code).lower()}: {message}. {effect}"
    if code == "25001":
        msg += " Mark the file with '-- pg_migrate:no-transaction' in its first lines to run it outside a transaction."
    elif code == "2D000" and mig.transactional:
        msg += (" A COMMIT or ROLLBACK inside a DO block or a procedure (CALL) cannot end the file's own transaction: "
                "mark the file with '-- pg_migrate:no-transaction' in its first lines to run it outside one.")
    elif code == "55P04" and mig.transactional:
        msg += (" A new enum value cannot be used in the transaction that added it: move the ALTER TYPE ... ADD VALUE "
                "into an earlier file, or mark this file with '-- pg_migrate:no-transaction' in its first lines.")
    if code in LOCK_CONFLICTS and attempts > 1:
        msg += (f" It lost the race for its locks on each of {attempts} attempts "
                f"({option('lock_retries')}): {relation_lock_holders(db)}.")
    elif code == "55P03":
        setting = option("lock_retries" if lock_timeout else "lock_timeout")
        msg += (f" lock_timeout ({lock_timeout or db.p['lock_timeout']}, {setting}) expired: "
                f"{relation_lock_holders(db)}.")
    if code == "57014":
        msg += (f" {option('statement_timeout')} is {db.p['statement_timeout']}: raise it for a migration "
                "that needs longer.")
    if code == "42501":
        msg += f" Grant role {db.p['login_user']!r} the privilege named above."
    return MigrationError(msg, failed_migration=mig.name, sqlstate=code, line=line)
