"""Fixtures: a real PostgreSQL cluster started from the machine's binaries, and helpers that run our
modules and playbooks through ansible-playbook, as users do."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import ansible.module_utils
import psycopg2
import pytest
import yaml
from psycopg2 import sql

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "roles" / "stock_monitoring_db" / "files" / "migrations"
DEFAULTS = yaml.safe_load((ROOT / "roles" / "stock_monitoring_db" / "defaults" / "main.yml").read_text())
EXPECTED = DEFAULTS["stock_monitoring_db_expected_tables"]  # the role's list, written once
sys.path.insert(0, str(ROOT / "scripts"))

import sshhost
from pgbouncer import PgBouncer
from pgcluster import SUPPORTED_MAJORS, Cluster, find_bindir, major_of

# Our module_utils import as ansible.module_utils.<name>, as they do inside a module run.
ansible.module_utils.__path__.append(str(ROOT / "module_utils"))


def load_library(name: str, folder: str = "library"):
    """Import a module of library/ (or a plugin of another folder) to test its plain functions."""
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


DEFAULT_MAJOR = major_of(find_bindir())


def pytest_addoption(parser) -> None:
    parser.addoption("--pg-majors", metavar="M,M|others|none", help=(
        "run only the every_major tests, on these PostgreSQL majors (others: every supported one but the "
        "default); none: the whole suite on the default major alone. Without the option: the whole suite on the "
        "default major, and the every_major tests on every other supported one"))


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "every_major: depends on the server; runs on every supported PostgreSQL "
                                       "major (the rest of the suite runs on the default one)")


def majors_of(config) -> list[int]:
    """The majors that every_major tests run on."""
    listed = config.getoption("--pg-majors")
    others = [m for m in SUPPORTED_MAJORS if m != DEFAULT_MAJOR]
    if listed in (None, "others", "none"):
        return {None: [DEFAULT_MAJOR, *others], "others": others, "none": []}[listed]
    return [int(m) for m in listed.split(",")]


def pytest_generate_tests(metafunc) -> None:
    if metafunc.definition.get_closest_marker("every_major"):
        majors = majors_of(metafunc.config) or [DEFAULT_MAJOR]
        for name in ("cluster", "own_cluster"):
            if name in metafunc.fixturenames:
                metafunc.parametrize(name, majors, ids=[f"pg{m}" for m in majors], indirect=True)


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("--pg-majors") not in (None, "none"):  # the matrix alone
        keep = [item for item in items if item.get_closest_marker("every_major")]
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep


def new_cluster(prefix: str, major: int | None = None) -> Cluster:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)  # the server runs as the postgres account when the tests run as root
    pg = Cluster(root / "cluster", major=major)
    pg.start()
    return pg


def remove_cluster(pg: Cluster) -> None:
    pg.stop("immediate")
    shutil.rmtree(pg.root.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def servers():
    """One shared cluster per PostgreSQL major, started when a test first asks for that major."""
    started: dict[int, Cluster] = {}

    def of(major: int) -> Cluster:
        if major not in started:
            started[major] = new_cluster(f"smdb-test-pg{major}-", major)
        return started[major]

    yield of
    for pg in started.values():
        remove_cluster(pg)


@pytest.fixture
def cluster(request, servers) -> Cluster:
    """The shared cluster of the default major, or of the major an `every_major` test runs on."""
    return servers(getattr(request, "param", DEFAULT_MAJOR))


@pytest.fixture
def own_cluster(request):
    """A cluster of the test's own, for tests that kill, stop or restart the server."""
    pg = new_cluster("smdb-test-own-", getattr(request, "param", DEFAULT_MAJOR))
    yield pg
    remove_cluster(pg)


@pytest.fixture
def bouncer(request, cluster):
    """A real PgBouncer in front of the cluster: request.param is (pool_mode, pool_size[, "ignore options"])."""
    mode, size, *ignore_options = request.param
    pool = PgBouncer(cluster, {cluster.user: cluster.password}, pool_mode=mode, pool_size=size,
                     ignore_options=bool(ignore_options)).start()
    yield pool
    pool.stop()


