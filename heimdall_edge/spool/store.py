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
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import stat
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Self, TypedDict, get_args

from heimdall_edge.spool import durable, lease

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
Trigger = Literal["button", "voice", "wake_word", "follow_up"]
"""What started a capture: a press, speech onset (no wake word set), the wake word, or speech in a follow-up window."""
Status = Literal["captured", "complete", "failed"]
SyncState = Literal["pending", "synced", "failed"]
TRIGGERS: tuple[str, ...] = get_args(Trigger)
STATUSES: tuple[str, ...] = get_args(Status)
SYNC_STATES: tuple[str, ...] = get_args(SyncState)

AUDIO_NAME = "audio.wav"
RECORD_NAME = "capture.json"
INDEX_NAME = "index.sqlite3"
LOCK_NAME = "spool.lock"
EVICT_LOCK_NAME = "evict.lock"
BUSY_TIMEOUT_S = 10.0

CAPTURE_ID = re.compile(r"\d{8}T\d{9}Z-[0-9a-f]{8}")
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
UPDATABLE = frozenset(
    {"transcript", "transcript_on_device", "reply", "engines", "timings_ms", "status", "error",
     "speculative", "sync_state", "extra", "lease"}
)  # fmt: skip
BOOKKEEPING = frozenset({"sync_state", "extra", "lease"})
"""Where the capture stands on this device; not part of what goes up in its record."""
CONTENT = UPDATABLE - BOOKKEEPING
"""What a person said and what became of it: a change to any of these is a new revision."""
RECORD_KEYS = (
    "schema_version", "capture_id", "device_id", "created_at", "trigger", "files",
    "transcript", "reply", "engines", "timings_ms", "status", "error", "sync_state", "extra",
)  # fmt: skip

SCHEMA = """
CREATE TABLE IF NOT EXISTS captures (
    capture_id TEXT PRIMARY KEY,
    sync_state TEXT NOT NULL,
    record TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS captures_by_sync_state ON captures (sync_state, capture_id);
"""


class SpoolError(Exception):
    """The spool cannot do what was asked; the message says why and what to do."""


class SpoolUnavailable(SpoolError):
    """A file could not be read just now (EIO on an under-volted Pi, EACCES, EMFILE): trouble,
    not damage. Nothing is quarantined or changed; the capture is tried again later."""


class SpoolFullError(SpoolError):
    """The disk under the spool is full; nothing of the failed write was kept."""


class CaptureNotFoundError(SpoolError, KeyError):
    """No capture with that id in this spool."""

    def __str__(self) -> str:
        # KeyError would print the repr of the message, quotes and all.
        return str(self.args[0]) if self.args else ""


class CaptureChangedError(SpoolError):
    """The capture changed since it was read (a new revision, another sync state): the
    caller decided on an older record and must look again."""


FileInfo = TypedDict("FileInfo", {"bytes": int, "sha256": str})


