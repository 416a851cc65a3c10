"""What syncing reports: one capture's outcome, a pass's report, progress, running totals.

Shared by the upload of one capture, the pass over the spool and the service loop,
and read by the CLI (`sync --json`) and the appliance's status line.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from heimdall_edge.cloud.errors import ErrorKind

log = logging.getLogger(__name__)

SYNC_OFF = "sync off: no bucket set (HEIMDALL_S3_BUCKET); captures stay on the device"

TOTALS = ("synced", "bytes", "failed", "quarantined")
"""Counters kept since the syncer started, shown by status() with the keeper's."""


class Outcome(enum.Enum):
    SYNCED = "synced"
    ALREADY_SYNCED = "already_synced"  # another process (the CLI, the service) got there first
    QUARANTINED = "quarantined"
    GONE = "gone"  # deleted (quota, another process) while we looked at it
    CHANGED = "changed"  # a new revision came while this one went up: still pending


@dataclass(frozen=True)
class CaptureResult:
    capture_id: str
    outcome: Outcome
    bytes: int = 0
    """Bytes uploaded now (objects written, not those already there)."""
    written: int = 0
    """Objects and index items written now."""
    already_there: int = 0
    """Objects and index items an earlier, interrupted attempt had already put."""
    keys: dict[str, str] | None = None


@dataclass
class SyncReport:
    """What one pass did; `error` is the first store error, in words safe to log and show."""

    synced: int = 0
    """Captures confirmed in S3 (and the index) and marked synced in this pass."""
    bytes: int = 0
    """Bytes uploaded (files written now, not those found already there)."""
    written: int = 0
    """Objects and index items written."""
    already_there: int = 0
    """Objects and index items an earlier, interrupted attempt had already stored."""
    failed: int = 0
    """Captures attempted that did not make it (they stay pending, unless marked failed)."""
    quarantined: int = 0
    """Captures whose files no longer match their SHA-256: moved to quarantine/, not sent."""
    evicted: int = 0
    """Captures evicted to keep the spool under its quota."""
    expired: int = 0
    """Synced captures deleted because they outlived retention_days."""
    waiting: int = 0
    """Pending captures left for later: their turn is still being recorded."""
    pending: int = 0
    """Pending captures still in the spool after the pass."""
    aborted_uploads: int = 0
    reached_store: bool = False
    """Whether the store answered at least once in this pass."""
    error: str | None = None
    error_kind: ErrorKind | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.failed == 0

    def summary(self) -> str:
        parts = [f"{self.synced} synced ({self.bytes} bytes uploaded)"]
        if self.already_there:
            parts.append(f"{self.already_there} already there")
        for name in ("failed", "quarantined", "evicted", "expired", "waiting", "pending"):
            if value := getattr(self, name):
                parts.append(f"{value} {name}")
        text = ", ".join(parts)
        return f"{text}; error: {self.error}" if self.error else text

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["error_kind"] = self.error_kind.value if self.error_kind else None
        return data


@dataclass(frozen=True)
class SyncProgress:
    """Passed to sync_once's `progress` after each file and each capture (in the event loop)."""

    captures_total: int
    captures_done: int
    bytes_total: int
    bytes_done: int
    capture_id: str | None = None


Progress = Callable[[SyncProgress], None]


@dataclass
class Tally:
    """A pass's progress so far, from which each SyncProgress is taken."""

    captures_total: int
    bytes_total: int
    captures_done: int = 0
    bytes_done: int = 0

    def snapshot(self, capture_id: str | None) -> SyncProgress:
        return SyncProgress(
            self.captures_total, self.captures_done, self.bytes_total, self.bytes_done, capture_id
        )


def call_progress(progress: Progress | None, snapshot: SyncProgress) -> None:
    """Tell the caller; a failing callback is logged, never a reason to stop syncing."""
    if progress is None:
        return
    try:
        progress(snapshot)
    except Exception:
        log.exception("sync progress callback failed")


class Totals:
    """Counters since the syncer started (TOTALS), bumped by uploads in any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {name: self._counts.get(name, 0) for name in TOTALS}


@dataclass
class SyncState:
    """What status() says of the syncer: written by its passes and by its service loop."""

    state: str
    last_success_at: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None

    def note(self, report: SyncReport, now: datetime) -> None:
        """Remember a pass's last error and last success."""
        if report.error is not None and report.error_kind is not None:
            self.last_error, self.last_error_at = report.error, now
        elif report.failed:
            self.last_error, self.last_error_at = "captures failed (see the log)", now
        if report.synced or (report.reached_store and report.ok):
            self.last_success_at = now
