"""Trust and interrupts: a deploy never runs code another role planted, never writes the password to
disk, and never leaves a lock behind when the controller goes away."""

from __future__ import annotations

import contextlib
import glob
import os
import shlex
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import sshhost
from conftest import (
    EXPECTED,
    LOCAL,
    ROOT,
    Live,
    ansible_env,
    env_text,
    finish,
    module_params,
    play,
    playbook_command,
    run_module,
    run_playbook,
    start_playbook,
    wait_for,
    write_migrations,
)

APP = "stock-monitoring-db"
# The interrupt tests stop a deploy while its progress is being printed.
WITH_PROGRESS = {"stock_monitoring_db_progress_interval": 1}
def progress_files() -> set[str]:
    """The progress files on this host (local and SSH runs share /tmp): one left behind is a module that never
    reached its cleanup."""
    return set(glob.glob("/tmp/pg_migrate-progress-*"))


PROGRESS_SHOWN = r"^progress: \[.* s: running, waiting on Timeout:PgSleep$"


@pytest.fixture
def planter(db):
    """A role with only CREATE on the database: enough to plant the managed schema before the first deploy."""
    db.create()
    role, password = f"planter_{uuid.uuid4().hex[:8]}", "Pl-" + uuid.uuid4().hex[:10]
    db.query(f"CREATE ROLE {role} LOGIN PASSWORD %s", (password,), dbname="postgres")
    db.query(f'GRANT CREATE ON DATABASE "{db.name}" TO {role}')
    yield role, password
    db.drop()
    db.query(f"DROP ROLE {role}", dbname="postgres")


