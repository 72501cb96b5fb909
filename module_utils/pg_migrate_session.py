# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""The PostgreSQL side of pg_migrate: connect, inspect, lock, create the database, apply, record."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import TypeVar

from ansible.module_utils.pg_migrate_plan import (
    LOCK_CONFLICTS,
    Attempt,
    Migration,
    MigrationError,
    advisory_key,
    check_runnable,
    first_line,
    line_of,
    lock_schedule,
    make_plan,
)
from ansible.module_utils.pg_migrate_schema import SNAPSHOT, differences, not_compared

try:
    import psycopg2
    import psycopg2.errorcodes
    import psycopg2.errors
    import psycopg2.extensions
    from psycopg2 import sql as pgsql
except ImportError:  # pg_migrate reports it through missing_required_lib
    psycopg2 = None
    PSYCOPG2_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    PSYCOPG2_IMPORT_ERROR = None

# Connection failures worth retrying while waiting for the server: it is down or not ready yet.
SERVER_DOWN_PATTERNS = ("could not connect", "connection refused", "timeout expired", "could not translate host",
                        "no such file or directory", "the database system is starting up",
                        "the database system is shutting down", "the database system is in recovery mode",
                        "server closed the connection unexpectedly", "no route to host", "network is unreachable",
                        "connection timed out", "connection reset by peer", "could not send ssl negotiation packet")
# libpq's words when TLS cannot be set up as ssl_mode asks: a setting to fix, not a server to wait for.
TLS_PATTERNS = ("does not support ssl", "certificate", "ssl error", "sslmode", "tlsv1", "ssl/tls")
# libpq's words when the server asks for an authentication method that require_auth or channel_binding refuse.
AUTH_METHOD_PATTERNS = ("authentication method requirement", "channel binding required", "channel binding is required")
# How the server finds out that the module is gone (SIGKILL, the OOM killer, a dead network) while a statement
# runs, instead of holding its locks until statement_timeout: it checks the client's socket every 2 s during a
# statement (PostgreSQL 14+), and TCP keepalives find a peer that stopped answering.
GUARDS = {"client_connection_check_interval": "2s", "tcp_keepalives_idle": "30", "tcp_keepalives_interval": "10",
          "tcp_keepalives_count": "3"}
# The client's side of the same: keepalives, and unacknowledged data abandoned after 60 s (libpq 12+).
CLIENT_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
# The run's timeouts and guards for the session; the timeouts' values are the module's options.
TIMEOUTS = ("set_config('lock_timeout', %(lock_timeout)s, false), "
            "set_config('statement_timeout', %(statement_timeout)s, false), "
            + ", ".join(f"set_config('{name}', %({name})s, false)" for name in GUARDS))
# What a file may leave behind in the session; the next file starts without it, as with `psql -f` per file,
# then the run's timeouts again. (DISCARD ALL would also release the migration lock.)
RESET_SESSION = ("SET SESSION AUTHORIZATION DEFAULT; RESET ROLE; RESET ALL; DEALLOCATE ALL; CLOSE ALL; "
                 "UNLISTEN *; DISCARD TEMP; DISCARD SEQUENCES; SELECT " + TIMEOUTS)
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
       current_setting('standard_conforming_strings')
FROM (SELECT 1) one
LEFT JOIN pg_namespace n ON n.nspname = %(schema)s
LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = %(table)s
"""


def classify_connect_error(message: str) -> str:
    """Tell apart the reasons a connection fails: 'down', 'auth', 'auth_method', 'tls', 'no_database', 'standby'
    or 'other'."""
    low = message.lower()
    if any(p in low for p in AUTH_METHOD_PATTERNS):
        return "auth_method"
    if any(p in low for p in SERVER_DOWN_PATTERNS):  # before TLS: a reset during the TLS handshake is a restart
        return "down"
    if any(p in low for p in TLS_PATTERNS):
        return "tls"
    if "does not exist" in low and "database" in low:
        return "no_database"
    # libpq's words when target_session_attrs=read-write finds no server that takes writes (14 and later;
    # 10 to 13), checked before the "down" words, which the second one contains.
    if any(p in low for p in ("hot standby mode", "session is read-only", "could not make a writable connection")):
        return "standby"
    if any(p in low for p in ("password authentication failed", "no pg_hba.conf entry", "authentication failed",
                              "role \"", "no password supplied", "permission denied for database")):
        return "auth"
    if any(p in low for p in SERVER_DOWN_PATTERNS):
        return "down"
    return "other"


# The majors pg_migrate supports and is tested on (README, meta/main.yml).
SUPPORTED_SERVERS = (14, 18)
# How long a second client of a pool may wait for a server connection while ours is idle: longer means the
# pool keeps ours for us (session pooling) and has no other free.
POOL_PROBE_WAIT = 1.0
POOL_PROBE_ROUNDS = 3


def wait_ready(conn: psycopg2.extensions.connection, deadline: float) -> bool:
    """Drive an asynchronous connection until its operation is done; False when the deadline passes first."""
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if state == psycopg2.extensions.POLL_READ:
            select.select([conn.fileno()], [], [], left)
        elif state == psycopg2.extensions.POLL_WRITE:
            select.select([], [conn.fileno()], [], left)


def shares_server(conn: psycopg2.extensions.connection, connect: Callable[[], psycopg2.extensions.connection]) -> bool:
    """Whether the pooler in front gives this session's server connection to another client between our
    transactions: a second client of the same pool asks for its server process while ours is idle. The same
    process, or ours changed meanwhile: shared. The second client served by another one, or left waiting for
    one (the pool keeps ours for us and has no other free): not shared. Nothing is set by either client."""
    def server_pid(c: psycopg2.extensions.connection) -> int:
        with c.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            return cur.fetchone()[0]

    ours = server_pid(conn)
    other = connect()
    try:
        if not wait_ready(other, time.monotonic() + POOL_PROBE_WAIT):
            return False
        cur = other.cursor()
        for _ in range(POOL_PROBE_ROUNDS):  # a busy transaction pool may hand out another free one once
            cur.execute("SELECT pg_backend_pid()")
            if not wait_ready(other, time.monotonic() + POOL_PROBE_WAIT):
                return False
            if cur.fetchone()[0] == ours or server_pid(conn) != ours:
                return True
        return False
    finally:
        other.close()


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


T = TypeVar("T")


class LockRace(Exception):
    """An attempt lost a race for a lock (lock_timeout, deadlock victim) and left nothing: try again."""


def with_lock_retries(schedule: list[Attempt], attempt_once: Callable[[int, Attempt, bool], T]) -> T:
    """attempt_once(attempt, step, last) for each step of the schedule until it returns; it raises LockRace,
    when it lost a lock race and this was not the last attempt, for another one after the step's pause."""
    for attempt, step in enumerate(schedule, 1):
        try:
            return attempt_once(attempt, step, attempt == len(schedule))
        except LockRace:
            time.sleep(step.pause)
    raise AssertionError("the last attempt never raises LockRace")


