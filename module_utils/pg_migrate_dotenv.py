# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""The backend's .env file, read on the host as python-dotenv (1.2) reads it, and the connection settings
it holds. Messages name the file, the line or the key, never a value."""

from __future__ import annotations

import codecs
import os
import pwd
import re
import stat

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


# The backend's connection settings, in the order a message lists them.
LOGIN_KEYS = ("POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB")
PORT_RE = re.compile(r"^[0-9]{1,5}$")


def read_login(path: str, overrides: dict[str, object]) -> dict[str, str]:
    """The connection settings: the file's POSTGRES_* keys, each replaced by its override when one is set
    (not None). Only the keys without an override must be in the file, which is not read when none is."""
    required = [key for key in LOGIN_KEYS if overrides.get(key) is None]
    values: dict[str, str | None] = {}
    if required:
        text = read_file(path)
        if text is None:
            raise DotenvError(f"The .env file {path} does not exist on this host; it must set "
                              f"{', '.join(required)} (see the README's .env contract)")
        values = expand(parse(text, path), dict(os.environ))
        absent = [key for key in required if not values.get(key)]
        if absent:
            raise DotenvError(f"The .env file {path} does not set {', '.join(absent)} (missing or empty): add "
                              f"{'them' if len(absent) > 1 else 'it'} as KEY=value lines")
    login = {key: str(overrides[key]) if overrides.get(key) is not None else values.get(key) or "" for key in LOGIN_KEYS}
    nul = [key for key, value in login.items() if "\0" in value]
    if nul:  # libpq takes C strings: the value would end there
        raise DotenvError(f"{', '.join(nul)} in {path} (or the role variable that overrides it) holds a NUL "
                          "character, which no PostgreSQL connection can carry: fix the value")
    if not PORT_RE.match(login["POSTGRES_PORT"]) or not 0 < int(login["POSTGRES_PORT"]) < 65536:
        raise DotenvError(f"POSTGRES_PORT in {path} is not a port number (digits only, e.g. 5432)")
    return login
