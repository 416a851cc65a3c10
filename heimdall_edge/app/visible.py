"""Text from the cloud or a capture record, made safe to print on an operator's terminal.

A reply is steered by what the camera sees, so it can hold anything, escape
sequences included: ESC [2J clears the screen, ESC ] 0;... BEL retitles the
window, and worse. Before such text reaches a terminal, every character a
terminal acts on is shown as an escape instead (ESC as \\x1b, a newline as \\n):
C0 and C1 controls, DEL, the bidirectional overrides that reorder what is shown,
line and paragraph separators, and lone surrogates (which cannot even be
encoded). Every other character, printable Unicode included, is left as it is.
"""

from __future__ import annotations

import logging
import re

_ACTIVE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)
"""Characters a terminal acts on, or that hide or reorder the text around them."""
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(char: str) -> str:
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def visible(text: str, *, multiline: bool = False) -> str:
    """`text` with every active character shown as an escape; `multiline` keeps newlines."""

    def shown(match: re.Match[str]) -> str:
        char = match.group()
        return char if multiline and char == "\n" else _escape(char)

    return _ACTIVE.sub(shown, text)


def visible_json(document: str) -> str:
    """A JSON document with the active characters json.dumps(ensure_ascii=False) leaves raw
    (DEL, C1, bidirectional overrides, separators, lone surrogates) as \\u escapes: the same
    value, safe on a terminal. (They can only be inside strings, where \\u is always valid.)"""
    return _ACTIVE.sub(lambda match: f"\\u{ord(match.group()):04x}", document)


class VisibleFormatter(logging.Formatter):
    """Log lines as `visible` shows them, newlines kept (a traceback has them)."""

    def format(self, record: logging.LogRecord) -> str:
        return visible(super().format(record), multiline=True)
