#!/usr/bin/env python3
"""make bench: pg_migrate and deploy-db.yml measured side by side with the manual psql way.

Everything runs in one go on one throwaway PostgreSQL (scripts/pgcluster.py), and the targets are
ratios between runs of the same session, since this machine is shared and absolute times drift.
Each figure is the median of several runs; every run uses a database of its own.

The tables are printed, and written into docs/benchmark.md (from DOC_TEMPLATE below): a run rewrites
the sections it measured, between their <!-- bench:NAME --> markers, and keeps the others as they
were. The busy-table run also draws docs/img/busy-table-latency.png.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import sshhost
from pgcluster import Cluster

MIGRATIONS = ROOT / "roles" / "stock_monitoring_db" / "files" / "migrations"
DOC = ROOT / "docs" / "benchmark.md"
PLOT = ROOT / "docs" / "img" / "busy-table-latency.png"
SECTIONS = ("small", "plan", "progress", "big", "live")  # in the order of docs/benchmark.md
BIN = Path(sys.executable).parent
# Actions that run on the controller; every other task result is a module execution on the host.
CONTROLLER_ONLY = {"ansible.builtin.set_fact", "ansible.builtin.assert", "ansible.builtin.debug",
                   "ansible.builtin.fail", "ansible.builtin.include_tasks", "ansible.builtin.validate_argument_spec"}


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        # A 50 MB DDL file applied in one transaction locks every object it creates: size the lock table
        # for it, as a DBA applying such a baseline would (the default holds about 6,400 locks).
        self.pg = Cluster(work / "pg", settings={"max_locks_per_transaction": "8192"})
        self.pg.start()
        self.env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_LIBRARY": str(ROOT / "library"),
           "ANSIBLE_MODULE_UTILS": str(ROOT / "module_utils"), "ANSIBLE_ACTION_PLUGINS": str(ROOT / "action_plugins"),
                    "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
                    "ANSIBLE_LOOKUP_PLUGINS": str(ROOT / "roles" / "stock_monitoring_db" / "lookup_plugins")}

    def fresh_db(self, create: bool = True) -> str:
        name = f"b_{uuid.uuid4().hex[:10]}"
        if create:
            self.psql("postgres", ["-c", f"CREATE DATABASE {name}"])
        return name

    def psql(self, db: str, args: list[str]) -> None:
        subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db, *args], check=True,
                       env={**os.environ, **self.pg.env()}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def playbook(self, book: Path, extra: dict | None = None, env: dict | None = None,
                 inventory: str = "localhost,", local: bool = True,
                 args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "ansible-playbook"), str(book), "-i", inventory, *args]
        if local:
            cmd += ["-c", "local", "-e", json.dumps({"ansible_python_interpreter": sys.executable})]
        if extra:
            cmd += ["-e", json.dumps(extra)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **(env or {})}, cwd=ROOT)
        if res.returncode:
            sys.exit(f"bench: {book.name} failed:\n{res.stdout[-3000:]}{res.stderr[-2000:]}")
        return res

    def migrate_book(self) -> Path:
        """One pg_migrate task, as the role runs it (files read on the controller by its lookup)."""
        book = self.work / "migrate.yml"
        task = {"name": "Apply the migrations", "pg_migrate": {
            "login_host": "127.0.0.1", "login_port": self.pg.port, "login_user": "postgres",
            "login_password": "{{ bench_password }}", "login_db": "{{ bench_db }}", "schema": "{{ bench_schema }}",
            "migrations": "{{ lookup('migration_files', bench_dir) }}"}, "no_log": True}
        book.write_text(json.dumps([{"hosts": "localhost", "gather_facts": False, "tasks": [task]}]))
        return book

    def ping_book(self, hosts: str = "localhost") -> Path:
        book = self.work / f"ping-{hosts}.yml"
        book.write_text(json.dumps([{"hosts": hosts, "gather_facts": False,
                                     "tasks": [{"name": "Ping", "ansible.builtin.ping": {}}]}]))
        return book

    def migrate(self, db: str, folder: Path, schema: str) -> None:
        self.playbook(self.migrate_book(), {"bench_password": self.pg.password, "bench_db": db,
                                            "bench_dir": str(folder), "bench_schema": schema})

    def env_file(self, db: str) -> Path:
        path = self.work / f"{db}.env"
        path.write_text(f"POSTGRES_HOST=127.0.0.1\nPOSTGRES_PORT={self.pg.port}\nPOSTGRES_USER=postgres\n"
                        f"POSTGRES_PASSWORD='{self.pg.password}'\nPOSTGRES_DB={db}\n")
        return path

    def fleet_inventory(self, dbs: list[str]) -> Path:
        """One local host per database, each with its own .env, as a fleet of backends would be."""
        path = self.work / "fleet.json"
        path.write_text(json.dumps({"stock_monitoring_db": {
            "hosts": {f"backend-{i:02d}": {"stock_monitoring_db_env_file": str(self.env_file(db))}
                      for i, db in enumerate(dbs)},
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}))
        return path

    def deploy(self, db: str, extra: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        book = ROOT / "playbooks" / "deploy-db.yml"
        env = {"STOCK_MONITORING_DB_ENV_FILE": str(self.env_file(db)), "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json"}
        if check:
            return self.playbook(book, extra, env=env, inventory=str(ROOT / "inventory" / "local"))
        cmd = [str(BIN / "ansible-playbook"), str(book), "-i", str(ROOT / "inventory" / "local"), "-c", "local",
               "-e", json.dumps({"ansible_python_interpreter": sys.executable, **(extra or {})})]
        return subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **env}, cwd=ROOT)


def timed(action: Callable[[], object]) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def median(runs: int, setup: Callable[[], object], action: Callable[[object], object]) -> float:
    """Median wall time of action(setup()) over runs, the setup untimed."""
    samples = []
    for _ in range(runs):
        state = setup()
        samples.append(timed(lambda state=state: action(state)))
    return statistics.median(samples)


def interleaved(runs: int, a: Callable[[], object], b: Callable[[], object]) -> tuple[float, float]:
    """Medians of a and b timed in alternation, so that the machine's drift falls on both alike."""
    times_a, times_b = [], []
    for _ in range(runs):
        times_a.append(timed(a))
        times_b.append(timed(b))
    return statistics.median(times_a), statistics.median(times_b)


