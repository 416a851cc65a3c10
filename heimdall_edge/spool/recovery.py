"""What opening the spool repairs after a crash: tmp/, captures/ and the index agree again."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from heimdall_edge.spool import durable
from heimdall_edge.spool.errors import SpoolError, SpoolUnavailable
from heimdall_edge.spool.record import (
    CAPTURE_ID,
    INDEX_NAME,
    RECORD_NAME,
    CaptureRecord,
    check_file,
    read_record,
    record_row,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    """What opening the spool repaired; all zero after a clean shutdown."""

    ran: bool = True
    """False when another process had the spool open: repairing under it would break its writes."""
    index_rebuilt: bool = False
    staging_removed: int = 0
    """Captures left in tmp/: never acknowledged, so dropping them loses nothing promised."""
    temp_files_removed: int = 0
    unlisted_files_removed: int = 0
    """Files from an add_file that crashed before capture.json listed them."""
    reindexed: int = 0
    rows_repaired: int = 0
    rows_dropped: int = 0
    quarantined: int = 0
    unreadable_now: int = 0
    """Captures a transient error (EIO, EACCES, EMFILE) kept from being checked: left as they are."""


class Recovery:
    """The repairs, mixed into Spool: they use its folders, its index and its transactions.

    Only the first process to open a spool runs them (another may be writing to it).
    """

    root: Path
    _captures: Path
    _tmp: Path
    _quarantine: Path
    _db: sqlite3.Connection

    def _set_index_aside(self, exc: durable.IndexDamaged) -> None:
        """Move a damaged index to quarantine; the capture folders rebuild it."""
        target = durable.free_name(
            self._quarantine, f"{INDEX_NAME}.{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
        )
        for suffix in durable.SQLITE_SUFFIXES:
            source = self.root / (INDEX_NAME + suffix)
            if source.exists():
                os.rename(source, target.with_name(target.name + suffix))
        durable.fsync_dir(self._quarantine)
        durable.fsync_dir(self.root)
        log.warning(
            "spool index %s is damaged (%s): moved it to %s, rebuilding it from the capture folders",
            self.root / INDEX_NAME, exc, target,
        )  # fmt: skip

    def _recover(self, index_rebuilt: bool) -> RecoveryReport:
        """Bring tmp/, captures/ and the index back to agreement after a crash."""
        counts: Counter[str] = Counter()
        for entry in _entries(self._tmp):
            durable.remove(entry)
            counts["staging_removed"] += 1
            log.info("removed %s: a capture interrupted before it was acknowledged", entry)
        if counts["staging_removed"]:
            durable.fsync_dir(self._tmp)
        rows = dict(self._db.execute("SELECT capture_id, record FROM captures").fetchall())
        on_disk: set[str] = set()
        quarantined: set[str] = set()
        with self._transaction():
            for entry in _entries(self._captures):
                try:
                    record, problem = self._check_capture(entry, counts)
                except SpoolUnavailable as exc:  # trouble, not damage: leave it as it is
                    on_disk.add(entry.name)
                    counts["unreadable_now"] += 1
                    log.warning("capture %s not checked at start-up: %s", entry.name, exc)
                    continue
                if record is None:
                    self._quarantine_entry(entry, problem)
                    quarantined.add(entry.name)
                    continue
                on_disk.add(record.capture_id)
                row = rows.get(record.capture_id)
                if row != record_row(record):
                    self._put_row(record)
                    counts["reindexed" if row is None else "rows_repaired"] += 1
            for capture_id in rows.keys() - on_disk:
                self._db.execute("DELETE FROM captures WHERE capture_id = ?", (capture_id,))
                if capture_id in quarantined:
                    continue  # already logged
                counts["rows_dropped"] += 1
                log.warning("capture %s was in the index but its folder is gone", capture_id)
        report = RecoveryReport(index_rebuilt=index_rebuilt, quarantined=len(quarantined), **counts)
        if counts or quarantined:
            log.info("spool %s repaired: %s", self.root, report)
        return report

    def _check_capture(
        self, folder: Path, counts: Counter[str]
    ) -> tuple[CaptureRecord | None, str]:
        """The record of a whole, intact capture folder, or None and what is wrong with it."""
        if folder.is_symlink() or not folder.is_dir():
            return None, "not a capture folder"
        if not CAPTURE_ID.fullmatch(folder.name):
            return None, "the folder name is not a capture id"
        for entry in _entries(folder):
            if entry.name.startswith(durable.TEMP_PREFIX):
                durable.remove(entry)
                counts["temp_files_removed"] += 1
        try:
            record = read_record(folder)
        except SpoolError as exc:
            return None, str(exc)
        # Sizes only: hashing a 2 GB backlog on an SD card takes longer than systemd waits
        # for READY. Every byte is checked against its SHA-256 before upload (verify).
        for name, info in record.files.items():
            problem = check_file(folder / name, info, full_check=False)
            if problem:
                return None, problem
        for entry in _entries(folder):
            if entry.name != RECORD_NAME and entry.name not in record.files:
                durable.remove(entry)
                counts["unlisted_files_removed"] += 1
                log.info(
                    "removed %s: not listed in its %s (interrupted add_file)", entry, RECORD_NAME
                )
        return record, ""

    def _quarantine_entry(self, entry: Path, reason: str) -> None:
        target = durable.free_name(self._quarantine, entry.name)
        os.rename(entry, target)
        durable.fsync_dir(self._quarantine)
        durable.fsync_dir(entry.parent)
        log.warning("quarantined capture %s: %s (moved to %s)", entry.name, reason, target)


def _entries(folder: Path) -> list[Path]:
    return sorted(Path(entry.path) for entry in os.scandir(folder))
