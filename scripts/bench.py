#!/usr/bin/env python3
"""make bench: pg_migrate and deploy-db.yml measured side by side with the manual psql way.

Everything runs in one go on one throwaway PostgreSQL (scripts/pgcluster.py), and the targets are
ratios between runs of the same session, since this machine is shared and absolute times drift.
Each figure is the median of several runs; every run uses a database of its own.
"""

from __future__ import annotations

import json
import os
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
                 inventory: str = "localhost,", local: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "ansible-playbook"), str(book), "-i", inventory]
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


def big_file_rows(b: Bench) -> list[tuple[str, str, str, str]]:
    """pg_migrate (whole play, one transaction) against psql -f, which sends one statement at a time."""
    rows = []
    for label, path in big_files(b.work / "big").items():
        print(f"bench: {label} (1 run each)", flush=True)
        ours = timed(lambda path=path: b.migrate(b.fresh_db(), path.parent, "public"))
        theirs = timed(lambda path=path: b.psql(b.fresh_db(), ["-f", str(path)]))
        rows.append((f"one file of {label}", f"{ours:.1f} s", f"{theirs:.1f} s (psql -f)",
                     f"{ours / theirs:.2f}x (target <= 1.0x)"))
    return rows


def ssh_noop_rows(b: Bench, db: str) -> tuple[float, list[tuple[str, str, str, str]]]:
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
         f"{ours / ping:.2f}x (target <= 1.4x)"),
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
REPORT_SECONDS = 8.0
# The deploys compared, by the role variables they set (psql -f has none: no lock_timeout at all).
LIVE_DEPLOYS = {
    "psql -f": None,
    "pg_migrate, retries off": {"stock_monitoring_db_lock_retries": []},
    "pg_migrate, defaults": {},
    # GitLab's default timings (with_lock_retries, first rows): attempts of 100 ms to 500 ms in quick succession.
    "pg_migrate, GitLab's timings": {"stock_monitoring_db_lock_retries": [
        {"lock_timeout": "100ms", "sleep": "50ms", "times": 2}, {"lock_timeout": "200ms", "sleep": "50ms"},
        {"lock_timeout": "300ms", "sleep": "100ms"}, {"lock_timeout": "400ms", "sleep": "150ms"},
        {"lock_timeout": "500ms", "sleep": "2s", "times": 4}, {"lock_timeout": "1s", "sleep": "5s", "times": 20}]},
}


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    ordered = sorted(latencies) or [0.0]
    return (ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], ordered[-1])


def live_run(b: Bench, how: str, folder: Path) -> dict:
    """pgbench plays the backend at a steady rate; a report holds alerts for REPORT_SECONDS; the deploy
    of LIVE_MIGRATIONS starts while it does. Latencies of the transactions before the report (baseline)
    and of those in flight during the deploy."""
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
    bench = subprocess.Popen([str(b.pg.bindir / "pgbench"), "-n", "-c", "8", "-j", "2", "-R", "200", "-T", "24",
                              "-l", f"--log-prefix={run / 'txn'}", *scripts], cwd=run, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    report_began = time.time()
    report = psycopg2.connect(host=b.pg.host, port=b.pg.port, user="postgres", password=b.pg.password, dbname=db,
                              application_name="long-report")
    report.cursor().execute("SELECT count(*) FROM stock_monitoring.alerts")  # holds ACCESS SHARE until it ends
    ender = threading.Timer(REPORT_SECONDS, report.rollback)
    ender.start()
    time.sleep(0.5)
    began = time.time()
    if LIVE_DEPLOYS[how] is None:
        ok = all(subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db, "-f", str(folder / name)],
                                env={**os.environ, **b.pg.env()}, capture_output=True).returncode == 0
                 for name in sorted(LIVE_MIGRATIONS))
    else:
        extra = {"stock_monitoring_db_migrations_dir": str(folder), **LIVE_DEPLOYS[how]}
        ok = b.deploy(db, extra, check=False).returncode == 0
    ended = time.time()
    ender.join()
    report.close()
    bench.wait(60)
    txns = []
    for log in run.glob("txn*"):
        for line in log.read_text().splitlines():
            fields = line.split()
            latency = int(fields[2]) / 1e6
            done = int(fields[4]) + int(fields[5]) / 1e6
            txns.append((done - latency, done, latency))
    baseline = [lat for start, _, lat in txns if start < report_began]
    during = [lat for start, done, lat in txns if start < ended and done > began]
    return {"how": how, "ok": ok, "seconds": ended - began, "baseline": percentiles(baseline),
            "during": percentiles(during), "count": len(during)}


