# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)

from __future__ import annotations

DOCUMENTATION = r"""
name: plan_file
short_description: Read one host's entry of a reviewed plan file on the controller
description:
  - Reads the plan file that a plan run writes (C(stock_monitoring_db_plan_out), see docs/deploying.md), checks
    its format, version and integrity (its C(id) is the SHA-256 of the rest), and returns the entry of
    O(host) in the form the pg_migrate module's C(expected_plan) option takes, with the plan's C(id),
    C(created_at) and C(file).
  - A missing, truncated or edited file, or a host the plan does not have, fails naming the file and what
    is wrong, before anything runs.
options:
  _terms:
    description: The plan file.
    required: true
  host:
    description: The inventory name of the host whose entry to return.
    type: str
    required: true
"""

EXAMPLES = r"""
- name: Apply the reviewed plan
  pg_migrate:
    login_db: app
    migrations: "{{ lookup('migration_files', 'files/migrations') }}"
    expected_plan: "{{ lookup('plan_file', 'plan.json', host=inventory_hostname) }}"
"""

RETURN = r"""
_raw:
  description: The host's entry.
  type: list
  elements: dict
"""

import hashlib
import json
from pathlib import Path

from ansible.errors import AnsibleError
from ansible.plugins.lookup import LookupBase

FORMAT = "stock-monitoring-db plan"
VERSION = 1
AGAIN = "make a new plan (run the workflow again, or ansible-playbook --check -e stock_monitoring_db_plan_out=FILE)"


def plan_id(plan: dict) -> str:
    """The SHA-256 of the plan without its id; callback_plugins/stock_monitoring_db_report.py writes it so
    (a unit test holds the two to the same bytes)."""
    body = {key: value for key, value in plan.items() if key != "id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_file_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(f, dict) and isinstance(f.get("version"), int) and isinstance(f.get("name"), str)
        and isinstance(f.get("checksum"), str) for f in value)


def entry_problem(entry: object) -> str | None:
    """What is wrong with one host's entry, by key."""
    if not isinstance(entry, dict):
        return "it is not a mapping"
    database = entry.get("database")
    if database is None:  # a plan that could not read the database (psycopg2 missing): its files only
        if entry.get("history") is not None or entry.get("schema_objects") is not None:
            return "database is null, but history or schema_objects is not"
        return None if is_file_list(entry.get("pending")) else "pending is not a list of {version, name, checksum}"
    if not (isinstance(database, dict) and isinstance(database.get("database"), str)
            and isinstance(database.get("host"), str) and isinstance(database.get("port"), int)
            and isinstance(database.get("system_identifier"), (str, type(None)))
            and isinstance(database.get("database_oid"), (int, type(None)))):
        return "database is not {system_identifier, database, database_oid, host, port}"
    for key in ("pending", "history"):
        if not is_file_list(entry.get(key)):
            return f"{key} is not a list of {{version, name, checksum}}"
    if not isinstance(entry.get("accepted"), list):
        return "accepted is not a list"
    objects = entry.get("schema_objects")
    if not (isinstance(objects, dict) and all(isinstance(v, str) for v in objects.values())):
        return "schema_objects is not a mapping of object names to digests"
    return None


def read_plan(path: str, host: str) -> dict:
    """The host's entry of the plan file, with the plan's id, created_at and file."""
    try:
        plan = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnsibleError(f"The plan file {path} does not exist on the controller: {AGAIN}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AnsibleError(f"The plan file {path} cannot be read as JSON (truncated or damaged? {exc}): {AGAIN}") \
            from None
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise AnsibleError(f"The file {path} is not a plan of stock-monitoring-db (its format is not {FORMAT!r}): "
                           f"{AGAIN}")
    if plan.get("version") != VERSION:
        raise AnsibleError(f"The plan file {path} has format version {plan.get('version')!r}; this checkout reads "
                           f"version {VERSION}: apply it from the checkout that wrote it, or {AGAIN}")
    if plan.get("id") != plan_id(plan):
        raise AnsibleError(f"The plan file {path} was changed after it was written (its content does not match its "
                           f"id): a plan is applied as reviewed or not at all; {AGAIN}")
    hosts = plan.get("hosts")
    if not isinstance(hosts, dict) or not isinstance(plan.get("created_at"), str):
        raise AnsibleError(f"The plan file {path} lacks its hosts or created_at: {AGAIN}")
    if host not in hosts:
        raise AnsibleError(f"Host {host} is not in the plan file {path} (it has {', '.join(sorted(hosts)) or 'none'}), "
                           f"so nothing was applied to it: {AGAIN} with this host in the inventory")
    problem = entry_problem(hosts[host])
    if problem:
        raise AnsibleError(f"The plan file {path}, host {host}: {problem}: {AGAIN}")
    entry = {key: value for key, value in hosts[host].items() if key != "summary"}  # for the reviewer, not the host
    return {**entry, "id": plan["id"], "created_at": plan["created_at"], "file": path}


class LookupModule(LookupBase):
    def run(self, terms: list, variables: dict | None = None, **kwargs: object) -> list[dict]:
        self.set_options(var_options=variables, direct=kwargs)
        return [read_plan(str(term), self.get_option("host")) for term in terms]
