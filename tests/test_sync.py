"""The syncer against a real moto server over HTTP: exactly once, outages, damage, lifecycle.

Every store call goes through boto3 and real sockets to moto on 127.0.0.1; an outage
is the server stopped (connections refused), and coming back is the same server,
same port, same data, started again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from heimdall_edge.cloud.breaker import BreakerState, CircuitBreaker
from heimdall_edge.cloud.connectivity import Connectivity, tcp_probe
from heimdall_edge.cloud.errors import ErrorKind
from heimdall_edge.settings import SyncSettings
from heimdall_edge.spool.keeper import SpoolKeeper
from heimdall_edge.spool.record import CaptureRecord
from heimdall_edge.spool.store import Spool
from heimdall_edge.sync.bandwidth import TokenBucket
from heimdall_edge.sync.cloudstore import CaptureStore, PutResult
from heimdall_edge.sync.index_item import index_item
from heimdall_edge.sync.results import SYNC_OFF, Outcome, SyncProgress
from heimdall_edge.sync.store_config import StoreConfig
from heimdall_edge.sync.syncer import Syncer
from heimdall_edge.testing.clocks import FakeClock
from heimdall_edge.testing.moto import MotoServer, use_aws_test_env
from tests.shared import until

TIMEOUT = 20.0
BUCKET = "heimdall-sync-test"
TABLE = "heimdall-captures"
DEVICE = "pi-test"
MiB = 1024 * 1024
NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[MotoServer]:
    with MotoServer() as moto:
        yield moto


@pytest.fixture
def moto(server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """The server, up and empty, with a bucket and a table; dummy credentials."""
    use_aws_test_env(monkeypatch)
    server.start()
    server.reset()
    server.create_bucket(BUCKET)
    server.create_table(TABLE)
    return server


def make_store(moto: MotoServer, **overrides: Any) -> CaptureStore:
    config: dict[str, Any] = {
        "bucket": BUCKET,
        "prefix": "captures",
        "table": TABLE,
        "region": moto.region,
        "s3_endpoint_url": moto.url,
        "dynamodb_endpoint_url": moto.url,
    }
    return CaptureStore(StoreConfig(**(config | overrides)), connect_timeout_s=2, read_timeout_s=10)


@pytest.fixture
def store(moto: MotoServer) -> CaptureStore:
    return make_store(moto)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    with Spool(tmp_path / "spool") as opened:
        yield opened


def capture(
    spool: Spool,
    *,
    when: datetime | None = None,
    audio_bytes: int = 20_000,
    frames: int = 1,
    finished: bool = True,
) -> CaptureRecord:
    """A capture as the appliance keeps it, leased by this process; `finished`: its turn was
    recorded too (and the lease let go)."""
    record = spool.create(
        device_id=DEVICE,
        trigger="button",
        audio_wav=os.urandom(audio_bytes),
        frames=[os.urandom(5_000) for _ in range(frames)],
        created_at=when,
        leased=True,
    )
    if finished:
        record = spool.update(
            record.capture_id,
            transcript="what time is it",
            reply="noon",
            status="complete",
            lease=None,
        )
    return record


def keeper(spool: Spool, **settings: Any) -> SpoolKeeper:
    return SpoolKeeper(spool, SyncSettings(**settings))


def syncer(spool: Spool, store: CaptureStore | None, **options: Any) -> Syncer:
    settings = {k: options.pop(k) for k in list(options) if k in SyncSettings.model_fields}
    return Syncer(spool, store, SyncSettings(**settings), DEVICE, **options)


def objects(moto: MotoServer) -> dict[str, dict[str, Any]]:
    """Every object in the bucket: key -> its HEAD (SSE, metadata, ETag, LastModified)."""
    s3 = moto.client("s3")
    keys = [
        item["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for item in page.get("Contents", [])
    ]
    return {key: s3.head_object(Bucket=BUCKET, Key=key) for key in keys}


def items(moto: MotoServer) -> list[dict[str, Any]]:
    return moto.client("dynamodb").scan(TableName=TABLE)["Items"]


def moto_body(moto: MotoServer, key: str) -> bytes:
    return moto.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()


def body_sha(moto: MotoServer, key: str) -> str:
    return hashlib.sha256(moto_body(moto, key)).hexdigest()


def tamper(spool: Spool, record: CaptureRecord) -> None:
    path = spool.path(record.capture_id) / "audio.wav"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, different bytes: only a full hash sees it
    path.write_bytes(bytes(data))


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


# --- delivery -------------------------------------------------------------------------------------


async def test_captures_kept_while_the_store_is_down_are_delivered_once_it_is_back(
    moto: MotoServer, store: CaptureStore, spool: Spool
) -> None:
    moto.stop()
    records = [capture(spool, frames=n) for n in (0, 1, 2)]
    sync = syncer(spool, store)

    down = await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    assert (down.synced, down.failed, down.pending) == (0, 0, 3)
    assert down.error_kind is ErrorKind.CONNECTION
    assert "cannot reach s3" in (down.error or "") and "captures wait in the spool" in down.error
    assert spool.counts() == {"pending": 3, "synced": 0, "failed": 0}
    assert sync.status()["last_error"] == down.error

    moto.start()
    seen: list[SyncProgress] = []
    up = await asyncio.wait_for(sync.sync_once(progress=seen.append), TIMEOUT)
    assert up.error is None and up.ok
    assert (up.synced, up.failed, up.already_there, up.pending) == (3, 0, 0, 0)
    total = sum(info["bytes"] for r in records for info in r.files.values())
    assert up.bytes == total
    assert up.written == sum(len(r.files) for r in records) + 3 + 3  # files, manifests, items
    assert seen[-1].captures_done == seen[-1].captures_total == 3
    assert seen[-1].bytes_done == seen[-1].bytes_total == total

    stored = objects(moto)
    expected: dict[str, str] = {}
    for record in records:
        synced = spool.get(record.capture_id)
        assert synced.sync_state == "synced"
        assert set(synced.extra["s3_keys"]) == {*record.files, "capture.json"}
        assert synced.extra["synced_at"] and synced.extra["s3_bucket"] == BUCKET
        for name, key in synced.extra["s3_keys"].items():
            if name == "capture.json":  # this revision's record, content and files
                assert key == store.manifest_key(synced)
                expected[key] = hashlib.sha256(synced.manifest()).hexdigest()
                assert json.loads(moto_body(moto, key))["transcript"] == synced.transcript
                continue
            assert key == store.object_key(record, name)
            expected[key] = record.files[name]["sha256"]
    assert set(stored) == set(expected)
    for key, head in stored.items():
        assert head["ServerSideEncryption"] == "AES256"
        assert head["Metadata"]["sha256"] == expected[key]
        assert body_sha(moto, key) == expected[key]
    index = items(moto)
    assert sorted(item["capture_id"]["S"] for item in index) == sorted(
        r.capture_id for r in records
    )
    assert {item["transcript"]["S"] for item in index} == {"what time is it"}
    status = sync.status()
    assert (status["pending"], status["synced"], status["breaker"]) == (0, 3, "closed")
    assert status["last_success_at"] is not None

    # Nothing left to do: a second pass writes nothing.
    again = await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    assert (again.synced, again.written, again.bytes, again.error) == (0, 0, 0, None)

    # As after a crash between the uploads and marking them synced: a rerun finds every
    # object and item already there, and writes nothing.
    for record in records:
        spool.update(record.capture_id, sync_state="pending")
    rerun = await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    assert (rerun.synced, rerun.written, rerun.bytes) == (3, 0, 0)
    assert rerun.already_there == up.written
    after = objects(moto)
    assert {k: (h["ETag"], h["LastModified"]) for k, h in after.items()} == {
        k: (h["ETag"], h["LastModified"]) for k, h in stored.items()
    }
    assert items(moto) == index  # synced_at too: the first write stands
    assert spool.counts()["synced"] == 3


async def test_sync_capture_marks_synced_only_after_s3_and_the_index(
    moto: MotoServer, spool: Spool
) -> None:
    """The index write fails (no table): the objects are there, the capture stays pending."""
    moto.client("dynamodb").delete_table(TableName=TABLE)
    record = capture(spool)
    real = make_store(moto)
    sent: list[str] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def put_file(self, key: str, *args: Any, **kwargs: Any) -> PutResult:
            sent.append(key)
            return real.put_file(key, *args, **kwargs)

    sync = syncer(spool, Counting())  # type: ignore[arg-type]
    with pytest.raises(Exception, match="table 'heimdall-captures' does not exist") as caught:
        await asyncio.wait_for(sync.sync_capture(record), TIMEOUT)
    assert getattr(caught.value, "kind", None) is ErrorKind.CLIENT
    assert len(sent) == len(record.files)
    assert len(objects(moto)) == len(record.files) + 1  # and the revision's record
    assert spool.get(record.capture_id).sync_state == "pending"

    moto.create_table(TABLE)
    result = await asyncio.wait_for(sync.sync_capture(record), TIMEOUT)
    assert result.outcome is Outcome.SYNCED
    assert (result.written, result.already_there, result.bytes) == (1, len(record.files) + 1, 0)
    assert len(sent) == len(record.files)  # confirmed before: not sent again
    assert spool.get(record.capture_id).sync_state == "synced"
    assert len(items(moto)) == 1


async def test_a_capture_changed_after_it_synced_goes_up_again_as_a_new_revision(
    moto: MotoServer, store: CaptureStore, spool: Spool
) -> None:
    record = capture(spool)
    sync = syncer(spool, store)
    assert (await asyncio.wait_for(sync.sync_once(), TIMEOUT)).synced == 1
    first = spool.get(record.capture_id)
    before = objects(moto)

    spool.add_file(record.capture_id, "late.wav", b"RIFF late")
    changed = spool.update(record.capture_id, transcript="what time is it now")
    assert (changed.sync_state, changed.revision) == ("pending", first.revision + 2)
    again = await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    assert (again.synced, again.error) == (1, None)
    assert again.written == 3  # late.wav, the new revision's record, the index item

    now = spool.get(record.capture_id)
    after = objects(moto)
    assert {k: h["ETag"] for k, h in before.items()} == {k: after[k]["ETag"] for k in before}
    assert set(after) - set(before) == {
        store.object_key(now, "late.wav"),
        store.manifest_key(now),
    }
    assert json.loads(moto_body(moto, store.manifest_key(now)))["transcript"] == now.transcript
    [item] = items(moto)
    assert (item["revision"]["N"], item["transcript"]["S"]) == (str(now.revision), now.transcript)
    assert "late.wav" in item["s3_keys"]["M"]


async def test_the_index_never_goes_back_to_an_older_revision(
    moto: MotoServer, store: CaptureStore, spool: Spool
) -> None:
    record = capture(spool)
    older = spool.get(record.capture_id)
    newer = spool.update(record.capture_id, reply="It is noon.")
    keys = {name: store.object_key(newer, name) for name in newer.files}
    assert store.put_index(index_item(newer, keys)) is PutResult.WRITTEN
    assert store.put_index(index_item(older, keys)) is PutResult.ALREADY_THERE
    assert store.put_index(index_item(newer, keys)) is PutResult.ALREADY_THERE
    [item] = items(moto)
    assert (item["revision"]["N"], item["reply"]["S"]) == (str(newer.revision), "It is noon.")


async def test_a_capture_that_changes_while_it_uploads_stays_pending_for_the_next_pass(
    moto: MotoServer, spool: Spool
) -> None:
    record = capture(spool)
    real = make_store(moto)

    class ReplyArrivesMidUpload:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def put_bytes(self, *args: Any, **kwargs: Any) -> PutResult:
            if spool.get(record.capture_id).reply != "It is noon.":  # a late change, once
                spool.update(record.capture_id, reply="It is noon.")
            return real.put_bytes(*args, **kwargs)

    sync = syncer(spool, ReplyArrivesMidUpload())  # type: ignore[arg-type]
    result = await asyncio.wait_for(sync.sync_capture(spool.get(record.capture_id)), TIMEOUT)
    assert result.outcome is Outcome.CHANGED
    assert spool.get(record.capture_id).sync_state == "pending"
    assert (await asyncio.wait_for(sync.sync_once(), TIMEOUT)).synced == 1
    [item] = items(moto)
    assert item["reply"]["S"] == "It is noon."
    assert spool.get(record.capture_id).sync_state == "synced"


async def test_without_a_table_only_s3_is_written(moto: MotoServer, spool: Spool) -> None:
    record = capture(spool)
    report = await asyncio.wait_for(
        syncer(spool, make_store(moto, table=None)).sync_once(), TIMEOUT
    )
    assert (report.synced, report.written, report.error) == (1, len(record.files) + 1, None)
    assert items(moto) == []
    # The bucket alone describes the capture: its record went up beside the files.
    synced = spool.get(record.capture_id)
    manifest = json.loads(moto_body(moto, make_store(moto).manifest_key(synced)))
    assert manifest["transcript"] == synced.transcript and manifest["files"] == synced.files


async def test_an_outage_in_the_middle_of_a_pass_leaves_the_rest_pending(
    moto: MotoServer, store: CaptureStore, spool: Spool
) -> None:
    records = [capture(spool, when=NOW + timedelta(seconds=i)) for i in range(6)]

    class StopsAfterTwo:
        """The real store, until the server goes down after the second capture's index."""

        def __init__(self) -> None:
            self.indexed = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def put_index(self, item: dict[str, Any]) -> PutResult:
            result = store.put_index(item)
            self.indexed += 1
            if self.indexed == 2:
                moto.stop()
            return result

    sync = syncer(spool, StopsAfterTwo(), concurrency=1, wall_clock=lambda: NOW)  # type: ignore[arg-type]
    report = await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    assert (report.synced, report.failed, report.pending) == (2, 1, 4)
    assert report.error_kind is ErrorKind.CONNECTION
    assert [spool.get(r.capture_id).sync_state for r in records] == ["synced"] * 2 + [
        "pending"
    ] * 4  # oldest first, and the pass stopped at the first outage
    moto.start()
    report = await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    assert (report.synced, report.pending, report.error) == (4, 0, None)
    assert len(items(moto)) == 6


