"""README.md's ``c3dzoo`` command lines stay true to the command line: every line of its code
blocks parses with today's options, and every option its prose names (``c3dzoo train --val-clips
N``) exists for that command (a renamed or removed option fails here)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex

import pytest

from c3dzoo.cli import build_parser

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def _block_lines():
    """The command lines of the fenced code blocks (comments cut, continued lines joined)."""
    lines = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", _readme(), re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("c3dzoo "):
                lines.append(line)
    return lines


def _prose_spans():
    """Inline code spans of the prose that start with ``c3dzoo COMMAND``."""
    return re.findall(r"`(c3dzoo [a-z][^`]*)`", _readme())


def test_readme_shows_commands():
    assert len(_block_lines()) >= 20 and len(_prose_spans()) >= 5


@pytest.mark.parametrize("line", _block_lines())
def test_readme_command_parses(line):
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            build_parser().parse_args(shlex.split(line)[1:])
    except SystemExit:
        pytest.fail(f"README's {line!r} does not parse: {errors.getvalue().strip()}")


@pytest.mark.parametrize("span", _prose_spans())
def test_readme_prose_names_real_options(span):
    words = span.split()
    commands = build_parser().subparsers
    assert words[1] in commands, f"README names {words[1]!r}, not a c3dzoo command ({', '.join(commands)})"
    known = commands[words[1]]._option_string_actions
    unknown = [w for w in words[2:] if w.startswith("--") and w.split("=")[0] not in known]
    assert not unknown, f"README's {span!r}: c3dzoo {words[1]} has no {', '.join(unknown)}"
