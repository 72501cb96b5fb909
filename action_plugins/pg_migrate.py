# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""Controller side of pg_migrate: read each migration with PostgreSQL's own lexer and parser.

The module runs on the target host, where only psycopg2 is installed. The SQL is read here, on the
controller, with pglast (libpg_query, the server's own scanner and grammar), and the module gets what
was found, for the files where something was, in its internal `findings` option:

- every file must parse: a syntax error stops the run before any file runs, naming the line;
- a transactional file (the default) is sent to the server whole, inside the file's transaction, so
  the server's parser reads it; here it is only checked for what cannot run that way (transaction
  control, COPY with data from the client, psql meta-commands, a change of standard_conforming_strings);
- a file marked `-- pg_migrate:no-transaction` in its leading comment lines runs one statement at a
  time; here it is split at the statement boundaries the parser finds, as psql would.

A problem is carried as a message, and the module raises it only if the file is pending: a file that
was applied long ago never blocks a deploy.

Large migrations travel as a file in the target's temporary directory (they hold no secret) rather than
in the module's arguments: a pipelined module is Python source read from stdin, which CPython reads
at about 0.5 s per MB.
"""

from __future__ import annotations

import bisect
import json
import re

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

try:
    from pglast import parser as pg_parser
except ImportError:
    pg_parser = None

BOM = "\ufeff"
LINE_END = re.compile(r"\r\n|\r|\n")
# The file's leading lines: blank or `--` comments only, each ended by any line ending.
LEADING_LINES = re.compile(r"(?:[ \t\f]*(?:--[^\r\n]*)?(?:\r\n|\r|\n))*(?:[ \t\f]*--[^\r\n]*)?")
MARKER = re.compile(r"[ \t\f]*--[ \t\f]*pg_migrate:no-transaction[ \t\f]*")
FIRST_WORD = re.compile(r"[A-Za-z_]+")
# First keywords of statements that end, start or prepare a transaction. ROLLBACK TO (a savepoint) is fine.
TRANSACTION_CONTROL = {"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT"}
# Statements worth a look with the scanner, by their first word.
SCANNED = TRANSACTION_CONTROL | {"PREPARE", "COPY", "SET"}
STANDARD_STRINGS = re.compile("standard_conforming_strings", re.IGNORECASE)
STANDARD_STRINGS_ON = {"on", "true", "yes", "1", "default"}
# Characters of SQL that go inside the module's arguments; more go through a file.
INLINE_LIMIT = 1 << 20


def is_transactional(text: str) -> bool:
    """False when one of the file's leading lines (before any SQL, blank or `--` only) is the marker."""
    leading = LEADING_LINES.match(text).group(0)
    return not any(MARKER.fullmatch(line) for line in LINE_END.split(leading))


class Lines:
    """Line numbers of character offsets, counting \\r\\n, \\r and \\n each as one line ending."""

    def __init__(self, text: str) -> None:
        self.starts = [0] + [m.end() for m in LINE_END.finditer(text)]

    def at(self, offset: int) -> int:
        return bisect.bisect_right(self.starts, offset)


def statement_problem(text: str, piece: slice, transactional: bool, suspect: bool) -> tuple[int, str] | None:
    """Where and why one statement (leading comments allowed) cannot run through pg_migrate, if it cannot.

    `suspect`: the file holds a backslash or names standard_conforming_strings somewhere, so every
    statement is scanned; otherwise only those whose first word asks for it.
    """
    word = FIRST_WORD.match(text, piece.start, piece.stop)
    if not suspect and (not word or word.group(0).upper() not in SCANNED):
        return None  # the common case, decided without copying the statement
    stmt = text[piece]
    tokens = pg_parser.scan(stmt)
    names = [t.name for t in tokens]
    texts = [stmt[t.start:t.end + 1] for t in tokens]
    if "ASCII_92" in names:
        at = piece.start + tokens[names.index("ASCII_92")].start
        command = text[at:at + 20].split()[0]
        return at, (f"{command} is a psql meta-command; pg_migrate sends SQL to the server, which has no such "
                    "command: remove it (or write the SQL it stands for)")
    at = piece.start + (tokens[0].start if tokens else 0)
    first = texts[0].upper() if texts else ""
    second = texts[1].upper() if len(texts) > 1 else ""
    if first == "COPY" and {"STDIN", "STDOUT"} & set(names):
        return at, ("COPY ... FROM stdin / TO stdout exchanges data with psql, which pg_migrate is not: load the "
                    "data with INSERT ... VALUES, or with COPY from a file on the server")
    lowered = [t.lower() for t in texts]
    if "standard_conforming_strings" in lowered:
        value = lowered[lowered.index("standard_conforming_strings") + 1:]
        value = [v.strip("'") for v in value if v not in ("=", "to")]
        if first != "RESET" and (not value or value[0] not in STANDARD_STRINGS_ON):
            return at, ("it changes standard_conforming_strings, which changes how the rest of the file reads; the "
                        "server reads a whole file before running it, with the default (on): write backslash "
                        "escapes as E'...' strings and remove this SET")
    if not transactional:
        return None
    if (first in TRANSACTION_CONTROL and not (first == "ROLLBACK" and second == "TO")) \
            or (first == "PREPARE" and second == "TRANSACTION"):
        return at, (f"it starts with {first}; each file already runs in one transaction that pg_migrate commits "
                    "together with its history row: remove it, or mark the file with '-- pg_migrate:no-transaction' "
                    "in its first lines")
    return None


