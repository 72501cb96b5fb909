"""The reviewed plan without a server: its file (written by the callback, read by the lookup), the
differences a deploy names, and the summary a reviewer reads."""

from __future__ import annotations

import json

import pytest
from ansible.errors import AnsibleError
from ansible.module_utils import pg_migrate_reviewed as reviewed
from conftest import load_library

CALLBACK = load_library("stock_monitoring_db_report", "callback_plugins")
LOOKUP = load_library("plan_file", "roles/stock_monitoring_db/lookup_plugins")
SUMMARY = load_library("plan-summary", "scripts")

DATABASE = {"system_identifier": "7301", "database": "app", "database_oid": 16384, "host": "db1", "port": 5432,
            "history_table": "stock_monitoring.pg_migrate_history"}
ENTRY = {"database": DATABASE, "pending": [{"version": 23, "name": "023_b.sql", "checksum": "c23"}], "accepted": [],
         "history": [{"version": 22, "name": "022_a.sql", "checksum": "c22"}], "history_sha256": "h",
         "schema_objects": {"table alerts": "d1", "column alerts.id": "d2"}, "schema_sha256": "s",
         "summary": ["PLAN app.stock_monitoring on db1:5432 as app"]}


def write(tmp_path, plan: dict):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return str(path)


def test_the_plan_the_callback_writes_is_the_plan_the_lookup_reads(tmp_path):
    plan = CALLBACK.make_plan_file({"web1": ENTRY}, "2026-12-02T10:00:00Z")
    assert plan["id"] == LOOKUP.plan_id(plan)
    entry = LOOKUP.read_plan(write(tmp_path, plan), "web1")
    assert entry["pending"] == ENTRY["pending"] and entry["id"] == plan["id"]
    assert entry["created_at"] == "2026-12-02T10:00:00Z" and entry["file"].endswith("plan.json")


@pytest.mark.parametrize("change, words", [
    (lambda p: p["hosts"]["web1"]["pending"].append({"version": 24, "name": "024.sql", "checksum": "x"}),
     "was changed after it was written"),
    (lambda p: p.update(version=2), "has format version 2"),
    (lambda p: p.update(format="terraform"), "is not a plan of stock-monitoring-db"),
])
def test_an_edited_plan_file_is_refused(tmp_path, change, words):
    plan = CALLBACK.make_plan_file({"web1": json.loads(json.dumps(ENTRY))}, "2026-12-02T10:00:00Z")
    change(plan)
    with pytest.raises(AnsibleError, match=words):
        LOOKUP.read_plan(write(tmp_path, plan), "web1")


def test_an_entry_of_the_wrong_shape_is_named_by_its_key(tmp_path):
    plan = CALLBACK.make_plan_file({"web1": {**ENTRY, "history": [{"version": "22"}]}}, "2026-12-02T10:00:00Z")
    with pytest.raises(AnsibleError, match="host web1: history is not a list of"):
        LOOKUP.read_plan(write(tmp_path, plan), "web1")


def test_a_plan_that_could_not_read_the_database_is_read_with_its_files_only(tmp_path):
    blind = {**ENTRY, "database": None, "history": None, "schema_objects": None, "schema_sha256": None}
    plan = CALLBACK.make_plan_file({"web1": blind}, "2026-12-02T10:00:00Z")
    assert LOOKUP.read_plan(write(tmp_path, plan), "web1")["database"] is None
    plan = CALLBACK.make_plan_file({"web1": {**blind, "history": []}}, "2026-12-02T10:00:00Z")
    with pytest.raises(AnsibleError, match="database is null, but history or schema_objects is not"):
        LOOKUP.read_plan(write(tmp_path, plan), "web1")


def test_a_host_missing_from_the_plan_is_named_with_those_it_has(tmp_path):
    plan = CALLBACK.make_plan_file({"web1": ENTRY, "web2": ENTRY}, "2026-12-02T10:00:00Z")
    with pytest.raises(AnsibleError, match=r"Host web3 is not in the plan file .* \(it has web1, web2\)"):
        LOOKUP.read_plan(write(tmp_path, plan), "web3")


def test_a_server_is_told_apart_by_its_system_identifier_else_by_host_and_port():
    expected = {"database": DATABASE}
    assert reviewed.server_differences(expected, {**DATABASE, "host": "db1.internal"}) == []  # the same cluster
    assert "the server is another one: system identifier 9" in reviewed.server_differences(
        expected, {**DATABASE, "system_identifier": "9"})[0]
    unreadable = {**DATABASE, "system_identifier": None}
    assert reviewed.server_differences(expected, unreadable) == []
    assert "cannot read the system identifier" in reviewed.server_differences(expected, {**unreadable, "port": 6432})[0]
    assert "the history table is other.pg_migrate_history" in reviewed.server_differences(
        expected, {**DATABASE, "history_table": "other.pg_migrate_history"})[0]
    assert reviewed.database_differences(expected, {**DATABASE, "database_oid": 99}) == [
        "database 'app' was created again since the plan (oid 99, the plan's 16384)"]