def synthetic(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "001_bench_schema.sql").write_text("CREATE SCHEMA IF NOT EXISTS bench;\n")
    for i in range(2, count + 1):
        (folder / f"{i:03d}_table_{i}.sql").write_text(
            f"CREATE TABLE IF NOT EXISTS bench.t_{i} (\n    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n"
            f"    name text NOT NULL,\n    created_at timestamptz NOT NULL DEFAULT now()\n);\n"
            f"CREATE INDEX IF NOT EXISTS t_{i}_name_idx ON bench.t_{i} (name);\n")
    return folder


def big_files(folder: Path, size: int = 50_000_000) -> dict[str, Path]:
    """A data migration of INSERTs and a DDL baseline (tables, comments, indexes), each about `size` bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    inserts, ddl = folder / "inserts" / "001_inserts.sql", folder / "ddl" / "001_ddl.sql"
    for path in (inserts, ddl):
        path.parent.mkdir()
    with inserts.open("w") as out:
        out.write("CREATE TABLE prices (id int, symbol text, price numeric, note text);\n")
        i = 0
        while out.tell() < size:
            out.write(f"INSERT INTO prices VALUES ({i}, 'SYM{i % 500}', {i % 9973}.25, 'it''s row {i}; (a note)');\n")
            i += 1
    with ddl.open("w") as out:
        i = 0
        while out.tell() < size:
            out.write(f"CREATE TABLE t_{i} (id bigint PRIMARY KEY, symbol text NOT NULL DEFAULT 'x', "
                      f"price numeric(12,4), created_at timestamptz DEFAULT now());\n"
                      f"COMMENT ON TABLE t_{i} IS 'table {i}';\nCREATE INDEX t_{i}_symbol_idx ON t_{i} (symbol);\n")
            i += 1
    return {"50 MB of INSERTs": inserts, "50 MB of DDL": ddl}


def target(ratio: float, limit: float, digits: int = 2) -> str:
    """A ratio against its target, as the tables show it."""
    return f"{ratio:.{digits}f}x (target <= {limit}x{'' if ratio <= limit else ', not met'})"


def big_file_rows(b: Bench) -> tuple[bool, list[tuple[str, ...]]]:
    """pg_migrate (whole play, one transaction) against psql -f, which sends one statement at a time."""
    rows, met = [], True
    for label, path in big_files(b.work / "big").items():
        print(f"bench: {label} (1 run each)", flush=True)
        ours = timed(lambda path=path: b.migrate(b.fresh_db(), path.parent, "public"))
        theirs = timed(lambda path=path: b.psql(b.fresh_db(), ["-f", str(path)]))
        rows.append((f"one file of {label}", f"{ours:.1f} s", f"{theirs:.1f} s (`psql -f`)", target(ours / theirs, 1.0)))
        met = met and ours <= theirs
    return met, rows


def ssh_noop_rows(b: Bench, db: str) -> tuple[float, list[tuple[str, ...]]]:
    """deploy-db.yml with inventory/production's settings (JSON report on) over real SSH to a non-root
    user, its Python found by interpreter discovery as in production, against ping over the same hosts."""
    host = sshhost.start("smdb-bench-ssh-")
    try:
        host.write_env(b.env_file(db).read_text())
        inventory = json.loads(host.inventory.read_text())
        del inventory["stock_monitoring_db"]["hosts"]["deploy-host"]["ansible_python_interpreter"]
        inventory["stock_monitoring_db"]["vars"] = {"stock_monitoring_db_environment": "production",
                                                    "stock_monitoring_db_report_file": str(b.work / "report.json")}
        path = b.work / "ssh-inventory.json"
        path.write_text(json.dumps(inventory))
        deploy = ROOT / "playbooks" / "deploy-db.yml"
        ours, ping = interleaved(9, lambda: b.playbook(deploy, inventory=str(path), local=False),
                                 lambda: b.playbook(b.ping_book("stock_monitoring_db"), inventory=str(path), local=False))
        execs = module_executions(b.playbook(deploy, inventory=str(path), local=False,
                                             env={"ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json"}))
    finally:
        host.stop()
    return ours / ping, [
        ("no-op `deploy-db.yml` over SSH, CD settings (report on)", f"{ours:.2f} s", f"{ping:.2f} s (ping play, same SSH)",
         target(ours / ping, 1.4)),
        ("module executions per host over SSH", f"{execs} no-op", "1 (ping)", "target 1")]


LIVE_MIGRATIONS = {
    "024_alerts_note.sql": "ALTER TABLE stock_monitoring.alerts ADD COLUMN IF NOT EXISTS note text;\n",
    "025_alerts_note_idx.sql": "-- pg_migrate:no-transaction\nCREATE INDEX CONCURRENTLY IF NOT EXISTS alerts_note_idx "
                               "ON stock_monitoring.alerts (note);\n",
}
SEED = """
INSERT INTO stock_monitoring.alerts (user_id, symbol, condition, threshold)
  SELECT 'u' || (i % 2000), 'SYM' || (i % 500), 'price_above', 100 + i % 50 FROM generate_series(1, 20000) i;
