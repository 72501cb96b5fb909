# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""Progress of a long statement: what PostgreSQL says it is doing, every progress_interval seconds.

While a migration's statement (a transactional file, or one statement of a no-transaction file) has run
longer than the interval, a thread asks the server on a second, read-only connection what the session
is doing (pg_stat_progress_create_index, _cluster, _vacuum, _analyze; the lock it waits for and who
holds it, from pg_blocking_pids; else its wait_event), once per interval. Each answer is an event:

- kept for the result (the JSON report keeps them, with the statement's duration);
- appended as a JSON line to a private file on the host, which the action plugin reads on the
  controller while the module runs and prints (see action_plugins/pg_migrate.py).

No query is made and no connection opened for a statement shorter than the interval: a no-op deploy
costs no more (the file is made when the module starts, and removed when it ends).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from typing import TYPE_CHECKING

from ansible.module_utils.pg_migrate_locks import SCHEMA_LOCKS
from ansible.module_utils.pg_migrate_plan import first_line

if TYPE_CHECKING:  # the driver holds its Progress: no import at run time
    from ansible.module_utils.pg_migrate_connect import Database

try:
    import psycopg2
except ImportError:  # pg_migrate reports it through missing_required_lib
    psycopg2 = None

# One round trip per event. The progress views are read whole (to_jsonb), so that a column a major
# renamed or added does no harm; pg_locks and pg_blocking_pids (which take the lock manager's partitions)
# run only while the session waits for a lock, pg_blocking_pids once (in FROM).
ACTIVITY = """
SELECT a.wait_event_type, a.wait_event,
  (SELECT to_jsonb(p) || jsonb_build_object('relation', p.relid::regclass::text)
     FROM pg_stat_progress_create_index p WHERE p.pid = a.pid) AS create_index,
  (SELECT to_jsonb(p) || jsonb_build_object('relation', p.relid::regclass::text)
     FROM pg_stat_progress_cluster p WHERE p.pid = a.pid) AS cluster,
  (SELECT to_jsonb(p) || jsonb_build_object('relation', p.relid::regclass::text)
     FROM pg_stat_progress_vacuum p WHERE p.pid = a.pid) AS vacuum,
  (SELECT to_jsonb(p) || jsonb_build_object('relation', p.relid::regclass::text)
     FROM pg_stat_progress_analyze p WHERE p.pid = a.pid) AS analyze,
  (SELECT jsonb_build_object('locktype', l.locktype, 'mode', l.mode, 'relation', l.relation::regclass::text)
     FROM pg_locks l WHERE a.wait_event_type = 'Lock' AND l.pid = a.pid AND NOT l.granted LIMIT 1) AS waiting,
  (SELECT jsonb_agg(jsonb_build_object('pid', b.pid, 'application_name', b.application_name, 'user', b.usename,
                                       'state', b.state,
                                       'transaction_open_s', round(extract(epoch FROM now() - b.xact_start)))
                    ORDER BY b.pid)
     FROM pg_stat_activity b
    WHERE b.pid IN (SELECT unnest(pg_blocking_pids(a.pid)) WHERE a.wait_event_type = 'Lock'
                    UNION SELECT current_locker_pid FROM pg_stat_progress_create_index
                           WHERE pid = a.pid AND current_locker_pid <> 0)) AS blockers
FROM pg_stat_activity a WHERE a.pid = %s
"""
# Between two attempts under lock retries nothing waits, so pg_blocking_pids has nothing to say: the sessions
# that hold locks on the managed schema's tables instead (see longest_first).
HOLDERS = f"SELECT jsonb_agg(to_jsonb(h) ORDER BY h.pid, h.relation) FROM ({SCHEMA_LOCKS}) h"
# Before each progress query, in the same transaction: read only, and never waiting long.
ONE_QUERY = "SET TRANSACTION READ ONLY; SET LOCAL statement_timeout = '5s'; SET LOCAL lock_timeout = '1s'; "
# Seconds an answer to a progress query may take.
ANSWER_WAIT = 5
# Events a statement keeps in the result (an hour at 5 s): the first ones, then the latest.
MAX_EVENTS, KEPT_FIRST = 720, 60
# Sessions named in one line, at most.
SHOWN_SESSIONS = 5
# The unit of a phase's progress: (phase words, done column, total column, unit).
CREATE_INDEX_UNITS = (("loading tuples", "tuples_done", "tuples_total", "tuples"),
                      ("scanning", "blocks_done", "blocks_total", "blocks"),
                      ("waiting for", "lockers_done", "lockers_total", "older transactions"),
                      # GIN, GiST, hash and BRIN builds name no sub-phase, and count blocks
                      ("building index", "blocks_done", "blocks_total", "blocks", "whole"))
CLUSTER_UNITS = (("seq scanning heap", "heap_blks_scanned", "heap_blks_total", "blocks"),)
VACUUM_UNITS = (("scanning heap", "heap_blks_scanned", "heap_blks_total", "blocks"),
                ("vacuuming heap", "heap_blks_vacuumed", "heap_blks_total", "blocks"),
                ("vacuuming indexes", "indexes_processed", "indexes_total", "indexes"))  # 17 and later
ANALYZE_UNITS = (("acquiring sample rows", "sample_blks_scanned", "sample_blks_total", "blocks"),
                 ("acquiring inherited sample rows", "child_tables_done", "child_tables_total", "child tables"),
                 ("computing extended statistics", "ext_stats_computed", "ext_stats_total", "statistics"))
LOCK_NAMES = {"transactionid": "a row lock (another transaction's rows)", "tuple": "a row lock",
              "virtualxid": "another transaction to end", "advisory": "an advisory lock"}


def blocker_text(b: dict) -> str:
    """One blocking session. Its state and transaction are hidden from a login without pg_read_all_stats
    when it is another role's session: said so, rather than guessed."""
    state = b.get("state") or "state hidden (pg_read_all_stats)"
    held = f", {b['mode']} on {b['relation']}" if b.get("mode") else ""
    opened = b.get("transaction_open_s")
    transaction = f", transaction open {int(opened)} s" if opened is not None else ""
    return f"pid {b['pid']} (application {b.get('application_name') or ''!r}, {state}{held}{transaction})"


def longest_first(locks: list[dict], schema: str) -> list[dict]:
    """One lock a session (its first table), the longest-open transaction first."""
    first: dict[int, dict] = {}
    for lock in locks:
        first.setdefault(lock["pid"], {**lock, "relation": f"{schema}.{lock['relation']}"})
    return sorted(first.values(), key=lambda b: (b["transaction_open_s"] is None, -(b["transaction_open_s"] or 0),
                                                 b["pid"]))


def sessions_text(sessions: list[dict]) -> str:
    """The first SHOWN_SESSIONS sessions, and how many more."""
    more = len(sessions) - SHOWN_SESSIONS
    return "; ".join(blocker_text(b) for b in sessions[:SHOWN_SESSIONS]) + (f"; and {more} more" if more > 0 else "")


def relation_text(relation: str | None) -> str:
    """A table's name; one created by a transaction not committed yet has none another session can read."""
    if relation and relation.isdigit():
        return f"a table created in this transaction (oid {relation})"
    return relation or "?"


def measured(view: dict, units: tuple[tuple[str, ...], ...]) -> dict:
    """The phase's done, total and percentage, where the view counts it (a unit marked "whole" only for a
    phase of exactly those words)."""
    phase = view.get("phase") or ""
    for words, done, total, unit, *whole in units:
        if (phase == words if whole else words in phase) and (view.get(total) or 0) > 0:
            return {"done": view.get(done) or 0, "total": view[total], "unit": unit,
                    "percent": round(100 * (view.get(done) or 0) / view[total], 1)}
    return {}


def describe(row: dict) -> dict:
    """What the session is doing, from one row of ACTIVITY (as a dict): the view's facts and one sentence
    (the event's attempt and attempts say which attempt under lock retries)."""
    for name, units in (("create_index", CREATE_INDEX_UNITS), ("cluster", CLUSTER_UNITS),
                        ("vacuum", VACUUM_UNITS), ("analyze", ANALYZE_UNITS)):
        view = row.get(name)
        if not view:
            continue
        command = view.get("command") or name.upper()
        facts = {"view": f"pg_stat_progress_{name}", "command": command, "relation": view.get("relation"),
                 "phase": view.get("phase"), **measured(view, units)}
        text = f"{command} on {relation_text(facts['relation'])}: {facts['phase']}"
        if "percent" in facts:
            text += f", {facts['percent']:g}% ({facts['done']:,} of {facts['total']:,} {facts['unit']})"
        if name == "cluster" and not facts.get("total") and view.get("heap_tuples_written"):
            text += f", {view['heap_tuples_written']:,} tuples written"
        if (view.get("partitions_total") or 0) > 0:
            text += f", partition {view.get('partitions_done', 0) + 1} of {view['partitions_total']}"
        if row.get("blockers") and "waiting" in (facts["phase"] or ""):
            facts["blockers"] = row["blockers"]
            text += ": waiting for " + sessions_text(row["blockers"])
        return {**facts, "text": text}
    waiting = row.get("waiting")
    if waiting and row.get("wait_event_type") == "Lock":
        if waiting.get("locktype") == "relation":
            what = f"{waiting['mode']} on {relation_text(waiting['relation'])}"
        else:
            what = LOCK_NAMES.get(waiting.get("locktype"), f"a {waiting.get('locktype')} lock")
        blockers = row.get("blockers") or []
        text = f"waiting for {what}"
        text += (", blocked by " + sessions_text(blockers)) if blockers else ""
        return {"waiting_for": {**waiting}, "blockers": blockers, "text": text}
    if row.get("wait_event"):
        event = f"{row['wait_event_type']}:{row['wait_event']}"
        return {"wait_event": event, "text": f"running, waiting on {event}"}
    return {"wait_event": None, "text": "running (on CPU, no wait event)"}


def progress_file(token: str | None) -> str | None:
    """The file the action plugin reads, named by its token: in ${TMPDIR:-/tmp}, as its command spells it."""
    return os.path.join(os.environ.get("TMPDIR") or "/tmp", f"pg_migrate-progress-{token}.jsonl") if token else None


class Unanswered(Exception):
    """The progress connection got no answer in time."""


class Unit:
    """A statement (or a whole transactional file, or a block of a no-transaction file) being run, with
    its lock retries. `statement` is the one running now; `first` names the unit in the result."""

    def __init__(self, migration: str, statement: int | None, attempts: int, due: float) -> None:
        self.migration, self.first, self.statement, self.attempts = migration, statement, statement, attempts
        self.attempt = 1
        self.pausing = False  # between two attempts under lock retries
        self.started = time.monotonic()
        self.next_due = self.started + due
        self.events: list[dict] = []
        self.dropped = 0  # events left out of the result (see MAX_EVENTS)


class Progress:
    """The events of one run. `begin`, `at`, `pause` and `end` come from the main thread (pg_migrate_apply),
    the samples from a thread of its own, started on the first statement, which alone uses the progress
    connection."""

    def __init__(self, db: Database, interval: int, path: str | None) -> None:
        self.db, self.interval, self.path = db, interval, path
        self.fd: int | None = None
        self.closed = False
        self.lock = threading.Lock()  # the unit, the events and the file
        self.unit: Unit | None = None
        self.statements: list[dict] = []  # the units that ran the interval or longer, for the result
        self.seq = 0
        self.monitor: psycopg2.extensions.connection | None = None
        self.monitor_for: Unit | None = None  # the statement the progress connection was opened for
        self.made = False  # the file exists (it goes at the end)
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Make the progress file when the module starts, so that the action plugin's polls end as soon as the
        module does: private, and never another's file of that name (O_EXCL, no symlink followed)."""
        if not self.interval or not self.path:
            return
        with self.lock, contextlib.suppress(OSError):  # no live lines then; the result keeps the events
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW, 0o600)
            self.made = True

    def begin(self, migration: str, statement: int | None, attempts: int) -> None:
        if not self.interval:
            return
        with self.lock:
            self.unit = Unit(migration, statement, attempts, self.interval)
        if self.thread is None:
            self.thread = threading.Thread(target=self.run, name="pg_migrate-progress", daemon=True)
            self.thread.start()

    def at(self, statement: int | None = None, attempt: int | None = None) -> None:
        """The statement of a block (BEGIN ... COMMIT) now running, or the attempt now starting."""
        unit = self.unit
        if unit is not None:
            unit.statement = unit.statement if statement is None else statement
            if attempt is not None:
                unit.pausing = False
                unit.attempt = attempt

    def pause(self) -> None:
        """An attempt lost a race for a lock; the next one starts after the schedule's pause."""
        unit = self.unit
        if unit is not None:
            unit.pausing = True

    def end(self, ok: bool) -> None:
        """The unit ended: one that ran the interval or longer goes into the result, its duration closing
        its events."""
        with self.lock:
            unit, self.unit = self.unit, None
            if unit is None:
                return
            duration = time.monotonic() - unit.started
            if duration < self.interval and not unit.events:
                return
            unit.statement = unit.first
            self.emit(unit, {"finished": True, "ok": ok, "elapsed_s": round(duration, 1),
                             "text": f"{'finished' if ok else 'failed'} after {duration:.1f} s"})
            self.statements.append({"migration": unit.migration, "statement": unit.first,
                                    "duration_ms": round(duration * 1000, 3), "ok": ok, "events": unit.events,
                                    **({"events_left_out": unit.dropped} if unit.dropped else {})})

    def run(self) -> None:
        while True:
            time.sleep(0.25)
            unit = self.unit
            if self.monitor is not None and self.monitor_for is not unit:
                self.close_monitor()  # a pool's second server connection is kept for one long statement only
            if unit is None:
                continue
            now = time.monotonic()
            if now < unit.next_due:
                continue
            unit.next_due = now + self.interval
            attempt = unit.attempt  # as the sample saw it
            try:
                event = {"attempt": attempt, **self.sample(unit)}
            except Exception as exc:  # progress never stops a deploy: say so and go on
                self.close_monitor()
                event = {"attempt": attempt, "text": f"running (no progress from PostgreSQL: {type(exc).__name__}: "
                                                     f"{first_line(str(exc))})"}
            with self.lock:
                if self.unit is unit:  # not ended meanwhile
                    event["elapsed_s"] = round(now - unit.started, 1)
                    self.emit(unit, event)

    def sample(self, unit: Unit) -> dict:
        try:
            if unit.pausing and unit.attempt < unit.attempts:
                locks = self.read(unit, HOLDERS, {"ours": self.db.server_pid, "schema": self.db.schema, "mode": None})
                holders = longest_first(locks["jsonb_agg"] or [], self.db.schema)
                text = (f"did not get its locks within the attempt's lock_timeout, pausing before attempt "
                        f"{unit.attempt + 1}")
                return {"holders": holders, "text": text + (
                    f"; holding locks in {self.db.schema}: {sessions_text(holders)}" if holders else "")}
            row = self.read(unit, ACTIVITY, (self.db.server_pid,))
        except (psycopg2.Error, Unanswered) as exc:
            self.close_monitor()
            return {"text": f"running (PostgreSQL's progress views could not be read: {first_line(str(exc))})"}
        if not row:
            return {"text": "running (the session is not in pg_stat_activity)"}
        return describe(row)

    def read(self, unit: Unit, query: str, args: tuple | dict) -> dict:
        """One row of a query on a connection of its own to the same server (opened once per long statement),
        answered within ANSWER_WAIT seconds. Each query is read only and under short timeouts of its own
        transaction: nothing is left on the session, which a pooler may hand to the application next."""
        db = self.db
        if self.monitor is None:
            wait = max(db.p["connect_timeout"], ANSWER_WAIT)
            self.monitor = db.side_connection(wait, f"{db.p['application_name']} progress"[:63])
            self.monitor_for = unit
            if self.monitor is None:
                raise Unanswered(f"no connection within {wait} s")
        row = db.ask_aside(self.monitor, ONE_QUERY + query, args, ANSWER_WAIT)
        if row is None:
            raise Unanswered(f"connected, but no answer within {ANSWER_WAIT} s (a pool with no free server "
                             "connection, or a busy server)")
        return row

    def emit(self, unit: Unit, event: dict) -> None:
        """Keep an event and append it to the file (with self.lock held)."""
        if self.closed:
            return
        self.seq += 1
        event = {"seq": self.seq, "migration": unit.migration, "statement": unit.statement,
                 "attempt": unit.attempt, "attempts": unit.attempts, **event}
        unit.events.append(event)
        if len(unit.events) > MAX_EVENTS:  # the first ones and the latest ones stay
            del unit.events[KEPT_FIRST]
            unit.dropped += 1
        if self.fd is not None:
            data = (json.dumps(event, default=str) + "\n").encode()
            try:
                written = os.write(self.fd, data)
            except OSError:
                written = -1
            if written != len(data):  # a full disk: no more live lines (a half one would stop the reader)
                os.close(self.fd)
                self.fd = None

    def result(self) -> dict:
        """The module result's `progress`, when a statement was reported on."""
        return {"progress": self.statements} if self.statements else {}

    def close_monitor(self) -> None:
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                self.monitor.close()
            self.monitor = None

    def close(self) -> None:
        """At the module's end, and in the watchdog's exit: the file goes (the action plugin then stops), and
        no event is written after. The progress connection ends with the process."""
        with self.lock:
            self.closed = True
            if self.made:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            if self.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.fd)
                self.fd = None