class Db:
    """One database (possibly not created yet) on the test cluster."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster, self.name = cluster, name

    def connect(self, dbname: str | None = None, autocommit: bool = True, user: str | None = None,
                password: str | None = None):
        conn = psycopg2.connect(host=self.cluster.host, port=self.cluster.port, user=user or self.cluster.user,
                                password=password or self.cluster.password, dbname=dbname or self.name)
        conn.autocommit = autocommit
        return conn

    def query(self, statement: str | sql.Composable, args: tuple = (), dbname: str | None = None) -> list[tuple]:
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(statement, args)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def create(self) -> Db:
        self.query(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)), dbname="postgres")
        return self

    def drop(self) -> None:
        self.query(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name)),
                   dbname="postgres")

    def exists(self) -> bool:
        return bool(self.query("SELECT 1 FROM pg_database WHERE datname = %s", (self.name,), dbname="postgres"))

    def tables(self, schema: str = "stock_monitoring") -> list[str]:
        return [r[0] for r in self.query("SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
                                         "ORDER BY 1", (schema,))]

    def history(self, schema: str = "stock_monitoring") -> list[tuple]:
        return self.query(f'SELECT version, name, checksum, adopted FROM "{schema}".pg_migrate_history ORDER BY 1')

    def psql_files(self, *files: Path) -> None:
        """The manual process this project replaces."""
        args = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.name]
        for f in files:
            args += ["-f", str(f)]
        subprocess.run(args, check=True, env={**os.environ, **self.cluster.env()}, capture_output=True)


@pytest.fixture
def db(cluster) -> Db:
    """A fresh, not yet created database name."""
    d = Db(cluster, f"t_{uuid.uuid4().hex[:10]}")
    yield d
    d.drop()


def ansible_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_LIBRARY": str(ROOT / "library"),
           "ANSIBLE_MODULE_UTILS": str(ROOT / "module_utils"), "ANSIBLE_ACTION_PLUGINS": str(ROOT / "action_plugins"),
           "ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    env.pop("PGPASSWORD", None)
    env.update(extra or {})
    return env


class Result:
    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.rc, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        self.output = proc.stdout + proc.stderr


def playbook_command(playbook: Path | str, inventory: Path | str | None = None, extra_vars: dict | None = None,
                     args: list[str] | None = None) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), str(playbook)]
    if inventory:
        cmd += ["-i", str(inventory)]
    if extra_vars:
        cmd += ["-e", json.dumps(extra_vars)]
    return cmd + (args or [])


def run_playbook(playbook: Path | str, inventory: Path | str | None = None, extra_vars: dict | None = None,
                 args: list[str] | None = None, env: dict | None = None, timeout: int = 300,
                 cwd: Path = ROOT) -> Result:
    proc = subprocess.run(playbook_command(playbook, inventory, extra_vars, args), capture_output=True, text=True,
                          env=ansible_env(env), cwd=cwd, timeout=timeout)
    return Result(proc)


def start_playbook(playbook: Path | str, inventory: Path | str | None = None, extra_vars: dict | None = None,
                   args: list[str] | None = None, env: dict | None = None) -> subprocess.Popen:
    """The same, in the background, in a process group of its own (as a terminal runs it): finish it
    with finish(proc); os.killpg(proc.pid, SIGINT) is a Ctrl-C."""
    return subprocess.Popen(playbook_command(playbook, inventory, extra_vars, args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ansible_env(env), cwd=ROOT,
                            start_new_session=True)


class Live:
    """The output of a playbook started with start_playbook, line by line as it comes, each with the time it
    came (time.monotonic()): what an operator watching the terminal sees, and when."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def matching(self, pattern: str) -> list[tuple[float, str]]:
        return [(at, line) for at, line in list(self.lines) if re.search(pattern, line)]

    def wait(self, pattern: str, timeout: float = 60) -> None:
        wait_for(lambda: self.matching(pattern), f"a line matching {pattern!r}", timeout)

    def finish(self, timeout: int = 300) -> Result:
        self.proc.wait(timeout)
        self.reader.join(10)
        out = "".join(line + "\n" for _, line in self.lines)
        return Result(subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, ""))