INSERT INTO stock_monitoring.watchlists (user_id, name) SELECT 'u' || i, 'main' FROM generate_series(0, 1999) i;
INSERT INTO stock_monitoring.watchlist_items (watchlist_id, symbol)
  SELECT w.id, 'SYM' || ((w.id * 7 + j) % 500) FROM stock_monitoring.watchlists w, generate_series(1, 10) j;
ANALYZE;
"""
# The backend and the alert DAG, as pgbench scripts with their weights.
APP_SCRIPTS = {
    "alerts_by_symbol.sql@5": "\\set s random(0, 499)\n"
        "SELECT id, condition, threshold FROM stock_monitoring.alerts WHERE symbol = 'SYM' || :s AND enabled;\n",
    "watchlist.sql@3": "\\set u random(0, 1999)\n"
        "SELECT i.symbol FROM stock_monitoring.watchlists w JOIN stock_monitoring.watchlist_items i "
        "ON i.watchlist_id = w.id WHERE w.user_id = 'u' || :u;\n",
    "notify.sql@2": "\\set a random(1, 20000)\n\\set k random(1, 2000000000)\n"
        "INSERT INTO stock_monitoring.notifications (user_id, alert_id, title, dedupe_key) "
        "VALUES ('u' || (:a % 2000), :a, 'price above', 'k' || :k) ON CONFLICT DO NOTHING;\n",
}
APP_RATE, APP_CLIENTS = 200, 8  # pgbench's transactions per second, and its connections
REPORT_SECONDS = 8.0  # how long the report holds alerts
DEPLOY_AFTER = 0.5  # seconds between the report's start and the deploy's
# The deploys compared: (the table's label, the role variables set; psql -f has none: no lock_timeout at all).
LIVE_DEPLOYS = {
    "psql -f": ("`psql -f` per file", None),
    "pg_migrate, retries off": ("`pg_migrate`, retries off (`lock_timeout` 5 s)", {"stock_monitoring_db_lock_retries": []}),
    "pg_migrate, defaults": ("`pg_migrate`, defaults", {}),
    # GitLab's default timings (with_lock_retries, first rows): attempts of 100 ms to 500 ms in quick succession.
    "pg_migrate, GitLab's timings": ("`pg_migrate`, GitLab's timings", {"stock_monitoring_db_lock_retries": [
        {"lock_timeout": "100ms", "sleep": "50ms", "times": 2}, {"lock_timeout": "200ms", "sleep": "50ms"},
        {"lock_timeout": "300ms", "sleep": "100ms"}, {"lock_timeout": "400ms", "sleep": "150ms"},
        {"lock_timeout": "500ms", "sleep": "2s", "times": 4}, {"lock_timeout": "1s", "sleep": "5s", "times": 20}]}),
}
# How the picture draws each deploy, in LIVE_DEPLOYS' order.
LIVE_COLORS = ("#d62728", "#ff7f0e", "#2ca02c", "#1f77b4")
PLOT_BIN = 0.1  # seconds: the picture shows the slowest transaction started in each bin


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    ordered = sorted(latencies) or [0.0]
    return (ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], ordered[-1])


def live_run(b: Bench, how: str, folder: Path) -> dict:
    """pgbench plays the backend at a steady rate; a report holds alerts for REPORT_SECONDS; the deploy
    of LIVE_MIGRATIONS starts while it does. Latencies of the transactions before the report (baseline)
    and of those in flight during the deploy, and every transaction's (start, latency) with its start in
    seconds since the deploy's, for the picture."""
    db = b.fresh_db(create=False)
    b.deploy(db)
    b.psql(db, ["-c", SEED])
    run = b.work / f"live-{how.split()[0]}-{db}"
    run.mkdir()
    scripts = []
    for name, text in APP_SCRIPTS.items():
        (run / name.split("@")[0]).write_text(text)
        scripts += ["-f", str(run / name)]
    env = {**os.environ, **b.pg.env(), "PGDATABASE": db}
    bench = subprocess.Popen([str(b.pg.bindir / "pgbench"), "-n", "-c", str(APP_CLIENTS), "-j", "2", "-R", str(APP_RATE),
                              "-T", "24", "-l", f"--log-prefix={run / 'txn'}", *scripts], cwd=run, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    report_began = time.time()
    report = psycopg2.connect(host=b.pg.host, port=b.pg.port, user="postgres", password=b.pg.password, dbname=db,
                              application_name="long-report")
    report.cursor().execute("SELECT count(*) FROM stock_monitoring.alerts")  # holds ACCESS SHARE until it ends
    locked = time.time()
    released: list[float] = []

    def end_report() -> None:
        report.rollback()
        released.append(time.time())

    ender = threading.Timer(REPORT_SECONDS, end_report)
    ender.start()
    time.sleep(DEPLOY_AFTER)
    began = time.time()
    vars_ = LIVE_DEPLOYS[how][1]
    if vars_ is None:
        ok = all(subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db, "-f", str(folder / name)],
                                env={**os.environ, **b.pg.env()}, capture_output=True).returncode == 0
                 for name in sorted(LIVE_MIGRATIONS))
    else:
        extra = {"stock_monitoring_db_migrations_dir": str(folder), **vars_}
        ok = b.deploy(db, extra, check=False).returncode == 0
    ended = time.time()
    ender.join()
    report.close()
    bench.wait(60)
    txns = []
    for log in run.glob("txn*"):
        for line in log.read_text().splitlines():
            fields = line.split()
            # With -R the latency counts from the transaction's scheduled start: the wait of a request
            # the application made then.
            latency = int(fields[2]) / 1e6
            done = int(fields[4]) + int(fields[5]) / 1e6
            txns.append((done - latency, done, latency))
    baseline = [lat for start, _, lat in txns if start < report_began]
    during = [lat for start, done, lat in txns if start < ended and done > began]
    return {"how": how, "ok": ok, "seconds": ended - began, "baseline": percentiles(baseline),
            "during": percentiles(during), "count": len(during),
            "report": (locked - began, released[0] - began),
            "series": sorted((start - began, lat) for start, _, lat in txns)}


