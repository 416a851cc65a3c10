"""The capture spool: round trips, atomic updates, permissions, repairs after a crash, full disk."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from heimdall_edge.spool import durable
from heimdall_edge.spool import store as spool_module
from heimdall_edge.spool.errors import (
    CaptureNotFoundError,
    SpoolError,
    SpoolFullError,
    SpoolUnavailable,
)
from heimdall_edge.spool.record import CaptureRecord, record_row
from heimdall_edge.spool.store import Spool

T0 = datetime(2026, 11, 26, 22, 53, 0, 123456, tzinfo=UTC)
AUDIO = b"RIFF-not-really-a-wav" * 100
FRAMES = [b"\xff\xd8jpeg-one\xff\xd9", b"\xff\xd8jpeg-two\xff\xd9"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "state" / "spool"


@pytest.fixture
def spool(root: Path) -> Iterator[Spool]:
    with Spool(root) as opened:
        yield opened


def make(spool: Spool, when: datetime = T0, **overrides: Any) -> CaptureRecord:
    args: dict[str, Any] = {
        "device_id": "heimdall-test",
        "trigger": "button",
        "audio_wav": AUDIO,
        "frames": FRAMES,
        "created_at": when,
    }
    return spool.create(**(args | overrides))


def reopen(root: Path) -> Spool:
    return Spool(root)


@contextlib.contextmanager
def index(root: Path) -> Iterator[sqlite3.Connection]:
    """The index opened behind the spool's back, as another tool (or a crash) would leave it."""
    with contextlib.closing(sqlite3.connect(root / "index.sqlite3")) as db, db:
        yield db


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(root: Path) -> list[str]:
    """Everything in tmp/, captures/ and quarantine/, and temp files in any capture."""
    found = [
        str(p.relative_to(root))
        for d in ("tmp", "captures", "quarantine")
        for p in (root / d).iterdir()
    ]
    return sorted(found)


def temp_files(root: Path) -> list[Path]:
    return [p for p in (root / "captures").glob("*/*") if p.name.startswith(".tmp-")]


# -- round trip and listing ------------------------------------------------------


def test_create_then_get_round_trips_files_and_record(spool: Spool, root: Path) -> None:
    record = make(spool, trigger="voice")

    assert record.capture_id.startswith("20261126T225300123Z-")
    assert spool_module.CAPTURE_ID.fullmatch(record.capture_id)
    assert record.created_at == T0.replace(microsecond=123000)
    assert (record.trigger, record.status, record.sync_state) == ("voice", "captured", "pending")
    assert record.files == {
        "audio.wav": {"bytes": len(AUDIO), "sha256": sha(AUDIO)},
        "frame-00.jpg": {"bytes": len(FRAMES[0]), "sha256": sha(FRAMES[0])},
        "frame-01.jpg": {"bytes": len(FRAMES[1]), "sha256": sha(FRAMES[1])},
    }
    folder = spool.path(record.capture_id)
    assert folder == root / "captures" / record.capture_id
    assert (folder / "audio.wav").read_bytes() == AUDIO
    assert (folder / "frame-01.jpg").read_bytes() == FRAMES[1]
    on_disk = json.loads((folder / "capture.json").read_text())
    assert on_disk["created_at"] == "2026-11-26T22:53:00.123Z"
    assert on_disk["schema_version"] == 1
    assert CaptureRecord.from_dict(on_disk) == record
    assert spool.get(record.capture_id) == record
    assert leftovers(root) == [f"captures/{record.capture_id}"]


def test_a_capture_without_frames_holds_only_the_audio(spool: Spool) -> None:
    record = make(spool, frames=[])
    assert list(record.files) == ["audio.wav"]
    assert sorted(p.name for p in spool.path(record.capture_id).iterdir()) == [
        "audio.wav",
        "capture.json",
    ]


def test_created_at_defaults_to_now_in_utc(spool: Spool) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    record = spool.create(device_id="d", trigger="button", audio_wav=AUDIO, frames=[])
    assert before <= record.created_at <= datetime.now(UTC)
    assert record.capture_id[:8] == record.created_at.strftime("%Y%m%d")


def test_other_time_zones_are_stored_as_utc(spool: Spool) -> None:
    local = T0.astimezone(timezone(timedelta(hours=2)))
    assert make(spool, when=local).capture_id.startswith("20261126T225300123Z-")