def parent_of(pid: int) -> int | None:
    """The parent of a process, or None when it is gone (Linux /proc; elsewhere only our own parent is known)."""
    if pid == os.getpid():
        return os.getppid()
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def controller_chain(controller: int | None) -> list[tuple[int, int]]:
    """(pid, parent) of our process and of each ancestor up to `controller`, the ansible-playbook worker that
    runs this task on a local connection (the action plugin sends its pid): a new parent anywhere on that
    chain means a process between us and ansible-playbook died, the worker's parent ansible-playbook itself
    included. The worker outlives a killed ansible-playbook and keeps reading our stdout, so the pipe alone
    does not tell there. Over SSH the controller is on another machine: no chain, the pipe tells.

    Nothing here depends on process names or on what is above ansible-playbook (nohup, a shell that exits).
    """
    if not controller:
        return []
    chain, pid = [], os.getpid()
    for _ in range(16):
        parent = parent_of(pid)
        if parent is None or parent <= 1:
            return []
        chain.append((pid, parent))
        if pid == controller:
            return chain
        pid = parent
    return []  # not our ancestor: another process namespace (a container), become through a daemon


def controller_gone(fd: int, chain: list[tuple[int, int]]) -> bool:
    """Our stdout lost its reader (signal, closed SSH session), or a process of the controller died."""
    poller = select.poll()
    poller.register(fd, select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0)) or any(parent_of(pid) != parent for pid, parent in chain)


def watch_controller(conn_of: Callable[[], object], controller: int | None, tick: Callable[[], None],
                     interval: float = 0.5) -> None:
    """Cancel the running statement and exit when the controller goes away, so no lock outlives it.

    Without this, ansible-playbook exits on Ctrl-C while the module's server session runs on to the end
    of its statement, holding the migration lock and the table locks. Cancelling rolls the file back;
    exiting closes the connection, which ends the session and releases the migration lock. `tick` runs
    every interval in a thread of its own (Session.watch_server).
    """
    fd, chain = sys.stdout.fileno(), controller_chain(controller)

    def cancel_and_exit() -> None:
        conn = conn_of()
        if conn is not None and not conn.closed:
            with contextlib.suppress(Exception):
                conn.cancel()
        os._exit(1)

    def watch() -> None:
        while not controller_gone(fd, chain):
            time.sleep(interval)
        cancel_and_exit()

    def watch_server() -> None:  # a thread of its own: a hung server must not delay the checks above
        while True:
            with contextlib.suppress(Exception):  # a connection closed meanwhile: the next tick sees the new one
                tick()
            time.sleep(interval)

    def wait_for_signal() -> None:
        signal.sigwait(STOP_SIGNALS)
        cancel_and_exit()

    # A stop signal sent to the module itself (the worker stopping its children, a process group) is
    # taken by a thread: the main thread sits in libpq until the statement ends and could not act on it.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=watch, name="pg_migrate-watchdog", daemon=True).start()
    threading.Thread(target=watch_server, name="pg_migrate-server-watch", daemon=True).start()
    threading.Thread(target=wait_for_signal, name="pg_migrate-signals", daemon=True).start()


if psycopg2 is not None:
    class WatchedCursor(psycopg2.extensions.cursor):
        """Marks on its connection when the query in flight started, for Session.watch_server."""

        def execute(self, query: str | pgsql.Composable, vars: tuple | dict | None = None) -> None:
            self.connection.running_since = time.monotonic()
            try:
                return super().execute(query, vars)
            finally:
                self.connection.running_since = None

    class WatchedConnection(psycopg2.extensions.connection):
        running_since: float | None = None


