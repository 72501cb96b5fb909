#!/usr/bin/python
# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: dotenv_read
short_description: Read keys from a .env file on the target host, by python-dotenv's rules
description:
  - Reads a C(.env) file the way the backend's python-dotenv (1.2) does - an optional C(export)
    prefix, C(#) comments, single and double quotes with their escapes, values spanning lines,
    C(${VAR}) and C(${VAR:-default}) expansion from earlier keys and then the environment, a BOM,
    CRLF line endings, and the last of duplicate keys winning.
  - Unlike python-dotenv, which skips a line it cannot parse with a warning, a line that cannot be
    parsed fails the task, naming the file and the line number (never its content).
  - Values are returned. The module's action plugin marks its result hidden, as C(no_log) would, so
    the task needs no C(no_log), which would also hide why a host could not be reached. Failure
    messages never contain a value.
  - Anything but a regular file (a directory, a FIFO, a device) is refused without being read, and a
    directory on the path that the user cannot enter is named as such, not as a missing file.
version_added: "1.0.0"
author:
  - Stock Monitoring team (@stock-monitoring)
options:
  path:
    description: Path of the C(.env) file on the target host.
    type: path
    required: true
  keys:
    description:
      - Keys to return. Others are parsed (so that a broken file fails) but not returned.
      - When omitted, every key is returned.
    type: list
    elements: str
  required:
    description:
      - Keys that must be present with a non-empty value. When some are not, the task fails naming
        the file and every such key.
      - When every key of O(keys) is satisfied elsewhere, pass an empty list; a missing file is then
        not an error.
    type: list
    elements: str
    default: []
attributes:
  check_mode:
    description: Can run in check mode and return a changed status prediction without modifying the target.
    support: full
  diff_mode:
    description: Returns details on what has changed (or would change in check mode) when in diff mode.
    support: none
"""

EXAMPLES = r"""
- name: Read the database settings of the backend
  dotenv_read:
    path: /opt/stock-monitoring/.env
    keys: [POSTGRES_HOST, POSTGRES_PORT, POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB]
    required: [POSTGRES_HOST, POSTGRES_PORT, POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB]
  register: env
"""

RETURN = r"""
values:
  description: The keys found (of O(keys) when given) and their values, after expansion.
  returned: success
  type: dict
  sample: {POSTGRES_HOST: db.internal, POSTGRES_PORT: "5432"}
exists:
  description: Whether the file exists.
  returned: success
  type: bool
missing:
  description: Keys of O(keys) that the file does not set.
  returned: success
  type: list
  elements: str
"""

import codecs
import os
import pwd
import re
import stat

from ansible.module_utils.basic import AnsibleModule

# python-dotenv's grammar (dotenv/parser.py, 1.2.x).
_MULTILINE_WHITESPACE = re.compile(r"\s*", re.MULTILINE)
_WHITESPACE = re.compile(r"[^\S\r\n]*")
_EXPORT = re.compile(r"(?:export[^\S\r\n]+)?")
_SINGLE_QUOTED_KEY = re.compile(r"'([^']+)'")
_UNQUOTED_KEY = re.compile(r"([^=\#\s]+)")
_EQUAL_SIGN = re.compile(r"(=[^\S\r\n]*)")
_SINGLE_QUOTED_VALUE = re.compile(r"'((?:\\.|[^'\\])*)'", re.DOTALL)
_DOUBLE_QUOTED_VALUE = re.compile(r'"((?:\\.|[^"\\])*)"', re.DOTALL)
_UNQUOTED_VALUE = re.compile(r"([^\r\n]*)")
_COMMENT = re.compile(r"(?:[^\S\r\n]*#[^\r\n]*)?")
_END_OF_LINE = re.compile(r"[^\S\r\n]*(?:\r\n|\n|\r|$)")
_NEWLINE = re.compile(r"\r\n|\n|\r")
_DOUBLE_QUOTE_ESCAPES = re.compile(r"\\[\\'\"abfnrtv]")
_SINGLE_QUOTE_ESCAPES = re.compile(r"\\[\\']")
_VARIABLE = re.compile(r"\$\{(?P<name>[^\}:]*)(?::-(?P<default>[^\}]*))?\}")


class DotenvError(Exception):
    """A problem with the file, worded to name the file, the line or the keys, never a value."""


def _unescape(pattern: re.Pattern, value: str) -> str:
    return pattern.sub(lambda m: codecs.decode(m.group(0), "unicode-escape"), value)


def parse(text: str, source: str = ".env") -> list[tuple[str, str | None]]:
    """Parse the text of a .env file into (key, raw value) pairs; a key without '=' has None."""
    text = text.removeprefix("\ufeff")
    pos, bindings = 0, []

    def read(pattern: re.Pattern) -> re.Match:
        nonlocal pos
        m = pattern.match(text, pos)
        if m is None:
            line = 1 + len(_NEWLINE.findall(text, 0, pos))
            raise DotenvError(f"{source}: line {line} cannot be parsed (check its quotes and the KEY=value form)")
        pos = m.end()
        return m

    while pos < len(text):
        read(_MULTILINE_WHITESPACE)
        if pos >= len(text):
            break
        read(_EXPORT)
        key = None
        if text.startswith("'", pos):
            key = read(_SINGLE_QUOTED_KEY).group(1)
        elif not text.startswith("#", pos):
            key = read(_UNQUOTED_KEY).group(1)
        read(_WHITESPACE)
        value = None
        if text.startswith("=", pos):
            equal_sign = read(_EQUAL_SIGN).group(1)
            char = text[pos:pos + 1]
            if len(equal_sign) > 1 and char == "#":
                value = ""  # `KEY= # comment`
            elif char == "'":
                value = _unescape(_SINGLE_QUOTE_ESCAPES, read(_SINGLE_QUOTED_VALUE).group(1))
            elif char == '"':
                value = _unescape(_DOUBLE_QUOTE_ESCAPES, read(_DOUBLE_QUOTED_VALUE).group(1))
            elif char in ("", "\n", "\r"):
                value = ""
            else:
                value = re.sub(r"\s+#.*", "", read(_UNQUOTED_VALUE).group(1)).rstrip()
        read(_COMMENT)
        read(_END_OF_LINE)
        if key is not None:
            bindings.append((key, value))
    return bindings


def expand(bindings: list[tuple[str, str | None]], environ: dict[str, str]) -> dict[str, str | None]:
    """Expand ${VAR} and ${VAR:-default}: earlier keys of the file first, then the environment."""
    values: dict[str, str | None] = {}
    for key, raw in bindings:
        if raw is None:
            values[key] = None
            continue
        scope = {**environ, **values}

        def resolve(m: re.Match, scope: dict = scope) -> str:
            found = scope.get(m.group("name"), m.group("default") or "")
            return found if found is not None else ""

        values[key] = _VARIABLE.sub(resolve, raw)
    return values


FILE_KINDS = {stat.S_IFDIR: "directory", stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
              stat.S_IFBLK: "block device"}


def user_name() -> str:
    """Who runs the module, for messages; a uid without a passwd entry (a container's) by its number."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def read_file(path: str) -> str | None:
    """The file's text as python-dotenv reads it (UTF-8, universal newlines); None when it does not exist.

    Opened without blocking and checked to be a regular file before reading: a FIFO would wait for a
    writer for ever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except PermissionError:
        user = user_name()
        if os.access(os.path.dirname(os.path.abspath(path)), os.X_OK):
            raise DotenvError(f"{path} cannot be read by {user}: give it read access (owner, group or mode)") from None
        raise DotenvError(f"{path} cannot be reached by {user}: a directory on its path denies it (each directory "
                          "needs the x permission for it)") from None
    except NotADirectoryError:
        raise DotenvError(f"{path}: a part of its path is not a directory") from None
    with os.fdopen(fd, encoding="utf-8") as stream:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind != stat.S_IFREG:
            raise DotenvError(f"{path} is a {FILE_KINDS.get(kind, 'special file')}, not a regular file: "
                              "point the role at the .env file itself")
        os.set_blocking(fd, True)
        try:
            return stream.read()
        except UnicodeDecodeError as exc:
            raise DotenvError(f"{path} is not UTF-8 text (invalid byte at offset {exc.start}): save it as UTF-8") from None


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "keys": {"type": "list", "elements": "str", "no_log": False},
            "required": {"type": "list", "elements": "str", "default": []},
        },
        supports_check_mode=True,
    )
    path, keys, required = module.params["path"], module.params["keys"], module.params["required"]
    try:
        text = read_file(path)
        values = expand(parse(text, path), dict(os.environ)) if text is not None else {}
    except DotenvError as exc:
        module.fail_json(msg=str(exc))
    if text is None:
        if required:
            module.fail_json(msg=f"The .env file {path} does not exist on this host; it must set "
                                 f"{', '.join(required)} (see the README's .env contract)", missing=required)
        module.exit_json(changed=False, exists=False, values={}, missing=list(keys or []))
    wanted = keys if keys is not None else list(values)
    found = {k: values[k] for k in wanted if values.get(k) is not None}
    absent = [k for k in required if not found.get(k)]
    if absent:
        module.fail_json(msg=f"The .env file {path} does not set {', '.join(absent)} (missing or empty): add "
                             f"{'them' if len(absent) > 1 else 'it'} as KEY=value lines", missing=absent)
    module.exit_json(changed=False, exists=True, values=found, missing=[k for k in wanted if k not in found])


if __name__ == "__main__":
    main()