@dataclass(frozen=True)
class CaptureRecord:
    """What capture.json holds: the files with their checksums, and what became of the turn."""

    capture_id: str
    device_id: str
    created_at: datetime
    trigger: Trigger
    files: dict[str, FileInfo]
    transcript: str | None = None
    """The best transcript: cloud Whisper's once it has heard the audio (turn.upgrade)."""
    transcript_on_device: str | None = None
    """What the device's own engine heard, kept when cloud Whisper's replaced it
    (its engine is engines["stt_on_device"])."""
    reply: str | None = None
    engines: dict[str, str] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    status: Status = "captured"
    error: str | None = None
    sync_state: SyncState = "pending"
    extra: dict[str, Any] = field(default_factory=dict)
    """Room for fields that a later version adds, so older readers still load the record."""
    schema_version: int = SCHEMA_VERSION
    lease: dict[str, Any] | None = None
    """The process recording this capture's turn (lease.this_process()); None once the turn is
    recorded. A lease whose process is gone (lease.is_held) is a turn cut short."""
    revision: int = 1
    """Bumped by every change to the files or the content (CONTENT); the copy in the cloud is
    only current when it was uploaded at this revision (Spool.mark_synced checks it)."""
    speculative: bool = False
    """The turn was answered from a head start taken at a pause in the speech."""

    def manifest(self) -> bytes:
        """The record as the bucket keeps it for this revision: content and files, no sync state.

        The same revision always gives the same bytes, so an upload retried after a crash
        finds its object already there.
        """
        data = {k: v for k, v in self.to_dict().items() if k not in BOOKKEEPING}
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def to_dict(self) -> dict[str, Any]:
        return (
            {
                "schema_version": self.schema_version,
                "capture_id": self.capture_id,
                "device_id": self.device_id,
                "created_at": iso_utc(self.created_at),
                "trigger": self.trigger,
                "files": {name: dict(info) for name, info in self.files.items()},
                "transcript": self.transcript,
                "reply": self.reply,
                "engines": dict(self.engines),
                "timings_ms": dict(self.timings_ms),
                "status": self.status,
                "error": self.error,
                "sync_state": self.sync_state,
                "extra": dict(self.extra),
                "lease": None if self.lease is None else dict(self.lease),
                "revision": self.revision,
            }
            | (
                # Only when there is one: a record of an earlier version keeps the same bytes.
                {"transcript_on_device": self.transcript_on_device}
                if self.transcript_on_device is not None
                else {}
            )
            | ({"speculative": True} if self.speculative else {})
        )

    @classmethod
    def from_dict(cls, data: Any) -> CaptureRecord:
        """Parse and check a record; a missing or mistyped field raises SpoolError naming it.

        Keys this version does not know are ignored, so a record written by a newer
        version still loads.
        """
        if not isinstance(data, dict):
            raise SpoolError(f"capture record must be a JSON object, not {type(data).__name__}")
        missing = [key for key in RECORD_KEYS if key not in data]
        if missing:
            raise SpoolError(f"capture record is incomplete: {', '.join(missing)} missing")
        version = _typed(data, "schema_version", int)
        if version < 1:
            raise SpoolError(f"capture record field 'schema_version' must be >= 1, got {version}")
        capture_id = _typed(data, "capture_id", str)
        if not CAPTURE_ID.fullmatch(capture_id):
            raise SpoolError(
                f"capture record field 'capture_id' is not a capture id: {capture_id!r:.80}"
            )
        device_id = _typed(data, "device_id", str)
        if not device_id:
            raise SpoolError("capture record field 'device_id' is empty")
        revision = _typed(data, "revision", int) if "revision" in data else 1  # older records
        if revision < 1:
            raise SpoolError(f"capture record field 'revision' must be >= 1, got {revision}")
        return cls(
            schema_version=version,
            capture_id=capture_id,
            device_id=device_id,
            created_at=_parse_time(_typed(data, "created_at", str)),
            trigger=_choice(data, "trigger", TRIGGERS),  # type: ignore[arg-type]
            files=_parse_files(_typed(data, "files", dict)),
            transcript=_typed(data, "transcript", str, optional=True),
            transcript_on_device=_typed(data, "transcript_on_device", str, optional=True)
            if "transcript_on_device" in data
            else None,
            reply=_typed(data, "reply", str, optional=True),
            engines=_parse_engines(_typed(data, "engines", dict)),
            timings_ms=_parse_timings(_typed(data, "timings_ms", dict)),
            status=_choice(data, "status", STATUSES),  # type: ignore[arg-type]
            error=_typed(data, "error", str, optional=True),
            sync_state=_choice(data, "sync_state", SYNC_STATES),  # type: ignore[arg-type]
            extra=_typed(data, "extra", dict),
            lease=_parse_lease(data.get("lease")),
            revision=revision,
            speculative=_typed(data, "speculative", bool) if "speculative" in data else False,
        )


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


