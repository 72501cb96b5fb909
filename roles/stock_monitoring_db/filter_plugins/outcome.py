# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""The outcome of a run of the role on one host: the JSON report, the summary lines and the problems.

Presentation lives here, in plain functions tested directly, rather than in nested Jinja. It reads
pg_migrate's registered result whatever its shape: a result, a named failure, or a crash (a result
with only `msg`, or nothing at all when the module never ran).
"""

from __future__ import annotations

import os
import re

# How pg_migrate's messages name its options ("option lock_retries"; see pg_migrate_plan.option).
OPTION = re.compile(r"\boption ([a-z_]+)\b")


def named(message: str, variables: dict[str, str]) -> str:
    """The message with each option of pg_migrate that the role sets from a variable named as that variable."""
    return OPTION.sub(lambda m: variables.get(m.group(1), m.group(0)), message)


def outcome(result: dict | None, host: str, schema: str, mode: str, diff: bool = False,
            psycopg2_installed: bool = False, psycopg2_package: str = "python3-psycopg2",
            drift_fails: bool = False, variables: dict[str, str] | None = None) -> dict:
    """{'report': the JSON report of this host, 'summary': lines to read, 'problems': what is wrong}.

    The run's mode is pg_migrate's (it knows whether it ran in check mode, however that was set); `mode`,
    what the role expects (deploy, plan or verify), is only for a result that has none (a crash)."""
    result = result if isinstance(result, dict) else {}
    run_mode = result.get("mode") if result.get("mode") in ("deploy", "plan", "verify") else mode
    planning = run_mode != "deploy"
    psycopg2_missing = "missing_library" in result
    # A fresh host has no psycopg2 yet: its plan is the deploy's first step, not a failure.
    failure = "" if psycopg2_missing and run_mode == "plan" else named(str(result.get("msg", "")), variables or {})
    if not failure and not psycopg2_missing and (result.get("failed") or "history_table" not in result):
        # A crash, a killed module, or no run at all: not a success, whatever else the result lacks.
        failure = ("pg_migrate returned no usable result (it crashed or was killed before it could report, and "
                   "nothing it did is known): run again with -vvv to see its output")
    login = result.get("login") if isinstance(result.get("login"), dict) else {}  # pg_migrate's, never a secret
    report = {
        "host": host,
        "server": f"{login['host']}:{login['port']}" if login else None,
        "database": login.get("database"),
        "user": login.get("user"),
        "schema": schema,
        "mode": run_mode,
        # The task registers with failed_when: false, so any message is a failure: success has none.
        "failure": failure,
        "psycopg2": "missing" if psycopg2_missing else ("installed" if psycopg2_installed else ""),
        "not_compared": list(result.get("files", [])) if psycopg2_missing else [],
        "database_created": bool(result.get("database_created", False)),
        "database_exists": result.get("database_exists"),
        "adopted_manual_schema": bool(result.get("adopting", False)),
        "applied": list(result.get("applied", [])),
        "pending": list(result.get("pending", [])),
        "already_applied": [a["name"] for a in result.get("already_applied", [])],
        "accepted": list(result.get("accepted", [])),
        "drift": list(result.get("drift", [])),
        "tables": list(result.get("tables", [])),
        "missing_tables": list(result.get("missing_tables", [])),
        "unexpected_tables": list(result.get("unexpected_tables", [])),
        "schema_compared": result.get("schema_compared"),
        "schema_differences": list(result.get("schema_differences", [])),
        "schema_not_compared": named(str(result.get("schema_not_compared", "")), variables or {}),
        "schema_file_unusable": bool(result.get("schema_file_unusable", False)),
        "schema_compare_blocked": bool(result.get("schema_compare_blocked", False)),
        "history_table": result.get("history_table", ""),
        "server_version": result.get("server_version", ""),
        "duration_ms": result.get("duration_ms", 0),
        # The statements that ran longer than progress_interval, with what PostgreSQL said every interval.
        "progress": list(result.get("progress", [])),
        # pg_migrate's warnings (Ansible shows them too, in the module's words), as the role's variables say it.
        "warnings": [named(str(w), variables or {}) for w in result.get("warnings", [])],
    }
    # The reviewed plan: this host's entry of a plan written (plan_out), or the plan applied and what it left out.
    report.update({key: result[key] for key in ("plan", "applied_plan", "left_out", "plan_differences")
                   if key in result})
    report["summary"] = summary(report, result, planning, False, psycopg2_package)  # without the SQL of --diff
    lines = summary(report, result, planning, diff, psycopg2_package) if diff else report["summary"]
    return {"report": report, "summary": lines, "problems": problems(report, drift_fails)}


def summary(report: dict, result: dict, planning: bool, diff: bool, psycopg2_package: str) -> list[str]:
    """One line per fact worth reading; with --diff, then the SQL that ran or would run."""
    version = f" (PostgreSQL {report['server_version']})" if report["server_version"] else ""
    if report["server"]:
        lines = [f"{report['mode'].upper()} {report['database']}.{report['schema']} on {report['server']} as "
                 f"{report['user']}{version}"]
    else:  # pg_migrate said nothing (a crash, an unreachable host): only the inventory's name is known
        lines = [f"{report['mode'].upper()} {report['schema']} on host {report['host']}"]
    if report["database_created"]:
        lines.append("database: created")
    elif planning and report["database_exists"] is False:
        lines.append("database: missing" if report["mode"] == "verify" else "database: would be created")
    if report["psycopg2"] == "missing" and report["mode"] == "plan":
        lines.append(f"psycopg2: missing on the host; the deploy installs {psycopg2_package} first (become), then "
                     "creates the database if missing and applies each file its history lacks")
        lines.append(f"not yet compared with the database: {', '.join(report['not_compared']) or 'none'}")
    elif report["psycopg2"] == "missing":
        lines.append("psycopg2: missing on the host")
    elif report["psycopg2"] == "installed":
        lines.append(f"psycopg2: installed ({psycopg2_package})")
    if report["adopted_manual_schema"] and report["applied"]:
        lines.append("adopted a schema that was migrated by hand")
    applied = ", ".join(f"{a['name']} in {a['duration_ms']} ms" + attempts(a) for a in report["applied"])
    lines.append(f"applied: {applied or 'none'}")
    lines += [f"long statement: {long_statement(statement)}" for statement in report["progress"]]
    if report["pending"]:
        state = "would apply" if planning else "not applied"
        lines.append(f"pending ({state}): {', '.join(p['name'] for p in report['pending'])}")
    lines += plan_lines(report)
    if "already_applied" in result:
        lines.append(f"already applied: {', '.join(report['already_applied']) or 'none'}")
    if report["accepted"]:
        lines.append(f"accepted edits: {', '.join(a['name'] for a in report['accepted'])}")
    if report["drift"]:
        lines.append(f"drift: {drift_text(report['drift'])}")
    if "tables" in result:
        tables = f"tables: {', '.join(report['tables']) or 'none'}"
        if report["missing_tables"]:
            tables += f"; missing: {', '.join(report['missing_tables'])}"
        if report["unexpected_tables"]:
            tables += f"; unexpected: {', '.join(report['unexpected_tables'])}"
        lines.append(tables)
    if report["schema_compared"]:
        differences = report["schema_differences"]
        lines.append(f"schema: differs from the schema file ({len(differences)}): {'; '.join(differences)}"
                     if differences else "schema: matches the schema file")
    elif report["schema_not_compared"]:
        lines.append(f"schema: not compared: {report['schema_not_compared']}")
    if report["history_table"]:
        lines.append(f"history: {report['history_table']}; pg_migrate took {report['duration_ms']} ms")
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    if diff:
        lines += [line for line in result.get("diff", {}).get("prepared", "").split("\n") if line]
    return lines


def long_statement(statement: dict) -> str:
    """A statement that ran longer than progress_interval: where, how long, and the last thing PostgreSQL said."""
    if statement.get("line") is not None:
        where = f" line {statement['line']} ({statement['sql']})"
    elif statement.get("lines"):
        where = " lines " + ", ".join(map(str, statement["lines"][:6]))
    else:
        where = ""
    said = [e["text"] for e in statement.get("events", []) if not e.get("finished")]
    last = f"; last seen: {said[-1]}" if said else ""
    outcome = "" if statement.get("ok", True) else ", failed"
    return f"{statement['migration']}{where}, {statement['duration_ms'] / 1000:.1f} s{outcome}{last}"


def plan_lines(report: dict) -> list[str]:
    """What the summary says of a reviewed plan: the entry written, or the plan applied."""
    lines = []
    if "plan" in report:
        entry = report["plan"]
        seen = (f"over {len(entry['history'])} history row(s) and schema fingerprint {entry['schema_sha256'][:12]}"
                if entry["history"] is not None else "the database not read (psycopg2 is missing on the host)")
        lines.append(f"reviewed plan: {len(entry['pending'])} file(s) to apply, {seen}")
    if "applied_plan" in report:
        applied = report["applied_plan"]
        before = "; applied before, nothing to do" if applied["applied_before"] else ""
        lines.append(f"reviewed plan: {applied['id'][:12]}, made {applied['created_at']}{before}")
    if report.get("left_out"):
        lines.append(f"left out (not in the reviewed plan): {', '.join(m['name'] for m in report['left_out'])}")
    return lines


def problems(report: dict, drift_fails: bool = False) -> list[str]:
    """What verification finds wrong. Verify reports anything not deployed or different from the schema
    file; a deploy, missing tables (and schema differences when drift_fails); a --check deploy only
    describes its plan, since pending migrations may create the tables."""
    if report["failure"]:
        return [report["failure"]]
    if report["mode"] == "plan":
        return []
    if report["database_exists"] is False:
        return ["the database does not exist (a deploy creates it)"]
    found = []
    if report["pending"]:
        found.append(f"pending migrations: {', '.join(p['name'] for p in report['pending'])}")
    if report["missing_tables"]:
        found.append(f"missing tables: {', '.join(report['missing_tables'])}")
    if report["drift"] and report["mode"] == "verify":
        found.append(f"drift: {drift_text(report['drift'])}")
    # An unusable schema file fails verify; a locked table fails whatever must compare (verify, drift_fails).
    strict = report["mode"] == "verify" or (drift_fails and report["schema_compare_blocked"])
    if (report["schema_file_unusable"] or report["schema_compare_blocked"]) and strict:
        found.append(f"schema not compared: {report['schema_not_compared']}")
    if report["schema_differences"] and (report["mode"] == "verify" or drift_fails):
        found.append(f"schema differs from the schema file: {'; '.join(report['schema_differences'])}")
    return found


def attempts(applied: dict) -> str:
    """How often a file ran before it got its locks, when more than once (lock retries)."""
    return f" ({applied['attempts']} attempts)" if applied.get("attempts", 1) > 1 else ""


def drift_text(drift: list[dict]) -> str:
    return ", ".join(f"{d['name']} {d['kind']}" for d in drift)


def report_problem(path: str, what: str = "JSON report", variable: str = "stock_monitoring_db_report_file") -> str:
    """Why the JSON report (or the reviewed plan) could not be written at the end of the run, found before
    anything runs (on the controller, where the report callback writes it, from the directory
    ansible-playbook started in)."""
    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    if os.path.isdir(target):
        why = "it is a directory"
    elif os.path.exists(target) and not os.access(target, os.W_OK):
        why = "it exists and is not writable"
    elif not os.path.isdir(folder):
        why = f"its directory {folder} does not exist"
    elif not os.access(folder, os.W_OK | os.X_OK):
        why = f"its directory {folder} is not writable"
    else:
        return ""
    return f"The {what} {path} cannot be written: {why}. Fix {variable}; nothing was run"


class FilterModule:
    def filters(self) -> dict:
        return {"stock_monitoring_db_outcome": outcome, "stock_monitoring_db_report_problem": report_problem}