@pytest.mark.every_major
def test_a_planted_history_table_with_a_trigger_is_refused_and_its_code_never_runs(tmp_path, db, planter):
    role, password = planter
    conn = db.connect(user=role, password=password)
    conn.cursor().execute(
        "CREATE SCHEMA stock_monitoring; CREATE TABLE stock_monitoring.pg_migrate_history (version bigint, name text, "
        "checksum text, applied_at timestamptz, applied_by text, duration_ms numeric, transactional boolean, "
        "adopted boolean, host text, source text, previous_checksum text, checksum_accepted_at timestamptz);"
        "CREATE FUNCTION stock_monitoring.grab() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$BEGIN EXECUTE 'ALTER ROLE {role} SUPERUSER'; RETURN NEW; END$$;"
        "CREATE TRIGGER grab BEFORE INSERT ON stock_monitoring.pg_migrate_history "
        "FOR EACH ROW EXECUTE FUNCTION stock_monitoring.grab();")
    conn.close()
    for check in (True, False):
        res, run = run_module(tmp_path, "pg_migrate", module_params(db), check=check)
        assert run.rc != 0 and f"Schema stock_monitoring is owned by role '{role}'" in res["msg"], res
    assert db.query("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,))[0][0] is False
    assert "watchlists" not in db.tables()


@pytest.mark.every_major
def test_a_trigger_on_a_trusted_history_table_is_refused(tmp_path, db):
    db.create()
    run_module(tmp_path, "pg_migrate", module_params(db))
    db.query("CREATE FUNCTION stock_monitoring.noop() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;"
             "CREATE TRIGGER noop BEFORE INSERT ON stock_monitoring.pg_migrate_history "
             "FOR EACH ROW EXECUTE FUNCTION stock_monitoring.noop()")
    res, run = run_module(tmp_path, "pg_migrate", module_params(db))
    assert run.rc != 0 and "has trigger noop" in res["msg"]


@pytest.mark.every_major
def test_a_schema_created_by_hand_as_postgres_is_deployed_by_the_app_login(tmp_path, db):
    """The seed's process: postgres (a superuser) creates the schema, the application's own login deploys."""
    db.create()
    role, password = f"app_{uuid.uuid4().hex[:8]}", "App-" + uuid.uuid4().hex[:10]
    db.query(f"CREATE ROLE {role} LOGIN PASSWORD %s", (password,), dbname="postgres")
    try:
        db.query(f'CREATE SCHEMA stock_monitoring; GRANT CREATE ON DATABASE "{db.name}" TO {role}; '
                 f"GRANT USAGE, CREATE ON SCHEMA stock_monitoring TO {role}")
        res = play(tmp_path, db, env=env_text(db, password=password, POSTGRES_USER=role))
        assert res.rc == 0, res.output
        assert db.query("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'pg_migrate_history'")[0][0] \
            == role
        assert sorted(set(db.tables()) - {"pg_migrate_history"}) == EXPECTED
    finally:
        db.drop()
        db.query(f"DROP ROLE {role}", dbname="postgres")


SLOW = {"024_slow.sql": "LOCK TABLE stock_monitoring.alerts IN ACCESS EXCLUSIVE MODE;\n"
                        "CREATE TABLE stock_monitoring.slow (id int);\nSELECT pg_sleep(120);\n"}


def running_slow(db) -> bool:
    return bool(db.query("SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND query LIKE %s",
                         (APP, "%pg_sleep(120)%"), dbname="postgres"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stopping_the_controller_cancels_the_migration_and_frees_the_table(tmp_path, db, signum):
    db.create()
    assert play(tmp_path, db).rc == 0
    env_file = tmp_path / ".env"
    files = progress_files()
    live = Live(start_playbook(ROOT / "playbooks" / "deploy-db.yml", inventory=LOCAL, extra_vars=WITH_PROGRESS | {
        "stock_monitoring_db_migrations_dir": str(write_migrations(tmp_path / "m", SLOW, with_real=True))},
        env={"STOCK_MONITORING_DB_ENV_FILE": str(env_file)}))
    wait_for(lambda: running_slow(db), "the migration to run", 60)
    live.wait(PROGRESS_SHOWN, 30)  # the progress reader is polling too
    live.proc.send_signal(signum)
    live.finish(60)
    stopped = time.monotonic()
    wait_for(lambda: not running_slow(db), "the migration's session to end", 10)
    assert time.monotonic() - stopped < 5
    conn = db.connect()
    conn.cursor().execute("SET lock_timeout = '2s'; SELECT count(*) FROM stock_monitoring.alerts")
    conn.close()
    assert [r[0] for r in db.history()] == [22, 23] and "slow" not in db.tables()
    assert progress_files() == files


@pytest.mark.parametrize("how", ["Ctrl-C", "the SSH connection dropped"])
def test_over_ssh_losing_the_controller_cancels_the_migration_and_frees_the_table(tmp_path, db, ssh_host, how):
    """The production path: a non-root deploy user over real SSH. Ctrl-C reaches the whole process group
    (ssh included); a dropped connection is every ssh process of the run killed, its master included."""
    db.create()
    ssh_host.write_env(env_text(db))
    first = run_playbook(ROOT / "playbooks" / "deploy-db.yml", inventory=ssh_host.inventory)
    assert first.rc == 0, first.output
    files = progress_files()
    live = Live(start_playbook(ROOT / "playbooks" / "deploy-db.yml", inventory=ssh_host.inventory,
                               extra_vars=WITH_PROGRESS | {"stock_monitoring_db_migrations_dir": str(
                                   write_migrations(tmp_path / "m", SLOW, with_real=True))}))
    wait_for(lambda: running_slow(db), "the migration to run", 60)
    live.wait(PROGRESS_SHOWN, 30)  # the progress reader's ssh is running too
    if how == "Ctrl-C":
        os.killpg(live.proc.pid, signal.SIGINT)
    else:
        subprocess.run(["pkill", "-KILL", "-f", f"ControlPath={ssh_host.root}/"], check=True)
    live.finish(60)
    stopped = time.monotonic()
    wait_for(lambda: not running_slow(db), "the migration's session to end", 10)
    assert time.monotonic() - stopped < 5
    assert [r[0] for r in db.history()] == [22, 23] and "slow" not in db.tables()
    wait_for(lambda: progress_files() == files, "the module over SSH to remove its progress file", 10)


def module_process(root: int) -> int:
    """The pid of the pg_migrate module's Python under the process `root` (the pipelined module's command
    line is the interpreter alone)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            children.setdefault(int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            if len(args) == 1 and Path(args[0].decode()).name.startswith("python"):
                found.append(pid)
        todo += children.get(pid, [])
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_signal_to_the_module_itself_ends_the_statement_and_frees_the_table(tmp_path, db, signum):
    """SIGTERM: the module's main thread sits in libpq during a statement; a thread takes the signal and
    cancels. SIGKILL (the OOM killer, `timeout -s KILL`, a runner killing a process tree): the module
    cannot act, so the server notices its client is gone (client_connection_check_interval) and ends it."""
    db.create()
    assert play(tmp_path, db).rc == 0
    files = progress_files()
    live = Live(start_playbook(ROOT / "playbooks" / "deploy-db.yml", inventory=LOCAL, extra_vars=WITH_PROGRESS | {
        "stock_monitoring_db_migrations_dir": str(write_migrations(tmp_path / "m", SLOW, with_real=True))},
        env={"STOCK_MONITORING_DB_ENV_FILE": str(tmp_path / ".env")}))
    wait_for(lambda: running_slow(db), "the migration to run", 60)
    live.wait(PROGRESS_SHOWN, 30)
    os.kill(module_process(live.proc.pid), signum)
    stopped = time.monotonic()
    wait_for(lambda: not running_slow(db), "the migration's session to end", 15)
    assert time.monotonic() - stopped < 5
    res = live.finish(60)
    assert res.rc != 0 and [r[0] for r in db.history()] == [22, 23]
    left = progress_files() - files  # SIGKILL leaves the file: the module cannot act
    assert len(left) == (signum == signal.SIGKILL), left
    for path in left:
        os.unlink(path)
    conn = db.connect()
    conn.cursor().execute("SET lock_timeout = '2s'; SELECT count(*) FROM stock_monitoring.alerts")
    conn.close()


def test_a_local_run_writes_no_module_with_the_password_to_disk(tmp_path, db):
    """Pipelining on every connection: a killed local run leaves no AnsiballZ file with the arguments behind."""
    db.create()
    remote_tmp = tmp_path / "remote-tmp"
    env_file = tmp_path / ".env"
    env_file.write_text(env_text(db))
    proc = start_playbook(ROOT / "playbooks" / "deploy-db.yml", inventory=LOCAL,
                          extra_vars={"stock_monitoring_db_migrations_dir": str(write_migrations(
                              tmp_path / "m", SLOW, with_real=True))},
                          env={"STOCK_MONITORING_DB_ENV_FILE": str(env_file), "ANSIBLE_REMOTE_TMP": str(remote_tmp)})
    wait_for(lambda: running_slow(db), "the migration to run", 60)
    os.kill(proc.pid, signal.SIGKILL)
    finish(proc, 60)
    leftovers = [p for p in remote_tmp.rglob("*") if p.is_file()] if remote_tmp.exists() else []
    assert not [p for p in leftovers if db.cluster.password.encode() in p.read_bytes()], leftovers
    wait_for(lambda: not running_slow(db), "the migration's session to end", 10)


STEADY = {"024_steady.sql": "CREATE TABLE stock_monitoring.steady (id int);\nSELECT pg_sleep(6);\n"}


def running_steady(db) -> bool:
    return bool(db.query("SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND query LIKE %s",
                         (APP, "%pg_sleep(6)%"), dbname="postgres"))


def test_a_deploy_started_with_nohup_outlives_the_shell_that_launched_it(tmp_path, db):
    """`nohup ansible-playbook ... &`, then the shell exits: the controller is still there, and so is the deploy."""
    db.create()
    assert play(tmp_path, db).rc == 0
    log = tmp_path / "deploy.log"
    command = " ".join(shlex.quote(part) for part in playbook_command(
        ROOT / "playbooks" / "deploy-db.yml", LOCAL,
        {"stock_monitoring_db_migrations_dir": str(write_migrations(tmp_path / "m", STEADY, with_real=True))}))
    shell = subprocess.Popen(["bash", "-c", f"nohup {command} > {shlex.quote(str(log))} 2>&1 & echo $!; read _"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env=ansible_env({"STOCK_MONITORING_DB_ENV_FILE": str(tmp_path / ".env")}))
    deploy = int(shell.stdout.readline())
    wait_for(lambda: running_steady(db), "the migration to run", 60)
    shell.kill()  # the launching shell goes away; the deploy is re-parented
    shell.wait(10)
    wait_for(lambda: not Path(f"/proc/{deploy}").exists(), "the deploy to end", 60)
    assert [r[0] for r in db.history()] == [22, 23, 24], log.read_text()
    assert "applied: 024_steady.sql" in log.read_text()


@pytest.fixture(scope="module")
def ssh_host_named_ansible():
    """A deploy user literally named `ansible`: its sshd processes are `sshd: ansible [priv]`."""
    if os.geteuid() != 0:
        pytest.skip("the SSH tests create the deploy user and run sshd: run them as root (CI does)")
    host = sshhost.start("smdb-test-ssh-ansible-", user="ansible")
    yield host
    host.stop()


def test_an_sshd_restart_does_not_cancel_a_deploy_by_a_user_named_ansible(tmp_path, db, ssh_host_named_ansible):
    host = ssh_host_named_ansible
    db.create()
    host.write_env(env_text(db))
    proc = start_playbook(ROOT / "playbooks" / "deploy-db.yml", inventory=host.inventory,
                          extra_vars={"stock_monitoring_db_migrations_dir": str(write_migrations(
                              tmp_path / "m", STEADY, with_real=True))})
    wait_for(lambda: running_steady(db), "the migration to run", 60)
    host.restart()  # as an openssh upgrade does: the running sessions stay
    res = finish(proc, 60)
    assert res.rc == 0 and "applied: 022_stock_monitoring_schema.sql" in res.output, res.output
    assert [r[0] for r in db.history()] == [22, 23, 24]
