"""The production path: the CD workflow's plan and deploy over real SSH to a non-root deploy user, on
a fresh host as well as a prepared one."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from conftest import ROOT, env_text, python_without_psycopg2, recap, run_playbook

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
