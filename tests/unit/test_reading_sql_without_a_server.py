"""Reading SQL on the controller, without a server: what a transactional file may hold, where statements end."""

from __future__ import annotations

from conftest import load_library

sql = load_library("pg_migrate", "action_plugins")


def test_standard_conforming_strings_on_as_pg_dump_writes_it_is_fine():
    assert sql.analyse("001_x.sql", "SET standard_conforming_strings = on;\nSELECT 'a\\b';\n").get("problem") is None
    assert sql.analyse("001_x.sql", "SET standard_conforming_strings TO 'on';\nRESET standard_conforming_strings;\n"
                       ).get("problem") is None


def test_savepoints_are_allowed_in_a_transactional_file():
    assert sql.analyse("001_x.sql", "SAVEPOINT a;\nSELECT 1;\nROLLBACK TO SAVEPOINT a;\nRELEASE a;\n").get("problem") is None


def test_no_transaction_statements_carry_their_lines_with_any_line_ending():
    found = sql.analyse("001_x.sql", "\ufeff-- pg_migrate:no-transaction\r\nSELECT 1;\rSELECT 2;\n\nSELECT 3")
    assert not found["transactional"] and [s[2] for s in found["statements"]] == [2, 3, 5]