def finish(proc: subprocess.Popen, timeout: int = 300) -> Result:
    out, _ = proc.communicate(timeout=timeout)
    return Result(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


LOCAL = ROOT / "inventory" / "local"


def env_text(db, password=None, **changes) -> str:
    values = {"POSTGRES_HOST": db.cluster.host, "POSTGRES_PORT": str(db.cluster.port), "POSTGRES_USER": db.cluster.user,
              "POSTGRES_PASSWORD": password or db.cluster.password, "POSTGRES_DB": db.name, **changes}
    return "".join(f"{k}={v}\n" for k, v in values.items() if v is not None)


def play(tmp_path, db, name="deploy-db.yml", env: str | None = None, args=None, extra=None, inventory=LOCAL):
    env_file = tmp_path / ".env"
    env_file.write_text(env if env is not None else env_text(db))
    return run_playbook(ROOT / "playbooks" / name, inventory=inventory, args=args, extra_vars=extra,
                        env={"STOCK_MONITORING_DB_ENV_FILE": str(env_file)})


def recap(output: str) -> dict[str, dict[str, int]]:
    return {m.group(1): {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
            for m in re.finditer(r"^(\S+)\s+: (ok=.*)$", output, re.M)}


def module_params(db: Db, **overrides) -> dict:
    params = {"login_host": db.cluster.host, "login_port": db.cluster.port, "login_user": db.cluster.user,
              "login_password": db.cluster.password, "login_db": db.name, "schema": "stock_monitoring",
              "migrations": read_migrations(MIGRATIONS), "expected_tables": EXPECTED, "lock_wait_timeout": 30}
    params.update(overrides)
    return params


def write_migrations(folder: Path, files: dict[str, str | bytes], with_real: bool = False) -> Path:
    """A migrations directory: the files given (bytes as they are), after 022/023 when with_real."""
    folder.mkdir(parents=True, exist_ok=True)
    if with_real:
        files = {**read_migrations(MIGRATIONS), **files}
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def read_migrations(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.sql"))}


def run_module(tmp_path: Path, module: str, params: dict, check: bool = False, diff: bool = False,
               verbosity: int = 0, env: dict | None = None, interpreter: str = sys.executable) -> tuple[dict, Result]:
    """Run one module task through ansible-playbook on localhost; return its result and the run."""
    book = tmp_path / f"play-{uuid.uuid4().hex[:6]}.yml"
    task = {"name": "Run the module", module: params, "register": "out"}
    book.write_text(json.dumps([{"hosts": "localhost", "gather_facts": False, "tasks": [task]}]))
    args = ["-i", "localhost,", "-c", "local", "-e", json.dumps({"ansible_python_interpreter": interpreter})]
    args += ["--check"] * check + ["--diff"] * diff + ([f"-{'v' * verbosity}"] if verbosity else [])
    res = run_playbook(book, args=args, env={"ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
                                             "ANSIBLE_CALLBACK_RESULT_FORMAT": "json", **(env or {})})
    data = json.loads(res.stdout[res.stdout.index("{"):])
    task_result = data["plays"][0]["tasks"][0]["hosts"]["localhost"]
    return task_result, res


def python_without_psycopg2(folder: Path) -> Path:
    """A fresh host's Python: a bare venv of the system's, which sees none of its packages. Readable by
    every user, so that the deploy user can run it over SSH."""
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(folder)], check=True)
    for path in (folder, *folder.parents):
        if path == Path(tempfile.gettempdir()):
            break
        path.chmod(path.stat().st_mode | 0o755)
    return folder / "bin" / "python"


@pytest.fixture(scope="session")
def ssh_host():
    if os.geteuid() != 0:
        pytest.skip("the SSH tests create the deploy user and run sshd: run them as root (CI does)")
    if not Path("/usr/sbin/sshd").exists() or subprocess.run(["/usr/bin/python3", "-c", "import psycopg2"]).returncode:
        pytest.fail("openssh-server or python3-psycopg2 is missing: run scripts/host-deps.sh (make pytest does)")
    host = sshhost.start("smdb-test-ssh-")
    yield host
    host.stop()
