"""The summary, the problems and the JSON report of a host, from whatever pg_migrate returned, without a server."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import ROOT, load_library

outcome = load_library("outcome", "roles/stock_monitoring_db/filter_plugins").outcome


LOGIN = {"login": {"host": "db", "port": 5432, "database": "app", "user": "app"}}


@pytest.mark.parametrize("result", [
    {"msg": "MODULE FAILURE: See stdout/stderr for the exact error", "module_stderr": "Traceback ...", "rc": 1},
    {},
    None,
])
def test_a_module_crash_is_reported_as_one_failure_not_a_template_error(result):
    found = outcome(result, "web1", "stock_monitoring", "deploy")
    if result:
        assert found["problems"] == ["MODULE FAILURE: See stdout/stderr for the exact error"]
    else:  # nothing, or no message: never a success
        assert found["problems"] == ["pg_migrate returned no usable result (it crashed or was killed before it could "
                                     "report, and nothing it did is known): run again with -vvv to see its output"]
    assert outcome({"failed": True, "changed": False, **LOGIN}, "web1", "s", "verify")["problems"] != []
    assert found["summary"][0] == "DEPLOY stock_monitoring on host web1"
    # What the module did not say is left out, not shown as "?" or "none".
    assert not [line for line in found["summary"] if "?" in line or line.startswith(("already applied", "tables"))]


def test_a_failed_migration_keeps_what_the_module_knew_in_the_summary():
    result = {"msg": "Migration 024_x.sql failed at line 3: ...", "applied": [], "server_version": "15.18",
              "pending": [{"name": "024_x.sql"}], **LOGIN}
    found = outcome(result, "web1", "stock_monitoring", "deploy")
    assert found["problems"] == [result["msg"]] and "(PostgreSQL 15.18)" in found["summary"][0]
    assert "pending (not applied): 024_x.sql" in found["summary"]
    assert found["report"]["failure"] == result["msg"] and found["report"]["database"] == "app"


def test_verify_reports_pending_files_and_drift_and_a_plan_reports_no_problem():
    result = {"pending": [{"name": "024_x.sql"}], "drift": [{"name": "023_y.sql", "kind": "unknown"}],
              "database_exists": True, "missing_tables": [], "history_table": "s.pg_migrate_history", **LOGIN}
    assert outcome(result, "h", "s", "verify")["problems"] == [
        "pending migrations: 024_x.sql", "drift: 023_y.sql unknown"]
    assert outcome({**result, "mode": "plan"}, "h", "s", "deploy")["problems"] == []


def test_verify_fails_when_the_schema_file_cannot_describe_the_server_and_a_deploy_only_says_so():
    result = {"database_exists": True, "schema_compared": False, "schema_file_unusable": True,
              "history_table": "s.pg_migrate_history",
              "schema_not_compared": "the schema file describes schema 'other', not 's'", **LOGIN}
    assert outcome(result, "h", "s", "verify")["problems"] == [
        "schema not compared: the schema file describes schema 'other', not 's'"]
    assert outcome(result, "h", "s", "deploy")["problems"] == []


def test_every_option_the_role_sets_from_a_variable_is_named_as_that_variable():
    """pg_migrate's messages say `option lock_retries`; the summary says the role variable behind it."""
    role = ROOT / "roles" / "stock_monitoring_db"
    names = yaml.safe_load((role / "vars" / "main.yml").read_text())["__stock_monitoring_db_option_names"]
    for tasks in ("migrate.yml", "drop.yml"):
        task = yaml.safe_load((role / "tasks" / tasks).read_text())[0]["pg_migrate"]
        for option, value in task.items():
            found = re.search(r"\b(stock_monitoring_db_\w+)", str(value))
            if found and not found.group(1).startswith("stock_monitoring_db_mode"):
                assert names.get(option) == found.group(1), (tasks, option)
    message = "It lost the race on each of 3 attempts (option lock_retries); set option schema"
    assert outcome({"msg": message, **LOGIN}, "h", "s", "deploy", variables=names)["problems"] == [
        "It lost the race on each of 3 attempts (stock_monitoring_db_lock_retries); set stock_monitoring_db_schema"]
