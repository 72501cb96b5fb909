"""The reviewed plan: a plan run writes it, a deploy applies exactly it, or refuses it naming what changed."""

from __future__ import annotations

import json

import pytest
from conftest import MIGRATIONS, env_text, load_library, play, read_migrations, recap, write_migrations

CALLBACK = load_library("stock_monitoring_db_report", "callback_plugins")
SCHEMA = "stock_monitoring"


def make_plan(tmp_path, db, extra=None, env=None):
    plan = tmp_path / "plan.json"
    res = play(tmp_path, db, args=["--check"], extra={"stock_monitoring_db_plan_out": str(plan), **(extra or {})},
               env=env)
    assert res.rc == 0 and plan.exists(), res.output
    return plan


def apply(tmp_path, db, plan, extra=None, env=None):
    return play(tmp_path, db, extra={"stock_monitoring_db_plan": str(plan), **(extra or {})}, env=env)


def history_plans(db) -> list[tuple]:
    return db.query(f"SELECT name, plan FROM {SCHEMA}.pg_migrate_history ORDER BY version")


def only_022(folder) -> dict:
    """The role's variables for a checkout with 022 alone (no notifications table yet)."""
    migrations = read_migrations(MIGRATIONS)
    write_migrations(folder, {"022_stock_monitoring_schema.sql": migrations["022_stock_monitoring_schema.sql"]})
    return {"stock_monitoring_db_migrations_dir": str(folder), "stock_monitoring_db_schema_file": "",
            "stock_monitoring_db_expected_tables": ["alerts", "audit_log", "watchlist_items", "watchlists"]}


@pytest.mark.every_major
def test_a_plan_of_a_missing_database_then_applied_creates_it_and_records_the_plan(tmp_path, db):
    plan = make_plan(tmp_path, db)
    assert not db.exists()
    content = json.loads(plan.read_text())
    entry = content["hosts"]["localhost"]
    assert content["format"] == "stock-monitoring-db plan" and content["version"] == 1
    assert [p["name"] for p in entry["pending"]] == sorted(read_migrations(MIGRATIONS))
    assert entry["database"]["database"] == db.name and entry["database"]["database_oid"] is None
    assert entry["database"]["system_identifier"]  # the test login is a superuser
    assert any("would apply" in line for line in entry["summary"]), entry["summary"]

    res = apply(tmp_path, db, plan)
    assert res.rc == 0, res.output
    assert history_plans(db) == [(name, content["id"]) for name in sorted(read_migrations(MIGRATIONS))]
    assert f"reviewed plan: {content['id'][:12]}" in res.output


def test_applying_a_plan_again_changes_nothing(tmp_path, db):
    plan = make_plan(tmp_path, db)
    assert apply(tmp_path, db, plan).rc == 0
    again = apply(tmp_path, db, plan)
    assert again.rc == 0 and recap(again.output)["localhost"]["changed"] == 0, again.output
    assert "applied before, nothing to do" in " ".join(again.output.split()), again.output


