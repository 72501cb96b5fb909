# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""The managed schema as the catalog describes it, and how it differs from the canonical schema file.

The canonical file (make schema) holds SNAPSHOT's result for a database made by applying the
migrations, with the checksums of those migrations. Only definitions are compared: no data,
statistics, OIDs or column positions, so rows, VACUUM ANALYZE, a column order changed by later
migrations, or an object dropped and re-created identically are not drift. The history table is
left out.

One schema file verifies on every supported major (14 to 18), so what a major words or stores
differently is kept out of the comparison: PostgreSQL 18's NOT NULL constraints (a column's NOT NULL
is compared instead), 17's identity columns copied onto partitions (the partitioned table's is
compared), and the table qualifiers that 16 stopped writing in one-table views (view bodies are
compared without qualifiers).
"""

from __future__ import annotations

import re

# One query. Run with search_path = pg_catalog, so that every name outside pg_catalog is qualified
# the same way whatever the session's search_path; local to the query's transaction, so that it stays
# off a pooled session.
SNAPSHOT = """
SET LOCAL search_path = pg_catalog;
WITH s AS (SELECT oid FROM pg_namespace WHERE nspname = %(schema)s),
rel AS (SELECT c.* FROM pg_class c, s WHERE c.relnamespace = s.oid AND c.relname <> %(table)s)
SELECT json_build_object(
  'tables', (SELECT coalesce(json_object_agg(c.relname, json_build_object(
      'comment', obj_description(c.oid, 'pg_class'),
      'columns', (SELECT coalesce(json_object_agg(a.attname, json_build_object(
          'type', format_type(a.atttypid, a.atttypmod),
          'not_null', a.attnotnull,
          'default', pg_get_expr(d.adbin, d.adrelid),
          'identity', CASE WHEN NOT c.relispartition THEN nullif(a.attidentity, '') END,
          'generated', nullif(a.attgenerated, ''),
          'comment', col_description(c.oid, a.attnum))), '{}')
        FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped))), '{}')
    FROM rel c WHERE c.relkind IN ('r', 'p', 'f')),
  'views', (SELECT coalesce(json_object_agg(c.relname, pg_get_viewdef(c.oid)), '{}') FROM rel c
    WHERE c.relkind IN ('v', 'm')),
  'indexes', (SELECT coalesce(json_object_agg(c.relname, pg_get_indexdef(c.oid)
      || CASE WHEN x.indisvalid THEN '' ELSE ' (INVALID)' END), '{}') FROM rel c
    JOIN pg_index x ON x.indexrelid = c.oid JOIN pg_class t ON t.oid = x.indrelid WHERE t.relname <> %(table)s),
  'constraints', (SELECT coalesce(json_object_agg(t.relname || '.' || k.conname, pg_get_constraintdef(k.oid)), '{}')
    FROM pg_constraint k JOIN rel t ON t.oid = k.conrelid WHERE k.contype <> 'n'),
  'sequences', (SELECT coalesce(json_object_agg(c.relname, json_build_object(
      'type', format_type(q.seqtypid, NULL), 'start', q.seqstart, 'increment', q.seqincrement,
      'min', q.seqmin, 'max', q.seqmax, 'cycle', q.seqcycle)), '{}')
    FROM rel c JOIN pg_sequence q ON q.seqrelid = c.oid),
  'functions', (SELECT coalesce(json_object_agg(p.oid::regprocedure::text, pg_get_functiondef(p.oid)), '{}')
    FROM pg_proc p, s WHERE p.pronamespace = s.oid AND p.prokind IN ('f', 'p')),
  'triggers', (SELECT coalesce(json_object_agg(t.relname || '.' || g.tgname, pg_get_triggerdef(g.oid)), '{}')
    FROM pg_trigger g JOIN rel t ON t.oid = g.tgrelid WHERE NOT g.tgisinternal))
"""

KINDS = (("indexes", "index"), ("constraints", "constraint"), ("views", "view"), ("sequences", "sequence"),
         ("functions", "function"), ("triggers", "trigger"))
COLUMN_FIELDS = (("type", "type"), ("not_null", "NOT NULL"), ("default", "default"), ("identity", "identity"),
                 ("generated", "generated"), ("comment", "comment"))


# In a view body: a string literal (kept as it is), or the qualifier of a column ("alerts." in alerts.symbol),
# which not every major writes. A relation's schema, after FROM or JOIN, is kept.
VIEW_TOKEN = re.compile(r"""('(?:[^']|'')*')|(?<![\w."$])(?<!FROM )(?<!FROM \()(?<!FROM \(\()(?<!FROM \(\(\()(?<!JOIN )"""
                        r"""(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)\.(?=["A-Za-z_])""")


def comparable(kind: str, definition: object) -> object:
    """A definition in the form compared, the same on every supported major."""
    if kind == "views" and isinstance(definition, str):
        return VIEW_TOKEN.sub(lambda m: m.group(1) or "", " ".join(definition.split()))
    return definition


def shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = " ".join(str(value).split())
    return text if len(text) <= 160 else text[:157] + "..."


def presence(kind: str, name: str, in_file: bool) -> str:
    return f"{kind} {name}: {'missing' if in_file else 'not in the schema file'}"


def differences(expected: dict, actual: dict) -> list[str]:
    """Each difference between the schema file's objects and the database's, in a DBA's words."""
    found: list[str] = []
    tables_file, tables_db = expected.get("tables", {}), actual.get("tables", {})
    for name in sorted(set(tables_file) | set(tables_db)):
        if name not in tables_db or name not in tables_file:
            found.append(presence("table", name, name in tables_file))
            continue
        file_cols, db_cols = tables_file[name]["columns"], tables_db[name]["columns"]
        for col in sorted(set(file_cols) | set(db_cols)):
            if col not in db_cols:
                found.append(f"{name}.{col}: column missing")
            elif col not in file_cols:
                found.append(f"{name}.{col}: column not in the schema file")
            else:
                found += [f"{name}.{col}: {label} differs: {shown(file_cols[col].get(key))} in the schema file, "
                          f"{shown(db_cols[col].get(key))} in the database"
                          for key, label in COLUMN_FIELDS if file_cols[col].get(key) != db_cols[col].get(key)]
        if tables_file[name].get("comment") != tables_db[name].get("comment"):
            found.append(f"table {name}: comment differs")
    for kind, label in KINDS:
        file_objs, db_objs = expected.get(kind, {}), actual.get(kind, {})
        for name in sorted(set(file_objs) | set(db_objs)):
            if name not in db_objs or name not in file_objs:
                found.append(presence(label, name, name in file_objs))
            elif comparable(kind, file_objs[name]) != comparable(kind, db_objs[name]):
                found.append(f"{label} {name}: definition differs: {shown(file_objs[name])} in the schema file, "
                             f"{shown(db_objs[name])} in the database")
    return found


def migration_changes(described: dict, present: dict) -> list[str]:
    """How the migrations present ({name: checksum}: applied ones, or files) differ from those the schema
    file was made from; empty when they are the same."""
    return ([f"{n}: not in the schema file" for n in sorted(set(present) - set(described))]
            + [f"{n}: only in the schema file" for n in sorted(set(described) - set(present))]
            + [f"{n}: another checksum than in the schema file" for n in sorted(set(described) & set(present))
               if described[n] != present[n]])


def not_compared(described: dict, applied: dict) -> str | None:
    """Why the database is not compared with the schema file, or None: the file describes the state after
    exactly its migrations, so the database must have exactly those applied."""
    changes = migration_changes(described, applied)
    return ("the migrations applied are not those the schema file was made from (" + "; ".join(changes) + ")"
            if changes else None)
