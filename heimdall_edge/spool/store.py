"""Durable capture store: every capture is safe on disk before anything else happens.

A capture is a folder of write-once files plus `capture.json`, which records each
file's size and SHA-256. The folders are the truth; `index.sqlite3` (WAL) is a
fast catalogue that is repaired from them whenever the two disagree. A capture
is staged in `tmp/` and renamed into `captures/` only when it is complete and
fsynced, so a crash or a power cut leaves a whole capture or none, never half.

The API blocks (fsync is slow on an SD card): the service calls it through
`asyncio.to_thread`. One Spool may be shared by threads; several processes (the
service and the CLI) may open the same spool, and only the first one repairs it.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from heimdall_edge.capture import Trigger
from heimdall_edge.spool import durable, lease
from heimdall_edge.spool.errors import (
    CaptureChangedError,
    CaptureNotFoundError,
    SpoolError,
    SpoolFullError,
    SpoolUnavailable,
)
from heimdall_edge.spool.record import (
    AUDIO_NAME,
    CAPTURE_ID,
    CONTENT,
    FILE_NAME,
    INDEX_NAME,
    RECORD_NAME,
    SYNC_STATES,
    UPDATABLE,
    CaptureRecord,
    SyncState,
    check_file,
    file_info,
    new_capture_id,
    read_record,
    record_file_bytes,
    record_row,
    to_ms,
    validated,
)
from heimdall_edge.spool.recovery import Recovery, RecoveryReport

log = logging.getLogger(__name__)

LOCK_NAME = "spool.lock"
EVICT_LOCK_NAME = "evict.lock"
BUSY_TIMEOUT_S = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS captures (
    capture_id TEXT PRIMARY KEY,
    sync_state TEXT NOT NULL,
    record TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS captures_by_sync_state ON captures (sync_state, capture_id);
"""