def test_a_plan_of_an_up_to_date_database_applies_nothing_and_changes_nothing(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    plan = make_plan(tmp_path, db)
    assert json.loads(plan.read_text())["hosts"]["localhost"]["pending"] == []
    res = apply(tmp_path, db, plan)
    assert res.rc == 0 and recap(res.output)["localhost"]["changed"] == 0, res.output


def test_a_planned_file_edited_after_the_plan_is_refused_and_nothing_is_applied(tmp_path, db):
    folder = tmp_path / "migrations"
    write_migrations(folder, {}, with_real=True)
    extra = {"stock_monitoring_db_migrations_dir": str(folder)}
    plan = make_plan(tmp_path, db, extra)
    edited = folder / "023_stock_monitoring_notifications.sql"
    edited.write_text(edited.read_text() + "\nCOMMENT ON TABLE stock_monitoring.notifications IS 'edited';\n")
    res = apply(tmp_path, db, plan, extra)
    assert res.rc != 0 and "planned file 023_stock_monitoring_notifications.sql was edited since the plan" in res.output
    assert "nothing was applied or recorded" in res.output and "Traceback" not in res.output, res.output
    assert not db.exists()  # refused before the database was created


def test_a_deploy_that_ran_after_the_plan_makes_it_stale(tmp_path, db):
    assert play(tmp_path, db, extra=only_022(tmp_path / "first")).rc == 0
    plan = make_plan(tmp_path, db)  # 023 pending
    assert play(tmp_path, db).rc == 0  # another deploy applies 023 meanwhile
    res = apply(tmp_path, db, plan)
    assert res.rc != 0 and "023_stock_monitoring_notifications.sql was applied since the plan (another deploy ran)" \
        in res.output, res.output


def test_a_history_row_removed_since_the_plan_makes_it_stale(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    plan = make_plan(tmp_path, db)
    db.query(f"DELETE FROM {SCHEMA}.pg_migrate_history WHERE version = 23")
    res = apply(tmp_path, db, plan, {"stock_monitoring_db_out_of_order": "apply"})
    assert res.rc != 0 and "the history row of 023_stock_monitoring_notifications.sql was removed since the plan" \
        in res.output, res.output
    assert [r[0] for r in history_plans(db)] == ["022_stock_monitoring_schema.sql"]


def test_a_hotfix_to_the_managed_schema_since_the_plan_is_refused_naming_it(tmp_path, db):
    assert play(tmp_path, db, extra=only_022(tmp_path / "first")).rc == 0
    plan = make_plan(tmp_path, db)
    db.query(f"ALTER TABLE {SCHEMA}.alerts ADD COLUMN hotfix integer")
    db.query(f"CREATE INDEX alerts_hotfix_idx ON {SCHEMA}.alerts (hotfix)")
    res = apply(tmp_path, db, plan)
    assert res.rc != 0, res.output
    assert "column alerts.hotfix: added since the plan" in res.output
    assert "index alerts_hotfix_idx: added since the plan" in res.output
    assert "notifications" not in db.tables()


def test_a_plan_made_for_another_database_is_refused(tmp_path, db, cluster):
    from conftest import Db
    other = Db(cluster, db.name + "_other")
    try:
        plan = make_plan(tmp_path, other)
        res = apply(tmp_path, db, plan)
        assert res.rc != 0 and f"the database is {db.name!r}, the plan was made for {other.name!r}" in res.output, \
            res.output
        assert not db.exists() and not other.exists()
    finally:
        other.drop()


def test_a_database_created_again_since_the_plan_is_not_the_one_it_was_made_for(tmp_path, db):
    db.create()
    plan = make_plan(tmp_path, db)
    db.drop()
    db.create()
    res = apply(tmp_path, db, plan)
    assert res.rc != 0 and "was created again since the plan" in res.output, res.output
    assert db.tables() == []


def test_a_file_added_after_the_plan_is_left_out_and_named(tmp_path, db):
    folder = tmp_path / "migrations"
    extra = only_022(folder)
    plan = make_plan(tmp_path, db, extra)
    write_migrations(folder, {}, with_real=True)  # 023 arrives after the plan
    res = apply(tmp_path, db, plan, extra)
    assert res.rc == 0, res.output
    assert "left out (not in the reviewed plan): 023_stock_monitoring_notifications.sql" in res.output
    assert [r[0] for r in history_plans(db)] == ["022_stock_monitoring_schema.sql"]


def test_a_host_that_is_not_in_the_plan_is_refused_before_anything_runs(tmp_path, db):
    plan = make_plan(tmp_path, db)
    content = json.loads(plan.read_text())
    content["hosts"] = {"stock-monitoring-prod-1": content["hosts"]["localhost"]}
    plan.write_text(json.dumps(CALLBACK.make_plan_file(content["hosts"], content["created_at"])))
    res = apply(tmp_path, db, plan)
    assert res.rc != 0 and "Host localhost is not in the plan file" in res.output, res.output
    assert "it has stock-monitoring-prod-1" in res.output and not db.exists()


DAMAGES = [
    (lambda text: text[: len(text) // 2], "cannot be read as JSON (truncated or damaged?"),
    (lambda text: text.replace('"version": 22', '"version": 21'), "was changed after it was written"),
    (lambda text: text.replace('"version": 1,', '"version": 2,', 1), "has format version 2"),
    (lambda text: "[]", "is not a plan of stock-monitoring-db"),
]


def test_a_damaged_or_edited_plan_file_is_refused_with_a_message(tmp_path, db):
    plan = make_plan(tmp_path, db)
    text = plan.read_text()
    for damage, words in DAMAGES:
        plan.write_text(damage(text))
        res = apply(tmp_path, db, plan)
        assert res.rc != 0 and words in res.output and "Traceback" not in res.output, res.output
    assert not db.exists()


def test_the_plan_file_holds_no_secret_and_no_other_value_of_the_env(tmp_path, db):
    db.create()
    env = env_text(db) + "SECRET_KEY=never-in-a-plan-0c5e\n"
    plan = make_plan(tmp_path, db, env=env)
    text = plan.read_text()
    assert db.cluster.password not in text and "never-in-a-plan-0c5e" not in text and "SECRET_KEY" not in text


def test_a_plan_is_written_only_by_a_plan_run(tmp_path, db):
    res = play(tmp_path, db, extra={"stock_monitoring_db_plan_out": str(tmp_path / "plan.json")})
    assert res.rc != 0 and "stock_monitoring_db_plan_out is written by a plan: run in check mode" in res.output
    assert not db.exists() and not (tmp_path / "plan.json").exists()


def test_a_plan_that_fails_on_a_host_writes_no_plan_and_removes_an_old_one(tmp_path, db):
    plan = tmp_path / "plan.json"
    plan.write_text("an old plan")
    res = play(tmp_path, db, args=["--check"], extra={"stock_monitoring_db_plan_out": str(plan),
                                                      "stock_monitoring_db_postgres_port": 1})
    assert res.rc != 0 and "The plan" in res.output and "was not written" in res.output, res.output
    assert not plan.exists()


def test_a_plan_checked_in_check_mode_says_whether_it_still_applies(tmp_path, db):
    assert play(tmp_path, db).rc == 0
    plan = make_plan(tmp_path, db)
    db.query(f"ALTER TABLE {SCHEMA}.alerts ADD COLUMN hotfix integer")
    res = play(tmp_path, db, args=["--check"], extra={"stock_monitoring_db_plan": str(plan)})
    assert res.rc != 0 and "column alerts.hotfix: added since the plan" in res.output, res.output


def test_a_plan_made_and_applied_by_a_login_that_is_not_a_superuser(tmp_path, db):
    db.create()
    db.query("DROP ROLE IF EXISTS smdb_plan_owner")
    db.query("CREATE ROLE smdb_plan_owner LOGIN PASSWORD 'owner-pw-81'")
    db.query(f'ALTER DATABASE "{db.name}" OWNER TO smdb_plan_owner')
    # Where a DBA revoked pg_control_system() (per database), the host and port tell servers apart.
    db.query("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
    try:
        env = env_text(db, password="owner-pw-81", POSTGRES_USER="smdb_plan_owner")
        plan = make_plan(tmp_path, db, env=env)
        entry = json.loads(plan.read_text())["hosts"]["localhost"]
        assert entry["database"]["database_oid"] is not None and entry["database"]["system_identifier"] is None
        res = apply(tmp_path, db, plan, env=env)
        assert res.rc == 0, res.output
        assert len(history_plans(db)) == 2
    finally:
        db.drop()
        db.query("DROP ROLE IF EXISTS smdb_plan_owner", dbname="postgres")


def test_a_plan_path_that_cannot_be_written_is_refused_before_anything_runs(tmp_path, db):
    target = tmp_path / "missing" / "plan.json"
    res = play(tmp_path, db, args=["--check"], extra={"stock_monitoring_db_plan_out": str(target),
                                                      "stock_monitoring_db_report_file": str(tmp_path / "r.json")})
    assert res.rc != 0 and f"The reviewed plan {target} cannot be written: its directory" in res.output, res.output
    assert "Fix stock_monitoring_db_plan_out; nothing was run" in " ".join(res.output.split())


def test_a_plan_of_a_missing_database_applies_to_the_empty_database_another_host_created(tmp_path, db):
    plan = make_plan(tmp_path, db)
    db.create()  # another host of the same plan, sharing the database, created it first
    res = apply(tmp_path, db, plan)
    assert res.rc == 0 and len(history_plans(db)) == 2, res.output


def test_a_plan_with_accepted_edits_applied_again_changes_nothing(tmp_path, db):
    from ansible.module_utils.pg_migrate_plan import checksum
    folder = tmp_path / "migrations"
    write_migrations(folder, {}, with_real=True)
    extra = {"stock_monitoring_db_migrations_dir": str(folder), "stock_monitoring_db_schema_file": ""}
    assert play(tmp_path, db, extra=extra).rc == 0
    edited = folder / "023_stock_monitoring_notifications.sql"
    old = checksum(edited.read_text())
    edited.write_text(edited.read_text() + "\n-- a comment added after it was applied\n")
    extra["stock_monitoring_db_accepted_changes"] = [{"version": 23, "old_checksum": old,
                                                      "new_checksum": checksum(edited.read_text())}]
    plan = make_plan(tmp_path, db, extra)
    assert apply(tmp_path, db, plan, extra).rc == 0
    again = apply(tmp_path, db, plan, extra)
    assert again.rc == 0 and recap(again.output)["localhost"]["changed"] == 0, again.output


def test_a_plan_made_without_psycopg2_applies_to_a_missing_database_and_is_refused_where_it_has_a_history(
        tmp_path, db):
    from conftest import python_without_psycopg2
    bare = {"ansible_python_interpreter": str(python_without_psycopg2(tmp_path / "bare"))}
    first = make_plan(tmp_path, db, bare)
    assert json.loads(first.read_text())["hosts"]["localhost"]["database"] is None
    res = apply(tmp_path, db, first)  # the host has psycopg2 by then, as after the role installed it
    assert res.rc == 0 and len(history_plans(db)) == 2, res.output
    plan = make_plan(tmp_path, db, bare)
    db.query(f"ALTER TABLE {SCHEMA}.alerts ADD COLUMN hotfix integer")
    res = apply(tmp_path, db, plan)
    assert res.rc != 0 and "make a new plan now that psycopg2 is installed" in " ".join(res.output.split()), res.output


def test_the_plan_file_holds_the_summary_without_the_sql_of_diff(tmp_path, db):
    plan = tmp_path / "plan.json"
    res = play(tmp_path, db, args=["--check", "--diff"], extra={"stock_monitoring_db_plan_out": str(plan)})
    assert res.rc == 0 and "CREATE TABLE" in res.output
    assert "CREATE TABLE" not in plan.read_text()


def test_a_deploy_given_plan_out_by_mistake_leaves_the_reviewed_plan_alone(tmp_path, db):
    plan = make_plan(tmp_path, db)
    kept = plan.read_text()
    res = play(tmp_path, db, extra={"stock_monitoring_db_plan_out": str(plan)})
    assert res.rc != 0 and plan.read_text() == kept


def test_an_older_file_merged_after_the_plan_is_left_out_not_refused_as_out_of_order(tmp_path, db):
    folder = tmp_path / "migrations"
    assert play(tmp_path, db, extra=only_022(folder)).rc == 0
    write_migrations(folder, {}, with_real=True)
    extra = {"stock_monitoring_db_migrations_dir": str(folder)}
    plan = make_plan(tmp_path, db, extra)  # 023 pending
    write_migrations(folder, {"021_merged_late.sql": "CREATE TABLE stock_monitoring.late (id int);\n"})
    res = apply(tmp_path, db, plan, {**extra, "stock_monitoring_db_schema_file": ""})
    assert res.rc == 0, res.output
    assert "left out (not in the reviewed plan): 021_merged_late.sql" in res.output
    assert [r[0] for r in history_plans(db)] == ["022_stock_monitoring_schema.sql",
                                                 "023_stock_monitoring_notifications.sql"]