class Session:
    """One run of pg_migrate against one database, on one connection."""

    def __init__(self, params: dict, check_mode: bool, warn: Callable[[str], None]) -> None:
        self.p = params
        self.verify = params["verify"]  # report only, for a read-only login: see the module's documentation
        self.check = check_mode or self.verify
        self.warn = warn
        self.schema = params["schema"]
        self.table = params["history_table"]
        self.conn = None
        self.read_only = False  # the connection's queries run READ ONLY (see settle)
        self.startup_options = True  # off once a pooler refused the options startup parameter
        self.warned_newer = False
        self.to_run: list[Migration] = []  # what ran, or in check mode what would run (for --diff)
        self.where = f"{params['login_host']}:{params['login_port']}"
        self.schedule = lock_schedule(params["lock_retries"])
        self.stalled: str | None = None  # why watch_server gave up on the server, for the failure's message
        self.unanswered = 0  # consecutive liveness checks the server did not answer
        self.checked_at = 0.0
        self.address: tuple[str, int] | None = None
        self.guards: dict[str, str | None] = dict(GUARDS)  # None: the server refused it (see connect)
        self.libpq = psycopg2.extensions.libpq_version()
        self.auth_settings = self.libpq_auth_settings()

    def libpq_auth_settings(self) -> dict:
        """require_auth and channel_binding as the libpq loaded here takes them (not the one psycopg2 was
        built against); a warning where it cannot enforce them."""
        version = self.libpq
        settings = {"channel_binding": self.p["channel_binding"]} if version >= 130000 else {}
        if self.p["channel_binding"] == "require" and version < 130000:
            self.warn(f"channel_binding require is not enforced: this host's libpq is {version // 10000}, and "
                      "channel binding needs 13 or newer")
        if self.p["require_auth"] and version >= 160000:
            settings["require_auth"] = self.p["require_auth"]
        elif self.p["require_auth"] and self.p["ssl_mode"] != "verify-full" and \
                not (self.p["channel_binding"] == "require" and version >= 130000):
            self.warn(f"{self.named('require_auth')} ({self.p['require_auth']}) is not enforced: this host's psycopg2 "
                      f"uses libpq {version // 10000}, and require_auth needs 16 or newer. Whatever answers on the "
                      "server's port can ask for the password in clear text. Install a psycopg2 built on a newer "
                      f"libpq (psycopg2-binary), or set {self.named('ssl_mode')} to verify-full")
        return settings

    def named(self, option: str) -> str:
        """The option as the user set it: its name, or the role variable that option_names maps it to."""
        return self.p["option_names"].get(option, option)

    # Connections ---------------------------------------------------------------------------------
    def _connect_once(self, dbname: str, writable: bool = True, on: tuple[str, int] | None = None,
                      async_: bool = False) -> psycopg2.extensions.connection:
        """A server that takes writes: with several hosts in login_host (libpq's multi-host form, as HA
        setups use), the primary; `on` one host and port of them. Verify falls back to any server (see connect).

        The timeouts go in the `options` startup parameter, which makes them the session's defaults (a
        file's RESET returns to them), unless a pooler refused it before (see connect); a pooler that takes
        it and drops it is found by settle, which then sets them by SQL."""
        kwargs = {"host": self.p["login_host"], "port": self.p["login_port"], "user": self.p["login_user"],
                  "dbname": dbname, "connect_timeout": self.p["connect_timeout"], "sslmode": self.p["ssl_mode"],
                  "application_name": self.p["application_name"],
                  "target_session_attrs": "read-write" if writable else "any"}
        kwargs.update(CLIENT_KEEPALIVES)
        if self.libpq >= 120000:
            kwargs["tcp_user_timeout"] = 60000
        if self.startup_options:
            settings = {"lock_timeout": self.p["lock_timeout"], "statement_timeout": self.p["statement_timeout"],
                        **self.guards}
            kwargs["options"] = " ".join(f"-c {name}={value}" for name, value in settings.items() if value is not None)
        if on:
            kwargs.update(host=on[0], port=on[1])
        if self.p["login_password"]:
            kwargs["password"] = self.p["login_password"]
        if self.p["ca_cert"]:
            kwargs["sslrootcert"] = self.p["ca_cert"]
        kwargs.update(self.auth_settings)
        conn = psycopg2.connect(**kwargs, async_=async_, connection_factory=WatchedConnection,
                                cursor_factory=WatchedCursor)
        if not async_:  # a probe (see shares_server) is autocommit, driven by the caller
            conn.autocommit = True
        return conn

    def connect(self, dbname: str, read_only: bool, on: tuple[str, int] | None = None) -> psycopg2.extensions.connection:
        """Connect, retrying while the server is down until wait_timeout; raise a named failure otherwise.
        The connection is settled (see settle) on a supported server."""
        deadline = time.monotonic() + self.p["wait_timeout"]
        writable = True
        while True:
            try:
                conn = self._connect_once(dbname, writable, on)
                break
            except psycopg2.OperationalError as exc:
                if self.startup_options and "unsupported startup parameter: options" in str(exc):
                    self.startup_options = False  # PgBouncer's default: connect without, set them by SQL
                    continue
                if self.guards["client_connection_check_interval"] and "client_connection_check_interval" in str(exc):
                    # PostgreSQL 13 (refused below, by version), or a platform without the check (Windows)
                    self.guards["client_connection_check_interval"] = None
                    continue
                reason = classify_connect_error(str(exc))
                if reason == "standby" and self.verify and writable:
                    # Verify prefers the primary (a standby may lag behind a deploy that just ran), then reads any.
                    writable = False
                    continue
                if reason == "down" and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                if reason == "no_database":
                    raise
                raise MigrationError(self._connect_message(reason, dbname, str(exc)), reason=reason) from None
        # From here the watchdog sees it: a stop cancels, a server that stops answering is found (watch_server).
        self.conn, self.address = conn, (conn.info.host, conn.info.port)
        try:
            self.check_server(conn)
            self.settle(conn, dbname, read_only)
        except psycopg2.Error as exc:
            conn.close()  # not a missing database (run takes an OperationalError from here for one)
            raise MigrationError(f"Connected to PostgreSQL at {self.where} (database {dbname!r}), but setting up the "
                                 f"session failed: {first_line(str(exc))}", reason="other") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def check_server(self, conn: psycopg2.extensions.connection) -> None:
        version = conn.server_version
        shown = f"{version // 10000}.{version % 10000}"
        if version < SUPPORTED_SERVERS[0] * 10000:
            raise MigrationError(
                f"PostgreSQL {shown} at {self.where} is not supported: pg_migrate supports PostgreSQL "
                f"{SUPPORTED_SERVERS[0]} to {SUPPORTED_SERVERS[1]} (older majors are out of community support and "
                "lack what it relies on, such as pg_database_owner). Upgrade the server; nothing was changed",
                reason="unsupported", server_version=shown)
        if version >= (SUPPORTED_SERVERS[1] + 1) * 10000 and not self.warned_newer:
            self.warned_newer = True
            self.warn(f"PostgreSQL {shown} is newer than the majors pg_migrate is tested on "
                      f"({SUPPORTED_SERVERS[0]} to {SUPPORTED_SERVERS[1]})")

    def settle(self, conn: psycopg2.extensions.connection, dbname: str, read_only: bool) -> None:
        """Set the run's timeouts where they cannot outlive it, after making sure the session is ours.

        Behind a connection pooler (the session's process id differs from the one the connection was
        given), a session that the pooler hands to other clients between transactions (PgBouncer's
        transaction and statement pooling) would carry what a deploy sets (the migration lock, each file's
        settings) to the application: a deploy and its plan are refused there before anything is set. A
        read-only run sets nothing on the session: each of its queries carries its own READ ONLY and
        timeouts, local to the query's transaction (see query), so verify reads through any pool.
        """
        self.read_only = read_only

        def probe() -> psycopg2.extensions.connection:  # another client of the same pool
            return self._connect_once(dbname, on=(conn.info.host, conn.info.port), async_=True)

        with conn.cursor() as cur:
            # One round trip when the session is the server's own (no pooler): the usual case. There the
            # startup options set the timeouts, unless a pooler refused them before: then by SQL.
            cur.execute("SELECT pg_backend_pid() = %(pid)s, CASE WHEN pg_backend_pid() = %(pid)s AND %(set)s "
                        "THEN concat(" + TIMEOUTS + ") END",
                        {"pid": conn.info.backend_pid, "set": not read_only and not self.startup_options,
                         **self.timeouts()})
            if cur.fetchone()[0] or self.verify:
                return
            if shares_server(conn, probe):
                raise self.shared_session()
            if not read_only:  # a pooler that dropped the startup options, or refused them
                cur.execute("SELECT " + TIMEOUTS, self.timeouts())

    def watch_server(self) -> None:
        """The watchdog's tick: while a query has run longer than connect_timeout, ask the server on a second
        connection, every connect_timeout, whether it answers at all. A server that answers (even "too many
        clients") is working on our statement. None twice in a row: a hung host or a frozen VM, where the
        kernel keeps the TCP connection and no timeout on the server runs; shut our connection down, so that
        the statement fails now, naming that, instead of waiting for statement_timeout or for ever."""
        conn, wait = self.conn, self.p["connect_timeout"]
        since = getattr(conn, "running_since", None) if conn is not None else None
        now = time.monotonic()
        if not wait or since is None or now - since < wait:  # 0: libpq's "no limit", and no watch either
            self.unanswered = 0
            return
        if now - self.checked_at < wait:
            return
        self.checked_at = now
        try:
            probe = self._connect_once(self.p["login_db"], writable=False, on=self.address, async_=True)
        except psycopg2.Error:
            return  # refused or failed at once: the server's or the network's own error reaches the statement
        try:  # at least 5 s: a busy server's fork and SCRAM login are not a hang
            answered = wait_ready(probe, now + max(wait, 5))
        except psycopg2.Error:
            answered = True
        finally:
            probe.close()
        self.unanswered = 0 if answered else self.unanswered + 1
        if self.unanswered >= 2 and self.conn is conn and conn.running_since == since:  # still that statement
            self.stalled = (f"the server stopped answering: the statement ran {round(now - since)} s, and a new "
                            f"connection got no reply within {wait} s, twice ({self.named('connect_timeout')}), so "
                            "pg_migrate closed the connection; check the host")
            with contextlib.suppress(OSError):
                socket.socket(fileno=os.dup(conn.fileno())).shutdown(socket.SHUT_RDWR)

    def timeouts(self) -> dict:
        """The values of TIMEOUTS: the run's timeouts and the guards (0 for a check the server cannot make)."""
        return {"lock_timeout": self.p["lock_timeout"], "statement_timeout": self.p["statement_timeout"],
                **{name: "0" if value is None else value for name, value in self.guards.items()}}

    def shared_session(self) -> MigrationError:
        return MigrationError(
            f"{self.where} is a connection pooler that hands this session's server connection to other clients "
            "between transactions (PgBouncer's pool_mode transaction or statement). A deploy needs one server "
            "session from its start to its end (the migration lock, the settings each file runs under, CREATE INDEX "
            "CONCURRENTLY), and what it sets there would reach the application's connections. Point the deploy at "
            f"the PostgreSQL server itself with {self.named('login_host')} and {self.named('login_port')} (the "
            "backend keeps its .env), or at a pool in session mode. Nothing was changed", reason="pooler")

    def _connect_message(self, reason: str, dbname: str, error: str) -> str:
        user, where = self.p["login_user"], self.where
        if reason == "down":
            waited = f" (waited {self.p['wait_timeout']} s)" if self.p["wait_timeout"] else ""
            return (f"PostgreSQL server at {where} is not reachable{waited}: {first_line(error)}. "
                    "Check that it is running and that POSTGRES_HOST/POSTGRES_PORT are right")
        if reason == "standby":
            return (f"PostgreSQL at {where} does not accept writes: it is a read-only standby (hot standby), or its "
                    "sessions are read-only (default_transaction_read_only). A deploy writes, so it needs the primary. "
                    "Point POSTGRES_HOST at the primary, or list the cluster's hosts (POSTGRES_HOST=host1,host2) so "
                    f"that each deploy finds the current primary ({first_line(error)})")
        if reason == "auth_method":
            setting = self.p["require_auth"] or "libpq's default"
            return (f"PostgreSQL at {where} authenticates {user!r} in a way that {self.named('require_auth')} "
                    f"({setting}, channel_binding {self.p['channel_binding']}) does not accept, so no password was "
                    f"sent: {first_line(error)}. If this is your server, have its pg_hba.conf use scram-sha-256 for "
                    f"{user!r} (and set the password again, so that it is stored as SCRAM), or set "
                    f"{self.named('require_auth')} to the method it uses (scram-sha-256,none where it trusts this "
                    "host); if it is not, something else is answering on that port")
        if reason == "tls":
            return (f"TLS with PostgreSQL at {where} could not be set up as {self.named('ssl_mode')} "
                    f"({self.p['ssl_mode']}) asks: {first_line(error)}. Check the server's ssl setting and "
                    f"certificate, and {self.named('ca_cert')}")
        if reason == "auth":
            return (f"Login to PostgreSQL at {where} as {user!r} (database {dbname!r}) was refused: {first_line(error)}. "
                    "Check POSTGRES_USER/POSTGRES_PASSWORD and the server's pg_hba.conf")
        return f"Cannot connect to PostgreSQL at {where} (database {dbname!r}): {first_line(error)}"

    # Queries ---------------------------------------------------------------------------------------
    def query(self, statement: str | pgsql.Composable, args: tuple | dict = ()) -> list[tuple]:
        """One query; on a read-only connection in a READ ONLY transaction of its own, under the run's timeouts
        (the durations were validated: digits and a unit)."""
        if self.read_only:
            statement = pgsql.SQL("SET TRANSACTION READ ONLY; SET LOCAL lock_timeout = {}; "
                                  "SET LOCAL statement_timeout = {}; ").format(
                pgsql.Literal(self.p["lock_timeout"]), pgsql.Literal(self.p["statement_timeout"])) + (
                pgsql.SQL(statement) if isinstance(statement, str) else statement)
        with self.conn.cursor() as cur:
            cur.execute(statement, args)
            return cur.fetchall() if cur.description else []

    def history_ident(self) -> pgsql.Composable:
        return pgsql.SQL("{}.{}").format(pgsql.Identifier(self.schema), pgsql.Identifier(self.table))

    def inspect(self) -> dict:
        """The managed schema and history table as they are, refused when the login cannot trust them.

        A role with CREATE on the database could plant the schema, or a history table with a trigger,
        before the first deploy; the deploy (as its owner or a superuser) would then run that role's code.
        """
        row = self.query(INSPECT, {"schema": self.schema, "table": self.table})[0]
        (schema_exists, schema_owner, schema_trusted, history_exists, table_owner, table_trusted, relkind,
         attachments, has_tables, can_create_schema, can_create_in_schema, has_attempts, standard_strings) = row
        user = self.p["login_user"]
        for exists, trusted, kind, name, owner in (
                (schema_exists, schema_trusted, "Schema", self.schema, schema_owner),
                (history_exists, table_trusted, "History table", f"{self.schema}.{self.table}", table_owner)):
            if exists and not trusted and not self.verify:  # reading runs nothing of the owner's
                raise MigrationError(
                    f"{kind} {name} is owned by role {owner!r}, which is neither {user!r} (the login), nor a role "
                    f"{user!r} belongs to, nor a superuser: running migrations there would run what {owner!r} put "
                    f"in it with {user!r}'s privileges. pg_migrate refuses. If {owner!r} is trusted, make the owner "
                    f"{user!r} (ALTER ... OWNER TO) or GRANT {owner!r} TO {user!r}; otherwise investigate")
        if history_exists and (relkind != "r" or attachments):
            what = ", ".join(attachments) if attachments else f"relkind {relkind!r}, not a plain table"
            raise MigrationError(
                f"History table {self.schema}.{self.table} has {what}: pg_migrate writes to it only when it is a "
                "plain table with no trigger, rule or policy, since those would run code on every deploy. Remove "
                "them, after finding out who added them")
        return {"schema_exists": schema_exists, "history_exists": history_exists,
                "adopting": not history_exists and has_tables,
                "can_create_schema": can_create_schema, "can_create_in_schema": can_create_in_schema,
                "history_has_attempts": has_attempts, "standard_strings": standard_strings}

    def read_history(self) -> dict[int, dict]:
        rows = self.query(pgsql.SQL("SELECT version, name, checksum FROM {}").format(self.history_ident()))
        return {int(v): {"name": n, "checksum": c} for v, n, c in rows}

    def tables(self) -> list[str]:
        rows = self.query("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                          "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND c.relname <> %s ORDER BY 1",
                          (self.schema, self.table))
        return [r[0] for r in rows]

    def catalog_fingerprint(self) -> tuple:
        """Counts of catalog rows: equal before and after a file means it created nothing."""
        return self.query("SELECT (SELECT count(*) FROM pg_class), (SELECT count(*) FROM pg_attribute), "
                          "(SELECT count(*) FROM pg_constraint), (SELECT count(*) FROM pg_namespace), "
                          "(SELECT count(*) FROM pg_proc), (SELECT count(*) FROM pg_type), "
                          "(SELECT count(*) FROM pg_trigger), (SELECT count(*) FROM pg_policy)")[0]

    def check_privileges(self, state: dict) -> None:
        """Fail before running anything when the login cannot create what the run needs."""
        user, db = self.p["login_user"], self.p["login_db"]
        if not state["schema_exists"] and not state["can_create_schema"]:
            raise MigrationError(
                f"Role {user!r} lacks the CREATE privilege on database {db!r}, needed to create schema "
                f"{self.schema!r}: run 'GRANT CREATE ON DATABASE {db} TO {user}' as its owner, or create the "
                "schema for it")
        if state["schema_exists"] and not state["can_create_in_schema"]:
            raise MigrationError(
                f"Role {user!r} lacks the CREATE privilege on schema {self.schema!r}: run "
                f"'GRANT CREATE ON SCHEMA {self.schema} TO {user}' or 'ALTER SCHEMA {self.schema} OWNER TO {user}'")

    def create_history(self) -> None:
        self.query(pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(pgsql.Identifier(self.schema)))
        self.query(pgsql.SQL(
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
            " checksum_accepted_at timestamptz)").format(self.history_ident()))

    # Locks -----------------------------------------------------------------------------------------
    def acquire_lock(self, key: int, what: str) -> float:
        """Take a session advisory lock, polling until lock_wait_timeout; return the wait in ms."""
        began = time.monotonic()
        deadline = began + self.p["lock_wait_timeout"]
        delay = 0.05
        while not self.query("SELECT pg_try_advisory_lock(%s)", (key,))[0][0]:
            if time.monotonic() >= deadline:
                raise MigrationError(f"Another run holds the lock of {what} after waiting "
                                     f"{self.p['lock_wait_timeout']} s ({self.named('lock_wait_timeout')}): "
                                     f"{self.lock_holders(key)}. Wait for it to finish, or end that session")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        return (time.monotonic() - began) * 1000

    def lock_holders(self, key: int) -> str:
        unsigned = key & 0xFFFFFFFFFFFFFFFF
        rows = self.query(
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

    def catalog_lock_holders(self) -> str:
        rows = self.query(
            "SELECT DISTINCT a.pid, a.usename, a.application_name, a.state, l.mode FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.granted AND l.pid <> pg_backend_pid() "
            "AND l.relation = 'pg_catalog.pg_database'::regclass ORDER BY 1")
        return "; ".join(f"pid {pid} (user {user}, application {app!r}, {state}, {mode})"
                         for pid, user, app, state, mode in rows) or "the holder has just released it"

    def schema_locks(self, mode: str | None = None) -> list[tuple]:
        """(pid, user, application, state, mode, table, seconds its transaction is open) of each lock that
        another session holds on a table of the managed schema in this database; of one `mode` only."""
        return self.query(
            "SELECT DISTINCT a.pid, a.usename, a.application_name, a.state, l.mode, c.relname, "
            "coalesce(round(extract(epoch FROM now() - a.xact_start))::text, '?') "
            "FROM pg_locks l JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.granted AND l.pid <> pg_backend_pid() "
            "AND n.nspname = %s AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND (%s::text IS NULL OR l.mode = %s) ORDER BY 1, 6", (self.schema, mode, mode))

    def relation_lock_holders(self) -> str:
        rows = self.schema_locks()
        if not rows:
            return "no session holds a lock in that schema any more"
        return "blocked by " + "; ".join(
            f"pid {pid} (user {user}, application {app!r}, {state}, {mode} on {rel}, transaction open {age} s)"
            for pid, user, app, state, mode, rel, age in rows)

    def exclusive_lock_holders(self) -> str:
        """Who holds a table of the managed schema in ACCESS EXCLUSIVE mode, which even reading its definition waits for."""
        rows = self.schema_locks("AccessExclusiveLock")
        if not rows:
            return "a table was locked while its definition was read (the holder has released it since)"
        return "; ".join(f"table {rel} is locked by pid {pid} (user {user}, application {app!r}, {state}, "
                         f"transaction open {age} s)" for pid, user, app, state, _mode, rel, age in rows)

    # The database ----------------------------------------------------------------------------------
    def no_createdb(self) -> MigrationError:
        user, name = self.p["login_user"], self.p["login_db"]
        return MigrationError(
            f"Role {user!r} lacks the CREATEDB privilege needed to create database {name!r} on {self.where}: "
            f"run 'ALTER ROLE {user} CREATEDB', or have a DBA create the database (UTF8) and grant {user} "
            "CREATE on it")

    def can_create_databases(self) -> bool:
        return bool(self.query("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")[0][0])

    def create_database(self) -> bool:
        """Create login_db from the maintenance database, once, whoever else is trying; True if this run did."""
        name = self.p["login_db"]
        key = advisory_key("create-database", name)
        self.acquire_lock(key, f"the creation of database {name!r}")
        try:
            if self.query("SELECT 1 FROM pg_database WHERE datname = %s", (name,)):
                return False
            # Creating a database blocks no application query: wait for pg_database as long as for the
            # migration lock, not lock_timeout (another database being created or dropped holds it).
            self.query("SELECT set_config('lock_timeout', %s, false)", (f"{self.p['lock_wait_timeout']}s",))
            try:
                self.query(pgsql.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0").format(
                    pgsql.Identifier(name)))
            except psycopg2.errors.InsufficientPrivilege:
                raise self.no_createdb() from None
            except psycopg2.errors.LockNotAvailable:
                raise MigrationError(
                    f"Creating database {name!r} on {self.where} waited {self.p['lock_wait_timeout']} s "
                    f"({self.named('lock_wait_timeout')}) for the "
                    f"catalog pg_database: {self.catalog_lock_holders()}. Retry once that session is done") from None
            return True
        finally:
            self.query("SELECT pg_advisory_unlock(%s)", (key,))

    # Applying ------------------------------------------------------------------------------------------
    def statement_error(self, mig: Migration, exc: psycopg2.Error, offset: int, index: int | None,
                        attempts: int = 1, lock_timeout: str | None = None) -> MigrationError:
        """Name the file, the line (from the server's error position) and what became of the file."""
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
        if self.conn.closed or exc.pgcode in (None, "57P01", "57P02"):
            kept = "all of this file" if mig.transactional else "this file's earlier statements stay"
            return MigrationError(
                f"{where}: the connection to the server was lost ({self.stalled or message}). The server rolls back "
                "what was not "
                f"committed ({kept}) and the file was not recorded. Run the deploy again when the server is back.",
                failed_migration=mig.name, line=line)
        code = exc.pgcode
        if mig.transactional:
            effect = "The file was rolled back and not recorded: nothing of it was applied."
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
                    f"({self.named('lock_retries')}): {self.relation_lock_holders()}.")
        elif code == "55P03":
            setting = self.named("lock_retries" if lock_timeout else "lock_timeout")
            msg += (f" lock_timeout ({lock_timeout or self.p['lock_timeout']}, {setting}) expired: "
                    f"{self.relation_lock_holders()}.")
        if code == "57014":
            msg += (f" {self.named('statement_timeout')} is {self.p['statement_timeout']}: raise it for a migration "
                    "that needs longer.")
        if code == "42501":
            msg += f" Grant role {self.p['login_user']!r} the privilege named above."
        return MigrationError(msg, failed_migration=mig.name, sqlstate=code, line=line)

    def run_file(self, mig: Migration, attempt: int, step: Attempt, last: bool) -> int:
        """A transactional file goes to the server whole (its parser reads it), in the transaction apply()
        opened, under the lock_timeout of this attempt (see with_lock_retries). A no-transaction file runs
        one statement at a time (see run_statement). The attempts it took."""
        with self.conn.cursor() as cur:
            if mig.transactional:
                if mig.statements == []:  # comments only: psql runs it as a no-op, and so does this
                    return attempt
                try:
                    cur.execute(mig.text)
                except psycopg2.Error as exc:
                    self.rollback(mig)
                    if exc.pgcode in LOCK_CONFLICTS and not last:
                        raise LockRace from None
                    raise self.statement_error(mig, exc, 0, None, attempt, step.lock_timeout) from None
                return attempt
            attempts = max((self.run_statement(cur, mig, index, start, end, once)
                            for index, (start, end, _line, once) in enumerate(mig.statements, 1)), default=1)
            self.refuse_invalid_indexes(mig)
            return attempts

    def refuse_invalid_indexes(self, mig: Migration) -> None:
        """A CREATE INDEX CONCURRENTLY that failed leaves an INVALID index, which CREATE INDEX CONCURRENTLY IF NOT
        EXISTS then skips: after a no-transaction file, any INVALID index in the managed schema fails the run."""
        invalid = [r[0] for r in self.query(
            "SELECT c.relname FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = %s AND NOT x.indisvalid ORDER BY 1", (self.schema,))]
        if invalid:
            names = ", ".join(f"{self.schema}.{name}" for name in invalid)
            raise MigrationError(
                f"Migration {mig.name} ran, but the managed schema has INVALID indexes: {names} (an index build with "
                "CONCURRENTLY that failed leaves one, not enforced and not used by queries, and IF NOT EXISTS then "
                f"skips it). The file was not recorded: drop each (DROP INDEX CONCURRENTLY {names.split(', ')[0]}), "
                "fix what made the build fail, and run the deploy again", failed_migration=mig.name,
                invalid_indexes=invalid)

    def run_statement(self, cur: psycopg2.extensions.cursor, mig: Migration, index: int, start: int, end: int,
                      once: str | None) -> int:
        """One statement of a no-transaction file, its own transaction: when it loses a lock race, nothing of it
        stayed, so it alone is retried by the schedule. Not a statement the action plugin marked `once` (a
        CONCURRENTLY build leaves an invalid index; a DO block or CALL may have committed): it runs once, under
        the session's lock_timeout."""
        text = mig.text[start:end]

        def attempt_once(attempt: int, step: Attempt, last: bool) -> int:
            if step.lock_timeout:
                cur.execute("SELECT set_config('lock_timeout', %s, false)", (step.lock_timeout,))
            try:
                cur.execute(text)
                return attempt
            except psycopg2.Error as exc:
                if exc.pgcode in LOCK_CONFLICTS and not last:
                    raise LockRace from None
                error = self.statement_error(mig, exc, start, index, attempt, step.lock_timeout)
                if once == "may_commit" and exc.pgcode in LOCK_CONFLICTS:
                    error.msg += (" This statement (a DO block or a CALL) may have committed part of its work, so it "
                                  f"was not retried ({self.named('lock_retries')}): check what it left, and make it "
                                  "safe to run again before the next deploy")
                raise error from None
            finally:
                if step.lock_timeout:
                    with contextlib.suppress(psycopg2.Error):  # the connection may have died with the statement
                        cur.execute("SELECT set_config('lock_timeout', %s, false)", (self.p["lock_timeout"],))

        return with_lock_retries([Attempt(None, 0.0)] if once else self.schedule, attempt_once)

    def apply(self, mig: Migration, create_history: bool, adopting: bool) -> dict:
        """Run one file from the session's defaults, then record it; a transactional file and its row commit together.

        The history table is created after the file's statements, so that a first migration may
        create the managed schema itself without IF NOT EXISTS.
        """
        began = time.monotonic()
        return with_lock_retries(self.schedule if mig.transactional else [Attempt(None, 0.0)],
                                 lambda attempt, step, last: self.apply_once(mig, create_history, adopting, began,
                                                                             attempt, step, last))

    def apply_once(self, mig: Migration, create_history: bool, adopting: bool, began: float, attempt: int,
                   step: Attempt, last: bool) -> dict:
        cur = self.conn.cursor()
        try:
            if step.lock_timeout:  # one round trip: the attempt's lock_timeout, local to the file's transaction
                cur.execute(RESET_SESSION + "; BEGIN; SELECT set_config('lock_timeout', %(attempt)s, true)",
                            {**self.timeouts(), "attempt": step.lock_timeout})
            else:
                cur.execute(RESET_SESSION + ("; BEGIN" if mig.transactional else ""), self.timeouts())
            before = self.catalog_fingerprint() if adopting else None
            attempt = self.run_file(mig, attempt, step, last)  # no-transaction: its most retried statement's
            adopted = adopting and before == self.catalog_fingerprint()
            # The history row is written by the login, whatever role or settings the file chose.
            cur.execute("SET LOCAL SESSION AUTHORIZATION DEFAULT; SET LOCAL ROLE NONE" if mig.transactional
                        else "SET SESSION AUTHORIZATION DEFAULT; RESET ROLE")
            if create_history:
                self.create_history()
            duration = (time.monotonic() - began) * 1000
            cur.execute(pgsql.SQL("INSERT INTO {} (version, name, checksum, duration_ms, transactional, adopted, host, "
                                  "source, attempts) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)").format(
                            self.history_ident()),
                        (mig.version, mig.name, mig.checksum, round(duration, 3), mig.transactional, adopted,
                         socket.gethostname(), self.p["source"], attempt))
            if mig.transactional:
                cur.execute("COMMIT")
        except psycopg2.Error as exc:
            self.rollback(mig)
            raise MigrationError(f"Recording migration {mig.name} in {self.schema}.{self.table} failed: "
                                 f"SQLSTATE {exc.pgcode}: {first_line(str(exc))}. The file was not recorded"
                                 + (" (its statements stayed committed)" if not mig.transactional else
                                    " and nothing of it was applied")) from None
        return {**mig.summary(), "duration_ms": round(duration, 3), "adopted": adopted, "attempts": attempt}

    def rollback(self, mig: Migration) -> None:
        """End a failed file's transaction; a lost connection needs nothing (the server rolls back)."""
        if mig.transactional and not self.conn.closed and \
                self.conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            with contextlib.suppress(psycopg2.OperationalError):  # the connection died with the statement
                self.conn.cursor().execute("ROLLBACK")

    def accept(self, change: dict) -> None:
        self.query(pgsql.SQL("UPDATE {} SET checksum = %s, previous_checksum = %s, checksum_accepted_at = now() "
                             "WHERE version = %s AND checksum = %s").format(self.history_ident()),
                   (change["new_checksum"], change["old_checksum"], change["version"], change["old_checksum"]))

    # The run -------------------------------------------------------------------------------------------
    def run(self, migrations: list[Migration]) -> dict:
        check = self.check
        result: dict = {"changed": False, "database_exists": True, "database_created": False, "adopting": False,
                        "applied": [], "pending": [], "already_applied": [], "accepted": [], "drift": [],
                        "lock_wait_ms": 0.0, "history_table": f"{self.schema}.{self.table}"}
        mode = "report" if self.verify else self.p["on_missing_database"]
        try:
            self.conn = self.connect(self.p["login_db"], read_only=check)
        except psycopg2.OperationalError as exc:
            # The server answered and the login is good, but the database is missing there: confirm on the
            # maintenance database, so that a typo in the host is not reported as a missing database. With
            # several hosts, that is the primary's; a standby listed first may not have replayed the database yet.
            self.conn = self.connect(self.p["maintenance_db"], read_only=check or mode != "create")
            result["server_version"] = self.server_version()
            server = (self.conn.info.host, self.conn.info.port)
            if not self.query("SELECT 1 FROM pg_database WHERE datname = %s", (self.p["login_db"],)):
                if mode == "fail":
                    raise MigrationError(f"Database {self.p['login_db']!r} does not exist on {self.where}: "
                                         f"create it first, or set {self.named('on_missing_database')}=create") from exc
                if check and mode == "create" and not self.can_create_databases():
                    raise self.no_createdb() from None  # the plan predicts the failure the deploy would have
                if check or mode == "report":
                    check_runnable(migrations)  # a broken file shows in the plan already
                    result.update(database_exists=False, pending=[m.summary() for m in migrations],
                                  changed=check and mode == "create")
                    self.to_run = migrations
                    if self.p["expected_tables"] is not None:
                        result.update(tables=[], missing_tables=sorted(self.p["expected_tables"]), unexpected_tables=[])
                    return result
                result["database_created"] = result["changed"] = self.create_database()
            self.close()
            self.conn = self.connect(self.p["login_db"], read_only=check, on=server)

        result["server_version"] = self.server_version()
        if not check:
            result["lock_wait_ms"] = round(self.acquire_lock(
                advisory_key(self.schema, self.table),
                f"{self.schema}.{self.table} in database {self.p['login_db']!r}"), 3)
        state = self.inspect()
        history = self.read_history() if state["history_exists"] else {}
        result["adopting"] = state["adopting"]
        plan = make_plan(migrations, history, self.p["accepted_changes"], self.p["unknown_versions"],
                         self.p["out_of_order"], self.p["option_names"])
        result.update(already_applied=[{"version": m.version, "name": m.name} for m in plan.already_applied],
                      accepted=plan.accepted, drift=plan.drift)
        check_runnable(plan.pending)  # every pending file is runnable before any of them runs
        escaped = [m.name for m in plan.pending if "\\" in m.text]
        if state["standard_strings"] == "off" and escaped:
            raise MigrationError(
                f"Database {self.p['login_db']!r} reads strings with standard_conforming_strings = off (from the "
                f"server's configuration, the database or role {self.p['login_user']!r}), where a backslash in "
                f"'...' escapes the next character; pg_migrate read {', '.join(escaped)} with it on, as PostgreSQL's "
                "default, so the server would split and run them differently. Nothing was run: write backslash "
                "escapes as E'...' strings and set the database back to on (ALTER DATABASE ... RESET "
                "standard_conforming_strings)",
                failed_migration=escaped[0])
        for d in plan.drift:
            if d["kind"] == "unknown":
                self.warn(f"Version {d['version']} ({d['name']}) is in the history but has no file")
        if plan.pending and not self.verify:
            self.check_privileges(state)  # in check mode too: the plan predicts the failure
        if plan.pending and not check and state["history_exists"] and not state["history_has_attempts"]:
            # A history table made before attempts were recorded.
            self.query(pgsql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS attempts integer NOT NULL DEFAULT 1").format(
                self.history_ident()))
        if check:
            result["pending"] = [m.summary() for m in plan.pending]
            self.to_run = plan.pending
            result["changed"] = bool(plan.pending or plan.accepted) and not self.verify
        else:
            for change in plan.accepted:
                self.accept(change)
                result["changed"] = True
            for index, mig in enumerate(plan.pending):
                try:
                    result["applied"].append(self.apply(mig, not state["history_exists"] and index == 0,
                                                        state["adopting"]))
                except MigrationError as exc:
                    exc.details.update(applied=result["applied"], pending=[m.summary() for m in plan.pending[index:]])
                    raise
                self.to_run.append(mig)
                result["changed"] = True
        try:
            if self.p["expected_tables"] is not None:
                actual = self.tables()
                expected = set(self.p["expected_tables"])
                result.update(tables=actual, missing_tables=sorted(expected - set(actual)),
                              unexpected_tables=sorted(set(actual) - expected))
            if self.p["expected_schema"] is not None:
                after = {row["name"]: row["checksum"] for row in history.values()}
                after.update({a["name"]: a["new_checksum"] for a in plan.accepted})
                after.update({a["name"]: a["checksum"] for a in result["applied"]})
                result.update(self.compare_schema(after))
        except psycopg2.Error as exc:  # what was applied stays applied, and is reported as such
            raise MigrationError(
                f"Reading the schema of database {self.p['login_db']!r} on {self.where} failed after the migrations: "
                f"SQLSTATE {exc.pgcode}: {first_line(str(exc))}. "
                + (f"{len(result['applied'])} applied and recorded; " if result["applied"] else "")
                + "run verify to compare the schema", applied=result["applied"], pending=[]) from None
        return result

    def drop_schema(self) -> dict:
        """Drop the managed schema with everything in it, the history table too (a development rollback),
        under the migration lock, so that it never interleaves with a deploy."""
        result = {"changed": False, "dropped": False, "database_exists": True,
                  "history_table": f"{self.schema}.{self.table}"}
        try:
            self.conn = self.connect(self.p["login_db"], read_only=self.check)
        except psycopg2.OperationalError:  # the database is missing: nothing to drop
            result["database_exists"] = False
            return result
        result["server_version"] = self.server_version()
        if self.query("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)):
            if not self.check:
                self.acquire_lock(advisory_key(self.schema, self.table),
                                  f"{self.schema}.{self.table} in database {self.p['login_db']!r}")
                self.query(pgsql.SQL("DROP SCHEMA {} CASCADE").format(pgsql.Identifier(self.schema)))
            result.update(changed=True, dropped=True)
        return result

    def compare_schema(self, applied: dict[str, str]) -> dict:
        """The schema against the canonical file, when the database has exactly the file's migrations."""
        expected = self.p["expected_schema"]
        reason = not_compared(expected.get("migrations", {}), applied)
        unusable = None  # the file cannot describe this database at all: verify fails on it
        if expected.get("schema", self.schema) != self.schema:
            unusable = f"the schema file describes schema {expected['schema']!r}, not {self.schema!r}"
        if unusable or reason:
            return {"schema_compared": False, "schema_not_compared": unusable or reason,
                    "schema_file_unusable": bool(unusable), "schema_differences": []}
        try:
            actual = self.query(SNAPSHOT, {"schema": self.schema, "table": self.table})[0][0]
        except psycopg2.Error as exc:
            # PostgreSQL's deparse functions (pg_get_expr, pg_get_indexdef, ...) take ACCESS SHARE on each table,
            # which is harmless to the application's queries but waits for a session that holds the table.
            if exc.pgcode != "55P03":
                raise
            held = self.exclusive_lock_holders()
            return {"schema_compared": False, "schema_compare_blocked": True, "schema_differences": [],
                    "schema_not_compared": f"{held} (waited lock_timeout, {self.p['lock_timeout']}): run verify "
                                           "again when it is free"}
        return {"schema_compared": True, "schema_differences": differences(expected.get("objects", {}), actual)}

    def server_version(self) -> str:
        version = self.conn.server_version
        return f"{version // 10000}.{version % 10000}"

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