class Spool(Recovery):
    """The capture store under one root folder; safe to share between threads.

    Opening it repairs whatever a crash left behind (see `recovered`). Close it (or
    use it as a context manager) so another process can repair it later.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._captures = self.root / "captures"
        self._tmp = self.root / "tmp"
        self._quarantine = self.root / "quarantine"
        self._lock = threading.RLock()
        self._evicting = threading.Lock()
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            for folder in (self.root, self._captures, self._tmp, self._quarantine):
                durable.make_private_dir(folder)
            durable.fsync_dir(self.root)
            durable.fsync_dir(self.root.parent)
            self._lock_fd = durable.open_private_file(self.root / LOCK_NAME)
        except OSError as exc:
            raise SpoolError(
                f"cannot open the spool at {self.root}: {exc}; "
                "check that the state directory is writable by this user"
            ) from exc
        try:
            self.recovered = self._open()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _open(self) -> RecoveryReport:
        """Take the cross-process lock, open the index and, if first in, repair."""
        owner = durable.lock_first_opener(self._lock_fd)  # waits while another opener repairs
        rebuilt = False
        try:
            try:
                self._db = _connect(self.root / INDEX_NAME)
            except durable.IndexDamaged as exc:
                if not owner:
                    raise SpoolError(
                        f"the spool index {self.root / INDEX_NAME} is damaged ({exc}) and another "
                        "process has the spool open: stop it, then open the spool again"
                    ) from exc
                self._set_index_aside(exc)
                self._db = _connect(self.root / INDEX_NAME)
                rebuilt = True
        except (OSError, sqlite3.Error) as exc:
            if durable.is_disk_full(exc):
                raise self._storage_error(exc, "its index cannot be opened") from exc
            raise SpoolError(
                f"cannot open the spool index {self.root / INDEX_NAME}: {exc}"
            ) from exc
        if not owner:
            log.info("spool %s is open in another process; it did the repairs", self.root)
            return RecoveryReport(ran=False)
        try:
            report = self._recover(rebuilt)
        except (OSError, sqlite3.Error) as exc:
            self._db.close()
            raise SpoolError(f"cannot repair the spool at {self.root}: {exc}") from exc
        durable.share_lock(self._lock_fd)  # others may open it now
        return report

    def close(self) -> None:
        """Release the index and the lock, so another process can open and repair the spool."""
        with self._lock:
            if self._lock_fd < 0:
                return
            self._db.close()
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def create(
        self,
        *,
        device_id: str,
        trigger: Trigger,
        audio_wav: bytes,
        frames: Sequence[bytes],
        created_at: datetime | None = None,
        leased: bool = False,
    ) -> CaptureRecord:
        """Store a new capture; once this returns it survives a crash or a power cut.

        `leased`: this process goes on recording its turn (the transcript, the reply),
        and says so in the record until an update sets `lease=None`. Raises
        SpoolFullError when the disk is full, and then nothing of it is kept.
        """
        when = to_ms(created_at or datetime.now(UTC))
        capture_id = new_capture_id(when)
        contents = {AUDIO_NAME: audio_wav}
        contents.update({f"frame-{i:02d}.jpg": frame for i, frame in enumerate(frames)})
        record = validated(
            CaptureRecord(
                capture_id=capture_id,
                device_id=device_id,
                created_at=when,
                trigger=trigger,
                files={name: file_info(data) for name, data in contents.items()},
                lease=lease.this_process() if leased else None,
            )
        )
        staging, final = self._tmp / capture_id, self._captures / capture_id
        published = False
        try:
            durable.make_private_dir(staging, exist_ok=False)
            try:
                for name, data in contents.items():
                    durable.write_new_file(staging / name, data)
                durable.write_new_file(staging / RECORD_NAME, record_file_bytes(record))
                durable.fsync_dir(staging)
                os.rename(staging, final)
                published = True
                durable.fsync_dir(self._captures)
            except BaseException:
                # Out of captures/ in one rename, so a crash here cannot leave half of it.
                if published:
                    with contextlib.suppress(OSError):
                        os.rename(final, staging)
                shutil.rmtree(staging, ignore_errors=True)
                raise
        except OSError as exc:
            raise self._storage_error(exc, "the capture was not stored") from exc
        try:
            with self._transaction():
                self._put_row(record)
        except sqlite3.Error as exc:
            # Durable already: the folder is the truth and the index a copy, rebuilt from it.
            log.error(
                "capture %s is kept, but its index row was not written (%s): it is indexed "
                "again when the spool is next opened",
                capture_id,
                exc,
            )
        return record

    def add_file(self, capture_id: str, name: str, data: bytes) -> CaptureRecord:
        """Add a file (say reply.wav) to a capture, durably.

        Files are write-once, so a copy already synced never goes stale.
        """
        if not FILE_NAME.fullmatch(name) or name == RECORD_NAME:
            raise SpoolError(
                f"cannot add a file named {name!r:.80}: use letters, digits, '.', '_' or '-', "
                f"not starting with a dot, and not {RECORD_NAME!r}"
            )
        folder = self._folder(capture_id)
        temp = folder / durable.temp_name()
        renamed = recorded = False
        try:
            durable.write_new_file(temp, data)
            with self._transaction():
                record = read_record(folder)
                if name in record.files:
                    raise SpoolError(
                        f"capture {capture_id} already has {name}: files are write-once, "
                        "add it under another name"
                    )
                files = {**record.files, name: file_info(data)}
                record = validated(
                    dataclasses.replace(
                        record, files=files, revision=record.revision + 1, sync_state="pending"
                    )
                )
                self._put_row(record)
                os.rename(temp, folder / name)
                renamed = True
                durable.fsync_dir(folder)
                durable.replace_file(folder / RECORD_NAME, record_file_bytes(record))
                recorded = True
        except BaseException as exc:
            # capture.json is replaced atomically: if it was not, nothing lists the file
            # (the index row rolled back too), so it goes; once listed, recovery owns it.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name if renamed and not recorded else temp)
            if isinstance(exc, OSError | sqlite3.Error):
                raise self._storage_error(exc, f"{name} was not added to {capture_id}") from exc
            raise
        return record

    def update(self, capture_id: str, /, **fields: Any) -> CaptureRecord:
        """Record what became of a capture (transcript, reply, engines, timings, states).

        A change to its content is a new revision and puts it back to pending (unless
        `sync_state` is given too), so the cloud copy follows.
        """
        unknown = fields.keys() - UPDATABLE
        if unknown:
            raise SpoolError(
                f"cannot update {', '.join(sorted(unknown))} of a capture: "
                f"only {', '.join(sorted(UPDATABLE))} change after it is stored"
            )

        def change(record: CaptureRecord) -> dict[str, Any]:
            if any(getattr(record, k) != v for k, v in fields.items() if k in CONTENT):
                return {"sync_state": "pending", **fields, "revision": record.revision + 1}
            return fields

        record = self._rewrite(capture_id, change, "was not updated")
        assert record is not None
        return record

    def mark_synced(
        self, capture_id: str, revision: int, extra: dict[str, Any]
    ) -> CaptureRecord | None:
        """Mark a capture synced if it is still at the `revision` that was uploaded.

        None if it changed meanwhile (a reply added, a transcript upgraded): it stays
        pending, and the next pass uploads the new revision.
        """

        def change(record: CaptureRecord) -> dict[str, Any] | None:
            return {"sync_state": "synced", "extra": extra} if record.revision == revision else None

        return self._rewrite(capture_id, change, "was not marked synced")

    def _rewrite(
        self,
        capture_id: str,
        change: Callable[[CaptureRecord], dict[str, Any] | None],
        failed: str,
    ) -> CaptureRecord | None:
        """Replace fields of a capture's record (in the index and capture.json, as one);
        `change` says which, from the current record, or None to leave it as it is."""
        folder = self._folder(capture_id)
        try:
            with self._transaction():
                record = read_record(folder)
                fields = change(record)
                if fields is None:
                    return None
                record = validated(dataclasses.replace(record, **fields))
                self._put_row(record)
                durable.replace_file(folder / RECORD_NAME, record_file_bytes(record))
        except (OSError, sqlite3.Error) as exc:
            raise self._storage_error(exc, f"capture {capture_id} {failed}") from exc
        return record

    def get(self, capture_id: str) -> CaptureRecord:
        """A capture's record, from the index: as current as capture.json, and cheaper to read."""
        rows = self._query("SELECT record FROM captures WHERE capture_id = ?", [capture_id])
        row = rows[0] if rows else None
        if row is None:
            raise CaptureNotFoundError(f"no capture {capture_id!r:.80} in the spool at {self.root}")
        return CaptureRecord.from_dict(json.loads(row[0]))

    def list(
        self, limit: int | None = None, sync_state: SyncState | None = None
    ) -> builtins.list[CaptureRecord]:
        """Captures newest first, from the index (no capture folder is read)."""
        if sync_state is not None and sync_state not in SYNC_STATES:
            raise SpoolError(
                f"sync_state must be one of {', '.join(SYNC_STATES)}, got {sync_state!r}"
            )
        if limit is not None and limit < 0:
            raise SpoolError(f"limit must be 0 or more, got {limit}")
        query = "SELECT record FROM captures"
        params: builtins.list[Any] = []
        if sync_state is not None:
            query += " WHERE sync_state = ?"
            params.append(sync_state)
        query += " ORDER BY capture_id DESC"
        if limit is not None:
            query += " LIMIT ?"
            params.append(limit)
        rows = self._query(query, params)
        return [CaptureRecord.from_dict(json.loads(row[0])) for row in rows]

    def counts(self) -> dict[str, int]:
        """Number of captures per sync_state, every state present (zero included)."""
        rows = self._query("SELECT sync_state, COUNT(*) FROM captures GROUP BY sync_state", [])
        return {state: 0 for state in SYNC_STATES} | dict(rows)

    def _query(self, sql: str, params: builtins.list[Any]) -> builtins.list[Any]:
        """Rows of a read from the index; an SQLite error becomes a SpoolError saying what to do."""
        try:
            with self._lock:
                return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise SpoolError(
                f"the spool's index at {self.root / INDEX_NAME} cannot be read now ({exc}): "
                "nothing was changed; if it persists, restart the service to rebuild it"
            ) from exc

    def path(self, capture_id: str) -> Path:
        """The folder of a capture, for readers such as the syncer."""
        return self._folder(capture_id)

    def verify(self, capture_id: str) -> builtins.list[str]:
        """Re-read every file of a capture against its record's SHA-256; [] when all intact.

        Each problem is one short line ("audio.wav does not match the SHA-256 in its
        record", "frame-01.jpg is missing", a capture.json that does not parse).
        Raises CaptureNotFoundError when the capture is gone.
        """
        folder = self._folder(capture_id)
        try:
            record = read_record(folder)
        except SpoolUnavailable:
            raise
        except SpoolError as exc:
            if not folder.is_dir():
                raise CaptureNotFoundError(
                    f"no capture {capture_id!r:.80} in the spool at {self.root}"
                ) from None
            return [str(exc)]
        problems = [
            problem
            for name, info in sorted(record.files.items())
            if (problem := check_file(folder / name, info, full_check=True))
        ]
        if problems and not folder.is_dir():  # deleted while we read it, not damaged
            raise CaptureNotFoundError(f"no capture {capture_id!r:.80} in the spool at {self.root}")
        return problems

    def quarantine(self, capture_id: str, reason: str) -> Path:
        """Move a damaged capture out of the spool into quarantine/ (kept for a person to look at).

        The folder leaves captures/ in one rename and its index row goes in the same
        transaction; a crash in between leaves a row without a folder, which the next
        opening drops. Returns where the folder went.
        """
        with self._lock:
            folder = self._folder(capture_id)
            target = durable.free_name(self._quarantine, capture_id)
            try:
                self._remove_capture(folder, target)
            except (OSError, sqlite3.Error) as exc:
                raise self._storage_error(exc, f"capture {capture_id} was not quarantined") from exc
        log.warning("quarantined capture %s: %s (moved to %s)", capture_id, reason, target)
        return target

    def delete(self, capture_id: str, *, unchanged: CaptureRecord | None = None) -> int:
        """Remove a capture for good (retention, quota); returns the bytes it held.

        With `unchanged`, only if the capture is still at that record's revision and sync
        state (CaptureChangedError if not): another process may have recorded a new
        revision since the caller chose it, and that one is not in S3 yet.

        The folder leaves captures/ in one rename (into tmp/, which every opening
        empties) in the same transaction that drops its row, then is removed: a crash
        leaves the capture whole, or gone, never half.
        """
        with self._lock:
            folder = self._folder(capture_id)
            doomed = durable.free_name(self._tmp, f"deleted-{capture_id}")
            try:
                size = durable.folder_bytes(folder)
                self._remove_capture(folder, doomed, unchanged)
            except (OSError, sqlite3.Error) as exc:
                if not durable.is_disk_full(exc):
                    raise self._storage_error(exc, f"capture {capture_id} was not deleted") from exc
                if unchanged is not None and self.get(capture_id).revision != unchanged.revision:
                    raise CaptureChangedError(f"capture {capture_id} changed: not deleted") from exc
                self._delete_on_a_full_disk(folder, doomed)
        try:
            durable.remove(doomed)
            durable.fsync_dir(self._tmp)
        except OSError as exc:  # out of captures/ already; the next opening finishes it
            log.warning("capture %s deleted, but %s is left: %s", capture_id, doomed, exc)
        return size

    @contextlib.contextmanager
    def evicting(self) -> Iterator[None]:
        """Hold while measuring and deleting to keep a quota or retention.

        One evictor at a time across every thread and process using this spool (the
        service and `heimdall-edge sync` at once), so each sees what the other freed
        and nothing is evicted twice over.
        """
        with self._evicting:
            try:
                fd = durable.open_private_file(self.root / EVICT_LOCK_NAME)
            except OSError as exc:
                raise self._storage_error(exc, "nothing was evicted") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # and with it the flock

    def folder_bytes(self, capture_id: str) -> int:
        """What one capture's folder holds on disk; 0 if it is gone (or cannot be read)."""
        try:
            return durable.folder_bytes(self.path(capture_id))
        except (OSError, CaptureNotFoundError):
            return 0

    def disk_usage(self) -> int:
        """Bytes held by the spool: captures, index, staging and quarantine."""
        total = 0
        for folder, _dirs, names in os.walk(self.root):
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(folder, name)).st_size
        return total

    # -- internals ---------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Serialise a read-modify-write across threads (lock) and processes (sqlite)."""
        with self._lock, durable.write_transaction(self._db):
            yield

    def _put_row(self, record: CaptureRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO captures (capture_id, sync_state, record) VALUES (?, ?, ?)",
            (record.capture_id, record.sync_state, record_row(record)),
        )

    def _require_row(self, capture_id: str) -> CaptureRecord:
        """Inside a transaction: the capture as indexed (another process may have removed it)."""
        row = self._db.execute(
            "SELECT record FROM captures WHERE capture_id = ?", (capture_id,)
        ).fetchone()
        if row is None or not (self._captures / capture_id).is_dir():
            raise CaptureNotFoundError(f"no capture {capture_id!r:.80} in the spool at {self.root}")
        return CaptureRecord.from_dict(json.loads(row[0]))

    def _remove_capture(
        self, folder: Path, target: Path, unchanged: CaptureRecord | None = None
    ) -> None:
        """Drop a capture's row and rename its folder out of captures/ (to `target`), as one.

        The rename is made durable before the row's deletion commits; if anything fails
        after the rename, the folder is put back, so the rolled-back row and the folder
        still agree. Raises CaptureNotFoundError if another process removed it first.
        """
        moved = False
        try:
            with self._transaction():
                now = self._require_row(folder.name)
                if unchanged is not None and (now.revision, now.sync_state) != (
                    unchanged.revision,
                    unchanged.sync_state,
                ):
                    raise CaptureChangedError(
                        f"capture {folder.name} is now at revision {now.revision} "
                        f"({now.sync_state}): not deleted"
                    )
                self._db.execute("DELETE FROM captures WHERE capture_id = ?", (folder.name,))
                os.rename(folder, target)
                moved = True
                durable.fsync_dir(target.parent)
                durable.fsync_dir(self._captures)
        except BaseException:
            if moved:
                with contextlib.suppress(OSError):
                    os.rename(target, folder)
            raise

    def _delete_on_a_full_disk(self, folder: Path, doomed: Path) -> None:
        """The index cannot record a deletion without space (its WAL grows): free the space
        first. The folder leaves captures/ in one rename, its files go, then the row. If the
        row still cannot go, the next opening drops it (its folder is gone): never half a
        capture, only a row that outlives it for a while."""
        try:
            os.rename(folder, doomed)
            durable.fsync_dir(self._captures)
            durable.remove(doomed)
        except OSError as exc:
            raise self._storage_error(exc, f"capture {folder.name} was not deleted") from exc
        try:
            with self._transaction():
                self._db.execute("DELETE FROM captures WHERE capture_id = ?", (folder.name,))
        except sqlite3.Error as exc:
            log.warning(
                "capture %s deleted to free a full disk; its index row goes at the next start (%s)",
                folder.name,
                exc,
            )

    def _folder(self, capture_id: str) -> Path:
        folder = self._captures / capture_id
        if not CAPTURE_ID.fullmatch(capture_id) or not folder.is_dir():
            raise CaptureNotFoundError(f"no capture {capture_id!r:.80} in the spool at {self.root}")
        return folder

    def _storage_error(self, exc: OSError | sqlite3.Error, outcome: str) -> SpoolError:
        if durable.is_disk_full(exc):
            return SpoolFullError(
                f"the disk holding the spool ({self.root}) is full, so {outcome}: free space "
                "(delete old synced captures or logs) or move the state directory to a larger disk"
            )
        return SpoolError(f"{outcome}: {exc}")


def _connect(path: Path) -> sqlite3.Connection:
    """Open the index in WAL mode with FULL sync: a committed row survives a power cut."""
    return durable.open_sqlite(path, SCHEMA, synchronous="FULL", busy_timeout_s=BUSY_TIMEOUT_S)
