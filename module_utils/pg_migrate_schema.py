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
WITH s AS (SELECT oid, nspowner, nspacl FROM pg_namespace WHERE nspname = %(schema)s),
rel AS (SELECT c.* FROM pg_class c, s WHERE c.relnamespace = s.oid AND c.relname <> %(table)s)
SELECT json_build_object(
  'tables', (SELECT coalesce(json_object_agg(c.relname, json_build_object(
      'comment', obj_description(c.oid, 'pg_class'),
      'persistence', CASE c.relpersistence WHEN 'u' THEN 'unlogged' ELSE 'logged' END,
      'options', array_to_string(c.reloptions, ', '),
      'row_security', CASE WHEN c.relforcerowsecurity THEN 'forced' WHEN c.relrowsecurity THEN 'on' ELSE 'off' END,
      'fk_triggers', CASE WHEN EXISTS (SELECT FROM pg_trigger g WHERE g.tgrelid = c.oid AND g.tgisinternal
                                       AND g.tgenabled <> 'O') THEN 'disabled' ELSE 'enabled' END,
      'columns', (SELECT coalesce(json_object_agg(a.attname, json_build_object(
          'type', format_type(a.atttypid, a.atttypmod),
          'not_null', a.attnotnull,
          'default', pg_get_expr(d.adbin, d.adrelid),
          'identity', CASE WHEN NOT c.relispartition THEN nullif(a.attidentity, '') END,
          'generated', nullif(a.attgenerated, ''),
          'collation', CASE WHEN a.attcollation NOT IN (0, 100)
                            THEN (SELECT quote_ident(collname) FROM pg_collation WHERE oid = a.attcollation) END,
          'comment', col_description(c.oid, a.attnum))), '{}')
        FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped))), '{}')
    FROM rel c WHERE c.relkind IN ('r', 'p', 'f')),
  'views', (SELECT coalesce(json_object_agg(c.relname, pg_get_viewdef(c.oid)
      || coalesce(' WITH (' || array_to_string(c.reloptions, ', ') || ')', '')), '{}') FROM rel c
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
    FROM pg_trigger g JOIN rel t ON t.oid = g.tgrelid WHERE NOT g.tgisinternal),
  'disabled_triggers', (SELECT coalesce(json_object_agg(t.relname || '.' || g.tgname, CASE g.tgenabled
      WHEN 'D' THEN 'no (DISABLE TRIGGER)' WHEN 'R' THEN 'on replicas only (ENABLE REPLICA TRIGGER)'
      ELSE 'always (ENABLE ALWAYS TRIGGER)' END), '{}')
    FROM pg_trigger g JOIN rel t ON t.oid = g.tgrelid WHERE NOT g.tgisinternal AND g.tgenabled <> 'O'),
  'rules', (SELECT coalesce(json_object_agg(t.relname || '.' || r.rulename, pg_get_ruledef(r.oid)
      || CASE r.ev_enabled WHEN 'O' THEN '' ELSE ' (enabled: ' || r.ev_enabled::text || ')' END), '{}')
    FROM pg_rewrite r JOIN rel t ON t.oid = r.ev_class WHERE r.rulename <> '_RETURN'),
  'policies', (SELECT coalesce(json_object_agg(tablename || '.' || policyname, concat_ws(' ', permissive, cmd, 'TO',
      array_to_string(roles, ', '), 'USING (' || qual || ')', 'WITH CHECK (' || with_check || ')')), '{}')
    FROM pg_policies WHERE schemaname = %(schema)s),
  -- Every other object in the schema, whatever its kind, by PostgreSQL's own name for it (pg_identify_object,
  -- which, unlike pg_describe_object, lc_messages never translates): a type, an operator
  -- (the search_path attack), an aggregate, a collation, text search objects, statistics, an extension. Left
  -- out: what comes with a relation (its row type, array types) or with a range (its multirange).
  'objects', (SELECT coalesce(json_object_agg(o.name, o.definition), '{}') FROM (
      SELECT (SELECT type || ' ' || identity FROM pg_identify_object('pg_type'::regclass, t.oid, 0)) AS name,
        CASE t.typtype
        WHEN 'd' THEN 'domain over ' || format_type(t.typbasetype, t.typtypmod)
          || CASE WHEN t.typnotnull THEN ' NOT NULL' ELSE '' END || coalesce(' DEFAULT ' || t.typdefault, '')
        WHEN 'e' THEN 'enum (' || (SELECT string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder)
                                   FROM pg_enum e WHERE e.enumtypid = t.oid) || ')'
        WHEN 'r' THEN 'range of ' || (SELECT format_type(g.rngsubtype, NULL) FROM pg_range g WHERE g.rngtypid = t.oid)
        WHEN 'c' THEN 'composite (' || (SELECT string_agg(quote_ident(a.attname) || ' '
                                        || format_type(a.atttypid, a.atttypmod), ', ' ORDER BY a.attnum)
                                        FROM pg_attribute a WHERE a.attrelid = t.typrelid AND a.attnum > 0
                                        AND NOT a.attisdropped) || ')'
        ELSE 'type' END AS definition
      FROM pg_type t, s WHERE t.typnamespace = s.oid AND t.typtype <> 'm'
        AND (t.typrelid = 0 OR (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')
        AND NOT EXISTS (SELECT FROM pg_type e WHERE e.typarray = t.oid)
      UNION ALL SELECT (SELECT type || ' ' || identity FROM pg_identify_object('pg_operator'::regclass, o.oid, 0)),
        'function ' || o.oprcode::regprocedure
        FROM pg_operator o, s WHERE o.oprnamespace = s.oid
      UNION ALL SELECT (SELECT type || ' ' || identity FROM pg_identify_object('pg_proc'::regclass, p.oid, 0)),
        CASE p.prokind WHEN 'a' THEN 'aggregate'
        ELSE 'window function' END FROM pg_proc p, s WHERE p.pronamespace = s.oid AND p.prokind IN ('a', 'w')
      UNION ALL SELECT (SELECT type || ' ' || identity FROM pg_identify_object('pg_constraint'::regclass, k.oid, 0)),
        pg_get_constraintdef(k.oid)
        FROM pg_constraint k, s WHERE k.connamespace = s.oid AND k.contypid <> 0 AND k.contype <> 'n'
      UNION ALL SELECT (SELECT type || ' ' || identity FROM pg_identify_object(y.classid, y.objid, 0)), '' FROM (
          SELECT 'pg_collation'::regclass, x.oid FROM pg_collation x, s WHERE x.collnamespace = s.oid
          UNION ALL SELECT 'pg_conversion'::regclass, x.oid FROM pg_conversion x, s WHERE x.connamespace = s.oid
          UNION ALL SELECT 'pg_opclass'::regclass, x.oid FROM pg_opclass x, s WHERE x.opcnamespace = s.oid
          UNION ALL SELECT 'pg_opfamily'::regclass, x.oid FROM pg_opfamily x, s WHERE x.opfnamespace = s.oid
          UNION ALL SELECT 'pg_ts_config'::regclass, x.oid FROM pg_ts_config x, s WHERE x.cfgnamespace = s.oid
          UNION ALL SELECT 'pg_ts_dict'::regclass, x.oid FROM pg_ts_dict x, s WHERE x.dictnamespace = s.oid
          UNION ALL SELECT 'pg_ts_parser'::regclass, x.oid FROM pg_ts_parser x, s WHERE x.prsnamespace = s.oid
          UNION ALL SELECT 'pg_ts_template'::regclass, x.oid FROM pg_ts_template x, s WHERE x.tmplnamespace = s.oid
          UNION ALL SELECT 'pg_statistic_ext'::regclass, x.oid FROM pg_statistic_ext x, s WHERE x.stxnamespace = s.oid
          UNION ALL SELECT 'pg_extension'::regclass, x.oid FROM pg_extension x, s WHERE x.extnamespace = s.oid
        ) y (classid, objid)) o),
  -- Who may add objects to the schema besides its owner (and the owner's members, and superusers).
  'creators', (SELECT CASE WHEN EXISTS (SELECT FROM aclexplode(s.nspacl) WHERE grantee = 0 AND privilege_type = 'CREATE')
      THEN '["PUBLIC"]'::json ELSE (SELECT coalesce(json_agg(r.rolname ORDER BY r.rolname), '[]') FROM pg_roles r
        WHERE has_schema_privilege(r.oid, s.oid, 'CREATE') AND NOT r.rolsuper
        AND NOT pg_has_role(r.oid, s.nspowner, 'MEMBER') AND left(r.rolname, 3) <> 'pg_') END FROM s),
  'schema', %(schema)s)
"""

KINDS = (("indexes", "index"), ("constraints", "constraint"), ("views", "view"), ("sequences", "sequence"),
         ("functions", "function"), ("triggers", "trigger"), ("rules", "rule"), ("policies", "policy"))
COLUMN_FIELDS = (("type", "type"), ("not_null", "NOT NULL"), ("default", "default"), ("identity", "identity"),
                 ("generated", "generated"), ("collation", "collation"), ("comment", "comment"))
# How a table behaves, beyond its columns: the word for each in a message, and its value when the schema
# file predates it (made before it was compared).
TABLE_FIELDS = (("persistence", "persistence differs", "logged"), ("options", "options differ", None),
                ("row_security", "row level security differs", "off"),
                ("fk_triggers", "triggers that enforce foreign keys differ", "enabled"))


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
        for key, words, default in TABLE_FIELDS:
            in_file, in_db = tables_file[name].get(key, default), tables_db[name].get(key, default)
            if in_file != in_db:
                found.append(f"table {name}: {words}: {shown(in_file)} in the schema file, {shown(in_db)} in the database")
    for kind, label in KINDS:
        file_objs, db_objs = expected.get(kind, {}), actual.get(kind, {})
        for name in sorted(set(file_objs) | set(db_objs)):
            if name not in db_objs or name not in file_objs:
                found.append(presence(label, name, name in file_objs))
            elif comparable(kind, file_objs[name]) != comparable(kind, db_objs[name]):
                found.append(f"{label} {name}: definition differs: {shown(file_objs[name])} in the schema file, "
                             f"{shown(db_objs[name])} in the database")
    file_off, db_off = expected.get("disabled_triggers", {}), actual.get("disabled_triggers", {})
    for name in sorted(set(file_off) | set(db_off)):
        if file_off.get(name) != db_off.get(name) and name in actual.get("triggers", {}):
            found.append(f"trigger {name}: enabled differs: {file_off.get(name, 'yes')} in the schema file, "
                         f"{db_off.get(name, 'yes')} in the database")
    file_objs, db_objs = expected.get("objects", {}), actual.get("objects", {})
    for name in sorted(set(file_objs) | set(db_objs)):  # the name says the kind: "operator stock_monitoring.=(...)"
        if name not in db_objs:
            found.append(f"{name}: missing")
        elif name not in file_objs:
            found.append(f"{name}: not in the schema file")
        elif file_objs[name] != db_objs[name]:
            found.append(f"{name}: definition differs: {shown(file_objs[name])} in the schema file, "
                         f"{shown(db_objs[name])} in the database")
    schema = actual.get("schema", "the schema")
    file_creators, db_creators = set(expected.get("creators", [])), set(actual.get("creators", []))
    found += [f"schema {schema}: role {role} can CREATE in it and is not its owner"
              for role in sorted(db_creators - file_creators)]
    found += [f"schema {schema}: role {role} can no longer CREATE in it" for role in sorted(file_creators - db_creators)]
    return found


# What make schema writes: the file's keys, and the keys of its objects (SNAPSHOT's).
FILE_KEYS = frozenset({"comment", "schema", "postgresql", "migrations", "objects"})
OBJECT_KEYS = frozenset({"tables", "views", "indexes", "constraints", "sequences", "functions", "triggers",
                         "disabled_triggers", "rules", "policies", "objects", "creators", "schema"})


def schema_file_problem(expected: dict | None) -> str | None:
    """Keys that make schema does not write, which the comparison would ignore: a hand edit, a file of
    another tool, or a typo that turns a check off."""
    if expected is None:
        return None
    unknown = sorted(set(expected) - FILE_KEYS)
    objects = expected.get("objects")
    if not isinstance(objects, dict):
        return "it has no objects: regenerate it with make schema"
    unknown += [f"objects.{key}" for key in sorted(set(objects) - OBJECT_KEYS)]
    if unknown:
        return f"it holds keys that make schema does not write ({', '.join(unknown)}): regenerate it with make schema"
    return None


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