class Spool:
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
        when = _to_ms(created_at or datetime.now(UTC))
        capture_id = _new_capture_id(when)
        contents = {AUDIO_NAME: audio_wav}
        contents.update({f"frame-{i:02d}.jpg": frame for i, frame in enumerate(frames)})
        record = _validated(
            CaptureRecord(
                capture_id=capture_id,
                device_id=device_id,
                created_at=when,
                trigger=trigger,
                files={name: _file_info(data) for name, data in contents.items()},
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
                durable.write_new_file(staging / RECORD_NAME, _record_file_bytes(record))
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
                record = _read_record(folder)
                if name in record.files:
                    raise SpoolError(
                        f"capture {capture_id} already has {name}: files are write-once, "
                        "add it under another name"
                    )
                files = {**record.files, name: _file_info(data)}
                record = _validated(
                    dataclasses.replace(
                        record, files=files, revision=record.revision + 1, sync_state="pending"
                    )
                )
                self._put_row(record)
                os.rename(temp, folder / name)
                renamed = True
                durable.fsync_dir(folder)
                durable.replace_file(folder / RECORD_NAME, _record_file_bytes(record))
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
                record = _read_record(folder)
                fields = change(record)
                if fields is None:
                    return None
                record = _validated(dataclasses.replace(record, **fields))
                self._put_row(record)
                durable.replace_file(folder / RECORD_NAME, _record_file_bytes(record))
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
            record = _read_record(folder)
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
            if (problem := _check_file(folder / name, info, full_check=True))
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
            target = _free_name(self._quarantine, capture_id)
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
            doomed = _free_name(self._tmp, f"deleted-{capture_id}")
            try:
                size = _folder_bytes(folder)
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
            return _folder_bytes(self.path(capture_id))
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
            (record.capture_id, record.sync_state, _record_row(record)),
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

    def _set_index_aside(self, exc: durable.IndexDamaged) -> None:
        """Move a damaged index to quarantine; the capture folders rebuild it."""
        target = _free_name(self._quarantine, f"{INDEX_NAME}.{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
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
                if row != _record_row(record):
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
            record = _read_record(folder)
        except SpoolError as exc:
            return None, str(exc)
        # Sizes only: hashing a 2 GB backlog on an SD card takes longer than systemd waits
        # for READY. Every byte is checked against its SHA-256 before upload (verify).
        for name, info in record.files.items():
            problem = _check_file(folder / name, info, full_check=False)
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
        target = _free_name(self._quarantine, entry.name)
        os.rename(entry, target)
        durable.fsync_dir(self._quarantine)
        durable.fsync_dir(entry.parent)
        log.warning("quarantined capture %s: %s (moved to %s)", entry.name, reason, target)


# -- records ----------------------------------------------------------------------


def iso_utc(when: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a Z, e.g. 2026-11-26T22:53:00.123Z."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _to_ms(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise SpoolError(f"created_at must carry a time zone (use datetime.now(UTC)), got {when}")
    when = when.astimezone(UTC)
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


def _new_capture_id(when: datetime) -> str:
    """UTC time to the millisecond, then 32 random bits: sorts by time, never collides."""
    return f"{when:%Y%m%dT%H%M%S}{when.microsecond // 1000:03d}Z-{os.urandom(4).hex()}"


def _file_info(data: bytes) -> FileInfo:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _typed(data: dict[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    value = data[key]
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        allowed = f"{kind.__name__} or null" if optional else kind.__name__
        raise SpoolError(f"capture record field {key!r} must be {allowed}, got {value!r:.80}")
    return value


def _choice(data: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = data[key]
    if value not in choices:
        raise SpoolError(
            f"capture record field {key!r} must be one of {', '.join(choices)}, got {value!r:.80}"
        )
    return str(value)


def _parse_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
        if when.tzinfo is not None:
            return when.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 shifted out of range
        pass
    raise SpoolError(f"capture record field 'created_at' is not an ISO 8601 UTC time: {text!r:.80}")


def _parse_files(files: dict[str, Any]) -> dict[str, FileInfo]:
    parsed: dict[str, FileInfo] = {}
    for name, info in files.items():
        if not FILE_NAME.fullmatch(name) or name == RECORD_NAME:
            raise SpoolError(f"capture record lists a file with a bad name: {name!r:.80}")
        size = info.get("bytes") if isinstance(info, dict) else None
        digest = info.get("sha256") if isinstance(info, dict) else None
        if (
            type(size) is not int
            or size < 0
            or not isinstance(digest, str)
            or not SHA256_HEX.fullmatch(digest)
        ):
            raise SpoolError(
                f"capture record entry for file {name!r} must be "
                f'{{"bytes": <size>, "sha256": <64 hex digits>}}, got {info!r:.120}'
            )
        parsed[name] = {"bytes": size, "sha256": digest}
    return parsed


def _parse_lease(lease: Any) -> dict[str, Any] | None:
    if lease is None:
        return None
    if (
        not isinstance(lease, dict)
        or not isinstance(lease.get("boot_id"), str)
        or any(type(lease.get(key)) is not int for key in ("pid", "start"))
    ):
        raise SpoolError("capture record field 'lease' must be null or {boot_id, pid, start}")
    return {"boot_id": lease["boot_id"], "pid": lease["pid"], "start": lease["start"]}


def _parse_engines(engines: dict[str, Any]) -> dict[str, str]:
    if not all(isinstance(value, str) for value in engines.values()):
        raise SpoolError(
            f"capture record field 'engines' must map stages to engine names, got {engines!r:.120}"
        )
    return dict(engines)


def _parse_timings(timings: dict[str, Any]) -> dict[str, float]:
    parsed: dict[str, float] = {}
    for stage, value in timings.items():
        try:
            ms = (
                None
                if isinstance(value, bool) or not isinstance(value, int | float)
                else float(value)
            )
        except OverflowError:  # an int too large for any float
            ms = None
        if ms is None or not math.isfinite(ms):
            raise SpoolError(
                f"capture record field 'timings_ms' must map stages to milliseconds, "
                f"got {stage!r}: {value!r:.40}"
            )
        parsed[stage] = ms
    return parsed


def _record_row(record: CaptureRecord) -> str:
    return _dumps(record, indent=None)


def _record_file_bytes(record: CaptureRecord) -> bytes:
    return (_dumps(record, indent=2) + "\n").encode()


def _dumps(record: CaptureRecord, indent: int | None) -> str:
    try:
        return json.dumps(
            record.to_dict(), indent=indent, sort_keys=True, ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise SpoolError(f"capture {record.capture_id} cannot be stored as JSON: {exc}") from exc


def _validated(record: CaptureRecord) -> CaptureRecord:
    """Check a record the way a reader will, before anything of it reaches the disk."""
    return CaptureRecord.from_dict(json.loads(_record_row(record)))


def _read_record(folder: Path) -> CaptureRecord:
    path = folder / RECORD_NAME
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise SpoolError(f"{path} is missing") from None
    except OSError as exc:
        raise _unavailable(path, exc) from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too deep
        raise SpoolError(f"{path} is not valid JSON: {exc}") from exc
    try:
        record = CaptureRecord.from_dict(data)
    except SpoolError as exc:
        raise SpoolError(f"{path}: {exc}") from None
    if record.capture_id != folder.name:
        raise SpoolError(f"{path} belongs to capture {record.capture_id}, not to {folder.name}")
    return record


def _check_file(path: Path, info: FileInfo, full_check: bool) -> str:
    """What is wrong with one listed file, or "" when it is intact."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return f"{path.name} is not a regular file"
        if st.st_size != info["bytes"]:
            return f"{path.name} is {st.st_size} bytes, its record says {info['bytes']}"
        if full_check:
            with open(path, "rb") as file:
                digest = hashlib.file_digest(file, "sha256").hexdigest()
            if digest != info["sha256"]:
                return f"{path.name} does not match the SHA-256 in its record"
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as exc:
        raise _unavailable(path, exc) from exc
    return ""


def _unavailable(path: Path, exc: OSError) -> SpoolUnavailable:
    return SpoolUnavailable(
        f"{path} cannot be read now ({exc.strerror or exc}): nothing was changed, "
        "it is tried again later; if it persists, check the SD card and the power supply"
    )


# -- files ------------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    """Open the index in WAL mode with FULL sync: a committed row survives a power cut."""
    return durable.open_sqlite(path, SCHEMA, synchronous="FULL", busy_timeout_s=BUSY_TIMEOUT_S)


def _entries(folder: Path) -> list[Path]:
    return sorted(Path(entry.path) for entry in os.scandir(folder))


def _folder_bytes(folder: Path) -> int:
    total = 0
    for entry in os.scandir(folder):
        with contextlib.suppress(FileNotFoundError):
            total += entry.stat(follow_symlinks=False).st_size
    return total


def _free_name(folder: Path, name: str) -> Path:
    """A path in `folder` named `name`, suffixed .1, .2... if that is taken."""
    target, n = folder / name, 0
    while target.exists():
        n += 1
        target = folder / f"{name}.{n}"
    return target
