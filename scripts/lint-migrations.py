#!/usr/bin/env python3
"""make lint: squawk, the migration linter, on the migration files, as pg_migrate runs them.

A transactional file runs inside a transaction of its own, a file marked `-- pg_migrate:no-transaction`
outside one: squawk is told which, file by file (the marker rule is the action plugin's own), and reads
the rest of its settings from .squawk.toml.
    scripts/lint-migrations.py [DIRECTORY ...]   (default: the role's migrations)
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "action_plugins" / "pg_migrate.py"


def marker_rule() -> Callable[[str], bool]:
    """The action plugin's is_transactional(text): the one definition of the no-transaction marker."""
    spec = importlib.util.spec_from_file_location("pg_migrate_action", PLUGIN)
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    return plugin.is_transactional


def main() -> int:
    folders = [Path(arg) for arg in sys.argv[1:]] or [ROOT / "roles" / "stock_monitoring_db" / "files" / "migrations"]
    files = sorted(f for folder in folders for f in folder.glob("*.sql"))
    if not files:
        sys.exit(f"lint-migrations: no .sql file in {', '.join(map(str, folders))}")
    squawk = Path(sys.executable).parent / "squawk"
    groups = {"--assume-in-transaction": [], "--no-assume-in-transaction": []}
    is_transactional = marker_rule()
    for f in files:
        groups["--assume-in-transaction" if is_transactional(f.read_text(encoding="utf-8"))
               else "--no-assume-in-transaction"].append(str(f))
    failed = False
    for flag, paths in groups.items():
        if paths:
            run = subprocess.run([str(squawk), "--config", str(ROOT / ".squawk.toml"), "--reporter", "gcc", flag, *paths])
            failed |= run.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
