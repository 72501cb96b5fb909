"""squawk on the migrations (make lint): what locks a busy table or breaks running code fails lint."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT, write_migrations

LINT = [sys.executable, str(ROOT / "scripts" / "lint-migrations.py")]


def lint(folder) -> subprocess.CompletedProcess:
    return subprocess.run([*LINT, str(folder)], capture_output=True, text=True, cwd=ROOT)


def test_the_shipped_migrations_pass():
    res = subprocess.run(LINT, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("sql, rule", [
    ("ALTER TABLE stock_monitoring.alerts ADD COLUMN owner text NOT NULL;\n", "adding-required-field"),
    ("CREATE INDEX alerts_symbol_idx ON stock_monitoring.alerts (symbol);\n", "require-concurrent-index-creation"),
    ("ALTER TABLE stock_monitoring.alerts ALTER COLUMN threshold TYPE numeric(20,8);\n", "changing-column-type"),
])
def test_a_migration_that_would_lock_a_busy_table_fails_naming_the_rule(tmp_path, sql, rule):
    res = lint(write_migrations(tmp_path / "m", {"024_risky.sql": sql}))
    assert res.returncode != 0 and re.search(rf"024_risky\.sql:\d+:\d+: warning: {rule} ", res.stdout), res.stdout


def test_a_concurrent_index_in_a_no_transaction_file_passes(tmp_path):
    sql = ("-- pg_migrate:no-transaction\n"
           "CREATE INDEX CONCURRENTLY IF NOT EXISTS alerts_symbol_idx ON stock_monitoring.alerts (symbol);\n")
    res = lint(write_migrations(tmp_path / "m", {"024_index.sql": sql}))
    assert res.returncode == 0, res.stdout + res.stderr