def test_list_is_newest_first_with_limit_and_state(spool: Spool) -> None:
    ids = [make(spool, when=T0 + timedelta(minutes=m)).capture_id for m in (5, 1, 9, 3)]
    newest_first = [ids[2], ids[0], ids[3], ids[1]]
    assert [r.capture_id for r in spool.list()] == newest_first
    assert [r.capture_id for r in spool.list(limit=2)] == newest_first[:2]
    assert spool.list(limit=0) == []
    spool.update(ids[1], sync_state="synced")
    assert [r.capture_id for r in spool.list(sync_state="synced")] == [ids[1]]
    assert [r.capture_id for r in spool.list(sync_state="pending")] == [ids[2], ids[0], ids[3]]
    with pytest.raises(SpoolError, match="sync_state must be one of"):
        spool.list(sync_state="done")  # type: ignore[arg-type]


def test_ids_made_in_the_same_millisecond_differ(spool: Spool) -> None:
    ids = {make(spool).capture_id for _ in range(20)}
    assert len(ids) == 20


def test_counts_per_sync_state(spool: Spool) -> None:
    assert spool.counts() == {"pending": 0, "synced": 0, "failed": 0}
    ids = [make(spool).capture_id for _ in range(5)]
    spool.update(ids[0], sync_state="synced")
    spool.update(ids[1], sync_state="synced")
    spool.update(ids[2], sync_state="failed", error="S3 said 403")
    assert spool.counts() == {"pending": 2, "synced": 2, "failed": 1}


def test_disk_usage_counts_the_bytes_stored(spool: Spool) -> None:
    empty = spool.disk_usage()
    make(spool)
    assert spool.disk_usage() >= empty + len(AUDIO) + sum(map(len, FRAMES))


# -- update and add_file -----------------------------------------------------------


def test_update_is_durable_in_file_index_and_after_reopen(spool: Spool, root: Path) -> None:
    record = make(spool)
    updated = spool.update(
        record.capture_id,
        transcript="what time is it",
        reply="It is eleven.",
        engines={"stt": "faster-whisper", "tts": "piper"},
        timings_ms={"stt": 812, "tts": 95.5},
        status="complete",
        extra={"led": "green"},
    )
    assert updated.transcript == "what time is it"
    assert updated.timings_ms == {"stt": 812.0, "tts": 95.5}
    assert updated.files == record.files and updated.created_at == record.created_at
    assert spool.get(record.capture_id) == updated
    on_disk = json.loads((spool.path(record.capture_id) / "capture.json").read_text())
    assert CaptureRecord.from_dict(on_disk) == updated
    assert temp_files(root) == []
    spool.close()
    with reopen(root) as again:
        assert again.get(record.capture_id) == updated
        assert again.recovered.rows_repaired == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"status": "done"}, "'status' must be one of"),
        ({"sync_state": None}, "'sync_state' must be one of"),
        ({"timings_ms": {"stt": True}}, "'timings_ms'"),
        ({"timings_ms": {"stt": float("nan")}}, "cannot be stored as JSON: Out of range float"),
        ({"engines": {"stt": 3}}, "'engines'"),
        ({"transcript": b"bytes"}, "cannot be stored as JSON"),
        ({"transcript": 42}, "'transcript' must be str or null"),
        ({"extra": {"x": object()}}, "cannot be stored as JSON"),
        ({"capture_id": "20261126T225300123Z-00000000"}, "cannot update capture_id"),
        ({"files": {}}, "cannot update files"),
    ],
)
def test_a_bad_update_changes_nothing(spool: Spool, fields: dict[str, Any], message: str) -> None:
    record = make(spool)
    before = (spool.path(record.capture_id) / "capture.json").read_bytes()
    with pytest.raises(SpoolError, match=message):
        spool.update(record.capture_id, **fields)
    assert spool.get(record.capture_id) == record
    assert (spool.path(record.capture_id) / "capture.json").read_bytes() == before


def test_add_file_is_listed_with_its_checksum(spool: Spool, root: Path) -> None:
    record = make(spool)
    reply = b"reply-audio" * 50
    updated = spool.add_file(record.capture_id, "reply.wav", reply)
    assert updated.files["reply.wav"] == {"bytes": len(reply), "sha256": sha(reply)}
    assert (spool.path(record.capture_id) / "reply.wav").read_bytes() == reply
    assert spool.get(record.capture_id) == updated
    assert stat.S_IMODE((spool.path(record.capture_id) / "reply.wav").stat().st_mode) == 0o600
    assert temp_files(root) == []
    spool.close()
    with reopen(root) as again:
        assert again.get(record.capture_id).files["reply.wav"]["sha256"] == sha(reply)
        assert again.recovered.quarantined == 0