def times(ratio: float) -> str:
    return f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"


def live_rows(b: Bench) -> tuple[bool, list[tuple[str, ...]], list[dict]]:
    folder = b.work / "live-migrations"
    folder.mkdir()
    for name in sorted(MIGRATIONS.glob("*.sql")):
        (folder / name.name).write_text(name.read_text())
    for name, text in LIVE_MIGRATIONS.items():
        (folder / name).write_text(text)
    rows, runs, met = [], [], True

    def ms(values: tuple[float, float, float]) -> str:
        return " / ".join(f"{v * 1000:.0f}" for v in values) + " ms"

    for how, (label, _) in LIVE_DEPLOYS.items():
        print(f"bench: live, {how}", flush=True)
        r = live_run(b, how, folder)
        runs.append(r)
        p99_ratio = r["during"][1] / max(r["baseline"][1], 1e-6)
        ratio = times(p99_ratio)
        if how == "pg_migrate, defaults":
            met = r["ok"] and r["during"][2] <= 0.5 + r["baseline"][2] and p99_ratio <= 2
            ratio += f" (target <= 2x; max target <= 0.5 s{'' if met else ', not met'})"
        rows.append((label, f"{'ok' if r['ok'] else 'FAILED'} in {r['seconds']:.1f} s", ms(r["during"]),
                     ms(r["baseline"]), ratio))
    return met, rows, runs


