"""The scripts the GitHub workflow and the composite action run, executed as the runner executes them,
against a real PostgreSQL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import EXPECTED, ROOT, Db, ansible_env

ACTION = ROOT / ".github" / "actions" / "deploy-db"
WORKFLOWS = sorted((ROOT / ".github").glob("**/*.yml"))


def run_steps(path: Path):
    """Every step with a `run:` in a workflow or composite action file."""
    doc = yaml.safe_load(path.read_text())
    jobs = doc.get("jobs", {}).values() if "jobs" in doc else [doc.get("runs", {})]
    return [step for job in jobs for step in job.get("steps", []) if "run" in step]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_run_step_of_the_workflows_parses_in_bash(path):
    for step in run_steps(path):
        script = re.sub(r"\$\{\{.*?\}\}", "x", step["run"])  # expressions are replaced before bash sees it
        check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
        assert check.returncode == 0, f"{step.get('name')}: {check.stderr}"


def run_action(inputs: dict, password: str, runner_temp: Path) -> subprocess.CompletedProcess:
    """The composite action's step as GitHub runs it: expressions substituted, `bash -e {0}` with its env."""
    action = yaml.safe_load((ACTION / "action.yml").read_text())
    values = {name: str(spec.get("default", "")) for name, spec in action["inputs"].items()} | inputs

    def expand(text: str) -> str:
        text = text.replace("${{ github.action_path }}", str(ACTION))
        return re.sub(r"\$\{\{ inputs\.([\w-]+) \}\}", lambda m: values[m.group(1)], text)

    (step,) = action["runs"]["steps"]
    env = ansible_env({k: expand(str(v)) for k, v in step.get("env", {}).items()})
    env.update(POSTGRES_PASSWORD=password, RUNNER_TEMP=str(runner_temp),
               STOCK_MONITORING_DB_VENV=str(Path(sys.executable).parent.parent))
    for name in ("ANSIBLE_CONFIG", "STOCK_MONITORING_DB_ENV_FILE"):
        env.pop(name, None)
    script = runner_temp / "step.sh"
    script.write_text(expand(step["run"]))
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], capture_output=True,
                          text=True, env=env, cwd=runner_temp, timeout=300)


@pytest.mark.parametrize("password", [
    "it's \"quoted\" `id`",
    "$HOME ${HOME} ${POSTGRES_USER:-x} $(id)",
    "spaced  out, ünïcødé ✓ and a \\ backslash",
    "{{ 7 * 7 }} {% raw %} %s",
])
def test_the_deploy_db_action_applies_the_migrations_with_any_password(tmp_path, db, password):
    role = f"ci_{uuid.uuid4().hex[:8]}"
    db.query(f'CREATE ROLE {role} LOGIN CREATEDB PASSWORD %s', (password,), dbname="postgres")
    temp = tmp_path / "runner-temp"
    temp.mkdir()
    try:
        res = run_action({"postgres-host": db.cluster.host, "postgres-port": str(db.cluster.port),
                          "postgres-user": role, "postgres-db": db.name}, password, temp)
        assert res.returncode == 0, res.stdout + res.stderr
        assert sorted(db.tables()) == sorted([*EXPECTED, "pg_migrate_history"])
        assert password not in res.stdout + res.stderr
        assert sorted(p.name for p in temp.iterdir()) == ["step.sh"]  # no .env left behind
    finally:
        db.drop()
        db.query(f"DROP ROLE {role}", dbname="postgres")


def test_the_deploy_db_action_removes_its_env_file_when_the_deploy_fails(tmp_path, db: Db):
    temp = tmp_path / "runner-temp"
    temp.mkdir()
    res = run_action({"postgres-host": db.cluster.host, "postgres-port": str(db.cluster.port),
                      "postgres-user": db.cluster.user, "postgres-db": db.name}, "not the password", temp)
    assert res.returncode != 0 and "was refused" in res.stdout + res.stderr
    assert sorted(p.name for p in temp.iterdir()) == ["step.sh"]


def test_the_deploy_db_action_plans_without_changing_anything(tmp_path, db):
    temp = tmp_path / "runner-temp"
    temp.mkdir()
    res = run_action({"postgres-host": db.cluster.host, "postgres-port": str(db.cluster.port),
                      "postgres-user": db.cluster.user, "postgres-db": db.name, "check": "true"},
                     db.cluster.password, temp)
    assert res.returncode == 0 and "database: would be created" in res.stdout, res.stdout + res.stderr
    assert not db.exists()


def test_the_deploy_db_action_says_when_the_password_is_not_set(tmp_path):
    res = run_action({}, "", tmp_path)
    assert res.returncode != 0 and "set POSTGRES_PASSWORD in the env of the step" in res.stderr
    assert not os.listdir(tmp_path) or sorted(os.listdir(tmp_path)) == ["step.sh"]


def test_the_deploy_db_action_refuses_a_line_break_in_an_input_before_anything_runs(tmp_path):
    res = run_action({"postgres-db": "stock\nmonitoring"}, "pw", tmp_path)
    assert res.returncode == 2 and "the postgres-db input holds a line break" in res.stderr, res.stdout + res.stderr
    assert "PLAY" not in res.stdout and sorted(p.name for p in tmp_path.iterdir()) == ["step.sh"]


def test_outside_github_actions_the_deploy_db_action_never_runs_a_planted_venv(tmp_path):
    """Without RUNNER_TEMP, a venv at a predictable path under a shared TMPDIR could be anyone's: another
    local user plants bin/ansible-playbook there, and it would run with POSTGRES_PASSWORD in its environment."""
    shared = tmp_path / "tmp"
    planted = shared / "stock-monitoring-db-venv" / "bin"
    planted.mkdir(parents=True)
    marker = tmp_path / "planted-ran"
    for tool in ("ansible-playbook", "pip", "python"):
        (planted / tool).write_text(f"#!/bin/sh\nenv > {marker}\n")
        (planted / tool).chmod(0o755)
    env = ansible_env({"POSTGRES_PASSWORD": "pw", "TMPDIR": str(shared),
                       "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)})  # no install: fail fast, offline
    for name in ("RUNNER_TEMP", "STOCK_MONITORING_DB_VENV", "ANSIBLE_CONFIG", "STOCK_MONITORING_DB_ENV_FILE"):
        env.pop(name, None)
    res = subprocess.run(["bash", str(ACTION.parent.parent.parent / "scripts" / "ci-deploy-db.sh")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode != 0 and not marker.exists(), res.stdout + res.stderr
    assert sorted(p.name for p in shared.iterdir()) == ["stock-monitoring-db-venv"]  # its own venv removed


def test_the_declared_minimum_ansible_core_is_the_one_the_tests_run_on():
    """The report callback needs ansible-core 2.19 (CallbackTaskResult): a lower minimum in meta/main.yml
    would promise what no test runs, and on 2.17/2.18 no report would be written."""
    declared = yaml.safe_load((ROOT / "roles" / "stock_monitoring_db" / "meta" / "main.yml").read_text())
    pinned = re.search(r"^ansible-core==(\d+\.\d+)\.", (ROOT / "requirements.txt").read_text(), re.M)
    assert pinned and declared["galaxy_info"]["min_ansible_version"] == pinned.group(1)