async def test_a_damaged_capture_is_quarantined_and_the_others_still_sync(
    moto: MotoServer, store: CaptureStore, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    good = capture(spool)
    bad = capture(spool)
    lost = capture(spool, frames=2)
    tamper(spool, bad)
    (spool.path(lost.capture_id) / "frame-01.jpg").unlink()
    with caplog.at_level(logging.WARNING):
        report = await asyncio.wait_for(syncer(spool, store).sync_once(), TIMEOUT)
    assert (report.synced, report.quarantined, report.failed, report.error) == (1, 2, 0, None)
    assert [r.capture_id for r in spool.list()] == [good.capture_id]
    quarantine = spool.root / "quarantine"
    assert (quarantine / bad.capture_id / "audio.wav").is_file()
    assert (quarantine / lost.capture_id / "frame-00.jpg").is_file()
    assert {key.split("/")[-2] for key in objects(moto)} == {good.capture_id}
    assert [item["capture_id"]["S"] for item in items(moto)] == [good.capture_id]
    logged = messages(caplog, logging.ERROR)
    assert any(
        bad.capture_id in m and "audio.wav does not match the SHA-256" in m for m in logged
    ), logged
    assert any(lost.capture_id in m and "frame-01.jpg is missing" in m for m in logged), logged


async def test_a_file_damaged_after_the_check_is_refused_by_the_store_and_quarantined(
    moto: MotoServer, store: CaptureStore, spool: Spool
) -> None:
    """The store hashes what it sends: damage between verify() and the upload is caught too."""
    record = capture(spool)
    real_verify = spool.verify
    calls = 0

    def verify_then_damage(capture_id: str) -> list[str]:
        nonlocal calls
        calls += 1
        problems = real_verify(capture_id)
        if calls == 1:
            tamper(spool, record)
        return problems

    spool.verify = verify_then_damage  # type: ignore[method-assign]
    report = await asyncio.wait_for(syncer(spool, store).sync_once(), TIMEOUT)
    assert (report.quarantined, report.synced, report.failed) == (1, 0, 0)
    assert objects(moto) == {} and items(moto) == []


async def test_a_different_object_at_a_captures_key_needs_a_person(
    moto: MotoServer, store: CaptureStore, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    """No retry can fix it: the capture is marked failed (kept, counted), the rest go on."""
    clash, fine = capture(spool), capture(spool)
    moto.client("s3").put_object(
        Bucket=BUCKET, Key=store.object_key(clash, "audio.wav"), Body=b"someone else's"
    )
    sync = syncer(spool, store)
    with caplog.at_level(logging.ERROR, logger="heimdall_edge.sync.syncer"):
        report = await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    assert (report.synced, report.failed, report.pending) == (1, 1, 0)
    assert "a different object already exists" in (report.error or "")
    failed = spool.get(clash.capture_id)
    assert failed.sync_state == "failed"
    assert "a different object already exists" in failed.extra["sync_error"]
    assert spool.get(fine.capture_id).sync_state == "synced"
    assert sync.status()["failed"] == 1
    assert any(clash.capture_id in m and "marked failed" in m for m in messages(caplog))
    again = await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    assert (again.failed, again.written) == (0, 0)  # not retried by every pass


# --- store errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"bucket": "heimdall-no-such-bucket"},
            "does not exist: create it or fix HEIMDALL_S3_BUCKET",
        ),
        ({"table": "no-such-table"}, "does not exist in eu-west-1: create it"),
    ],
    ids=["bucket", "table"],
)
async def test_a_missing_bucket_or_table_is_reported_clearly_and_captures_stay(
    moto: MotoServer, spool: Spool, overrides: dict[str, Any], message: str
) -> None:
    for _ in range(5):
        capture(spool)
    sync = syncer(spool, make_store(moto, **overrides), concurrency=1)
    report = await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    assert report.error_kind is ErrorKind.CLIENT
    assert message in (report.error or ""), report.error
    assert report.synced == 0
    assert report.failed == 3  # three in a row: not one bad capture, the store; the pass stops
    assert spool.counts()["pending"] == 5
    assert sync.breaker.state is BreakerState.CLOSED  # our configuration, not an outage
    assert message in sync.status()["last_error"]


