"""The production path: the CD workflow's plan and deploy over real SSH to a non-root deploy user, on
a fresh host as well as a prepared one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, Result, env_text, python_without_psycopg2, recap, run_playbook
from pgcluster import free_port
from sshhost import DEPLOY_USER

DEPLOY = ROOT / "playbooks" / "deploy-db.yml"


def fresh_host_inventory(ssh_host, folder: Path) -> Path:
    """The SSH deploy host, its Python without psycopg2 (a host nothing was installed on)."""
    hosts = json.loads(ssh_host.inventory.read_text())
    hosts["stock_monitoring_db"]["hosts"]["deploy-host"]["ansible_python_interpreter"] = str(
        python_without_psycopg2(folder / "bare"))
    inventory = folder / "fresh.yml"
    inventory.write_text(json.dumps(hosts))
    return inventory


def test_the_plan_on_a_fresh_host_succeeds_and_says_the_deploy_installs_psycopg2(db, ssh_host):
    ssh_host.write_env(env_text(db))
    with tempfile.TemporaryDirectory(prefix="smdb-fresh-") as folder:
        res = run_playbook(DEPLOY, inventory=fresh_host_inventory(ssh_host, Path(folder)), args=["--check", "--diff"])
    assert res.rc == 0, res.output
    assert "the deploy installs python3-psycopg2 first (become)" in res.output
    assert ("not yet compared with the database: 022_stock_monitoring_schema.sql, "
            "023_stock_monitoring_notifications.sql") in res.output
    assert recap(res.output)["deploy-host"]["failed"] == 0 and not db.exists()


def test_a_deploy_user_without_sudo_is_told_what_installing_psycopg2_needs(db, ssh_host):
    ssh_host.write_env(env_text(db))
    with tempfile.TemporaryDirectory(prefix="smdb-fresh-") as folder:
        res = run_playbook(DEPLOY, inventory=fresh_host_inventory(ssh_host, Path(folder)))
    assert res.rc != 0
    assert "psycopg2 is missing on deploy-host and installing python3-psycopg2 with become" in res.output, res.output
    assert "Give the deploy user sudo for the package manager" in res.output and not db.exists()


def production_inventory(ssh_host, folder: Path) -> Path:
    """inventory/production as it is (its group_vars), its one host pointed at the tests' sshd."""
    inventory = folder / "production"
    shutil.copytree(ROOT / "inventory" / "production", inventory)
    (inventory / "hosts.yml").write_text(json.dumps({"stock_monitoring_db": {"hosts": {"stock-monitoring-prod-1": {
        "ansible_host": "127.0.0.1", "ansible_port": ssh_host.port, "ansible_user": DEPLOY_USER,
        "stock_monitoring_db_env_file": str(ssh_host.env_file)}}}}))
    return inventory


def ci_ssh_setup(runner_temp: Path, private_key: str, known_hosts: str) -> dict:
    """scripts/ci-ssh-setup.sh as the workflow runs it, with a $HOME that is not the passwd home (a
    container job); returns what it added to the job's environment."""
    github_env = runner_temp / "github_env"
    home = runner_temp / "home"
    home.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "RUNNER_TEMP": str(runner_temp),
           "GITHUB_ENV": str(github_env), "SSH_PRIVATE_KEY": private_key, "SSH_KNOWN_HOSTS": known_hosts}
    res = subprocess.run([str(ROOT / "scripts" / "ci-ssh-setup.sh")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    job_env = dict(line.split("=", 1) for line in github_env.read_text().splitlines())
    # SSH connections of this job only: another test's persistent master would skip the host key check.
    return {**job_env, "ANSIBLE_SSH_CONTROL_PATH_DIR": str(runner_temp / "cp")}


@pytest.fixture
def runner_temp():
    folder = Path(tempfile.mkdtemp(prefix="smdb-runner-"))
    yield folder
    subprocess.run(["pkill", "-f", str(folder)], check=False)  # its ssh-agent and ssh masters
    shutil.rmtree(folder, ignore_errors=True)


def cd_playbook(step: str, inventory: Path, job_env: dict, cwd: Path, **env: str) -> Result:
    """scripts/cd-playbook.sh as a workflow step runs it: the job's environment, nothing of the tests'."""
    full = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], "STOCK_MONITORING_DB_INVENTORY": str(inventory),
            **job_env, **env}
    return Result(subprocess.run([str(ROOT / "scripts" / "cd-playbook.sh"), step], capture_output=True, text=True,
                                 env=full, cwd=cwd, timeout=300))


