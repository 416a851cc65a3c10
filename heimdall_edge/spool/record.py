"""A capture's record (capture.json): its files and checksums, and what became of the turn.

Parsed strictly (a missing or mistyped field names itself) and written the same way
every time, so the same revision always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypedDict, get_args

from heimdall_edge.capture import Trigger
from heimdall_edge.spool.errors import SpoolError, SpoolUnavailable

SCHEMA_VERSION = 1
Status = Literal["captured", "complete", "failed"]
SyncState = Literal["pending", "synced", "failed"]
TRIGGERS: tuple[str, ...] = get_args(Trigger)
STATUSES: tuple[str, ...] = get_args(Status)
SYNC_STATES: tuple[str, ...] = get_args(SyncState)

AUDIO_NAME = "audio.wav"
RECORD_NAME = "capture.json"
INDEX_NAME = "index.sqlite3"

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


def iso_utc(when: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a Z, e.g. 2026-11-26T22:53:00.123Z."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_ms(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise SpoolError(f"created_at must carry a time zone (use datetime.now(UTC)), got {when}")
    when = when.astimezone(UTC)
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


def new_capture_id(when: datetime) -> str:
    """UTC time to the millisecond, then 32 random bits: sorts by time, never collides."""
    return f"{when:%Y%m%dT%H%M%S}{when.microsecond // 1000:03d}Z-{os.urandom(4).hex()}"


def file_info(data: bytes) -> FileInfo:
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


def record_row(record: CaptureRecord) -> str:
    return _dumps(record, indent=None)


def record_file_bytes(record: CaptureRecord) -> bytes:
    return (_dumps(record, indent=2) + "\n").encode()


def _dumps(record: CaptureRecord, indent: int | None) -> str:
    try:
        return json.dumps(
            record.to_dict(), indent=indent, sort_keys=True, ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise SpoolError(f"capture {record.capture_id} cannot be stored as JSON: {exc}") from exc


def validated(record: CaptureRecord) -> CaptureRecord:
    """Check a record the way a reader will, before anything of it reaches the disk."""
    return CaptureRecord.from_dict(json.loads(record_row(record)))


def read_record(folder: Path) -> CaptureRecord:
    path = folder / RECORD_NAME
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise SpoolError(f"{path} is missing") from None
    except OSError as exc:
        raise unavailable(path, exc) from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too deep
        raise SpoolError(f"{path} is not valid JSON: {exc}") from exc
    try:
        record = CaptureRecord.from_dict(data)
    except SpoolError as exc:
        raise SpoolError(f"{path}: {exc}") from None
    if record.capture_id != folder.name:
        raise SpoolError(f"{path} belongs to capture {record.capture_id}, not to {folder.name}")
    return record


def check_file(path: Path, info: FileInfo, full_check: bool) -> str:
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
        raise unavailable(path, exc) from exc
    return ""


def unavailable(path: Path, exc: OSError) -> SpoolUnavailable:
    return SpoolUnavailable(
        f"{path} cannot be read now ({exc.strerror or exc}): nothing was changed, "
        "it is tried again later; if it persists, check the SD card and the power supply"
    )