def plot_live(runs: list[dict], path: Path) -> None:
    """The application's latency over time, one line per deploy: the slowest transaction started in each
    PLOT_BIN seconds, the report's hold shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    first = min(r["report"][0] for r in runs) - 2
    last = max(max(r["seconds"], r["report"][1]) for r in runs) + 3
    lock_from = statistics.median(r["report"][0] for r in runs)
    lock_to = statistics.median(r["report"][1] for r in runs)
    ax.axvspan(lock_from, lock_to, color="0.85", zorder=0,
               label=f"the report holds alerts ({REPORT_SECONDS:.0f} s)")
    ax.axvline(0, color="0.3", linestyle=":", linewidth=1, zorder=1)
    ax.annotate("deploy starts", (0, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                textcoords="offset points", fontsize=9, color="0.3")
    for r, color in zip(runs, LIVE_COLORS, strict=False):
        bins: dict[int, float] = {}
        for start, latency in r["series"]:
            if first <= start <= last:
                key = int((start - first) // PLOT_BIN)
                bins[key] = max(bins.get(key, 0.0), latency)
        xs = [first + (key + 0.5) * PLOT_BIN for key in sorted(bins)]
        ys = [bins[key] * 1000 for key in sorted(bins)]
        outcome = "ok" if r["ok"] else "FAILED"
        ax.plot(xs, ys, color=color, linewidth=1.4, zorder=3 if r["how"] == "pg_migrate, defaults" else 2,
                label=f"{r['how']} ({outcome} in {r['seconds']:.1f} s)")
        ax.plot([r["seconds"]], [0], marker="^", markersize=8, color=color, transform=ax.get_xaxis_transform(),
                clip_on=False, zorder=4)
    ax.set_yscale("log")
    ax.set_xlim(first, last)
    ax.set_xlabel("seconds since the deploy started (a triangle: that deploy ends)")
    ax.set_ylabel(f"latency, ms (slowest per {PLOT_BIN:g} s, log scale)")
    ax.set_title(f"The application's latency while a deploy alters a busy table\n"
                 f"(pgbench at {APP_RATE} transactions/s on {APP_CLIENTS} connections; "
                 f"ALTER TABLE alerts, then CREATE INDEX CONCURRENTLY)", fontsize=11)
    ax.grid(True, which="major", axis="both", color="0.9")
    ax.legend(loc="upper right", fontsize=9, framealpha=0.95)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def module_executions(result: subprocess.CompletedProcess) -> int:
    tasks = json.loads(result.stdout[result.stdout.index("{"):])["plays"][0]["tasks"]
    return sum(1 for t in tasks for r in t["hosts"].values()
               if r.get("action") not in CONTROLLER_ONLY and not r.get("skipped"))


def small_rows(b: Bench, work: Path) -> tuple[bool, list[tuple[str, ...]]]:
    """022+023, 500 files, the no-op deploy (locally, on a fleet, over SSH), concurrent first deploys."""
    rows: list[tuple[str, ...]] = []
    real = sorted(MIGRATIONS.glob("*.sql"))
    files500 = sorted(synthetic(work / "m500", 500).glob("*.sql"))
    files2 = synthetic(work / "m2", 2)

    print("bench: 022+023, fresh and no-op (5 runs each)", flush=True)
    pgm_fresh = median(5, b.fresh_db, lambda db: b.migrate(db, MIGRATIONS, "stock_monitoring"))
    psql_fresh = median(5, b.fresh_db, lambda db: [b.psql(db, ["-f", str(f)]) for f in real])

    def applied_db(run: Callable[[str], object]) -> Callable[[], str]:
        def setup() -> str:
            db = b.fresh_db()
            run(db)
            return db
        return setup

    pgm_noop = median(5, applied_db(lambda db: b.migrate(db, MIGRATIONS, "stock_monitoring")),
                      lambda db: b.migrate(db, MIGRATIONS, "stock_monitoring"))
    psql_noop = median(5, applied_db(lambda db: [b.psql(db, ["-f", str(f)]) for f in real]),
                       lambda db: [b.psql(db, ["-f", str(f)]) for f in real])
    rows += [("022+023 on an empty database", f"{pgm_fresh:.2f} s", f"{psql_fresh:.2f} s (`psql -f` per file)",
              f"{pgm_fresh / psql_fresh:.1f}x"),
             ("022+023 again (no-op)", f"{pgm_noop:.2f} s", f"{psql_noop:.2f} s (`psql -f` per file)",
              f"{pgm_noop / psql_noop:.1f}x")]

    print("bench: 500 synthetic migrations (3 runs each)", flush=True)
    ping = median(5, lambda: None, lambda _: b.playbook(b.ping_book()))
    psql500 = median(3, b.fresh_db, lambda db: b.psql(db, [arg for f in files500 for arg in ("-f", str(f))]))
    pgm500 = median(3, b.fresh_db, lambda db: b.migrate(db, work / "m500", "bench"))
    noop500 = median(5, applied_db(lambda db: b.migrate(db, work / "m500", "bench")),
                     lambda db: b.migrate(db, work / "m500", "bench"))
    noop2 = median(5, applied_db(lambda db: b.migrate(db, files2, "bench")),
                   lambda db: b.migrate(db, files2, "bench"))
    fresh_ratio, noop_ratio = pgm500 / (psql500 + ping), noop500 / noop2
    rows += [("500 migrations on an empty database", f"{pgm500:.2f} s",
              f"{psql500:.2f} s (one psql session) + {ping:.2f} s (ping play) = {psql500 + ping:.2f} s",
              target(fresh_ratio, 1.4)),
             ("no-op over 500 applied files", f"{noop500:.2f} s", f"{noop2:.2f} s (no-op over 2 files)",
              target(noop_ratio, 1.1))]

    print("bench: whole no-op deploy-db.yml against the ping play (9 runs each, alternating)", flush=True)
    noop_db = applied_db(b.deploy)()
    deploy_noop, ping = interleaved(9, lambda: b.deploy(noop_db), lambda: b.playbook(b.ping_book()))
    execs = module_executions(b.deploy(applied_db(b.deploy)()))
    first_execs = module_executions(b.deploy(b.fresh_db(create=False)))
    deploy_ratio = deploy_noop / ping
    rows += [("no-op `deploy-db.yml` (whole play)", f"{deploy_noop:.2f} s", f"{ping:.2f} s (one-task ping play)",
              target(deploy_ratio, 1.4)),
             ("module executions per host", f"{execs} no-op, {first_execs} first deploy", "1 (ping)",
              "target 1" if execs == 1 == first_execs else "target 1, not met")]

    print("bench: no-op deploy-db.yml on a fleet of 20 hosts, each its own .env and database, against the "
          "ping play on them (5 runs each, alternating)", flush=True)
    fleet = b.fleet_inventory([applied_db(b.deploy)() for _ in range(20)])
    fleet_noop, fleet_ping = interleaved(5, lambda: b.playbook(ROOT / "playbooks" / "deploy-db.yml",
                                                               inventory=str(fleet), local=False),
                                         lambda: b.playbook(b.ping_book("stock_monitoring_db"),
                                                            inventory=str(fleet), local=False))
    rows.append(("no-op `deploy-db.yml`, 20 hosts (each its own `.env` and database)", f"{fleet_noop:.2f} s",
                 f"{fleet_ping:.2f} s (ping play, 20 hosts)",
                 f"{fleet_noop / fleet_ping:.2f}x (how the cost grows with hosts)"))

    print("bench: no-op deploy over SSH, as the CD deploy job runs it, against the ping play over the same "
          "SSH inventory (9 runs each, alternating)", flush=True)
    ssh_ratio, ssh_rows = ssh_noop_rows(b, applied_db(b.deploy)())
    rows += ssh_rows

    print("bench: 8 concurrent first deploys of one database against one (3 runs)", flush=True)
    one = median(3, lambda: b.fresh_db(create=False), b.deploy)

    def eight(db: str) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: b.deploy(db), range(8)))

    eight_t = median(3, lambda: b.fresh_db(create=False), eight)
    rows.append(("8 concurrent first deploys, one database", f"{eight_t:.2f} s", f"{one:.2f} s (one deploy)",
                 f"{eight_t / one:.1f}x"))
    ok = (fresh_ratio <= 1.4 and noop_ratio <= 1.1 and deploy_ratio <= 1.4 and execs == 1 == first_execs
          and ssh_ratio <= 1.4)
    return ok, rows


def plan_rows(b: Bench, work: Path) -> tuple[bool, list[tuple[str, ...]]]:
    """Deploying a reviewed plan against deploying without one: the first deploy and the no-op."""
    book = ROOT / "playbooks" / "deploy-db.yml"
    local = str(ROOT / "inventory" / "local")

    def env_of(db: str) -> dict:
        return {"STOCK_MONITORING_DB_ENV_FILE": str(b.env_file(db)), "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json"}

    def planned(db: str) -> dict:
        """A reviewed plan of db, made now (untimed): the variables that apply it."""
        path = work / f"{db}.plan.json"
        b.playbook(book, {"stock_monitoring_db_plan_out": str(path)}, env=env_of(db), inventory=local, args=("--check",))
        return {"stock_monitoring_db_plan": str(path)}

    def deploy(db: str, extra: dict | None) -> subprocess.CompletedProcess:
        return b.playbook(book, extra, env=env_of(db), inventory=local)

    print("bench: first deploy and no-op deploy-db.yml, with a reviewed plan and without (7 runs each, "
          "alternating)", flush=True)
    first, first_plan, noop, noop_plan = [], [], [], []
    plain_db, plan_db = b.fresh_db(), b.fresh_db()
    deploy(plain_db, None)
    plan_noop = planned(plan_db)
    deploy(plan_db, plan_noop)
    plan_noop = planned(plan_db)  # nothing pending: the plan a no-op deploy job applies
    for _ in range(7):
        db = b.fresh_db(create=False)
        first.append(timed(lambda db=db: deploy(db, None)))
        db = b.fresh_db(create=False)
        extra = planned(db)
        first_plan.append(timed(lambda db=db, extra=extra: deploy(db, extra)))
        noop.append(timed(lambda: deploy(plain_db, None)))
        noop_plan.append(timed(lambda: deploy(plan_db, plan_noop)))
    first_t, first_plan_t = statistics.median(first), statistics.median(first_plan)
    noop_t, noop_plan_t = statistics.median(noop), statistics.median(noop_plan)
    db = b.fresh_db(create=False)
    first_execs = module_executions(deploy(db, planned(db)))
    noop_execs = module_executions(deploy(plan_db, plan_noop))
    first_ratio, noop_ratio = first_plan_t / first_t, noop_plan_t / noop_t
    rows = [("first deploy applying a reviewed plan", f"{first_plan_t:.2f} s", f"{first_t:.2f} s (without a plan)",
             target(first_ratio, 1.1)),
            ("no-op deploy applying a reviewed plan", f"{noop_plan_t:.2f} s", f"{noop_t:.2f} s (without a plan)",
             target(noop_ratio, 1.1)),
            ("module executions per host, applying a plan", f"{noop_execs} no-op, {first_execs} first deploy",
             "1 (without a plan)", "target 1" if noop_execs == 1 == first_execs else "target 1, not met")]
    return first_ratio <= 1.1 and noop_ratio <= 1.1 and noop_execs == 1 == first_execs, rows


def progress_rows(b: Bench, work: Path) -> tuple[bool, list[tuple[str, ...]]]:
    """Progress on (the default interval) against off: the first deploy, the no-op, and a statement long
    enough to be reported on."""
    book = ROOT / "playbooks" / "deploy-db.yml"
    local = str(ROOT / "inventory" / "local")
    off = {"stock_monitoring_db_progress_interval": 0}
    slow = work / "slow-migrations"
    slow.mkdir()
    for path in MIGRATIONS.glob("*.sql"):
        shutil.copy(path, slow)
    (slow / "024_slow.sql").write_text("SELECT pg_sleep(12);\n")
    long_on = {"stock_monitoring_db_migrations_dir": str(slow), "stock_monitoring_db_schema_file": ""}

    def deploy(db: str, extra: dict | None) -> subprocess.CompletedProcess:
        env = {"STOCK_MONITORING_DB_ENV_FILE": str(b.env_file(db)), "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json"}
        return b.playbook(book, extra, env=env, inventory=local)

    print("bench: first deploy and no-op deploy-db.yml with progress on (every 5 s) and off (7 runs each, "
          "alternating), and a 12 s statement (3 runs each)", flush=True)
    first, first_off, noop, noop_off, long, long_off = [], [], [], [], [], []
    noop_db, noop_off_db = b.fresh_db(), b.fresh_db()
    deploy(noop_db, None)
    deploy(noop_off_db, off)
    def on_a_new_database(extra: dict | None) -> Callable[[], object]:
        db = b.fresh_db(create=False)
        return lambda: deploy(db, extra)

    for _ in range(7):
        first.append(timed(on_a_new_database(None)))
        first_off.append(timed(on_a_new_database(off)))
        noop.append(timed(lambda: deploy(noop_db, None)))
        noop_off.append(timed(lambda: deploy(noop_off_db, off)))
    for _ in range(3):
        long.append(timed(on_a_new_database(long_on)))
        long_off.append(timed(on_a_new_database({**long_on, **off})))
    reported = deploy(b.fresh_db(create=False), long_on)
    tasks = json.loads(reported.stdout[reported.stdout.index("{"):])["plays"][0]["tasks"]
    (host,) = next(t for t in tasks if "Create the database" in t["task"]["name"])["hosts"].values()
    events = sum(len(statement["events"]) for statement in host.get("progress", []))
    ratios = [statistics.median(a) / statistics.median(o) for a, o in ((first, first_off), (noop, noop_off),
                                                                        (long, long_off))]
    execs = (module_executions(deploy(noop_db, None)), module_executions(reported))
    rows = [("first deploy, progress on", f"{statistics.median(first):.2f} s",
             f"{statistics.median(first_off):.2f} s (off)", target(ratios[0], 1.05)),
            ("no-op deploy, progress on", f"{statistics.median(noop):.2f} s", f"{statistics.median(noop_off):.2f} s (off)",
             target(ratios[1], 1.05)),
            ("a deploy with a 12 s statement, progress on", f"{statistics.median(long):.2f} s",
             f"{statistics.median(long_off):.2f} s (off)", target(ratios[2], 1.05) + f", {events} events reported"),
            ("module executions per host, progress on", f"{execs[0]} no-op, {execs[1]} with the 12 s statement",
             "1 (off)", "target 1" if execs == (1, 1) else "target 1, not met")]
    return all(r <= 1.05 for r in ratios) and execs == (1, 1), rows


MEASURE_HEADER = ("measure", "this project", "reference (same run)", "ratio")
LIVE_HEADER = ("deploy", "outcome", "app p50 / p99 / max during the deploy", "baseline p50 / p99 / max",
               "p99 vs baseline")

# docs/benchmark.md, less the measured blocks ({small}, {big}, {live}): only what the numbers do not change.
DOC_TEMPLATE = """\
# Speed, measured

