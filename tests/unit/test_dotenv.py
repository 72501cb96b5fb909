"""The .env reader against python-dotenv, without a server: what it accepts, what it refuses, and that it
never shows a line."""

from __future__ import annotations

import io
import os
import warnings

import dotenv
import dotenv.parser
import pytest
from ansible.module_utils import pg_migrate_dotenv as dr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Pieces that exercise every rule of the grammar, mixed with arbitrary text.
PIECES = st.sampled_from([
    "export ", "KEY", "POSTGRES_PASSWORD", "A", "=", " = ", "'", '"', "\\", "\\'", '\\"', "\\n", "#", " #", "\n",
    "\r\n", "\r", "\t", " ", "${A}", "${B:-dflt}", "${", "}", ":-", "$A", "\ufeff", "é", "😀", "\x00", "\x0b", "'k k'",
])


DOTENV_TEXT = st.lists(st.one_of(PIECES, st.text(max_size=8)), max_size=40).map("".join)


def python_dotenv(text: str) -> tuple[bool, dict]:
    """What python-dotenv gives, and whether it had to skip a line it could not parse."""
    broken = any(b.error for b in dotenv.parser.parse_stream(io.StringIO(text)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return broken, dict(dotenv.dotenv_values(stream=io.StringIO(text)))


def ours(text: str) -> dict:
    return dr.expand(dr.parse(text), dict(os.environ))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DOTENV_TEXT)
def test_parser_agrees_with_python_dotenv_or_fails_clearly(text):
    # Files are read in text mode, as python-dotenv reads them: line endings arrive as \n.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    broken, expected = python_dotenv(text)
    if broken:
        with pytest.raises(dr.DotenvError, match=r"^\.env: line \d+ cannot be parsed"):
            ours(text)
    else:
        assert ours(text) == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_binary_garbage_is_refused_or_parsed_like_python_dotenv(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("env") / ".env"
    path.write_bytes(data)
    try:
        text = dr.read_file(str(path))
    except dr.DotenvError as exc:
        assert str(exc).startswith(f"{path} is not UTF-8 text (invalid byte at offset ")
        return
    broken, expected = python_dotenv(text)
    if broken:
        with pytest.raises(dr.DotenvError):
            ours(text)
    else:
        assert ours(text) == expected


def test_huge_line_and_huge_file():
    value = "x" * 2_000_000
    assert ours(f"A={value}\n" + "B=1\n" * 50_000) == {"A": value, "B": "1"}


def test_parse_errors_never_show_the_line():
    with pytest.raises(dr.DotenvError) as err:
        ours("OK=1\nSECRET=\"s3cr3t never closed\nX=2\n")
    assert "s3cr3t" not in str(err.value) and "line 2" in str(err.value)
