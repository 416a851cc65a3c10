"""Text compared the way word error rates compare it, by tests and benchmarks alike."""

from __future__ import annotations

import re


def words(text: str) -> str:
    """Text reduced to lowercase words, for word error rates."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())
