"""The shared models and recordings: where the environment says, else beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]


def shared_dir(env: str, name: str) -> Path:
    """`$env`, else `../shared/NAME` beside the checkout; FileNotFoundError says which and where."""
    path = Path(os.environ.get(env) or CHECKOUT.parent / "shared" / name)
    if not path.is_dir():
        raise FileNotFoundError(f"{name} not found at {path}: set {env}")
    return path