def live_rows(b: Bench) -> tuple[bool, list[tuple[str, str, str, str]]]:
    folder = b.work / "live-migrations"
    folder.mkdir()
    for name in sorted(MIGRATIONS.glob("*.sql")):
        (folder / name.name).write_text(name.read_text())
    for name, text in LIVE_MIGRATIONS.items():
        (folder / name).write_text(text)
    rows, met = [], True

    def ms(values: tuple[float, float, float]) -> str:
        return "/".join(f"{v * 1000:.0f}" for v in values) + " ms"

    for how in LIVE_DEPLOYS:
        print(f"bench: live, {how}", flush=True)
        r = live_run(b, how, folder)
        p99_ratio = r["during"][1] / max(r["baseline"][1], 1e-6)
        rows.append((f"live: {how}", f"deploy {'ok' if r['ok'] else 'FAILED'} in {r['seconds']:.1f} s; app p50/p99/max "
                     f"{ms(r['during'])}", f"baseline p50/p99/max {ms(r['baseline'])}",
                     f"p99 {p99_ratio:.1f}x, max {r['during'][2]:.2f} s"))
        if how == "pg_migrate, defaults":
            met = r["ok"] and r["during"][2] <= 0.5 + r["baseline"][2] and p99_ratio <= 2
    return met, rows


def module_executions(result: subprocess.CompletedProcess) -> int:
    tasks = json.loads(result.stdout[result.stdout.index("{"):])["plays"][0]["tasks"]
    return sum(1 for t in tasks for r in t["hosts"].values()
               if r.get("action") not in CONTROLLER_ONLY and not r.get("skipped"))


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="smdb-bench-"))
    os.chmod(work, 0o755)
    b = Bench(work)
    rows: list[tuple[str, str, str, str]] = []
    # small: 022+023, 500 files, the no-op deploy; big: 50 MB files; live: a deploy under application load
    parts = sys.argv[1:] or ["small", "big", "live"]
    ok = True
    try:
        if "small" in parts:
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
            rows += [("022+023 on an empty database", f"{pgm_fresh:.2f} s", f"{psql_fresh:.2f} s (psql -f per file)",
                      f"{pgm_fresh / psql_fresh:.1f}x"),
                     ("022+023 again (no-op)", f"{pgm_noop:.2f} s", f"{psql_noop:.2f} s (psql -f per file)",
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
                      f"{fresh_ratio:.2f}x (target <= 1.4x)"),
                     ("no-op over 500 applied files", f"{noop500:.2f} s", f"{noop2:.2f} s (no-op over 2 files)",
                      f"{noop_ratio:.2f}x (target <= 1.1x)")]

            print("bench: whole no-op deploy-db.yml against the ping play (9 runs each, alternating)", flush=True)
            noop_db = applied_db(b.deploy)()
            deploy_noop, ping = interleaved(9, lambda: b.deploy(noop_db), lambda: b.playbook(b.ping_book()))
            execs = module_executions(b.deploy(applied_db(b.deploy)()))
            first_execs = module_executions(b.deploy(b.fresh_db(create=False)))
            deploy_ratio = deploy_noop / ping
            rows += [("no-op deploy-db.yml (whole play)", f"{deploy_noop:.2f} s", f"{ping:.2f} s (one-task ping play)",
                      f"{deploy_ratio:.2f}x (target <= 1.4x)"),
                     ("module executions per host", f"{execs} no-op, {first_execs} first deploy", "1 (ping)",
                      "target 1")]

            print("bench: no-op deploy-db.yml on a fleet of 20 hosts, each its own .env and database, against the "
                  "ping play on them (5 runs each, alternating)", flush=True)
            fleet = b.fleet_inventory([applied_db(b.deploy)() for _ in range(20)])
            fleet_noop, fleet_ping = interleaved(5, lambda: b.playbook(ROOT / "playbooks" / "deploy-db.yml",
                                                                       inventory=str(fleet), local=False),
                                                 lambda: b.playbook(b.ping_book("stock_monitoring_db"),
                                                                    inventory=str(fleet), local=False))
            rows.append(("no-op deploy-db.yml, 20 hosts", f"{fleet_noop:.2f} s", f"{fleet_ping:.2f} s (ping play, "
                         "20 hosts)", f"{fleet_noop / fleet_ping:.2f}x (how the cost grows with hosts)"))

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
        if "live" in parts:
            live_met, live = live_rows(b)
            rows += live
            ok = ok and live_met
        if "big" in parts:
            big = big_file_rows(b)
            rows += big
            ok = ok and all(float(r[3].split("x")[0]) <= 1.0 for r in big)
    finally:
        b.pg.stop("immediate")
        shutil.rmtree(work, ignore_errors=True)

    header = ("measure", "this project", "reference (same run)", "ratio")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    print()
    print(line.format(*header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line.format(*row))
    print(f"\nbench: targets {'met' if ok else 'NOT met'} ({os.cpu_count()} cores, PostgreSQL {b.pg.bindir.parent.name})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
