# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)

from __future__ import annotations

DOCUMENTATION = r"""
name: schema_file
short_description: Read the canonical schema file (make schema) on the controller
description:
  - Returns the content of the JSON file that C(make schema) writes, the form that the pg_migrate
    module's C(expected_schema) option takes.
  - A missing or unreadable file fails, naming it: a wrong path must not turn the comparison off.
options:
  _terms:
    description: The schema file.
    required: true
"""

EXAMPLES = r"""
- name: Apply the migrations and compare the schema with its canonical file
  pg_migrate:
    login_db: app
    migrations: "{{ lookup('migration_files', 'files/migrations') }}"
    expected_schema: "{{ lookup('schema_file', 'files/schema.json') }}"
"""

RETURN = r"""
_raw:
  description: The file's content.
  type: list
  elements: dict
"""

import json
from pathlib import Path

from ansible.errors import AnsibleError
from ansible.plugins.lookup import LookupBase


def read_schema_file(path: str) -> dict:
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnsibleError(f"The schema file {path} does not exist on the controller: run make schema, or set "
                           "stock_monitoring_db_schema_file to '' to compare nothing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AnsibleError(f"The schema file {path} cannot be read as JSON ({exc}): run make schema") from None
    if not isinstance(content, dict) or not isinstance(content.get("migrations"), dict):
        raise AnsibleError(f"The schema file {path} is not one that make schema writes: run make schema")
    return content


class LookupModule(LookupBase):
    def run(self, terms: list, variables: dict | None = None, **kwargs: object) -> list[dict]:
        return [read_schema_file(str(term)) for term in terms]
