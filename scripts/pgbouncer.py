#!/usr/bin/env python3
"""Start and stop a throwaway PgBouncer in front of a pgcluster.Cluster, for the pooler tests.

Debian's pgbouncer, run as the postgres account (when root) with `pgbouncer -d INI`, never as a
service: listening on 127.0.0.1 and a free port, every database forwarded to the cluster, SCRAM for
clients and for the server, in the pool mode and pool size asked for. Its configuration is PgBouncer's
default otherwise: in particular it refuses the `options` startup parameter, as most installations do,
unless `ignore_options` (then it takes it and drops it, as some do to let such clients in).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg2
from pgcluster import Cluster, free_port

PGBOUNCER = Path("/usr/sbin/pgbouncer")


class PgBouncer:
    """A PgBouncer in a folder of its own, forwarding to `server`, knowing the logins in `users` ({name: password})."""

    def __init__(self, server: Cluster, users: dict[str, str], pool_mode: str = "transaction",
                 pool_size: int = 1, ignore_options: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="smdb-pgbouncer-"))
        self.server, self.users = server, users
        self.pool_mode, self.pool_size, self.ignore_options = pool_mode, pool_size, ignore_options
        self.host, self.port = "127.0.0.1", free_port()
        self.ini, self.pidfile = self.root / "pgbouncer.ini", self.root / "pgbouncer.pid"

    def _as_postgres(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args

    def start(self) -> PgBouncer:
        if not PGBOUNCER.exists():
            raise RuntimeError("pgbouncer is missing: run scripts/host-deps.sh (make pytest does)")
        self.root.chmod(0o755)  # pgbouncer runs as the postgres account when root
        auth = self.root / "userlist.txt"
        auth.write_text("".join(f'"{name}" "{password}"\n' for name, password in self.users.items()))
        self.ini.write_text(
            f"[databases]\n* = host={self.server.host} port={self.server.port}\n"
            f"[pgbouncer]\nlisten_addr = {self.host}\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = scram-sha-256\nauth_file = {auth}\npool_mode = {self.pool_mode}\n"
            f"default_pool_size = {self.pool_size}\nmax_client_conn = 100\n"
            f"logfile = {self.root / 'pgbouncer.log'}\npidfile = {self.pidfile}\n"
            f"ignore_startup_parameters = extra_float_digits{',options' if self.ignore_options else ''}\n")
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for path in (self.root, auth, self.ini):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        for path in (auth, self.ini):
            path.chmod(0o600)
        subprocess.run(self._as_postgres([str(PGBOUNCER), "-d", str(self.ini)]), check=True, capture_output=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                user = next(iter(self.users))
                psycopg2.connect(host=self.host, port=self.port, user=user, password=self.users[user],
                                 dbname="postgres", connect_timeout=2).close()
                return self
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.pidfile.exists():
            pid = int(self.pidfile.read_text().split()[0])
            subprocess.run(["kill", str(pid)], check=False)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)