def test_add_file_refuses_to_overwrite_or_escape(spool: Spool, root: Path) -> None:
    record = make(spool)
    spool.add_file(record.capture_id, "reply.wav", b"first")
    with pytest.raises(SpoolError, match="already has reply.wav: files are write-once"):
        spool.add_file(record.capture_id, "reply.wav", b"second")
    with pytest.raises(SpoolError, match="already has audio.wav"):
        spool.add_file(record.capture_id, "audio.wav", b"other")
    for bad in ("../escape.wav", ".hidden", "capture.json", "a/b", ""):
        with pytest.raises(SpoolError, match="cannot add a file named"):
            spool.add_file(record.capture_id, bad, b"x")
    assert (spool.path(record.capture_id) / "reply.wav").read_bytes() == b"first"
    assert (spool.path(record.capture_id) / "audio.wav").read_bytes() == AUDIO
    assert not (root / "captures" / "escape.wav").exists()
    assert temp_files(root) == []


def test_readers_never_see_a_half_written_record(spool: Spool) -> None:
    """capture.json is swapped in one rename: a reader sees the old or the new, whole."""
    record = make(spool)
    path = spool.path(record.capture_id) / "capture.json"
    stop = threading.Event()
    seen: list[str | None] = []
    errors: list[Exception] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(CaptureRecord.from_dict(json.loads(path.read_bytes())).transcript)
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(60):
            spool.update(record.capture_id, transcript="word " * (n % 7 * 200) + str(n))
            spool.add_file(record.capture_id, f"extra-{n}.bin", os.urandom(n * 10))
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert len(seen) > 10
    assert len(spool.get(record.capture_id).files) == 3 + 60


def test_unknown_captures_raise_a_clear_key_error(spool: Spool) -> None:
    unknown = "20261126T225300123Z-deadbeef"
    for call in (
        lambda: spool.get(unknown),
        lambda: spool.update(unknown, status="complete"),
        lambda: spool.add_file(unknown, "reply.wav", b"x"),
        lambda: spool.path(unknown),
        lambda: spool.path("../../etc"),
    ):
        with pytest.raises(CaptureNotFoundError, match="no capture .* in the spool at") as caught:
            call()
        assert isinstance(caught.value, KeyError) and isinstance(caught.value, SpoolError)
    assert str(CaptureNotFoundError("no capture 'x'")) == "no capture 'x'"


def test_create_checks_its_arguments_before_writing(spool: Spool, root: Path) -> None:
    with pytest.raises(SpoolError, match="'trigger' must be one of button, voice"):
        make(spool, trigger="clap")
    with pytest.raises(SpoolError, match="must carry a time zone"):
        make(spool, when=datetime(2026, 1, 1))
    with pytest.raises(SpoolError, match="'device_id' is empty"):
        make(spool, device_id="")
    assert leftovers(root) == []


def test_threads_share_one_spool(spool: Spool) -> None:
    def work(n: int) -> None:
        for i in range(8):
            record = make(spool, when=T0 + timedelta(seconds=n * 100 + i), trigger="voice")
            spool.add_file(record.capture_id, "reply.wav", bytes([n, i]))
            spool.update(record.capture_id, sync_state="synced" if i % 2 else "pending")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert spool.counts() == {"pending": 24, "synced": 24, "failed": 0}
    records = spool.list()
    assert len(records) == 48 and all("reply.wav" in r.files for r in records)
    assert [r.capture_id for r in records] == sorted((r.capture_id for r in records), reverse=True)


# -- on-disk properties ------------------------------------------------------------


def test_folders_are_0700_and_files_0600_whatever_the_umask(root: Path) -> None:
    old = os.umask(0)
    try:
        with Spool(root) as spool:
            record = make(spool)
            spool.update(record.capture_id, status="complete")
            spool.add_file(record.capture_id, "reply.wav", b"reply")
            (root / "index.sqlite3-wal").stat()  # the WAL exists while the spool is open
            checked = 0
            for folder, dirs, files in os.walk(root):
                assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder
                for name in files:
                    assert stat.S_IMODE(os.stat(Path(folder, name)).st_mode) == 0o600, name
                    checked += 1
            assert checked >= 9  # index, -wal, -shm, lock, 5 capture files
    finally:
        os.umask(old)


def test_the_index_uses_wal_and_full_sync(spool: Spool, root: Path) -> None:
    make(spool)
    with index(root) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_the_index_write_ahead_log_stays_small(spool: Spool, root: Path) -> None:
    # SQLite's default lets the WAL grow to about 4 MB and keeps it: under a 10 MB quota
    # that crowded out captures. Hundreds of commits later it is still about the limit.
    record = make(spool)
    wal = root / "index.sqlite3-wal"
    largest = 0
    for n in range(400):
        spool.update(record.capture_id, transcript=f"take {n} " + "x" * 2000)
        largest = max(largest, wal.stat().st_size)
    assert largest > durable.WAL_SIZE_LIMIT // 2  # it did fill up and checkpoint
    assert largest <= durable.WAL_SIZE_LIMIT + 64 * 1024