def test_each_difference_from_the_plan_is_named():
    rows = {22: {"name": "022_a.sql", "checksum": "c22-edited"}, 23: {"name": "023_b.sql", "checksum": "c23"}}
    assert reviewed.history_differences(ENTRY, rows) == [
        "the history row of 022_a.sql has checksum c22-edited, c22 in the plan",
        "023_b.sql was applied since the plan (another deploy ran)"]
    assert reviewed.history_differences(ENTRY, {}) == ["the history row of 022_a.sql was removed since the plan"]
    assert reviewed.schema_differences(ENTRY, {"table alerts": "d1-changed", "index x": "d3"}) == [
        "column alerts.id: gone since the plan", "index x: added since the plan", "table alerts: changed since the plan"]


def test_a_plan_is_applied_before_only_when_its_files_carry_its_id_over_the_history_it_saw():
    expected = {**ENTRY, "id": "p1"}
    rows = {22: {"name": "022_a.sql", "checksum": "c22", "plan": None},
            23: {"name": "023_b.sql", "checksum": "c23", "plan": "p1"}}
    assert reviewed.applied_before(expected, rows)
    assert not reviewed.applied_before(expected, {**rows, 23: {**rows[23], "plan": "p0"}})
    assert not reviewed.applied_before(expected, {**rows, 21: {"name": "021.sql", "checksum": "c", "plan": None}})
    accepting = {**expected, "pending": [], "accepted": [{"version": 22, "name": "022_a.sql", "old_checksum": "c22",
                                                         "new_checksum": "c22-new"}]}
    assert reviewed.applied_before(accepting, {22: {**rows[22], "checksum": "c22-new"}})
    assert not reviewed.applied_before(accepting, {22: rows[22]})


def test_the_job_summary_lists_each_host_and_its_files():
    text = SUMMARY.markdown(CALLBACK.make_plan_file({"web1": ENTRY}, "2026-12-02T10:00:00Z"))
    assert "### web1: app on db1:5432" in text and "| 23 | `023_b.sql` | `c23` |" in text
    assert "PLAN app.stock_monitoring on db1:5432 as app" in text


def test_a_plan_is_written_by_a_plan_and_applied_by_a_deploy():
    module = load_library("pg_migrate")
    params = {"plan_out": True, "verify": False, "expected_plan": None, "drop_schema": False}
    assert module.plan_problem(params, check_mode=True) is None
    assert "is written by a plan: run in check mode" in module.plan_problem(params, check_mode=False)
    applying = {**params, "plan_out": False, "expected_plan": {"id": "x"}}
    assert "is not a plan entry (missing or wrong: created_at, file" in module.plan_problem(applying, False)
    assert "not by a verify" in module.plan_problem({**applying, "verify": True}, False)
    whole = {**ENTRY, "id": "x", "created_at": "t", "file": "f"}
    assert module.plan_problem({**applying, "expected_plan": whole}, False) is None
    assert "(missing or wrong: database)" in module.plan_problem(
        {**applying, "expected_plan": {**whole, "database": {}}}, False)
    assert "history or schema_objects" in module.plan_problem(
        {**applying, "expected_plan": {**whole, "history": None}}, False)


def test_the_summary_says_what_a_plan_saw_also_when_it_could_not_read_the_database():
    outcome = load_library("outcome", "roles/stock_monitoring_db/filter_plugins").outcome
    login = {"login": {"host": "db1", "port": 5432, "database": "app", "user": "app"}, "mode": "plan"}
    read = outcome({**login, "history_table": "s.h", "plan": ENTRY}, "web1", "s", "plan")["summary"]
    assert "reviewed plan: 1 file(s) to apply, over 1 history row(s) and schema fingerprint s" in read
    blind = {**ENTRY, "database": None, "history": None, "schema_objects": None, "schema_sha256": None}
    unread = outcome({**login, "msg": "psycopg2 missing", "missing_library": "psycopg2", "files": ["023_b.sql"],
                      "plan": blind}, "web1", "s", "plan")
    assert "reviewed plan: 1 file(s) to apply, the database not read (psycopg2 is missing on the host)" \
        in unread["summary"] and unread["problems"] == []