def test_the_cd_sequence_over_ssh_plans_deploys_verifies_and_then_changes_nothing(db, ssh_host, runner_temp):
    ssh_host.write_env(env_text(db))
    inventory = production_inventory(ssh_host, runner_temp)
    key = (ssh_host.root / "client_key").read_text()
    ci_ssh_setup(runner_temp, key, ssh_host.known_hosts_line)
    job_env = ci_ssh_setup(runner_temp, key, ssh_host.known_hosts_line)  # a second run in one job works too
    # A relative report path is taken from where the step runs, as any path on a command line.
    plan = cd_playbook("plan", inventory, job_env, runner_temp, STOCK_MONITORING_DB_REPORT="plan-report.json",
                       STOCK_MONITORING_DB_PLAN="plan.json", GITHUB_STEP_SUMMARY=str(runner_temp / "summary.md"))
    assert plan.rc == 0 and "database: would be created" in plan.output, plan.output
    assert json.loads((runner_temp / "plan-report.json").read_text())[0]["mode"] == "plan" and not db.exists()
    reviewed = json.loads((runner_temp / "plan.json").read_text())
    assert f"## Database plan `{reviewed['id'][:12]}`" in (runner_temp / "summary.md").read_text()
    deploy = cd_playbook("deploy", inventory, job_env, runner_temp, STOCK_MONITORING_DB_PLAN="plan.json")
    assert deploy.rc == 0 and "applied: 022_stock_monitoring_schema.sql" in deploy.output, deploy.output
    assert db.query("SELECT DISTINCT plan FROM stock_monitoring.pg_migrate_history") == [(reviewed["id"],)]
    verify = cd_playbook("verify", inventory, job_env, runner_temp)
    assert verify.rc == 0, verify.output
    again = cd_playbook("deploy", inventory, job_env, runner_temp)
    assert again.rc == 0 and recap(again.output)["stock-monitoring-prod-1"]["changed"] == 0, again.output
    # OpenSSH added none of the host's other keys to the pinned file.
    assert (runner_temp / "stock-monitoring-db-ssh" / "known_hosts").read_text() == ssh_host.known_hosts_line + "\n"


def other_host_key(folder: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "other")], check=True)
    return (folder / "other.pub").read_text()


@pytest.mark.parametrize("case, expected", [
    ("changed host key", "REMOTE HOST IDENTIFICATION HAS CHANGED"),
    ("unknown host", "Host key verification failed"),
    ("refused login", "Permission denied (publickey)"),
    ("closed port", "Connection refused"),
])
def test_each_ssh_failure_is_named_not_censored(db, ssh_host, runner_temp, case, expected):
    ssh_host.write_env(env_text(db))
    inventory = production_inventory(ssh_host, runner_temp)
    key, pinned = (ssh_host.root / "client_key").read_text(), ssh_host.known_hosts_line
    if case == "changed host key":
        pinned = f"[127.0.0.1]:{ssh_host.port} {other_host_key(runner_temp)}"
    elif case == "unknown host":
        pinned = f"[127.0.0.1]:{ssh_host.port + 1} {other_host_key(runner_temp)}"
    elif case == "refused login":
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(runner_temp / "stranger")], check=True)
        key = (runner_temp / "stranger").read_text()
    elif case == "closed port":
        hosts = json.loads((inventory / "hosts.yml").read_text())
        hosts["stock_monitoring_db"]["hosts"]["stock-monitoring-prod-1"]["ansible_port"] = free_port()
        (inventory / "hosts.yml").write_text(json.dumps(hosts))
    res = run_playbook(DEPLOY, inventory=inventory, env=ci_ssh_setup(runner_temp, key, pinned))
    assert res.rc != 0 and recap(res.output)["stock-monitoring-prod-1"]["unreachable"] == 1, res.output
    assert expected in res.output and "censored" not in res.output, res.output


