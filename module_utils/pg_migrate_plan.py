# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""Migration files and the plan: names, checksums, and what the history says is pending.

Plain functions, tested without a server. The SQL itself was read on the controller by the
pg_migrate action plugin (PostgreSQL's own lexer); what it found arrives as `_findings`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

BIGINT_MAX = 2**63 - 1  # the history table's version column
# ASCII digits only: \d would take any Unicode digit (Arabic-Indic ٠٢٤ read as 24).
NAME_RE = re.compile(r"^([0-9]+)_([A-Za-z0-9][A-Za-z0-9_.-]*)\.sql$")
LINE_END = re.compile(r"\r\n|\r|\n")
BOM = "\ufeff"


def option(name: str) -> str:
    """How a message names one of the module's options: `option lock_retries`. A role that exposes the
    options as variables of its own maps those words to its variable's name."""
    return f"option {name}"


class MigrationError(Exception):
    """A problem to report to the user as one message; `details` go into the failed result."""

    def __init__(self, msg: str, **details: object) -> None:
        super().__init__(msg)
        self.msg = msg
        self.details = details


def normalise(text: str) -> str:
    """The text that checksums cover: no BOM, LF line endings, no trailing white space."""
    return LINE_END.sub("\n", text.lstrip(BOM)).rstrip()


def checksum(text: str) -> str:
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


def line_of(text: str, offset: int) -> int:
    """1-based line of a character offset; \\r\\n, \\r and \\n each end a line, as in PostgreSQL's lexer."""
    return len(LINE_END.findall(text, 0, offset)) + 1


@dataclass
class Migration:
    version: int
    name: str
    text: str  # without a leading BOM: the offsets of `statements` and of server errors refer to it
    checksum: str
    transactional: bool
    # (start, end, line, run_once) of each statement of a no-transaction file; run_once says why a statement is
    # never retried after a lost lock race: 'concurrently' (an invalid index stays) or 'may_commit' (DO, CALL)
    statements: list[tuple[int, int, int, str | None]] | None
    problem: str | None  # why the file cannot run, raised when it is pending

    def check_runnable(self) -> None:
        if self.problem:
            raise MigrationError(self.problem, failed_migration=self.name)

    def summary(self) -> dict:
        return {"version": self.version, "name": self.name, "checksum": self.checksum,
                "transactional": self.transactional}


def check_runnable(migrations: list[Migration]) -> None:
    """Every file that cannot run, named in one message, before any of them runs."""
    broken = [m for m in migrations if m.problem]
    if len(broken) == 1:
        broken[0].check_runnable()
    if broken:
        raise MigrationError(f"{len(broken)} migration files cannot run: " + " | ".join(m.problem for m in broken),
                             failed_migration=broken[0].name, failed_migrations=[m.name for m in broken])


def load_migrations(files: dict, findings: dict | None) -> list[Migration]:
    """Validate the names, join each file with what the action plugin found in it, order them by version."""
    if not files:
        raise MigrationError("No migration files were given: check the migrations directory")
    if findings is None:
        raise MigrationError(
            "pg_migrate got SQL that its action plugin did not read: it runs through the plugin "
            "(action_plugins/pg_migrate.py), which Ansible finds through the project's ansible.cfg or "
            "ANSIBLE_ACTION_PLUGINS")
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
        if version > BIGINT_MAX:
            raise MigrationError(f"Migration {name}: its version {m.group(1)} is larger than the history table's version "
                                 f"column holds (bigint, at most {BIGINT_MAX}): number it with fewer digits, such as a "
                                 "timestamp to the second (20191100000001)")
        if version in by_version:
            raise MigrationError(f"Migrations {by_version[version].name} and {name} have the same version {version}: "
                                 "renumber one of them")
        found = findings.get(name, {})  # nothing found: an ordinary transactional file
        by_version[version] = Migration(version, name, text.removeprefix(BOM), checksum(text),
                                        found.get("transactional", True), found.get("statements"),
                                        found.get("problem"))
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
            f"the change explicitly, e.g. {option('accepted_changes')}: "
            f"[{{version: {first['version']}, "
            f"old_checksum: {first['old_checksum']}, new_checksum: {first['new_checksum']}}}]", drift=drift)
    unknown = [d for d in drift if d["kind"] == "unknown"]
    if unknown and unknown_versions == "fail":
        listed = ", ".join(d["name"] for d in unknown)
        raise MigrationError(
            f"The database has applied migrations that this checkout does not have: {listed}. Deploy from a "
            f"checkout that has them, or set {option('unknown_versions')}=warn to go on",
            drift=drift)
    late = [d for d in drift if d["kind"] == "out_of_order"]
    if late and out_of_order == "fail":
        listed = ", ".join(d["name"] for d in late)
        highest = late[0]["highest_applied"]
        raise MigrationError(
            f"Pending migrations are older than the newest applied one ({highest}): {listed}. If one was applied "
            "before and its history row was deleted by hand, do not renumber it: find out who deleted the row, and "
            "restore it (or let the file run again, if it is re-runnable). If it is new (a branch merged late), "
            f"renumber it above {highest}, or set {option('out_of_order')}=apply to apply it "
            "anyway", drift=drift)
    return Plan(pending, already_applied, accepted, drift)