async def test_sync_off_without_a_bucket(spool: Spool) -> None:
    capture(spool)
    sync = syncer(spool, None)
    report = await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    assert report.error == SYNC_OFF
    assert SYNC_OFF == ("sync off: no bucket set (HEIMDALL_S3_BUCKET); captures stay on the device")
    status = sync.status()
    assert (status["enabled"], status["message"], status["pending"]) == (False, SYNC_OFF, 1)
    with pytest.raises(Exception, match="sync off"):
        await sync.sync_capture(spool.list()[0])
    stop = asyncio.Event()
    task = asyncio.create_task(sync.run(stop))
    await asyncio.sleep(0.05)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, TIMEOUT)
    assert spool.counts()["pending"] == 1


# --- what waits -----------------------------------------------------------------------------------


async def test_a_capture_whose_turn_is_still_running_waits(
    moto: MotoServer, store: CaptureStore, spool: Spool
) -> None:
    """Its transcript, reply and reply.wav are still coming: it waits while its lease is held,
    however far the wall clock jumps (NTP at boot), and goes once the turn is recorded."""
    now = [datetime.now(UTC)]
    sync = syncer(spool, store, wall_clock=lambda: now[0])
    record = capture(spool, when=now[0], finished=False)
    report = await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    assert (report.synced, report.waiting, report.pending) == (0, 1, 1)
    now[0] += timedelta(days=3)  # the clock steps forward mid-turn
    report = await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    assert (report.synced, report.waiting) == (0, 1)
    spool.add_file(record.capture_id, "reply.wav", b"RIFF reply")
    spool.update(record.capture_id, status="complete", reply="noon", lease=None)
    report = await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    assert (report.synced, report.waiting) == (1, 0)
    assert any(key.endswith("/reply.wav") for key in objects(moto))