# -- CaptureRecord ------------------------------------------------------------------


def record_dict(**changes: Any) -> dict[str, Any]:
    data = CaptureRecord(
        capture_id="20261126T225300123Z-1a2b3c4d",
        device_id="heimdall-test",
        created_at=T0,
        trigger="button",
        files={"audio.wav": {"bytes": 3, "sha256": "a" * 64}},
    ).to_dict()
    data.update(changes)
    return data


def test_record_round_trips_and_ignores_keys_from_newer_versions() -> None:
    data = record_dict(future_field={"a": 1}, schema_version=2)
    record = CaptureRecord.from_dict(data)
    assert record.schema_version == 2
    assert CaptureRecord.from_dict(record.to_dict()) == record


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a JSON object"),
        (
            {k: v for k, v in record_dict().items() if k not in ("files", "status")},
            "incomplete: files, status",
        ),
        (record_dict(schema_version="1"), "'schema_version' must be int"),
        (record_dict(schema_version=0), "'schema_version' must be >= 1"),
        (record_dict(capture_id="../etc"), "'capture_id' is not a capture id"),
        (record_dict(created_at="yesterday"), "'created_at' is not an ISO 8601"),
        (record_dict(created_at="2026-11-26T22:53:00"), "'created_at' is not an ISO 8601"),
        (record_dict(trigger="clap"), "'trigger' must be one of"),
        (
            record_dict(files={"audio.wav": {"bytes": -1, "sha256": "a" * 64}}),
            "entry for file 'audio.wav'",
        ),
        (
            record_dict(files={"audio.wav": {"bytes": 3, "sha256": "xyz"}}),
            "entry for file 'audio.wav'",
        ),
        (record_dict(files={"../x": {"bytes": 3, "sha256": "a" * 64}}), "bad name"),
        (record_dict(files=[]), "'files' must be dict"),
        (record_dict(sync_state="uploaded"), "'sync_state' must be one of"),
        (record_dict(extra=None), "'extra' must be dict"),
    ],
)
def test_record_validation_names_the_field(data: Any, message: str) -> None:
    with pytest.raises(SpoolError, match=message):
        CaptureRecord.from_dict(data)


# -- recovery -----------------------------------------------------------------------


def stored(root: Path, **overrides: Any) -> CaptureRecord:
    """One capture written and the spool closed again, as before a crash."""
    with Spool(root) as spool:
        return make(spool, **overrides)


def test_a_clean_reopen_repairs_nothing(root: Path) -> None:
    record = stored(root)
    with reopen(root) as spool:
        assert spool.recovered == spool_module.RecoveryReport()
        assert spool.get(record.capture_id) == record


def test_recovery_drops_unacknowledged_staging(root: Path) -> None:
    record = stored(root)
    staging = root / "tmp" / "20261126T225301000Z-0badf00d"
    staging.mkdir()
    (staging / "audio.wav").write_bytes(b"half a capt")
    (root / "tmp" / "stray").write_bytes(b"")
    with reopen(root) as spool:
        assert spool.recovered.staging_removed == 2
        assert list((root / "tmp").iterdir()) == []
        assert [r.capture_id for r in spool.list()] == [record.capture_id]


def test_recovery_reindexes_a_capture_missing_from_the_index(root: Path) -> None:
    """A crash between the rename into captures/ and the index commit."""
    record = stored(root)
    with index(root) as db:
        db.execute("DELETE FROM captures")
    with reopen(root) as spool:
        assert spool.recovered.reindexed == 1
        assert spool.get(record.capture_id) == record


def test_recovery_repairs_an_index_row_older_than_its_record(root: Path) -> None:
    """A crash between renaming the new capture.json and committing the row."""
    record = stored(root)
    with Spool(root) as spool:
        newer = spool.update(record.capture_id, transcript="hello", sync_state="synced")
    with index(root) as db:
        db.execute(
            "UPDATE captures SET sync_state = ?, record = ?",
            ("pending", record_row(record)),
        )
    with reopen(root) as spool:
        assert spool.recovered.rows_repaired == 1
        assert spool.get(record.capture_id) == newer
        assert spool.counts()["synced"] == 1