# A PostgreSQL duration, as lock_timeout and statement_timeout take it; ASCII digits (\d takes any digit).
DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(us|ms|s|min|h|d)?$")
UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
# SQLSTATEs of a file that lost a race for a lock and was rolled back whole: lock_not_available, deadlock_detected.
LOCK_CONFLICTS = ("55P03", "40P01")


def seconds(duration: str) -> float:
    """A PostgreSQL duration (5s, 500ms, 15min; no unit: milliseconds) in seconds."""
    m = DURATION.match(str(duration).strip())
    if not m:
        raise ValueError(f"{duration!r} is not a duration such as 100ms, 5s or 15min")
    return float(m.group(1)) * UNIT_SECONDS[m.group(2) or "ms"]


MAX_ATTEMPTS = 1000  # a schedule's attempts per file, all entries together
MAX_TIMEOUT_SECONDS = 3600.0  # an attempt's lock_timeout


@dataclass
class Attempt:
    lock_timeout: str | None  # None: the session's lock_timeout (retries off)
    pause: float  # seconds to wait after this attempt lost a lock race, before the next one


def lock_schedule(entries: list[dict]) -> list[Attempt]:
    """The attempts of a file, from [{lock_timeout, sleep, times}]; none listed: one attempt, no retry."""
    attempts: list[Attempt] = []
    for e in entries:
        times = 1 if e.get("times") is None else e["times"]
        if not 1 <= times <= MAX_ATTEMPTS - len(attempts):
            raise ValueError(f"times is {times} in the entry with lock_timeout {e['lock_timeout']!r}: from 1, and at "
                             f"most {MAX_ATTEMPTS} attempts in all")
        if not 0 < seconds(e["lock_timeout"]) <= MAX_TIMEOUT_SECONDS:  # 0 would mean: wait forever
            raise ValueError(f"lock_timeout {e['lock_timeout']!r} in an entry: more than 0 (which PostgreSQL takes as "
                             "no limit at all) and at most 1h")
        attempts += [Attempt(str(e["lock_timeout"]), seconds(e["sleep"]))] * times
    return attempts or [Attempt(None, 0.0)]


def advisory_key(*parts: str) -> int:
    """A stable signed 64-bit advisory lock key, e.g. for one history table (schema, table)."""
    digest = hashlib.sha256(("pg_migrate:" + ".".join(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def name_problem(what: str, name: str) -> str | None:
    """PostgreSQL truncates names to 63 bytes (mid-character, for UTF-8): refuse such a name up front."""
    size = len(name.encode("utf-8"))
    if not name or "\x00" in name:
        return f"{what} {name!r} is empty or holds a NUL character"
    if size > 63:
        return (f"{what} {name!r} is {size} bytes long in UTF-8; PostgreSQL names hold at most 63 bytes "
                "(longer ones are cut): shorten it")
    return None


def first_line(message: str | None) -> str:
    return (message or "").strip().splitlines()[0] if (message or "").strip() else "unknown error"