<!-- Written by `make bench` (scripts/bench.py, DOC_TEMPLATE): edit the script, not this file. -->

`make bench` (`scripts/bench.py`) measures `pg_migrate` and `deploy-db.yml` side by side with the
ways they replace (`psql -f`, a one-task Ansible play), in one run on one throwaway PostgreSQL
server. Each figure is the median of several runs, each run on a database of its own, and every
ratio is against its reference measured in the same run, the two often alternating: the ratios are
the figures to compare, since on a shared machine the seconds drift from one run to the next.

`make bench BENCH=small` runs the small-file and no-op rows, `BENCH=plan` deploying a reviewed plan,
`BENCH=progress` deploys with progress on and off, `BENCH=big` the two 50 MB files (the longest, about
a quarter of an hour), `BENCH=live` the deploy on a busy table; `make bench` alone runs all five. A run
rewrites only the sections it measured and
keeps the others; each section says when, and on what machine, it was measured.

{last_run}

## Small files, the no-op deploy, a fleet, SSH (`BENCH=small`)

{small}

The first rows put `pg_migrate` (one task, Ansible included) against `psql -f` on the role's own
migrations, on an empty database and again when they are applied; the 500-file rows use synthetic
migrations of one table and one index each, and compare a first deploy with one psql session plus a
one-task ping play, and a no-op over 500 applied files with a no-op over 2. The `deploy-db.yml` rows
run the whole play, as a developer or CD runs it, against a one-task ping play, the two alternating;
module executions are counted from the play's JSON output (tasks that run on the controller, such
as `set_fact` and `assert`, do not count). The 20-host row runs it on 20 local hosts, each with its
own `.env` and database, as a fleet of backends would be: it shows how the cost grows with hosts.