def test_recovery_drops_rows_whose_folder_vanished(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gone = stored(root)
    kept = stored(root, when=T0 + timedelta(seconds=1))
    shutil.rmtree(root / "captures" / gone.capture_id)
    with (
        caplog.at_level(logging.WARNING, logger="heimdall_edge.spool.store"),
        reopen(root) as spool,
    ):
        assert spool.recovered.rows_dropped == 1
        assert [r.capture_id for r in spool.list()] == [kept.capture_id]
        with pytest.raises(CaptureNotFoundError):
            spool.get(gone.capture_id)
    assert any(
        gone.capture_id in r.getMessage() and "folder is gone" in r.getMessage()
        for r in caplog.records
    )


def corrupt_json(folder: Path) -> None:
    (folder / "capture.json").write_text('{"capture_id": "trunc')


def partial_json(folder: Path) -> None:
    data = json.loads((folder / "capture.json").read_text())
    del data["files"]
    (folder / "capture.json").write_text(json.dumps(data))


def missing_json(folder: Path) -> None:
    (folder / "capture.json").unlink()


def tampered_audio(folder: Path) -> None:
    data = bytearray((folder / "audio.wav").read_bytes())
    data[10] ^= 0xFF  # same size, different bytes
    (folder / "audio.wav").write_bytes(bytes(data))


def truncated_frame(folder: Path) -> None:
    (folder / "frame-01.jpg").write_bytes(b"\xff\xd8")


def missing_frame(folder: Path) -> None:
    (folder / "frame-00.jpg").unlink()


def record_of_another_capture(folder: Path) -> None:
    text = (folder / "capture.json").read_text()
    (folder / "capture.json").write_text(text.replace(folder.name, "20200101T000000000Z-00000000"))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (corrupt_json, "is not valid JSON"),
        (partial_json, "incomplete: files missing"),
        (missing_json, "capture.json is missing"),
        (truncated_frame, "frame-01.jpg is 2 bytes, its record says"),
        (missing_frame, "frame-00.jpg is missing"),
        (record_of_another_capture, "belongs to capture 20200101T000000000Z-00000000"),
    ],
)
def test_recovery_quarantines_a_damaged_capture(
    root: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[Path], None], reason: str
) -> None:
    bad = stored(root)
    good = stored(root, when=T0 + timedelta(seconds=1))
    damage(root / "captures" / bad.capture_id)
    with (
        caplog.at_level(logging.WARNING, logger="heimdall_edge.spool.store"),
        reopen(root) as spool,
    ):
        assert spool.recovered.quarantined == 1
        assert [r.capture_id for r in spool.list()] == [good.capture_id]
        assert spool.counts()["pending"] == 1
    assert (root / "quarantine" / bad.capture_id).is_dir()
    assert not (root / "captures" / bad.capture_id).exists()
    warnings = [r.getMessage() for r in caplog.records if r.name == "heimdall_edge.spool.recovery"]
    assert any(f"quarantined capture {bad.capture_id}" in m and reason in m for m in warnings), (
        warnings
    )


def test_start_up_checks_sizes_and_the_bytes_are_checked_before_upload(root: Path) -> None:
    """Hashing a 2 GB backlog at each start would outlast systemd's start timeout on an SD
    card; sizes still count at open, and verify() (run before every upload) reads every byte."""
    tampered = stored(root)
    truncated = stored(root, when=T0 + timedelta(seconds=1))
    with Spool(root) as spool:
        spool.update(truncated.capture_id, sync_state="synced")
    tampered_audio(root / "captures" / tampered.capture_id)
    truncated_frame(root / "captures" / truncated.capture_id)
    with reopen(root) as spool:
        assert spool.recovered.quarantined == 1
        assert [r.capture_id for r in spool.list()] == [tampered.capture_id]
        assert spool.verify(tampered.capture_id) == [
            "audio.wav does not match the SHA-256 in its record"
        ]


@pytest.mark.parametrize("errno_", [errno.EIO, errno.EACCES, errno.EMFILE])
def test_a_file_unreadable_just_now_is_trouble_not_damage(
    root: Path, monkeypatch: pytest.MonkeyPatch, errno_: int
) -> None:
    """An under-volted Pi's EIO, a permission slip, too many open files: nothing is
    quarantined or dropped, the error says it is tried again, and later all is there."""
    record = stored(root)
    real_open, real_lstat = open, os.lstat

    def refuse(path: Any) -> None:
        if str(path).endswith("audio.wav"):
            raise OSError(errno_, os.strerror(errno_), str(path))

    def failing_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        refuse(path)
        return real_open(path, *args, **kwargs)

    def failing_lstat(path: Any, *args: Any, **kwargs: Any) -> Any:
        refuse(path)
        return real_lstat(path, *args, **kwargs)

    with Spool(root) as spool:
        monkeypatch.setattr("builtins.open", failing_open)
        with pytest.raises(SpoolUnavailable, match="cannot be read now .*tried again later"):
            spool.verify(record.capture_id)
        monkeypatch.undo()
        assert spool.verify(record.capture_id) == []
    monkeypatch.setattr(os, "lstat", failing_lstat)  # at start-up now
    with reopen(root) as spool:
        assert (spool.recovered.quarantined, spool.recovered.unreadable_now) == (0, 1)
        monkeypatch.undo()
        assert spool.get(record.capture_id) == record
    assert not (root / "quarantine" / record.capture_id).exists()