async def test_a_capture_left_open_by_a_process_that_died_goes_at_once(
    moto: MotoServer, store: CaptureStore, spool: Spool
) -> None:
    """The turn died with its process (SIGKILL, a power cut): recognised at once, no waiting."""
    child = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", LEASED_BY_A_CHILD, str(spool.root)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    stuck = spool.get(child.stdout.strip())
    assert stuck.lease is not None and stuck.lease["pid"] != os.getpid()
    report = await asyncio.wait_for(syncer(spool, store).sync_once(), TIMEOUT)
    assert (report.synced, report.waiting) == (1, 0)
    assert spool.get(stuck.capture_id).sync_state == "synced"


LEASED_BY_A_CHILD = """
import sys
from heimdall_edge.spool.store import Spool
with Spool(sys.argv[1]) as spool:
    record = spool.create(device_id="pi-test", trigger="button", audio_wav=b"RIFF", frames=[],
                          leased=True)
print(record.capture_id)
"""


async def test_uploads_run_at_most_concurrency_at_once(store: CaptureStore, spool: Spool) -> None:
    for _ in range(6):
        capture(spool, frames=0)
    lock = threading.Lock()
    in_flight = peak = 0

    class Slow:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def put_file(self, *args: Any, **kwargs: Any) -> PutResult:
            nonlocal in_flight, peak
            with lock:
                in_flight += 1
                peak = max(peak, in_flight)
            try:
                time.sleep(0.05)
                return store.put_file(*args, **kwargs)
            finally:
                with lock:
                    in_flight -= 1

    report = await asyncio.wait_for(syncer(spool, Slow(), concurrency=3).sync_once(), TIMEOUT)  # type: ignore[arg-type]
    assert report.synced == 6
    assert peak == 3


async def test_the_bandwidth_cap_slows_uploads_down(
    moto: MotoServer, store: CaptureStore, spool: Spool
) -> None:
    for _ in range(3):
        capture(spool, audio_bytes=200_000, frames=0)
    sync = syncer(spool, store, bandwidth_kbps=1000)  # 1 MB/s, 0.25 s of burst
    started = time.monotonic()
    report = await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    elapsed = time.monotonic() - started
    assert report.synced == 3
    assert elapsed >= (600_000 - 250_000) / 1_000_000 * 0.9, elapsed


