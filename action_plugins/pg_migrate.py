# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""Controller side of pg_migrate: read each migration as psql does, with PostgreSQL's own scanner.

The module runs on the target host, where only psycopg2 is installed. The SQL is read here, on the
controller, with pglast (libpg_query, PostgreSQL's scanner and grammar), and the module gets what
was found, for the files where something was, in its internal `_findings` option. Whether SQL is valid
is the target server's to judge, whatever its major: the grammar here is only a fast, exact splitter,
and where it refuses a file (a word a later major made a keyword, a syntax error), psql's own scanner
rules split it instead. Found here, before any file runs, naming the line:

- what a transactional file (the default, sent to the server whole inside the file's transaction)
  cannot hold: transaction control, statements PostgreSQL refuses in a transaction block (CREATE INDEX
  CONCURRENTLY, VACUUM, ...), COPY with data from the client, psql meta-commands, a change of
  standard_conforming_strings, a NUL character, text the scanner cannot read (an unterminated quote);
- where a file marked `-- pg_migrate:no-transaction` in its leading comments (of either kind) ends each
  statement, for the module to run them one at a time;
- a file of comments only, which runs as a no-op, as psql runs it.

A problem is carried as a message, and the module raises it only if the file is pending: a file that
was applied long ago never blocks a deploy.

Large migrations travel as a file in the target's temporary directory (they hold no secret) rather than
in the module's arguments: a pipelined module is Python source read from stdin, which CPython reads
at about 0.5 s per MB.
"""

from __future__ import annotations

import bisect
import copy
import functools
import hashlib
import json
import os
import re
import secrets
import shlex
import threading
from collections.abc import Callable

from ansible import constants as C
from ansible.errors import AnsibleActionFail
from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase
from ansible.utils.collection_loader import resource_from_fqcr
from ansible.utils.display import Display

try:
    from pglast import parser as pg_parser
except ImportError:
    pg_parser = None

display = Display()
BOM = "\ufeff"
LINE_END = re.compile(r"\r\n|\r|\n")
# The marker, as a `--` line or a line of a block comment (` * pg_migrate:no-transaction`, with or without `--`).
MARKER = re.compile(r"[ \t\f]*(?:/\*+|\*)?[ \t\f]*(?:--)?[ \t\f]*pg_migrate:no-transaction[ \t\f]*(?:\*+/)?[ \t\f]*")
FIRST_WORD = re.compile(r"[A-Za-z_]+")
# First keywords of statements that end, start or prepare a transaction. ROLLBACK TO (a savepoint) is fine.
TRANSACTION_CONTROL = {"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT"}
# Statements worth a look with the scanner, by their first word.
SCANNED = TRANSACTION_CONTROL | {"PREPARE", "COPY", "SET"}
# Statements that may be one PostgreSQL refuses in a transaction block, by their first words: a look with the
# scanner decides (see no_transaction_statement).
NO_TRANSACTION_CANDIDATE = re.compile(r"(?is)(?:VACUUM|CLUSTER|REINDEX|ALTER\s+SYSTEM|(?:CREATE|DROP)\s+"
                                      r"(?:DATABASE|TABLESPACE)|(?:CREATE|DROP)\b.{0,80}?\bCONCURRENTLY)\b")
STANDARD_STRINGS = re.compile("standard_conforming_strings", re.IGNORECASE)
STANDARD_STRINGS_ON = {"on", "true", "yes", "1", "default"}
# Characters of SQL that go inside the module's arguments; more go through a file.
INLINE_LIMIT = 1 << 20


def leading_comments(text: str) -> list[str]:
    """The comments before the file's first SQL: `--` lines and `/* ... */` blocks (which nest in PostgreSQL)."""
    comments, at = [], 0
    while True:
        while at < len(text) and text[at] in " \t\f\r\n":
            at += 1
        if text.startswith("--", at):
            end = LINE_END.search(text, at)
            comments.append(text[at:end.start() if end else len(text)])
            at = end.end() if end else len(text)
        elif text.startswith("/*", at):
            depth, end = 1, at + 2
            while depth and end < len(text):
                if text.startswith("/*", end):
                    depth, end = depth + 1, end + 2
                elif text.startswith("*/", end):
                    depth, end = depth - 1, end + 2
                else:
                    end += 1
            comments.append(text[at:end])
            at = end
        else:
            return comments


def is_transactional(text: str) -> bool:
    """False when a line of the file's leading comments, `--` ones or inside a `/* ... */` block, is the marker."""
    return not any(MARKER.fullmatch(line) for comment in leading_comments(text) for line in LINE_END.split(comment))


class Lines:
    """Line numbers of character offsets, counting \\r\\n, \\r and \\n each as one line ending."""

    def __init__(self, text: str) -> None:
        self.starts = [0] + [m.end() for m in LINE_END.finditer(text)]

    def at(self, offset: int) -> int:
        return bisect.bisect_right(self.starts, offset)


def no_transaction_statement(words: list[str]) -> str | None:
    """What the statement is, when PostgreSQL refuses to run it inside a transaction block (its words, upper case)."""
    first, second = [*words, "", ""][:2]
    if first in ("CREATE", "DROP") and "INDEX" in words[:3] and "CONCURRENTLY" in words[:5]:
        return f"{first} INDEX CONCURRENTLY"
    if first == "REINDEX" and ("CONCURRENTLY" in words[:6] or second in ("DATABASE", "SYSTEM")):
        return "REINDEX CONCURRENTLY" if "CONCURRENTLY" in words[:6] else f"REINDEX {second}"
    if first == "VACUUM" or (first == "CLUSTER" and set(words[1:]) <= {"VERBOSE", ";"}):
        return first
    if (first, second) in (("ALTER", "SYSTEM"), ("CREATE", "DATABASE"), ("DROP", "DATABASE"),
                           ("CREATE", "TABLESPACE"), ("DROP", "TABLESPACE")):
        return f"{first} {second}"
    return None


def statement_problem(text: str, piece: slice, transactional: bool, suspect: bool) -> tuple[int, str] | None:
    """Where and why one statement (leading comments allowed) cannot run through pg_migrate, if it cannot.

    `suspect`: the file holds a backslash or names standard_conforming_strings somewhere, so every
    statement is scanned; otherwise only those whose first word asks for it.
    """
    word = FIRST_WORD.match(text, piece.start, piece.stop)
    candidate = transactional and NO_TRANSACTION_CANDIDATE.match(text, piece.start, min(piece.stop, piece.start + 300))
    if not suspect and not candidate and (not word or word.group(0).upper() not in SCANNED):
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
    words = [t.upper() for n, t in zip(names, texts, strict=True) if n not in ("SQL_COMMENT", "C_COMMENT")]
    outside = no_transaction_statement(words)
    if outside:
        return at, (f"{outside} cannot run inside a transaction block, and each file runs in one: mark the file with "
                    "'-- pg_migrate:no-transaction' in its first lines (its statements then run one at a time, so it "
                    "must be re-runnable)")
    if (first in TRANSACTION_CONTROL and not (first == "ROLLBACK" and second == "TO")) \
            or (first == "PREPARE" and second == "TRANSACTION"):
        return at, (f"it starts with {first}; each file already runs in one transaction that pg_migrate commits "
                    "together with its history row: remove it, or mark the file with '-- pg_migrate:no-transaction' "
                    "in its first lines")
    return None


def psql_split(text: str) -> list[slice]:
    """The statements as psql ends them, from PostgreSQL's scanner alone: at a semicolon outside parentheses and
    outside the BEGIN ... END body of CREATE [OR REPLACE] FUNCTION/PROCEDURE (psqlscan.l's own rule), a last
    statement without one included. Raises the scanner's ParseError (an unterminated quote or comment)."""
    pieces, start, end = [], None, 0
    words: list[str] = []  # the statement's first unquoted words, lower case
    depth = begin = 0
    for token in pg_parser.scan(text):
        if token.name in ("SQL_COMMENT", "C_COMMENT"):
            continue
        word = text[token.start:token.end + 1]
        if token.name == "ASCII_59" and depth == 0 and begin == 0:
            if start is not None:
                pieces.append(slice(start, end))
            start, words = None, []
            continue
        start = token.start if start is None else start
        end = token.end + 1
        if token.name == "ASCII_40":
            depth += 1
        elif token.name == "ASCII_41":
            depth = max(depth - 1, 0)
        elif token.kind != "NO_KEYWORD" or (token.name == "IDENT" and not word.startswith('"')):
            words.append(word.lower())
            routine = words[:2] in (["create", "function"], ["create", "procedure"]) or \
                words[:4] in (["create", "or", "replace", "function"], ["create", "or", "replace", "procedure"])
            if routine and depth == 0:
                if words[-1] == "begin" or (words[-1] == "case" and begin):
                    begin += 1
                elif words[-1] == "end" and begin:
                    begin -= 1
    if start is not None:
        pieces.append(slice(start, end))
    return pieces


def split(text: str) -> tuple[list[slice], tuple[str, int] | None]:
    """The statements, and the scanner's error where it cannot read the text. PostgreSQL's parser splits
    exactly and fast; where it refuses the text (a word that a later major made a keyword, a syntax error:
    the server's to judge, not this controller's grammar), psql's scanner rules do."""
    try:
        return pg_parser.split(text, with_parser=True, only_slices=True), None
    except pg_parser.ParseError:
        pass
    try:
        return psql_split(text), None
    except pg_parser.ParseError as exc:
        return [], exc.args


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
        index = len(text) if index is None else index
        result["problem"] = (f"Migration {name}, line {lines.at(index)}: {message}: the file cannot be read as SQL "
                             "(PostgreSQL's scanner) before anything runs: fix it")
        return result
    if not slices or not transactional:  # comments only: nothing to send, a no-op recorded as applied (as psql)
        result["statements"] = [[piece.start, piece.stop, lines.at(piece.start), run_once(text[piece])]
                                for piece in slices]
    return result


def run_once(stmt: str) -> str | None:
    """Why a statement of a no-transaction file must not be run again after it lost a lock race, if so:
    a CONCURRENTLY index build or drop leaves an INVALID index behind; a DO block or a CALL may have
    committed part of its work (COMMIT inside), which running it again would repeat."""
    words = [t.name for t in pg_parser.scan(stmt) if t.name not in ("SQL_COMMENT", "C_COMMENT")]
    if words[:1] in (["DO"], ["CALL"]):
        return "may_commit"
    # CREATE/DROP INDEX, REINDEX (VERBOSE, ..., CONCURRENTLY), ALTER TABLE ... DETACH PARTITION ... CONCURRENTLY;
    # REFRESH MATERIALIZED VIEW CONCURRENTLY leaves nothing behind when it fails, and is retried.
    if "CONCURRENTLY" in words and words[:1] != ["REFRESH"]:
        return "concurrently"
    return None


# Progress: the module appends an event as a JSON line to ${TMPDIR:-/tmp}/pg_migrate-progress-TOKEN.jsonl on
# the host while a statement runs longer than progress_interval (see module_utils/pg_migrate_progress.py);
# it makes the file when it starts, and removes it when it ends. This command waits on
# the host, up to `ticks` fifths of a second, until the file is there ("here", then what it holds) or has
# grown past `offset` bytes (what was added), and says "gone" once the file it saw is removed. It reads
# only a file that is not a link and is its user's (the module never writes to another's: O_EXCL).
# Its errors are dropped: over SSH with a terminal they would come with the output.
POLL = ('exec 2>/dev/null; f="${{TMPDIR:-/tmp}}/pg_migrate-progress-{token}.jsonl"; t=0; while :; do '
        'if [ -f "$f" ] && [ ! -h "$f" ] && [ -O "$f" ]; then '
        '[ {seen} = 0 ] && {{ echo here; break; }}; [ "$(wc -c < "$f")" -gt {offset} ] && break; '
        'elif [ {seen} = 1 ]; then echo gone; exit 0; fi; '
        '[ $t -ge {ticks} ] && exit 0; sleep 0.2 2>/dev/null || sleep 1; t=$((t+1)); done; '
        'tail -c +{start} "$f"')
# Before the file is there (the module starting on the host), one poll waits this long.
FIRST_WAIT = 30
# Connections whose commands may run beside the module's (checked for ansible-core 2.19): others get the
# events in the result only.
LIVE_CONNECTIONS = {"local", "ssh", "paramiko_ssh", "docker"}
# The first words of a statement shown in a progress line.
SHOWN_SQL = 72
# The statements a progress view's command comes from, by their first words (upper case); an index also
# comes from ALTER TABLE ... ADD PRIMARY KEY, UNIQUE or EXCLUDE.
COMMAND_WORDS = {"CREATE INDEX": ("CREATE", "ALTER"), "CREATE INDEX CONCURRENTLY": ("CREATE",),
                 "REINDEX": ("REINDEX",), "REINDEX CONCURRENTLY": ("REINDEX",), "CLUSTER": ("CLUSTER",),
                 "VACUUM FULL": ("VACUUM",), "VACUUM": ("VACUUM",), "ANALYZE": ("VACUUM", "ANALYZE")}
INDEX_CONSTRAINTS = {"primary", "unique", "exclude"}
# Statements that may do anything, on any table (code, or an index whose table they do not name): they fit
# every event, so that a guess is never shown as the statement.
ANYTHING = {"DO", "CALL", "SELECT", "EXECUTE"}
UNNAMED_TABLE = (["DROP", "INDEX"], ["ALTER", "INDEX"], ["REINDEX", "INDEX"], ["COMMENT", "ON"])


def shown_sql(stmt: str) -> str:
    """A statement's first words, without its comments, on one line."""
    head = stmt[:SHOWN_SQL * 8]
    try:  # the text between the comments, each run of white space (line ends too) as one space
        tokens = [t for t in pg_parser.scan(head) if t.name not in ("SQL_COMMENT", "C_COMMENT")]
        shown = "".join((" " if i and t.start > tokens[i - 1].end + 1 else "") + head[t.start:t.end + 1]
                        for i, t in enumerate(tokens))
    except pg_parser.ParseError:  # a string or comment that the prefix cuts: the words as they stand
        shown = head
    shown = " ".join(shown.split())
    return shown if len(shown) <= SHOWN_SQL else shown[:SHOWN_SQL - 1].rstrip() + "…"


@functools.lru_cache(maxsize=4096)
def statement_words(stmt: str) -> tuple[list[str], set[str]]:
    """The first keywords (upper case) and the names a statement uses (lower case, unquoted)."""
    tokens = [t for t in pg_parser.scan(stmt) if t.name not in ("SQL_COMMENT", "C_COMMENT")]
    texts = [stmt[t.start:t.end + 1] for t in tokens]
    names = {text.strip('"').lower() if text.startswith('"') else text.lower() for text in texts}
    return [text.upper() for text in texts[:4]], names


def fits(event: dict, table: str, words: list[str], names: set[str]) -> bool:
    """Whether a statement can be the one an event is about: a progress view's command on that table, or
    for a lock wait any statement on it; a statement that may do anything always can."""
    first = words[0] if words else ""
    if first in ANYTHING or (event.get("waiting_for") and words[:2] in UNNAMED_TABLE):
        return True
    if table not in names:
        return False
    command = event.get("command")
    if command is None:
        return bool(event.get("waiting_for"))
    if first == "ALTER":
        return command == "CREATE INDEX" and bool(INDEX_CONSTRAINTS & names)
    if first == "CREATE" and "INDEX" not in words:
        return False
    return first in COMMAND_WORDS.get(command, ())


@functools.lru_cache(maxsize=16)
def statements_of(text: str) -> tuple[list[slice], Lines]:
    """A transactional file's statements and line table, read once however many events name it."""
    return split(text)[0], Lines(text)


def where_running(text: str, finding: dict, event: dict) -> dict:
    """The line and first words of the statement an event is about, from the file as read here.

    A no-transaction file runs statement by statement, and the module names it. A transactional file runs
    whole, so PostgreSQL cannot say which of its statements runs: the one statement that fits what the
    server reports (the progress view's command and table, or the table of the lock it waits for) is
    named; otherwise the lines of those that fit, or of the whole file."""
    text = text.removeprefix(BOM)
    if finding.get("statements") is not None and event.get("statement") is not None:
        start, end, line, _once = finding["statements"][event["statement"]]
        return {"line": line, "sql": shown_sql(text[start:end])}
    slices, lines = statements_of(text)
    if len(slices) == 1:
        return {"line": lines.at(slices[0].start), "sql": shown_sql(text[slices[0]])}
    relation = event.get("relation") or (event.get("waiting_for") or {}).get("relation")
    found = []
    if relation and not relation.isdigit():  # a table of this transaction has no name to find
        table = relation.rsplit(".", 1)[-1].strip('"').lower()
        found = [piece for piece in slices if fits(event, table, *statement_words(text[piece]))]
    if len(found) == 1:
        return {"line": lines.at(found[0].start), "sql": shown_sql(text[found[0]])}
    return {"line": None, "lines": [lines.at(piece.start) for piece in found or slices], "sql": None}


def progress_line(host: str, event: dict) -> str:
    """The line an operator sees: host, file, line, the statement's first words, the time so far, and what
    PostgreSQL says the session is doing."""
    if event.get("line") is not None:
        where = f"line {event['line']} ({event['sql']})"
    elif len(event.get("lines") or []) > 1:
        lines = event["lines"]
        where = "one of the statements at lines " + ", ".join(map(str, lines[:6])) + (", ..." if len(lines) > 6
                                                                                      else "")
    else:
        where = "(comments only)"
    if event.get("finished"):
        return f"progress: [{host}] {event['migration']} {where}: {event['text']}"
    # The attempt under lock retries, once it matters: waiting for a lock, or after the first.
    retried = event.get("attempts", 1) > 1 and (event.get("attempt", 1) > 1 or "waiting_for" in event
                                                 or "holders" in event)
    tries = f", attempt {event['attempt']} of {event['attempts']}" if retried else ""
    return f"progress: [{host}] {event['migration']} {where}, {event['elapsed_s']:g} s{tries}: {event['text']}"


class ProgressReader(threading.Thread):
    """Prints the module's progress events while it runs: from `interval` seconds after the module started,
    reads what the module added to its progress file, with a command of its own on the task's connection
    (over SSH, a new channel of the same connection), and shows each event with Ansible's display.

    It works on a copy of the connection and of its become plugin, which keep per-command state, so that
    the module's own command is never disturbed. Whatever goes wrong here, the task's result is the
    module's: the reader stops, and says why once."""

    def __init__(self, action: ActionBase, host: str, interval: int, token: str,
                 where: Callable[[dict], dict]) -> None:
        super().__init__(name="pg_migrate-progress", daemon=True)
        self.action = copy.copy(action)
        self.action._connection = copy.copy(action._connection)
        if self.action._connection.become is not None:
            self.action._connection.become = copy.copy(self.action._connection.become)
        self.environment = action._compute_environment_string()  # the module's TMPDIR, when the task sets one
        self.host, self.interval, self.token, self.where = host, interval, token, where
        self.stopped = threading.Event()
        self.shown: set[int] = set()
        self.lock = threading.Lock()  # the shown events, and the terminal: the finish prints the rest in order
        self.finishing = False
        self.seen = False

    def run(self) -> None:
        try:
            self.read()
        except Exception as exc:  # the module's result is what counts: say once that the lines stop here
            display.warning(f"pg_migrate: the progress of {self.host} is not shown live from here on "
                            f"({type(exc).__name__}: {exc}); the JSON report keeps it")

    def read(self) -> None:
        if self.stopped.wait(self.interval):
            return
        offset = 0
        while not self.stopped.is_set():
            command = POLL.format(token=self.token, offset=offset, start=offset + 1, seen=int(self.seen),
                                  ticks=(self.interval if self.seen else FIRST_WAIT) * 5)
            if self.environment:
                command = f"{self.environment} /bin/sh -c {shlex.quote(command)}"
            out = self.action._low_level_execute_command(command)["stdout"]
            # Over SSH with a terminal, line ends come as \r\n; a line being written is read next time.
            lines = out[:out.rfind("\n") + 1].replace("\r\n", "\n").splitlines()
            if lines[:1] == ["gone"]:
                return
            if lines[:1] == ["here"]:
                self.seen, lines = True, lines[1:]
            offset += sum(len(line.encode()) + 1 for line in lines)
            for line in lines:
                if line.startswith("{"):  # anything else is the shell's, not the module's
                    self.show(json.loads(line))

    def show(self, event: dict) -> None:
        with self.lock:
            if self.finishing or event["seq"] in self.shown:
                return
            self.shown.add(event["seq"])
            print_progress(progress_line(self.host, {**event, **self.where(event)}))

    def finish(self, result: dict) -> None:
        """After the module: stop reading (waiting briefly for a read under way, once the file was there),
        then print in order the events not shown live (locate_progress has named their statements)."""
        self.stopped.set()
        if self.seen:
            self.join(2)
        with self.lock:
            self.finishing = True
            for statement in result.get("progress") or []:
                for event in statement.get("events", []) if isinstance(statement, dict) else []:
                    if isinstance(event, dict) and event.get("seq") not in self.shown:
                        print_progress(progress_line(self.host, event))


def print_progress(line: str) -> None:
    """A progress line, on standard error (as warnings are): standard output stays the callback's, which
    may be JSON for a machine to read."""
    display.display(line, color=C.COLOR_VERBOSE, stderr=True)


def locate_progress(result: dict, where: Callable[[dict], dict]) -> None:
    """Add to each event and statement of the result the line and first words of its statement; a statement
    is the one its events named, when they named one."""
    for statement in result.get("progress") or []:
        if not isinstance(statement, dict) or not isinstance(statement.get("events"), list):
            continue
        for event in statement["events"]:
            event.update(where(event))
        located = [e for e in statement["events"] if e.get("line") is not None]
        statement.update({k: v for k, v in (located[-1] if located else where(statement)).items()
                          if k in ("line", "lines", "sql")})


INTERNAL_OPTIONS = ("_findings", "_migrations_path", "_migrations_sha256", "_controller_pid", "_progress_token")


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
        args = {key: value for key, value in self._task.args.items() if key not in INTERNAL_OPTIONS}
        migrations = args.get("migrations", {})
        if not isinstance(migrations, dict) or not all(isinstance(text, str) for text in migrations.values()):
            raise AnsibleActionFail("pg_migrate: migrations must be a mapping of file name to SQL text")
        findings = {name: found for name, text in migrations.items() if (found := analyse(str(name), text))}
        schema = args.get("expected_schema")
        schema_size = len(json.dumps(schema)) if isinstance(schema, dict) else 0
        if sum(len(text) for text in migrations.values()) + schema_size <= INLINE_LIMIT:
            args["_findings"] = findings
        else:  # the temporary directory goes with the task (ActionBase.cleanup), whatever happens
            path = self._connection._shell.join_path(self._make_tmp_path(), "pg_migrate-migrations.json")
            data = json.dumps({"migrations": migrations, "findings": findings, "expected_schema": schema}).encode()
            args["expected_schema"] = None
            self._transfer_data(path, data)
            self._fixup_perms2((self._connection._shell.tmpdir, path))
            args.update(migrations={}, _migrations_path=path, _migrations_sha256=hashlib.sha256(data).hexdigest())
        if self._connection.transport == "local":  # the module watches this process (see controller_chain)
            args["_controller_pid"] = os.getpid()
        def where(event: dict) -> dict:
            return where_running(migrations[event["migration"]], findings.get(event["migration"], {}), event)

        try:
            reader = self.progress_reader(args, where, task_vars)
        except Exception as exc:  # progress never stops a deploy
            display.warning(f"pg_migrate: progress is not shown live ({type(exc).__name__}: {exc})")
            reader = None
        try:
            module_result = self._execute_module(module_name="pg_migrate", module_args=args, task_vars=task_vars)
        finally:
            if reader is not None:
                reader.stopped.set()
        try:
            locate_progress(module_result, where)
            if reader is not None:
                reader.finish(module_result)
        except Exception as exc:  # the result stays the module's
            display.warning(f"pg_migrate: the progress events could not be read back ({type(exc).__name__}: {exc})")
        result.update(module_result)
        return result

    def progress_reader(self, args: dict, where: Callable[[dict], dict], task_vars: dict) -> ProgressReader | None:
        """Started before a deploy, when progress_interval asks for it (the module refuses a bad value). A plan,
        a verify and a drop run no migration; a task with no_log shows nothing; a connection not checked
        here gets the events in the result only."""
        try:
            interval = int(args.get("progress_interval", 5))
        except (TypeError, ValueError):
            return None
        if interval <= 0 or self._play_context.check_mode or self._task.no_log or any(
                boolean(args.get(key, False), strict=False) for key in ("verify", "drop_schema", "plan_out")) or \
                resource_from_fqcr(self._connection.transport) not in LIVE_CONNECTIONS:
            return None
        args["_progress_token"] = secrets.token_hex(16)
        reader = ProgressReader(self, task_vars.get("inventory_hostname", "?"), interval, args["_progress_token"],
                                where)
        reader.start()
        return reader
