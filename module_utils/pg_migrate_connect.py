# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""The driver: one connection to the database pg_migrate works on, how it is made and kept, and its queries.

Everything else (history, locks, applying) works through `Database.query` and `Database.conn`.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
import traceback
from collections.abc import Callable

from ansible.module_utils.pg_migrate_plan import MigrationError, first_line, option
from ansible.module_utils.pg_migrate_progress import Progress, progress_file

try:
    import psycopg2
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


if psycopg2 is not None:
    class WatchedCursor(psycopg2.extensions.cursor):
        """Marks on its connection when the query in flight started, for Database.watch_server."""

        def execute(self, query: str | pgsql.Composable, vars: tuple | dict | None = None) -> None:
            self.connection.running_since = time.monotonic()
            try:
                return super().execute(query, vars)
            finally:
                self.connection.running_since = None

    class WatchedConnection(psycopg2.extensions.connection):
        running_since: float | None = None


class Database:
    """The database of one run: its options, its one connection, the state of that connection."""

    def __init__(self, params: dict, mode: str, warn: Callable[[str], None]) -> None:
        self.p = params
        self.mode = mode  # deploy, plan (check mode) or verify (see the module's documentation)
        self.verify = mode == "verify"
        self.check = mode != "deploy"  # nothing is written
        self.warn = warn
        self.schema = params["schema"]
        self.table = params["history_table"]
        self.conn = None
        self.read_only = False  # the connection's queries run READ ONLY (see settle)
        self.startup_options = True  # off once a pooler refused the options startup parameter
        self.warned_newer = False
        self.where = f"{params['login_host']}:{params['login_port']}"
        self.stalled: str | None = None  # why watch_server gave up on the server, for the failure's message
        self.unanswered = 0  # consecutive liveness checks the server did not answer
        self.checked_at = 0.0
        self.address: tuple[str, int] | None = None
        self.server_pid: int | None = None  # of the session on the server, behind a pooler too (see settle)
        self.guards: dict[str, str | None] = dict(GUARDS)  # None: the server refused it (see connect)
        # What a long statement is doing, every progress_interval seconds (0: never); the action plugin
        # names the file it reads by a token of its own.
        self.progress = Progress(self, params.get("progress_interval") or 0, progress_file(params.get("_progress_token")))
        self.libpq = psycopg2.extensions.libpq_version()
        self.auth_settings = self.libpq_auth_settings()

    @property
    def history(self) -> str:
        return f"{self.schema}.{self.table}"

    def history_ident(self) -> pgsql.Composable:
        return pgsql.SQL("{}.{}").format(pgsql.Identifier(self.schema), pgsql.Identifier(self.table))

    def libpq_auth_settings(self) -> dict:
        """require_auth and channel_binding as the libpq loaded here takes them (not the one psycopg2 was
        built against); a warning where it cannot enforce them."""
        version = self.libpq
        settings = {"channel_binding": self.p["channel_binding"]} if version >= 130000 else {}
        if self.p["channel_binding"] == "require" and version < 130000:
            self.warn(f"{option('channel_binding')} require is not enforced: this host's libpq is {version // 10000}, and "
                      "channel binding needs 13 or newer")
        if self.p["require_auth"] and version >= 160000:
            settings["require_auth"] = self.p["require_auth"]
        elif self.p["require_auth"] and self.p["ssl_mode"] != "verify-full" and \
                not (self.p["channel_binding"] == "require" and version >= 130000):
            self.warn(f"{option('require_auth')} ({self.p['require_auth']}) is not enforced: this host's psycopg2 "
                      f"uses libpq {version // 10000}, and require_auth needs 16 or newer. Whatever answers on the "
                      "server's port can ask for the password in clear text. Install a psycopg2 built on a newer "
                      f"libpq (psycopg2-binary), or set {option('ssl_mode')} to verify-full")
        return settings

    def _connect_once(self, dbname: str, writable: bool = True, on: tuple[str, int] | None = None,
                      async_: bool = False, application_name: str | None = None) -> psycopg2.extensions.connection:
        """A server that takes writes: with several hosts in login_host (libpq's multi-host form, as HA
        setups use), the primary; `on` one host and port of them. Verify falls back to any server (see connect).

        The timeouts go in the `options` startup parameter, which makes them the session's defaults (a
        file's RESET returns to them), unless a pooler refused it before (see connect); a pooler that takes
        it and drops it is found by settle, which then sets them by SQL."""
        kwargs = {"host": self.p["login_host"], "port": self.p["login_port"], "user": self.p["login_user"],
                  "dbname": dbname, "connect_timeout": self.p["connect_timeout"], "sslmode": self.p["ssl_mode"],
                  "application_name": application_name or self.p["application_name"],
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
            cur.execute("SELECT pg_backend_pid(), CASE WHEN pg_backend_pid() = %(pid)s AND %(set)s "
                        "THEN concat(" + TIMEOUTS + ") END",
                        {"pid": conn.info.backend_pid, "set": not read_only and not self.startup_options,
                         **self.timeouts()})
            self.server_pid = cur.fetchone()[0]
            if self.server_pid == conn.info.backend_pid or self.verify:
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
                            f"connection got no reply within {wait} s, twice ({option('connect_timeout')}), so "
                            "pg_migrate closed the connection; check the host")
            with contextlib.suppress(OSError):
                socket.socket(fileno=os.dup(conn.fileno())).shutdown(socket.SHUT_RDWR)

    def side_connection(self, wait: float, application_name: str) -> psycopg2.extensions.connection | None:
        """A second connection to the server of ours, for a question on the side (progress), or None when it
        is not made within `wait` seconds. Asynchronous, so that a pool with no free server connection or a
        hung server cannot hold the asking thread."""
        conn = self._connect_once(self.conn.info.dbname, writable=False, on=self.address, async_=True,
                                  application_name=application_name)
        if wait_ready(conn, time.monotonic() + wait):
            return conn
        conn.close()
        return None

    @staticmethod
    def ask_aside(conn: psycopg2.extensions.connection, query: str, args: tuple | dict,
                  wait: float) -> dict | None:
        """One row of a query on a side connection, by column name, or None when no answer came in `wait`
        seconds ({} for no row)."""
        cur = conn.cursor()
        cur.execute(query, args)
        if not wait_ready(conn, time.monotonic() + wait):
            return None
        row = cur.fetchone() if cur.description else None
        return dict(zip([c.name for c in cur.description], row, strict=True)) if row else {}

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
            f"the PostgreSQL server itself with {option('login_host')} and {option('login_port')} (the "
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
            return (f"PostgreSQL at {where} authenticates {user!r} in a way that {option('require_auth')} "
                    f"({setting}, {option('channel_binding')} {self.p['channel_binding']}) does not accept, so no "
                    f"password was sent: {first_line(error)}. If this is your server, have its pg_hba.conf use "
                    f"scram-sha-256 for {user!r} (and set the password again, so that it is stored as SCRAM), or set "
                    f"{option('require_auth')} to the method it uses (scram-sha-256,none where it trusts this "
                    "host); if it is not, something else is answering on that port")
        if reason == "tls":
            return (f"TLS with PostgreSQL at {where} could not be set up as {option('ssl_mode')} "
                    f"({self.p['ssl_mode']}) asks: {first_line(error)}. Check the server's ssl setting and "
                    f"certificate, and {option('ca_cert')}")
        if reason == "auth":
            return (f"Login to PostgreSQL at {where} as {user!r} (database {dbname!r}) was refused: {first_line(error)}. "
                    "Check POSTGRES_USER/POSTGRES_PASSWORD and the server's pg_hba.conf")
        return f"Cannot connect to PostgreSQL at {where} (database {dbname!r}): {first_line(error)}"

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

    def server_version(self) -> str:
        version = self.conn.server_version
        return f"{version // 10000}.{version % 10000}"

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
