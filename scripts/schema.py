#!/usr/bin/env python3
"""The canonical schema file, roles/stock_monitoring_db/files/schema.json.

    scripts/schema.py            (make schema) apply the migrations with deploy-db.yml to a throwaway
                                 database and write what the catalog says of the managed schema
    scripts/schema.py --check    (make lint) fail when the file was not made from the migrations as they
                                 are, naming each one added, changed or removed since; no server needed
    --migrations DIR --file F    another migrations directory and schema file (default: the role's)

A pull request that adds a migration then shows its effect on the schema as a reviewable diff.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import ansible.module_utils
import psycopg2

ROOT = Path(__file__).resolve().parent.parent
ROLE = ROOT / "roles" / "stock_monitoring_db"
MIGRATIONS = ROLE / "files" / "migrations"
SCHEMA_FILE = ROLE / "files" / "schema.json"
SCHEMA, HISTORY = "stock_monitoring", "pg_migrate_history"
sys.path.insert(0, str(ROOT / "scripts"))
ansible.module_utils.__path__.append(str(ROOT / "module_utils"))  # as inside a module run

from ansible.module_utils.pg_migrate_plan import checksum
from ansible.module_utils.pg_migrate_schema import SNAPSHOT, migration_changes
from pgcluster import Cluster


def migrations(folder: Path = MIGRATIONS) -> dict[str, str]:
    """{file name: checksum}, the checksums the history table records."""
    return {f.name: checksum(f.read_text(encoding="utf-8")) for f in sorted(folder.glob("*.sql"))}


def generate(folder: Path = MIGRATIONS) -> dict:
    """Apply the migrations with deploy-db.yml to a throwaway cluster; the file's content."""
    work = Path(tempfile.mkdtemp(prefix="smdb-schema-"))
    os.chmod(work, 0o755)
    pg = Cluster(work / "pg")
    pg.start()
    try:
        db = f"schema_{uuid.uuid4().hex[:8]}"
        env_file = work / ".env"
        env_file.write_text(f"POSTGRES_HOST=127.0.0.1\nPOSTGRES_PORT={pg.port}\nPOSTGRES_USER=postgres\n"
                            f"POSTGRES_PASSWORD='{pg.password}'\nPOSTGRES_DB={db}\n")
        run = subprocess.run(
            [str(Path(sys.executable).parent / "ansible-playbook"), str(ROOT / "playbooks" / "deploy-db.yml"),
             "-i", str(ROOT / "inventory" / "local"),
             "-e", json.dumps({"stock_monitoring_db_migrations_dir": str(folder), "stock_monitoring_db_schema_file": ""})],
            capture_output=True, text=True, cwd=ROOT,
            env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "STOCK_MONITORING_DB_ENV_FILE": str(env_file)})
        if run.returncode:
            sys.exit(f"schema: deploy-db.yml failed on the throwaway database:\n{run.stdout[-3000:]}{run.stderr[-2000:]}")
        conn = psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname=db)
        with conn, conn.cursor() as cur:
            cur.execute(SNAPSHOT, {"schema": SCHEMA, "table": HISTORY})
            objects = cur.fetchone()[0]
        major = conn.server_version // 10000
        conn.close()
    finally:
        pg.stop("immediate")
        shutil.rmtree(work, ignore_errors=True)
    # The major it was made on, for the reader: the comparison holds on every supported major.
    return {"comment": "Written by make schema from the migrations listed here: do not edit, regenerate.",
            "schema": SCHEMA, "postgresql": major, "migrations": migrations(folder), "objects": objects}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--migrations", type=Path, default=MIGRATIONS)
    parser.add_argument("--file", type=Path, default=SCHEMA_FILE)
    args = parser.parse_args()
    if args.check:
        if not args.file.exists():
            print(f"schema: {args.file} is missing: run make schema", file=sys.stderr)
            return 1
        changes = migration_changes(json.loads(args.file.read_text())["migrations"], migrations(args.migrations))
        if changes:
            print(f"schema: {args.file} is stale ({'; '.join(changes)}): run make schema and commit the result",
                  file=sys.stderr)
            return 1
        return 0
    args.file.write_text(json.dumps(generate(args.migrations), indent=2, sort_keys=True) + "\n")
    print(f"schema: wrote {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
