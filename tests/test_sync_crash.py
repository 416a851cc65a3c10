"""A real crash test of the syncer: SIGKILL it mid-upload, again and again, then let it finish.

Each syncer is a separate process uploading over HTTP to moto (running in this
process, so S3 and DynamoDB outlive every kill). A bandwidth cap makes the uploads
slow enough that each kill lands in the middle of something: a multipart upload, a
single PUT, an index write, marking a capture synced in the spool. After the last,
clean run every capture must be in S3 exactly once and in DynamoDB exactly once.

The bucket is versioned, so an object written twice (even with the same bytes)
would show as two versions: one version per key proves nothing was ever
overwritten, not merely that the last write was right.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from heimdall_edge.spool.store import Spool
from heimdall_edge.testing.moto import AWS_ENV_TO_UNSET, MotoServer, aws_test_env

REPO = Path(__file__).resolve().parents[1]
BUCKET = "heimdall-crash-test"
TABLE = "heimdall-crash-index"
DEVICE = "pi-crash"
CAPTURES = 30
KILLS = 8
SEED = 20261127

SYNCER = r"""
import asyncio, json, logging, sys
from heimdall_edge.sync.cloudstore import CaptureStore
from heimdall_edge.sync.store_config import StoreConfig
from heimdall_edge.settings import SyncSettings
from heimdall_edge.spool.store import Spool
from heimdall_edge.sync.syncer import Syncer

args = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
spool = Spool(args["root"])
store = CaptureStore(
    StoreConfig(
        bucket=args["bucket"], prefix="captures", table=args["table"], region=args["region"],
        s3_endpoint_url=args["url"], dynamodb_endpoint_url=args["url"],
        multipart_threshold_bytes=args["multipart_threshold"],
    )
)
# One syncer at a time here: any multipart upload it finds was left by a killed one.
syncer = Syncer(
    spool, store, SyncSettings(concurrency=3, bandwidth_kbps=args["kbps"]), args["device"],
    stale_upload_s=0,
)
print("READY", flush=True)
report = asyncio.run(syncer.sync_once())
print("REPORT", json.dumps(report.to_dict()), flush=True)
spool.close()
"""


@pytest.fixture
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AWS_ENV_TO_UNSET}
    return env | aws_test_env()


def run_syncer(args: dict[str, Any], kill_after_s: float | None) -> tuple[str, dict | None]:
    """Run one syncer; SIGKILL it `kill_after_s` after it is ready (None: let it finish).

    Returns how it ended ("killed" or "finished") and its report if it printed one.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", SYNCER, json.dumps(args)],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        ready = child.stdout.readline()
        assert ready == b"READY\n", (ready, child.stderr.read() if child.stderr else b"")
        if kill_after_s is not None:
            time.sleep(kill_after_s)
            child.send_signal(signal.SIGKILL)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode == -signal.SIGKILL:
        return "killed", None
    assert child.returncode == 0, f"the syncer failed:\n{err.decode()[-4000:]}"
    reports = [line for line in out.decode().splitlines() if line.startswith("REPORT ")]
    return "finished", json.loads(reports[-1].removeprefix("REPORT ")) if reports else None


def test_every_capture_reaches_s3_and_dynamodb_exactly_once_across_sigkills(
    moto: MotoServer, tmp_path: Path
) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    moto.create_bucket(BUCKET)
    moto.create_table(TABLE)
    s3, ddb = moto.client("s3"), moto.client("dynamodb")
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})

    root = tmp_path / "spool"
    with Spool(root) as spool:
        for _ in range(CAPTURES):
            record = spool.create(
                device_id=DEVICE,
                trigger="voice",
                audio_wav=rng.randbytes(rng.randint(250_000, 350_000)),
                frames=[rng.randbytes(rng.randint(20_000, 80_000))],
            )
            spool.update(record.capture_id, transcript="hello", status="complete")
        expected = {r.capture_id: r for r in spool.list()}
    total_bytes = sum(info["bytes"] for r in expected.values() for info in r.files.values())

    args = {
        "root": str(root),
        "url": moto.url,
        "bucket": BUCKET,
        "table": TABLE,
        "region": moto.region,
        "device": DEVICE,
        # Audio (over 200 kB) goes up as a multipart upload, frames as single PUTs.
        "multipart_threshold": 200_000,
        "kbps": 1500,  # the whole spool would take about 7 s
    }
    endings: list[str] = []
    left_behind = 0  # multipart uploads a killed syncer left (the next one aborts them)
    for _ in range(KILLS):
        endings.append(run_syncer(args, rng.uniform(0.2, 1.0))[0])
        left_behind += len(s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []))
    assert endings.count("killed") >= KILLS - 1, endings
    assert left_behind > 0, "no kill landed in a multipart upload: the test proves less"

    with Spool(root) as spool:
        counts = spool.counts()
    assert 0 < counts["pending"] < CAPTURES, f"the kills should land mid-way: {counts}"

    ending, report = run_syncer(args, None)
    assert ending == "finished" and report is not None
    assert report["error"] is None and report["failed"] == 0, report
    assert report["pending"] == 0 and report["quarantined"] == 0, report

    # The spool: every capture synced, with the keys it went to.
    with Spool(root) as spool:
        records = {r.capture_id: r for r in spool.list()}
    assert records.keys() == expected.keys()
    assert {r.sync_state for r in records.values()} == {"synced"}
    wanted: dict[str, str] = {}  # key -> sha256 the spool recorded
    for capture_id, record in records.items():
        assert record.files == expected[capture_id].files
        keys = dict(record.extra["s3_keys"])
        manifest = keys.pop("capture.json")  # the record of the revision that went up
        assert capture_id in manifest and manifest.endswith(f"/capture.r{record.revision}.json")
        wanted[manifest] = hashlib.sha256(record.manifest()).hexdigest()
        assert set(keys) == set(record.files)
        for name, key in keys.items():
            assert capture_id in key and key.endswith("/" + name)
            wanted[key] = record.files[name]["sha256"]
    assert len(wanted) == 3 * CAPTURES

    # S3: each key exactly once (one version, never overwritten), bytes as recorded.
    versions: list[dict[str, Any]] = []
    markers: list[dict[str, Any]] = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=BUCKET):
        versions += page.get("Versions", [])
        markers += page.get("DeleteMarkers", [])
    assert markers == []
    keys_seen = [v["Key"] for v in versions]
    assert sorted(keys_seen) == sorted(wanted), "an object is missing, extra or written twice"
    stored_bytes = 0
    for key, sha in wanted.items():
        data = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert hashlib.sha256(data).hexdigest() == sha, key
        stored_bytes += 0 if key.endswith(".json") else len(data)
    assert stored_bytes == total_bytes

    # No multipart upload left behind by any of the kills.
    assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []

    # DynamoDB: exactly one item per capture, pointing at those keys.
    index = ddb.scan(TableName=TABLE)["Items"]
    assert sorted(item["capture_id"]["S"] for item in index) == sorted(expected)
    for item in index:
        record = records[item["capture_id"]["S"]]
        assert {k: v["S"] for k, v in item["s3_keys"]["M"].items()} == record.extra["s3_keys"]
        assert item["device_id"]["S"] == DEVICE

    assert time.monotonic() - started < 40