def test_an_env_file_in_a_directory_the_deploy_user_cannot_enter_is_named_as_such(db, ssh_host, runner_temp):
    locked = runner_temp / "locked"
    locked.mkdir(mode=0o700)
    (locked / ".env").write_text(env_text(db))
    res = run_playbook(DEPLOY, inventory=ssh_host.inventory,
                       extra_vars={"stock_monitoring_db_env_file": str(locked / ".env")})
    assert res.rc != 0 and "does not exist" not in res.output, res.output
    assert f"{locked / '.env'} cannot be reached by {DEPLOY_USER}: a directory on its path denies it" in res.output


def test_an_env_file_that_is_a_fifo_is_refused_without_waiting(db, ssh_host):
    fifo = ssh_host.env_file.parent / "fifo.env"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    shutil.chown(fifo, DEPLOY_USER, DEPLOY_USER)
    try:
        res = run_playbook(DEPLOY, inventory=ssh_host.inventory, extra_vars={"stock_monitoring_db_env_file": str(fifo)},
                           timeout=60)
        assert res.rc != 0 and f"{fifo} is a FIFO, not a regular file" in res.output, res.output
    finally:
        fifo.unlink()


def test_the_report_lists_every_host_failed_and_unreachable_ones_included(tmp_path, db, ssh_host):
    ssh_host.write_env(env_text(db))
    hosts = json.loads(ssh_host.inventory.read_text())["stock_monitoring_db"]["hosts"]
    hosts["no-env"] = {**hosts["deploy-host"], "stock_monitoring_db_env_file": str(ssh_host.env_file) + ".missing"}
    hosts["unreachable"] = {**hosts["deploy-host"], "ansible_port": free_port()}
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(json.dumps({"stock_monitoring_db": {"hosts": hosts}}))
    report = tmp_path / "report.json"
    res = run_playbook(DEPLOY, inventory=inventory, extra_vars={"stock_monitoring_db_report_file": str(report)})
    assert res.rc != 0
    entries = {entry["host"]: entry for entry in json.loads(report.read_text())}
    assert sorted(entries) == ["deploy-host", "no-env", "unreachable"]
    assert entries["deploy-host"]["failure"] == "" and entries["deploy-host"]["database_created"] is True
    assert "does not exist on this host" in entries["no-env"]["failure"]
    assert entries["unreachable"]["unreachable"] is True and "Connection refused" in entries["unreachable"]["failure"]
    assert db.cluster.password not in report.read_text()


def test_become_on_the_command_line_does_not_reach_the_report(tmp_path, db, ssh_host):
    """-b for the deploy host's tasks only: becoming another user on the controller, where the report is
    written, fails (here: su to nobody, whose shell refuses), so nothing of the report may run there."""
    ssh_host.write_env(env_text(db))
    inventory = json.loads(ssh_host.inventory.read_text())
    inventory["stock_monitoring_db"]["hosts"]["deploy-host"]["ansible_become"] = False  # no sudo there either
    (tmp_path / "hosts.yml").write_text(json.dumps(inventory))
    report = tmp_path / "report.json"
    res = run_playbook(DEPLOY, inventory=tmp_path / "hosts.yml", args=["-b", "--become-method=su", "--become-user=nobody"],
                       extra_vars={"stock_monitoring_db_report_file": str(report)})
    assert res.rc == 0, res.output
    assert json.loads(report.read_text())[0]["host"] == "deploy-host"


def test_a_host_whose_libpq_cannot_refuse_a_cleartext_request_is_warned(db, ssh_host, runner_temp):
    """Debian 12's python3-psycopg2 is built on libpq 15, which has no require_auth: the deploy says the
    protection is off there and how to get it, rather than implying it."""
    libpq = int(subprocess.run(["/usr/bin/python3", "-c", "import psycopg2.extensions as e; print(e.libpq_version())"],
                               capture_output=True, text=True, check=True).stdout)
    if libpq >= 160000:
        pytest.skip(f"this host's libpq is {libpq // 10000}, which enforces require_auth")
    ssh_host.write_env(env_text(db))
    res = run_playbook(ROOT / "playbooks" / "deploy-db.yml", inventory=ssh_host.inventory)
    assert res.rc == 0, res.output
    summary = " ".join(res.output.split()).replace("''", "'")  # the summary is YAML: 's written ''s
    assert "warning: stock_monitoring_db_require_auth (scram-sha-256) is not enforced: this host's psycopg2 uses " \
        f"libpq {libpq // 10000}" in summary, res.output