def test_quarantine_never_overwrites_an_earlier_one(root: Path) -> None:
    bad = stored(root)
    (root / "quarantine" / bad.capture_id).mkdir()
    corrupt_json(root / "captures" / bad.capture_id)
    with reopen(root) as spool:
        assert spool.recovered.quarantined == 1
    assert (root / "quarantine" / f"{bad.capture_id}.1" / "audio.wav").read_bytes() == AUDIO


def test_recovery_quarantines_strangers_in_captures(root: Path) -> None:
    record = stored(root)
    (root / "captures" / "notes.txt").write_text("hello")
    (root / "captures" / "not-a-capture").mkdir()
    with reopen(root) as spool:
        assert spool.recovered.quarantined == 2
        assert [r.capture_id for r in spool.list()] == [record.capture_id]
    assert sorted(p.name for p in (root / "quarantine").iterdir()) == ["not-a-capture", "notes.txt"]


def test_recovery_removes_temp_and_unlisted_files(root: Path) -> None:
    """Leftovers of an update or add_file that crashed before capture.json changed."""
    record = stored(root)
    folder = root / "captures" / record.capture_id
    (folder / ".tmp-0123456789ab").write_text('{"half": ')
    (folder / "reply.wav").write_bytes(b"reply never listed")
    with reopen(root) as spool:
        assert spool.recovered.temp_files_removed == 1
        assert spool.recovered.unlisted_files_removed == 1
        assert spool.recovered.quarantined == 0
        assert spool.get(record.capture_id) == record
        spool.add_file(record.capture_id, "reply.wav", b"now listed")
    assert sorted(p.name for p in folder.iterdir()) == [
        "audio.wav", "capture.json", "frame-00.jpg", "frame-01.jpg", "reply.wav",
    ]  # fmt: skip