def split(text: str) -> tuple[list[slice], tuple[str, int] | None]:
    """The statements as PostgreSQL's parser ends them. Where it cannot parse the text, the scanner's
    split of as much as it can read (to find a psql construct that explains it), and the error."""
    try:
        return pg_parser.split(text, with_parser=True, only_slices=True), None
    except pg_parser.ParseError as exc:
        error = exc.args
    readable = text
    for _ in range(2):  # the whole text, then the part before the scanner's own error
        try:
            return pg_parser.split(readable, with_parser=False, only_slices=True), error
        except pg_parser.ParseError as exc:
            error, readable = exc.args, readable[:exc.args[1]]
    return [], error


def analyse(name: str, text: str) -> dict:
    """What the module must know of one file beyond its text: {} for an ordinary transactional file;
    else transactional=False with the (start, end, line) of its statements, or the problem that stops
    it. Offsets count characters of the text without a leading BOM (the module strips it too)."""
    text = text.removeprefix(BOM)
    transactional = is_transactional(text)
    lines = Lines(text)
    result: dict = {} if transactional else {"transactional": False}
    if "\0" in text:  # the lexer and libpq would both stop there: what follows would never run
        result["problem"] = (f"Migration {name}, line {lines.at(text.index(chr(0)))}: it holds a NUL character, where "
                             "PostgreSQL would end the file's text, leaving the rest unrun: remove it")
        return result
    slices, parse_error = split(text)
    suspect = "\\" in text or STANDARD_STRINGS.search(text) is not None
    for piece in slices:
        problem = statement_problem(text, piece, transactional, suspect)
        if problem:
            result["problem"] = f"Migration {name}, line {lines.at(problem[0])}: {problem[1]}"
            return result
    if parse_error:
        message, index = parse_error
        index = len(text) if index is None else index  # "syntax error at end of input" has no position
        version = ".".join(map(str, pg_parser.get_postgresql_version()))
        result["problem"] = (f"Migration {name}, line {lines.at(index)}: {message}, read by PostgreSQL {version}'s "
                             "parser before anything runs: fix the SQL")
        return result
    if not slices:
        result["problem"] = f"Migration {name} holds no SQL statement: add its SQL or remove the file"
    elif not transactional:
        result["statements"] = [[piece.start, piece.stop, lines.at(piece.start)] for piece in slices]
    return result


class ActionModule(ActionBase):
    """Read the migrations on the controller, then run the pg_migrate module on the target."""

    TRANSFERS_FILES = False  # a temporary directory is made only for large migrations
    _supports_check_mode = True

    def run(self, tmp: str | None = None, task_vars: dict | None = None) -> dict:
        result = super().run(tmp, task_vars)
        if pg_parser is None:
            raise AnsibleActionFail("pg_migrate reads the SQL on the controller with pglast, which is not installed "
                                    "for the Python of ansible-playbook: pip install -r requirements.txt")
        # The internal options are this plugin's to set, never the task's.
        args = {key: value for key, value in self._task.args.items() if key not in ("findings", "migrations_path")}
        migrations = args.get("migrations")
        if not isinstance(migrations, dict) or not all(isinstance(text, str) for text in migrations.values()):
            raise AnsibleActionFail("pg_migrate: migrations must be a mapping of file name to SQL text")
        findings = {name: found for name, text in migrations.items() if (found := analyse(str(name), text))}
        if sum(len(text) for text in migrations.values()) <= INLINE_LIMIT:
            args["findings"] = findings
        else:  # the temporary directory goes with the task (ActionBase.cleanup), whatever happens
            path = self._connection._shell.join_path(self._make_tmp_path(), "pg_migrate-migrations.json")
            self._transfer_data(path, json.dumps({"migrations": migrations, "findings": findings}))
            self._fixup_perms2((self._connection._shell.tmpdir, path))
            args.update(migrations={}, migrations_path=path)
        result.update(self._execute_module(module_name="pg_migrate", module_args=args, task_vars=task_vars))
        return result
