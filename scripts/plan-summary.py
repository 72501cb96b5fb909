#!/usr/bin/env python3
"""The reviewed plan as Markdown, for the job summary that a reviewer reads before approving the deploy.

    scripts/plan-summary.py PLAN_FILE >> "$GITHUB_STEP_SUMMARY"

Reads what the report callback wrote (stock_monitoring_db_plan_out); the standard library only, so that
it runs on a bare runner.
"""

from __future__ import annotations

import json
import sys


def markdown(plan: dict) -> str:
    lines = [f"## Database plan `{plan['id'][:12]}`", "",
             f"Made {plan['created_at']}. Approving the deploy applies exactly this plan: if a planned file, the "
             "history, the managed schema or the database changed since, the deploy refuses it and applies "
             "nothing (run the workflow again for a new plan). A file added since is left out.", ""]
    for host, entry in sorted(plan["hosts"].items()):
        database = entry["database"]
        where = (f"{database['database']} on {database['host']}:{database['port']}" if database
                 else "(not read: psycopg2 is missing on the host, the deploy installs it first)")
        lines += [f"### {host}: {where}", ""]
        if entry["pending"]:
            lines += ["| version | file | checksum |", "| ---: | --- | --- |"]
            lines += [f"| {p['version']} | `{p['name']}` | `{p['checksum'][:12]}` |" for p in entry["pending"]]
        else:
            lines.append("Nothing to apply.")
        lines += ["", "```text", *entry.get("summary", []), "```", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: plan-summary.py PLAN_FILE", file=sys.stderr)
        return 2
    try:
        with open(argv[1], encoding="utf-8") as stream:
            plan = json.load(stream)
        print(markdown(plan))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"plan-summary.py: {argv[1]} is not a plan the deploy role wrote ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
