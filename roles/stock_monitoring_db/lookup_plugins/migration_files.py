# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)

from __future__ import annotations

DOCUMENTATION = r"""
name: migration_files
short_description: Read a directory of NNN_name.sql migrations on the controller, strictly as UTF-8
description:
  - Returns one mapping of file name to SQL text for every C(*.sql) file in the directory, the form
    that the pg_migrate module's C(migrations) option takes.
  - Unlike the C(file) lookup, which replaces undecodable bytes silently, a file that is not valid
    UTF-8 fails, naming the file and the offset of the first invalid byte.
options:
  _terms:
    description: The directory holding the migrations.
    required: true
"""

EXAMPLES = r"""
- name: Apply the migrations of a directory
  pg_migrate:
    login_db: app
    migrations: "{{ lookup('migration_files', 'files/migrations') }}"
"""

RETURN = r"""
_raw:
  description: One mapping of file name to SQL text.
  type: list
  elements: dict
"""

from pathlib import Path

from ansible.errors import AnsibleError
from ansible.plugins.lookup import LookupBase


def read_migrations(directory: str) -> dict[str, str]:
    folder = Path(directory)
    if not folder.is_dir():
        raise AnsibleError(f"The migrations directory {directory} does not exist on the controller")
    files: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() == ".sql" and path.suffix != ".sql":  # skipped, it would never run: say so
            raise AnsibleError(f"Migration {path} ends in {path.suffix}: migrations are *.sql files, in lower case; "
                               f"rename it to {path.stem}.sql")
    for path in sorted(folder.glob("*.sql")):
        data = path.read_bytes()
        try:
            files[path.name] = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AnsibleError(f"Migration {path} is not UTF-8 text (invalid byte at offset {exc.start}): "
                               "save it as UTF-8") from None
    if not files:
        raise AnsibleError(f"The migrations directory {directory} holds no .sql file")
    return files


class LookupModule(LookupBase):
    def run(self, terms: list, variables: dict | None = None, **kwargs: object) -> list[dict[str, str]]:
        return [read_migrations(str(term)) for term in terms]