def test_token_bucket_keeps_the_average_rate_across_threads() -> None:
    clock = FakeClock(0.0)
    lock = threading.Lock()

    def sleep(seconds: float) -> None:
        with lock:
            clock.sleeps.append(seconds)

    bucket = TokenBucket(1000, burst_bytes=500, clock=clock, sleep=sleep)
    assert bucket.consume(500) == 0.0  # the burst
    assert bucket.consume(250) == pytest.approx(0.25)  # then the debt, at 1000 B/s
    assert bucket.consume(250) == pytest.approx(0.5)  # queued behind the first
    clock.advance(10.0)  # idle: refills to the burst, no more
    assert bucket.consume(500) == 0.0
    clock.sleeps.clear()
    threads = [threading.Thread(target=bucket.consume, args=(100,)) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(clock.sleeps) == pytest.approx(1.0)  # 1000 bytes at 1000 B/s, shared fairly
    with pytest.raises(ValueError):
        TokenBucket(0)


# --- retention and quota --------------------------------------------------------------------------


async def test_retention_deletes_synced_captures_older_than_retention_days(
    moto: MotoServer, store: CaptureStore, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    old = capture(spool, when=NOW - timedelta(days=10))
    young = capture(spool, when=NOW - timedelta(days=1))
    unsynced_old = capture(spool, when=NOW - timedelta(days=30), finished=False)
    sync = syncer(spool, store, retention_days=7, wall_clock=lambda: NOW)
    with caplog.at_level(logging.INFO, logger="heimdall_edge.spool.keeper"):
        report = await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    assert (report.synced, report.expired, report.waiting) == (2, 1, 1)
    assert {r.capture_id for r in spool.list()} == {young.capture_id, unsynced_old.capture_id}
    assert any(
        old.capture_id in m and "retention is 7 days" in m for m in messages(caplog, logging.INFO)
    )
    assert any(old.capture_id in key for key in objects(moto))  # still in S3, of course


async def test_retention_zero_deletes_captures_right_after_they_synced(
    moto: MotoServer, store: CaptureStore, spool: Spool
) -> None:
    records = [capture(spool) for _ in range(2)]
    report = await asyncio.wait_for(syncer(spool, store, retention_days=0).sync_once(), TIMEOUT)
    assert (report.synced, report.expired) == (2, 2)
    assert spool.list() == []
    assert len(items(moto)) == 2
    assert len(objects(moto)) == sum(len(r.files) + 1 for r in records)  # and their records


def quota_spool(spool: Spool) -> tuple[list[CaptureRecord], list[CaptureRecord]]:
    """Two synced and three pending captures of 2 MiB each, oldest first (10 MiB + a little)."""
    records = [
        capture(spool, when=NOW + timedelta(minutes=i), audio_bytes=2 * MiB, frames=0)
        for i in range(5)
    ]
    for record in records[:2]:
        spool.update(record.capture_id, sync_state="synced")
    return records[:2], records[2:]


def ids(spool: Spool) -> set[str]:
    return {r.capture_id for r in spool.list()}


def test_make_room_evicts_synced_captures_oldest_first(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    (s1, s2), pending = quota_spool(spool)
    keep = keeper(spool, quota_mb=10)
    assert spool.disk_usage() > 10 * MiB  # the files, plus records and the index
    with caplog.at_level(logging.WARNING, logger="heimdall_edge.spool.keeper"):
        assert keep.make_room(MiB) is True
    assert ids(spool) == {s2.capture_id} | {p.capture_id for p in pending}
    assert spool.disk_usage() + MiB <= 10 * MiB
    logged = messages(caplog)
    assert any(f"evicted synced capture {s1.capture_id}" in m for m in logged), logged
    assert keep.totals["evicted_synced"] == 1

    # 5 MiB more cannot fit even without s2: nothing is evicted in vain, unsynced never.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="heimdall_edge.spool.keeper"):
        assert keep.make_room(5 * MiB) is False
    assert ids(spool) == {s2.capture_id} | {p.capture_id for p in pending}
    assert any("nothing evicted" in m for m in messages(caplog))
    assert keep.make_room(0) is True


def test_a_capture_being_uploaded_is_neither_evicted_nor_expired(spool: Spool) -> None:
    (s1, _s2), pending = quota_spool(spool)
    keep = keeper(spool, quota_mb=10, retention_days=0)
    with keep.in_use(s1.capture_id):  # as the syncer marks what it uploads
        assert keep.make_room(MiB) is True
        assert ids(spool) == {s1.capture_id} | {p.capture_id for p in pending}  # s2 went instead
        assert keep.expire() == 0
    assert keep.expire() == 1 and s1.capture_id not in ids(spool)


def test_eviction_leaves_a_capture_revised_after_it_was_listed(tmp_path: Path) -> None:
    """Found by the chaos run: another process (the service's backfill or upgrade) records a
    new revision of a synced capture between the evictor's listing and its deletion."""
    root = tmp_path / "spool"
    with Spool(root) as evictor, Spool(root) as service:
        six_mb = b"\0" * (6 * MiB)
        old = evictor.create(device_id=DEVICE, trigger="button", audio_wav=six_mb, frames=[])
        evictor.mark_synced(old.capture_id, old.revision, {"s3_keys": {}})
        evictor.create(device_id=DEVICE, trigger="button", audio_wav=six_mb, frames=[])
        listed = evictor.list

        def list_then_the_service_revises(*args: Any, **kwargs: Any) -> list[CaptureRecord]:
            records = listed(*args, **kwargs)
            if not args and not kwargs:  # the keeper's listing, under the evict lock
                service.update(old.capture_id, transcript="what the person said", status="failed")
            return records

        evictor.list = list_then_the_service_revises  # type: ignore[method-assign]
        keep = keeper(evictor, quota_mb=10)
        assert keep.sweep() == (0, 0)
        revised = service.get(old.capture_id)  # still there, pending: it goes up next
        assert (revised.revision, revised.sync_state) == (old.revision + 1, "pending")


EVICTOR = """
import pathlib, sys, time
from heimdall_edge.settings import SyncSettings
from heimdall_edge.spool.store import Spool
from heimdall_edge.spool.keeper import SpoolKeeper

def slow_delete(self, capture_id, delete=Spool.delete, **only_if):  # a slow SD card
    time.sleep(0.3)
    return delete(self, capture_id, **only_if)


Spool.delete = slow_delete
root, go = sys.argv[1], pathlib.Path(sys.argv[2])
with Spool(root) as spool:
    keeper = SpoolKeeper(spool, SyncSettings(quota_mb=10))
    while not go.exists():
        time.sleep(0.001)
    print(keeper.make_room(1024 * 1024), keeper.totals["evicted_synced"])
"""


def test_two_processes_making_room_at_once_evict_only_what_the_quota_asks(
    spool: Spool, tmp_path: Path
) -> None:
    (_s1, s2), pending = quota_spool(spool)
    go = tmp_path / "go"
    evictors = [
        subprocess.Popen(
            [sys.executable, "-c", EVICTOR, str(spool.root), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(1.0)  # both have opened the spool and wait
    go.touch()
    outputs = [evictor.communicate(timeout=60)[0].split() for evictor in evictors]
    assert sorted(outputs) == [["True", "0"], ["True", "1"]]  # one evicted s1, the other saw room
    assert ids(spool) == {s2.capture_id} | {p.capture_id for p in pending}


def test_make_room_evicts_unsynced_captures_only_when_configured(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    (s1, s2), (p1, p2, p3) = quota_spool(spool)
    keep = keeper(spool, quota_mb=10, evict_unsynced=True)
    with caplog.at_level(logging.WARNING, logger="heimdall_edge.spool.keeper"):
        assert keep.make_room(5 * MiB) is True
    assert ids(spool) == {p2.capture_id, p3.capture_id}  # synced first, then the oldest pending
    logged = messages(caplog)
    for gone in (s1, s2):
        assert sum(f"evicted synced capture {gone.capture_id}" in m for m in logged) == 1
    assert (
        sum(f"evicted UNSYNCED capture {p1.capture_id}" in m and "lost" in m for m in logged) == 1
    )
    totals = keep.totals
    assert (totals["evicted_synced"], totals["evicted_unsynced"]) == (2, 1)
    assert keep.make_room(20 * MiB) is False  # larger than the quota itself
    assert ids(spool) == {p2.capture_id, p3.capture_id}


def test_make_room_counts_what_evicting_adds_to_the_index(spool: Spool) -> None:
    # Found by the soak: deleting a capture's row grows the SQLite WAL, so a room that
    # fits to the byte by the files' count alone did not fit on disk, and the capture
    # was refused although more could have been evicted.
    (s1, _s2), pending = quota_spool(spool)
    keep = keeper(spool, quota_mb=10)
    folder = spool.root / "captures" / s1.capture_id
    s1_bytes = sum(f.stat().st_size for f in folder.iterdir())
    needed = 10 * MiB - (spool.disk_usage() - s1_bytes)  # evicting s1 frees exactly this
    assert keep.make_room(needed) is True
    assert spool.disk_usage() + needed <= 10 * MiB
    assert ids(spool) == {p.capture_id for p in pending}  # s2 went too, to make up the index


def test_make_room_is_safe_from_many_threads(spool: Spool) -> None:
    quota_spool(spool)
    keep = keeper(spool, quota_mb=10, evict_unsynced=True)
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(keep.make_room(2 * MiB))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 4
    totals = keep.totals
    gone = 5 - len(spool.list())
    assert gone >= 2  # the first caller alone needed two
    assert totals["evicted_synced"] + totals["evicted_unsynced"] == gone  # each counted once
    assert spool.disk_usage() + 2 * MiB <= 10 * MiB


async def test_a_pass_applies_the_quota_after_syncing(
    moto: MotoServer, store: CaptureStore, spool: Spool
) -> None:
    records = [
        capture(spool, when=NOW + timedelta(minutes=i), audio_bytes=4 * MiB, frames=0)
        for i in range(3)
    ]
    sync = syncer(spool, store, quota_mb=10, wall_clock=lambda: NOW)  # inside the retention
    report = await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    assert (report.synced, report.evicted) == (3, 1)
    assert ids(spool) == {r.capture_id for r in records[1:]}


# --- the service ----------------------------------------------------------------------------------


async def test_run_drains_at_once_when_a_capture_is_kept(store: CaptureStore, spool: Spool) -> None:
    sync = syncer(spool, store, interval_s=3600)
    stop = asyncio.Event()
    task = asyncio.create_task(sync.run(stop))
    try:
        await until(lambda: sync.status()["state"] == "idle", TIMEOUT, "the first pass", task)
        record = capture(spool)
        sync.notify()
        await until(
            lambda: spool.get(record.capture_id).sync_state == "synced",
            TIMEOUT,
            "the capture to sync after notify()",
            task,
        )
        # From another thread too (the appliance may keep captures in a worker thread).
        second = capture(spool)
        await asyncio.to_thread(sync.notify)
        await until(
            lambda: spool.get(second.capture_id).sync_state == "synced",
            TIMEOUT,
            "a notify() from a thread",
            task,
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)


async def test_run_waits_while_offline_and_drains_when_the_network_returns(
    store: CaptureStore, spool: Spool
) -> None:
    async def probe() -> bool:
        return False

    connectivity = Connectivity(probe, service="store", offline_after=1)
    connectivity.record_failure(ErrorKind.CONNECTION)
    assert not connectivity.online
    records = [capture(spool) for _ in range(3)]
    sync = syncer(spool, store, connectivity=connectivity, interval_s=3600, retry_max_s=3600)
    stop = asyncio.Event()
    task = asyncio.create_task(sync.run(stop))
    try:
        await until(lambda: sync.status()["state"] == "offline", TIMEOUT, "offline", task)
        sync.notify()  # a new capture does not make it try while offline
        await asyncio.sleep(0.2)
        assert spool.counts()["pending"] == 3
        assert sync.status()["online"] is False

        connectivity.record_success()  # the network is back
        await until(
            lambda: spool.counts()["synced"] == 3, TIMEOUT, "the drain when back online", task
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)
    assert all(spool.get(r.capture_id).sync_state == "synced" for r in records)


async def test_run_does_not_spin_when_the_network_flaps(store: CaptureStore, spool: Spool) -> None:
    async def probe() -> bool:
        return False

    connectivity = Connectivity(probe, service="store", offline_after=1)
    connectivity.record_failure(ErrorKind.CONNECTION)
    capture(spool)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(seconds)

    sync = syncer(spool, store, connectivity=connectivity, retry_max_s=3600, sleep=sleep)
    stop = asyncio.Event()
    task = asyncio.create_task(sync.run(stop))
    try:
        await until(lambda: sync.status()["state"] == "offline", TIMEOUT, "offline", task)
        connectivity.record_success()  # back for a moment...
        connectivity.record_failure(ErrorKind.CONNECTION)  # ...and gone again
        await asyncio.sleep(0.2)
        assert len(waits) <= 3, f"{len(waits)} waits in 0.2 s: the loop spins"
        assert spool.counts()["pending"] == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)


class ScriptedSleep:
    """The syncer's sleep: records each wait; short ones move a fake clock and return, the
    idle wait (interval_s) really waits, so the loop rests until a test wakes it."""

    def __init__(self, clock: FakeClock, idle_s: float, on_sleep: Any = None) -> None:
        self.clock = clock
        self.idle_s = idle_s
        self.waits: list[float] = []
        self.on_sleep = on_sleep

    async def __call__(self, seconds: float) -> None:
        if seconds >= self.idle_s:
            await asyncio.sleep(3600)
            return
        self.waits.append(round(seconds, 3))
        if self.on_sleep is not None:
            self.on_sleep(len(self.waits))
        self.clock.advance(seconds)
        await asyncio.sleep(0.001)


async def test_run_backs_off_exponentially_while_the_store_is_down_then_recovers(
    moto: MotoServer, store: CaptureStore, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    moto.stop()
    records = [capture(spool) for _ in range(2)]
    clock = FakeClock()
    sleep = ScriptedSleep(clock, idle_s=1000, on_sleep=lambda n: n == 5 and moto.start())
    breaker = CircuitBreaker("s3", failure_threshold=100, clock=clock)
    sync = syncer(
        spool, store, interval_s=1000, retry_max_s=10, breaker=breaker,
        clock=clock, sleep=sleep, jitter=lambda: 1.0, backoff_base_s=1.0,
    )  # fmt: skip
    stop = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="heimdall_edge.sync.syncer"):
        task = asyncio.create_task(sync.run(stop))
        try:
            await until(
                lambda: spool.counts()["synced"] == 2, TIMEOUT, "the sync once back up", task
            )
            await until(
                lambda: any("sync working again" in m for m in messages(caplog, logging.INFO)),
                TIMEOUT,
                "the recovery to be logged",
                task,
            )
        finally:
            stop.set()
            await asyncio.wait_for(task, TIMEOUT)
    assert sleep.waits == [1.0, 2.0, 4.0, 8.0, 10.0]  # doubling, capped at retry_max_s
    assert sync.status()["last_error"] is not None
    assert all(spool.get(r.capture_id).sync_state == "synced" for r in records)
    warnings = [m for m in messages(caplog) if "sync failed" in m]
    assert len(warnings) == 1, warnings  # the same error again is logged at INFO


async def test_run_takes_the_store_offline_from_its_calls_and_probes_it_back_itself(
    moto: MotoServer, store: CaptureStore, spool: Spool
) -> None:
    """As `sync` runs it, with no appliance: the store's own connectivity, fed by the store's
    calls and probed (at the store's host) by run() itself."""
    moto.stop()
    capture(spool)
    probe_waits: list[float] = []

    async def probe_sleep(seconds: float) -> None:
        probe_waits.append(seconds)
        if len(probe_waits) == 2:
            moto.start()  # back before the second probe
        await asyncio.sleep(0.001)

    connectivity = Connectivity(
        tcp_probe(moto.url), service="store", probe_interval_s=1.0, sleep=probe_sleep
    )
    changes: list[bool] = []
    connectivity.subscribe(changes.append)
    clock = FakeClock()
    sleep = ScriptedSleep(clock, idle_s=1000)
    sync = syncer(
        spool, store, interval_s=1000, retry_max_s=1000, connectivity=connectivity, clock=clock,
        sleep=sleep, jitter=lambda: 1.0, backoff_base_s=1.0,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(sync.run(stop))
    try:
        await until(lambda: spool.counts()["synced"] == 1, TIMEOUT, "the sync once back", task)
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)
    assert changes == [False, True]  # two failed passes took it offline; the probe, back
    assert probe_waits == [1.0, 2.0]  # refused once, then connected
    assert sleep.waits == [1.0, 2.0]  # two backoffs, then it waited for the probe, not the clock
    assert connectivity.online and sync.status()["online"] is True


def test_backoff_has_jitter_within_bounds(spool: Spool) -> None:
    from heimdall_edge.sync.results import SyncReport

    values = iter([0.0, 0.5, 1.0])
    sync = syncer(spool, None, retry_max_s=60, backoff_base_s=2.0, jitter=lambda: next(values))
    failure = SyncReport(error="s3: connection", error_kind=ErrorKind.CONNECTION)
    assert [sync._retry_delay(n, failure) for n in (3, 3, 3)] == [4.0, 6.0, 8.0]
    for kind in (ErrorKind.AUTH, ErrorKind.CLIENT):
        slow = SyncReport(error="s3: auth", error_kind=kind)
        assert sync._retry_delay(1, slow) == 60  # a bad key or bucket: retry slowly


async def test_run_waits_for_an_open_breaker_without_calling_the_store(
    moto: MotoServer, store: CaptureStore, spool: Spool
) -> None:
    moto.stop()
    capture(spool)
    clock = FakeClock()
    breaker = CircuitBreaker("s3", failure_threshold=2, reset_s=30, clock=clock)
    calls: list[float] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def abort_stale_uploads(self, *args: Any) -> int:
            calls.append(clock())
            return store.abort_stale_uploads(*args)

    sleep = ScriptedSleep(clock, idle_s=1000, on_sleep=lambda n: n == 3 and moto.start())
    sync = syncer(
        spool, Counting(), interval_s=1000, retry_max_s=5, breaker=breaker, clock=clock,
        sleep=sleep, jitter=lambda: 1.0, backoff_base_s=1.0,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(sync.run(stop))
    try:
        await until(lambda: spool.counts()["synced"] == 1, TIMEOUT, "the probe's sync", task)
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)
    # Two failures open the breaker (t=1000, 1001); after the 2 s backoff it waits out the
    # rest of the 30 s, and the next call is the half-open probe, which succeeds.
    assert calls == [1000.0, 1001.0, 1031.0]
    assert sleep.waits == [1.0, 2.0, 28.0]
    assert breaker.state is BreakerState.CLOSED


async def test_run_logs_a_configuration_error_once_and_retries_slowly(
    moto: MotoServer, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    capture(spool)
    clock = FakeClock()
    done = asyncio.Event()
    sleep = ScriptedSleep(clock, idle_s=1000, on_sleep=lambda n: n == 3 and done.set())
    sync = syncer(
        spool, make_store(moto, bucket="heimdall-missing"), retry_max_s=120, interval_s=1000,
        clock=clock, sleep=sleep,
    )  # fmt: skip
    stop = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="heimdall_edge.sync.syncer"):
        task = asyncio.create_task(sync.run(stop))
        try:
            await asyncio.wait_for(done.wait(), TIMEOUT)
        finally:
            stop.set()
            await asyncio.wait_for(task, TIMEOUT)
    assert sleep.waits == [120.0, 120.0, 120.0]
    errors = messages(caplog, logging.ERROR)
    assert len(errors) == 1, errors
    assert "bucket 'heimdall-missing' does not exist" in errors[0]
    assert "captures stay on the device" in errors[0]
    assert spool.counts()["pending"] == 1


async def test_run_never_dies_on_an_unexpected_error(
    store: CaptureStore, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    record = capture(spool)
    clock = FakeClock()
    failures = [RuntimeError("a bug"), OSError("disk hiccup")]

    class Buggy:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def abort_stale_uploads(self, *args: Any) -> int:
            if failures:
                raise failures.pop(0)
            return store.abort_stale_uploads(*args)

    sync = syncer(
        spool, Buggy(), interval_s=1000, clock=clock, sleep=ScriptedSleep(clock, idle_s=1000)
    )
    stop = asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="heimdall_edge.sync.syncer"):
        task = asyncio.create_task(sync.run(stop))
        try:
            await until(
                lambda: spool.get(record.capture_id).sync_state == "synced",
                TIMEOUT,
                "the sync after two crashing passes",
                task,
            )
        finally:
            stop.set()
            await asyncio.wait_for(task, TIMEOUT)
    assert sum("sync pass failed unexpectedly" in m for m in messages(caplog, logging.ERROR)) == 2


async def test_stopping_cuts_a_slow_upload_short_and_keeps_the_capture_pending(
    moto: MotoServer, spool: Spool
) -> None:
    record = capture(spool, audio_bytes=2 * MiB, frames=0)
    store = make_store(moto, multipart_threshold_bytes=MiB)
    sync = syncer(spool, store, bandwidth_kbps=200)  # about 10 s for this capture
    stop = asyncio.Event()
    task = asyncio.create_task(sync.run(stop))
    s3 = moto.client("s3")
    await until(
        lambda: s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads"),
        TIMEOUT,
        "the multipart upload to start",
        task,
    )
    started = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, TIMEOUT)
    assert time.monotonic() - started < 2.0
    assert spool.get(record.capture_id).sync_state == "pending"
    await until(  # the worker thread stops at its next read and aborts its upload
        lambda: not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads"),
        TIMEOUT,
        "the interrupted upload to be aborted",
    )
    assert objects(moto) == {}


async def test_status_for_doctor(moto: MotoServer, store: CaptureStore, spool: Spool) -> None:
    capture(spool)
    sync = syncer(spool, store)
    status = sync.status()
    assert status | {"totals": None} == {
        "enabled": True,
        "state": "starting",
        "message": "sync starting: 1 pending",
        "pending": 1,
        "synced": 0,
        "failed": 0,
        "last_success_at": None,
        "last_error": None,
        "last_error_at": None,
        "breaker": "closed",
        "online": None,
        "totals": None,
    }
    await asyncio.wait_for(sync.sync_once(), TIMEOUT)
    status = sync.status()
    assert (status["pending"], status["synced"], status["state"]) == (0, 1, "idle")
    assert status["last_success_at"] is not None
    assert status["totals"]["synced"] == 1 and status["totals"]["bytes"] > 0