def test_a_damaged_index_is_set_aside_and_rebuilt(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = stored(root)
    second = stored(root, when=T0 + timedelta(seconds=1))
    (root / "index.sqlite3").write_bytes(b"this is not a database" * 500)
    with (
        caplog.at_level(logging.WARNING, logger="heimdall_edge.spool.store"),
        reopen(root) as spool,
    ):
        assert spool.recovered.index_rebuilt
        assert spool.recovered.reindexed == 2
        assert [r.capture_id for r in spool.list()] == [second.capture_id, first.capture_id]
    assert [p.name.startswith("index.sqlite3.") for p in (root / "quarantine").iterdir()] == [True]
    assert any("is damaged" in r.getMessage() for r in caplog.records)


def test_a_second_opener_leaves_repairs_to_the_first(root: Path) -> None:
    """Repairing under a live writer would delete its staging: only the first opener repairs."""
    with Spool(root) as first:
        staging = root / "tmp" / "20261126T225301000Z-0badf00d"
        staging.mkdir()  # as if `first` were half-way through a create
        with Spool(root) as second:
            assert not second.recovered.ran
            assert staging.is_dir()
            record = make(second)
        assert first.get(record.capture_id) == record
    with reopen(root) as third:
        assert third.recovered.ran and third.recovered.staging_removed == 1


# -- full disk ----------------------------------------------------------------------


def failing_on_call(n: int, original: Callable[..., Any]) -> Callable[..., Any]:
    calls = 0

    def fake(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args)

    return fake


@pytest.mark.parametrize(
    "fail_at", [0, 1, 2, 3], ids=["audio", "frame-00", "frame-01", "capture.json"]
)
def test_a_full_disk_during_create_leaves_nothing(
    spool: Spool, root: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    monkeypatch.setattr(os, "write", failing_on_call(fail_at, os.write))
    with pytest.raises(
        SpoolFullError, match=r"is full, so the capture was not stored: free space"
    ) as caught:
        make(spool)
    assert caught.value.__cause__.errno == errno.ENOSPC  # type: ignore[union-attr]
    monkeypatch.undo()
    assert leftovers(root) == []
    assert spool.counts() == {"pending": 0, "synced": 0, "failed": 0}
    assert make(spool).capture_id  # and the spool still works once there is room


def test_a_full_disk_reported_by_fsync_leaves_nothing(
    spool: Spool, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fsync", failing_on_call(2, os.fsync))
    with pytest.raises(SpoolFullError):
        make(spool)
    monkeypatch.undo()
    assert leftovers(root) == []


def test_a_full_disk_during_update_or_add_file_keeps_the_old_record(
    spool: Spool, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = make(spool)
    monkeypatch.setattr(os, "write", failing_on_call(0, os.write))
    with pytest.raises(SpoolFullError, match="was not updated"):
        spool.update(record.capture_id, transcript="lost")
    with pytest.raises(SpoolFullError, match="reply.wav was not added"):
        spool.add_file(record.capture_id, "reply.wav", b"reply")
    monkeypatch.undo()
    assert spool.get(record.capture_id) == record
    assert (
        CaptureRecord.from_dict(
            json.loads((spool.path(record.capture_id) / "capture.json").read_text())
        )
        == record
    )
    assert sorted(p.name for p in spool.path(record.capture_id).iterdir()) == [
        "audio.wav", "capture.json", "frame-00.jpg", "frame-01.jpg",
    ]  # fmt: skip


def test_other_storage_errors_are_spool_errors(
    spool: Spool, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(
        SpoolError, match="the capture was not stored: .*Input/output error"
    ) as caught:
        make(spool)
    assert not isinstance(caught.value, SpoolFullError)
    monkeypatch.undo()
    assert leftovers(root) == []


# -- verify, quarantine, delete (for the syncer) -------------------------------------


def test_verify_rereads_every_byte(spool: Spool, root: Path) -> None:
    good, bad = make(spool), make(spool, when=T0 + timedelta(seconds=1))
    spool.update(bad.capture_id, sync_state="synced")  # synced or not, verify hashes it all
    tampered_audio(root / "captures" / bad.capture_id)
    missing_frame(root / "captures" / bad.capture_id)
    assert spool.verify(good.capture_id) == []
    assert spool.verify(bad.capture_id) == [
        "audio.wav does not match the SHA-256 in its record",
        "frame-00.jpg is missing",
    ]
    corrupt_json(root / "captures" / good.capture_id)
    [problem] = spool.verify(good.capture_id)
    assert "capture.json is not valid JSON" in problem
    with pytest.raises(CaptureNotFoundError):
        spool.verify("20200101T000000000Z-00000000")


def test_quarantine_moves_the_capture_out_with_its_row(
    spool: Spool, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad, good = make(spool), make(spool, when=T0 + timedelta(seconds=1))
    (root / "quarantine" / bad.capture_id).mkdir()  # an earlier one is never overwritten
    with caplog.at_level(logging.WARNING, logger="heimdall_edge.spool.store"):
        target = spool.quarantine(bad.capture_id, "audio.wav does not match")
    assert target == root / "quarantine" / f"{bad.capture_id}.1"
    assert (target / "audio.wav").read_bytes() == AUDIO
    assert [r.capture_id for r in spool.list()] == [good.capture_id]
    assert not (root / "captures" / bad.capture_id).exists()
    assert any(
        f"quarantined capture {bad.capture_id}: audio.wav does not match" in r.getMessage()
        for r in caplog.records
    )
    with pytest.raises(CaptureNotFoundError):
        spool.quarantine(bad.capture_id, "again")
    spool.close()
    with reopen(root) as again:
        assert again.recovered == spool_module.RecoveryReport()
        assert [r.capture_id for r in again.list()] == [good.capture_id]


def test_delete_removes_folder_and_row_and_returns_the_bytes(spool: Spool, root: Path) -> None:
    gone, kept = make(spool), make(spool, when=T0 + timedelta(seconds=1))
    folder = root / "captures" / gone.capture_id
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert spool.delete(gone.capture_id) == size
    assert [r.capture_id for r in spool.list()] == [kept.capture_id]
    assert leftovers(root) == [f"captures/{kept.capture_id}"]
    with pytest.raises(CaptureNotFoundError):
        spool.delete(gone.capture_id)
    with pytest.raises(CaptureNotFoundError):
        spool.get(gone.capture_id)


def test_a_delete_that_another_process_already_did_is_not_found(root: Path) -> None:
    record = stored(root)
    with Spool(root) as first, Spool(root) as second:
        first.delete(record.capture_id)
        with pytest.raises(CaptureNotFoundError):
            second.delete(record.capture_id)
        with pytest.raises(CaptureNotFoundError):
            second.quarantine(record.capture_id, "damaged")


def test_a_delete_interrupted_after_the_rename_is_finished_on_reopen(root: Path) -> None:
    """As after a crash between the rename out of captures/ and the commit."""
    record, kept = stored(root), stored(root, when=T0 + timedelta(seconds=1))
    os.rename(root / "captures" / record.capture_id, root / "tmp" / f"deleted-{record.capture_id}")
    with reopen(root) as spool:
        assert spool.recovered.staging_removed == 1 and spool.recovered.rows_dropped == 1
        assert [r.capture_id for r in spool.list()] == [kept.capture_id]
    assert leftovers(root) == [f"captures/{kept.capture_id}"]


def test_a_failed_delete_keeps_the_capture_whole(
    spool: Spool, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = make(spool)

    def broken(*args: Any) -> Any:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool_module.durable, "fsync_dir", broken)
    with pytest.raises(SpoolError, match="was not deleted: .*Input/output error"):
        spool.delete(record.capture_id)
    with pytest.raises(SpoolError, match="was not quarantined"):
        spool.quarantine(record.capture_id, "damaged")
    monkeypatch.undo()
    assert spool.get(record.capture_id) == record
    assert spool.verify(record.capture_id) == []
    assert leftovers(root) == [f"captures/{record.capture_id}"]


def test_every_change_to_a_capture_is_a_new_revision_and_pending_again(
    spool: Spool, root: Path
) -> None:
    record = make(spool)
    assert (record.revision, record.sync_state) == (1, "pending")
    assert spool.update(record.capture_id, sync_state="synced").revision == 1  # bookkeeping
    assert spool.update(record.capture_id, extra={"note": 1}).revision == 1
    changed = spool.update(record.capture_id, transcript="hello")
    assert (changed.revision, changed.sync_state) == (2, "pending")
    spool.update(record.capture_id, sync_state="synced")
    same = spool.update(record.capture_id, transcript="hello")  # nothing new
    assert (same.revision, same.sync_state) == (2, "synced")
    added = spool.add_file(record.capture_id, "reply.wav", b"RIFF")
    assert (added.revision, added.sync_state) == (3, "pending")
    with reopen(root) as again:  # capture.json and the index row agree after a restart
        assert again.get(record.capture_id) == added


def test_marking_synced_is_a_compare_and_set_on_the_uploaded_revision(spool: Spool) -> None:
    record = make(spool)
    uploaded = spool.update(record.capture_id, transcript="hello")
    spool.update(record.capture_id, reply="hi")  # arrives while revision 2 goes up
    assert spool.mark_synced(record.capture_id, uploaded.revision, {"s3_keys": {}}) is None
    assert spool.get(record.capture_id).sync_state == "pending"
    current = spool.get(record.capture_id)
    marked = spool.mark_synced(record.capture_id, current.revision, {"s3_keys": {}})
    assert marked is not None and marked.sync_state == "synced"
    assert spool.get(record.capture_id) == marked


def test_a_record_from_before_revisions_loads_as_revision_1(spool: Spool) -> None:
    data = make(spool).to_dict()
    del data["revision"]
    assert CaptureRecord.from_dict(data).revision == 1
    with pytest.raises(SpoolError, match="'revision' must be >= 1"):
        CaptureRecord.from_dict({**data, "revision": 0})


@pytest.mark.parametrize("code", [sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL])
def test_a_failed_index_insert_keeps_the_durable_capture(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    """The folder is the truth and the index a copy: a capture on disk is never taken back."""
    with Spool(root) as spool:

        def broken_index(*_args: Any) -> None:
            exc = sqlite3.OperationalError("disk I/O error or full")
            exc.sqlite_errorcode = code  # type: ignore[attr-defined]
            raise exc

        monkeypatch.setattr(spool, "_put_row", broken_index)
        with caplog.at_level(logging.ERROR, logger="heimdall_edge.spool.store"):
            record = make(spool)
        assert any("index row was not written" in m for m in caplog.messages)
        assert (root / "captures" / record.capture_id / "audio.wav").read_bytes() == AUDIO
    with reopen(root) as spool:
        assert spool.recovered.reindexed == 1
        assert spool.get(record.capture_id) == record


def test_an_index_that_cannot_be_read_is_a_spool_error(spool: Spool) -> None:
    """Raw sqlite3 errors never escape: the callers (sync, the CLI) know SpoolError."""
    make(spool)

    class Locked:
        def execute(self, *_args: Any) -> Any:
            raise sqlite3.OperationalError("database is locked")

    real, spool._db = spool._db, Locked()  # type: ignore[assignment]
    try:
        for read in (spool.list, spool.counts, lambda: spool.get("20261202T000000000Z-00000000")):
            with pytest.raises(SpoolError, match="cannot be read now .*database is locked"):
                read()
    finally:
        spool._db = real
    assert len(spool.list()) == 1