The SSH row is the CD deploy job's path: `deploy-db.yml` with `inventory/production`'s settings
(JSON report on, the target's Python found by interpreter discovery) over real SSH to the non-root
`smdb-deploy` user (`scripts/sshhost.py`), against a one-task ping play over the same inventory,
the two alternating.

What it means: against `psql` on two small files, `pg_migrate` costs what starting Ansible and one
module execution cost; the database work itself takes milliseconds (the `duration_ms` in the
summary). A no-op hardly grows with the number of files: it is one history query, and the
controller's parser reads small files quickly. A no-op deploy is one module execution plus the
`ansible-playbook` start; the rest of its cost is the controller's: the role's argument validation
and its `set_fact` and `assert` tasks, most of them skipped, and the comparison with the schema file
(one catalog query, see [Verifying the whole schema](deploying.md#verifying-the-whole-schema)). The eight concurrent deploys
are bound by eight Ansible processes on the machine's cores, not by the database lock. For scale
(from the tools' own measurements, not this bench): dbmate applies the 500 files in about 2.4 s; a
loop of `community.postgresql.postgresql_script` tasks needs about 116 s. Read the ratios as orders
of magnitude, and run `make bench` on your own hardware.

## Deploying a reviewed plan (`BENCH=plan`)

{plan}

Each deploy of a plan is timed against a deploy without one, alternating, on a database of its own
(the plan made beforehand, untimed). Applying a plan adds no module execution: `pg_migrate` reads the
database's identity and the managed schema's fingerprint under the migration lock, in the same
execution, and the controller reads the plan file.

## Progress while a long migration runs (`BENCH=progress`)

{progress}

Each deploy with progress on (the default, every 5 s) is timed against the same deploy with
`stock_monitoring_db_progress_interval: 0`, alternating, on a database of its own. For a statement
shorter than the interval no progress query is made and no connection opened (the module makes its
progress file when it starts and removes it when it ends); during the 12 s statement the module asks
PostgreSQL once every 5 s on a second connection, and the action plugin reads the host's progress file
about as often.

## Big files (`BENCH=big`)

{big}

Two files of 50 MB each: a data migration of 566,000 INSERTs, and a baseline of 230,000 tables with
their comments and indexes, each the whole `pg_migrate` task (Ansible included) against `psql -f`
on the same file, in the same run. A transactional file is, for `pg_migrate`, one query and one
commit, where psql makes a round trip and a commit per statement; on top of the server's time,
`pg_migrate` reads each file with PostgreSQL's parser on the controller and moves it to the target.
The DDL file in one transaction locks all its 690,000 objects: the bench's server has
`max_locks_per_transaction = 8192` (see [How pg_migrate runs a file](design.md#how-pg_migrate-runs-a-file-and-why)).

## On a busy table (`BENCH=live`)

pgbench plays the backend and the alert DAG at {rate} transactions/s on {clients} connections (reads
of enabled alerts by symbol, watchlist reads, notification inserts that reference an alert), while
a report transaction holds `alerts` for {report:g} s and, {after:g} s after it began, a deploy applies
`ALTER TABLE alerts ADD COLUMN` and a no-transaction `CREATE INDEX CONCURRENTLY` on `alerts`.
Latencies are those of the application's transactions in flight during the deploy, against those
before the report, each counted from the moment pgbench scheduled it (the application's request),
so that time spent queued behind a lock counts.

{live}

psql has no `lock_timeout`: every query behind the `ALTER` waits for the report. Without retries
the `ALTER` waits up to its `lock_timeout`, holding every query that comes after it all that time,
and fails if the report still holds the table then (whether it does depends on how long the deploy
took to reach the `ALTER`). With lock retries a failed attempt is rolled back and tried again after
a pause, so that queries wait at most one attempt's `lock_timeout`: GitLab's timings try for 100 ms
to 500 ms, again 50 ms to 150 ms later, so that many queries arrive while an attempt waits, where
the role's defaults try for 20 ms and then pause for 2 s. In the picture, the slowest transaction
started in each {bin:g} s is drawn against the time it started.
"""


def markdown(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    return "\n".join("| " + " | ".join(row) + " |" for row in [header, tuple("---" for _ in header), *rows])


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    print()
    print(line.format(*header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line.format(*row))


def machine() -> str:
    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")]
    return f"{os.cpu_count()} cores, {models[0] if models else 'CPU model unknown'}"


def measured_block(name: str, when: str, selection: str, where: str, body: str, note: str = "") -> str:
    """A section's measured part, between its markers: when, by which run, on what, then the table."""
    return (f"<!-- bench:{name} -->\nMeasured on {when} by `{selection}` on {where}.{' ' + note if note else ''}\n\n"
            f"{body.strip()}\n<!-- /bench:{name} -->")


def kept_blocks(text: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in re.finditer(r"<!-- bench:(\w+) -->\n.*?<!-- /bench:\1 -->", text, re.S)}


def write_doc(blocks: dict[str, str], last_run: str) -> None:
    """docs/benchmark.md from the template, with the blocks measured now and the others as they were."""
    kept = kept_blocks(DOC.read_text()) if DOC.exists() else {}
    for name in SECTIONS:
        blocks.setdefault(name, kept.get(name)
                          or f"<!-- bench:{name} -->\nNot measured yet: `make bench BENCH={name}`.\n<!-- /bench:{name} -->")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(DOC_TEMPLATE.format(last_run=last_run, rate=APP_RATE, clients=APP_CLIENTS, report=REPORT_SECONDS,
                                       after=DEPLOY_AFTER, bin=PLOT_BIN, **blocks))


def main() -> None:
    # small: 022+023, 500 files, the no-op deploy; big: 50 MB files; live: a deploy under application load
    parts = [part for part in sys.argv[1:] if part] or list(SECTIONS)
    unknown = set(parts) - set(SECTIONS)
    if unknown:
        sys.exit(f"bench: unknown section(s) {sorted(unknown)}: BENCH is one of {', '.join(SECTIONS)}")
    work = Path(tempfile.mkdtemp(prefix="smdb-bench-"))
    os.chmod(work, 0o755)
    b = Bench(work)
    tables: dict[str, tuple[tuple[str, ...], list[tuple[str, ...]], bool]] = {}
    runs: list[dict] = []
    try:
        if "small" in parts:
            met, rows = small_rows(b, work)
            tables["small"] = (MEASURE_HEADER, rows, met)
        if "plan" in parts:
            met, rows = plan_rows(b, work)
            tables["plan"] = (MEASURE_HEADER, rows, met)
        if "progress" in parts:
            met, rows = progress_rows(b, work)
            tables["progress"] = (MEASURE_HEADER, rows, met)
        if "live" in parts:
            met, rows, runs = live_rows(b)
            tables["live"] = (LIVE_HEADER, rows, met)
        if "big" in parts:
            met, rows = big_file_rows(b)
            tables["big"] = (MEASURE_HEADER, rows, met)
    finally:
        b.pg.stop("immediate")
        shutil.rmtree(work, ignore_errors=True)

    ok = all(met for _, _, met in tables.values())
    for header, rows, _ in tables.values():
        print_table(header, rows)
    where = f"{machine()}, PostgreSQL {b.pg.major}"
    print(f"\nbench: targets {'met' if ok else 'NOT met'} ({where})")

    today = datetime.date.today().isoformat()
    selection = "make bench" + ("" if set(parts) == set(SECTIONS) else " BENCH=" + " ".join(parts))
    blocks = {}
    for name, (header, rows, met) in tables.items():
        body = markdown(header, rows) + f"\n\nTargets of this section: {'met' if met else 'NOT met'}."
        if name == "live":
            plot_live(runs, PLOT)
            body += (f"\n\n![The application's latency over time during the deploy, one line per way of deploying]"
                     f"({PLOT.relative_to(DOC.parent).as_posix()})")
        blocks[name] = measured_block(name, today, selection, where, body)
    write_doc(blocks, f"Last written by `{selection}` on {today} ({where}), sections {', '.join(tables)}.")
    print(f"bench: wrote {DOC.relative_to(ROOT)} (sections {', '.join(tables)})"
          + (f" and {PLOT.relative_to(ROOT)}" if runs else ""))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
