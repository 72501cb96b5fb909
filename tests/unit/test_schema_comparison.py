"""Comparing a schema snapshot with the schema file, without a server: how differences are worded."""

from __future__ import annotations

from ansible.module_utils.pg_migrate_schema import differences


def test_view_bodies_are_compared_without_the_qualifiers_that_majors_write_differently():
    as_15 = {"views": {"v": " SELECT alerts.id,\n    alerts.symbol\n   FROM stock_monitoring.alerts\n"
                            "  WHERE alerts.enabled;"}}
    as_16 = {"views": {"v": " SELECT id,\n    symbol\n   FROM stock_monitoring.alerts\n  WHERE enabled;"}}
    assert differences(as_15, as_16) == []
    changed = {"views": {"v": " SELECT id,\n    symbol\n   FROM stock_monitoring.alerts\n  WHERE NOT enabled;"}}
    assert differences(as_15, changed) == [
        "view v: definition differs: SELECT alerts.id, alerts.symbol FROM stock_monitoring.alerts WHERE alerts.enabled; "
        "in the schema file, SELECT id, symbol FROM stock_monitoring.alerts WHERE NOT enabled; in the database"]


def test_differences_are_worded_per_kind_and_column_order_is_not_one():
    col = {"type": "bigint", "not_null": True, "default": None, "identity": "a", "generated": None, "comment": None}
    file = {"tables": {"t": {"comment": None, "columns": {"id": col, "name": {**col, "type": "text", "identity": None}}}},
            "sequences": {"t_id_seq": {"type": "bigint", "start": 1}}}
    reordered = {"tables": {"t": {"comment": None, "columns": {"name": file["tables"]["t"]["columns"]["name"], "id": col}}},
                 "sequences": {"t_id_seq": {"type": "bigint", "start": 1}}}
    assert differences(file, reordered) == []
    changed = {"tables": {"t": {"comment": "hotfix", "columns": {"id": {**col, "identity": "d"}}}},
               "views": {"v": "SELECT 1"}}
    assert differences(file, changed) == [
        "t.id: identity differs: a in the schema file, d in the database", "t.name: column missing",
        "table t: comment differs", "view v: not in the schema file", "sequence t_id_seq: missing"]
