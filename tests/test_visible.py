"""`visible`: what a terminal would act on is shown as an escape; everything else is left alone."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from heimdall_edge.app.visible import VisibleFormatter, visible, visible_json


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b[2J\x1b]0;pwned\x07", "\\x1b[2J\\x1b]0;pwned\\x07"),
        ("line\nnext\ttab\rback", "line\\nnext\\ttab\\rback"),
        ("\x9b31m\x7f\x00", "\\x9b31m\\x7f\\x00"),  # 8-bit CSI, DEL, NUL
        ("\u202eevil\u202c \u2066x\u2069 a\u2028b", "\\u202eevil\\u202c \\u2066x\\u2069 a\\u2028b"),
        ("lone \ud800 surrogate", "lone \\ud800 surrogate"),  # would not even encode
        (
            "caf\u00e9 \u2713 \u4f60\u597d \U0001f600 \u00a0 \\x1b",
            "caf\u00e9 \u2713 \u4f60\u597d \U0001f600 \u00a0 \\x1b",
        ),
    ],
)
def test_active_characters_are_escaped_and_the_rest_kept(text: str, shown: str) -> None:
    assert visible(text) == shown
    shown.encode("utf-8")  # printable on any UTF-8 terminal


def test_multiline_keeps_newlines_only() -> None:
    assert visible("a\nb\x1b[0m\tc", multiline=True) == "a\nb\\x1b[0m\\tc"


def test_json_stays_the_same_value() -> None:
    value = {"reply": "A\x1b]0;x\x07 \x9b \u202e \u2028 \ud800 caf\u00e9 \U0001f600"}
    document = visible_json(json.dumps(value, ensure_ascii=False))
    assert json.loads(document) == value
    assert visible(document) == document  # nothing active left in it
    assert "caf\u00e9 \U0001f600" in document


def test_log_lines_are_visible_with_their_tracebacks() -> None:
    try:
        raise ValueError("cloud said \x1b[2J")
    except ValueError:
        caught = sys.exc_info()
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "reply %r: %s", ("ok", "\x1b]0;t\x07"), caught
    )
    line = VisibleFormatter("%(levelname)s %(message)s").format(record)
    assert line.startswith("ERROR reply 'ok': \\x1b]0;t\\x07\nTraceback")
    assert line.endswith("ValueError: cloud said \\x1b[2J")
