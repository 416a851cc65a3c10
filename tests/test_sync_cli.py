"""Store and forward, as a person sees it: captures made while the store is down reach it with `sync --once`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from heimdall_edge.testing.moto import DEFAULT_REGION, MotoServer, moto_store
from heimdall_edge.testing.text import words

BUCKET, TABLE = "heimdall-test", "heimdall-captures"


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    with moto_store(monkeypatch, BUCKET, TABLE) as server:
        yield server


def heimdall(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "heimdall_edge.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ),
    )


def objects(server: MotoServer) -> dict[str, dict]:
    s3 = server.client("s3")
    listed = s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {o["Key"]: s3.head_object(Bucket=BUCKET, Key=o["Key"]) for o in listed}


def test_captures_made_offline_are_delivered_once_when_the_store_returns(
    store: MotoServer, speech_dir: Path
) -> None:
    store.stop()  # the store is unreachable while the person talks
    for name in ("v2j_what_time_is_it.wav", "ps_goforward.wav", "sr_english.wav"):
        done = heimdall("demo", "--input", str(speech_dir / name), "--json")
        assert done.returncode == 0, done.stderr
    listed = json.loads(heimdall("captures", "--json").stdout)
    assert [c["sync_state"] for c in listed] == ["pending"] * 3

    failed = heimdall("sync", "--once", "--json")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"]  # a clear error, captures kept
    assert [c["sync_state"] for c in json.loads(heimdall("captures", "--json").stdout)] == [
        "pending"
    ] * 3

    store.start()
    done = heimdall("sync", "--once")
    assert done.returncode == 0, done.stderr
    assert "3 synced" in done.stdout
    assert "captures 3/3" in done.stderr  # the progress bar
    listed = json.loads(heimdall("captures", "--json").stdout)
    assert [c["sync_state"] for c in listed] == ["synced"] * 3

    first = objects(store)
    assert {key.split("/")[-1] for key in first} >= {"audio.wav", "reply.wav", "frame-00.jpg"}
    assert all(head["ServerSideEncryption"] == "AES256" for head in first.values())
    ids = {c["capture_id"] for c in listed}
    assert {key.split("/")[5] for key in first} == ids  # captures/<device>/<y>/<m>/<d>/<id>/<file>
    items = store.client("dynamodb").scan(TableName=TABLE)["Items"]
    assert sorted(item["capture_id"]["S"] for item in items) == sorted(ids)

    again = heimdall("sync", "--once", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["synced"] == 0
    assert {k: h["ETag"] for k, h in objects(store).items()} == {
        k: h["ETag"] for k, h in first.items()
    }
    assert len(store.client("dynamodb").scan(TableName=TABLE)["Items"]) == 3


def test_sync_without_a_bucket_says_so_and_keeps_captures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEIMDALL_S3_BUCKET", raising=False)
    done = heimdall("sync", "--once")
    assert done.returncode == 2
    assert "sync is off: no bucket set (HEIMDALL_S3_BUCKET)" in done.stderr


def test_missing_bucket_is_a_clear_error(
    store: MotoServer, speech_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert heimdall("demo", "--input", str(speech_dir / "sr_english.wav")).returncode == 0
    monkeypatch.setenv("HEIMDALL_S3_BUCKET", "no-such-bucket")
    done = heimdall("sync", "--once", "--json")
    assert done.returncode == 1
    assert "no-such-bucket" in json.loads(done.stdout)["error"]
    assert json.loads(heimdall("captures", "--json").stdout)[0]["sync_state"] == "pending"


def test_doctor_checks_the_store(store: MotoServer) -> None:
    lines = heimdall("doctor").stdout.splitlines()
    [line] = [line for line in lines if line.split(":")[0].endswith("sync")]
    assert line.startswith(f"OK   sync: bucket {BUCKET} and table {TABLE} reachable")
    store.stop()
    [line] = [
        line
        for line in heimdall("doctor").stdout.splitlines()
        if line.split(":")[0].endswith("sync")
    ]
    assert line.startswith("FAIL sync: ") and "pending" in line


def test_the_region_comes_from_aws_region_and_without_one_captures_wait(
    store: MotoServer, speech_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HEIMDALL_SYNC__REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", DEFAULT_REGION)  # the bucket's region, from the chain only
    assert heimdall("demo", "--input", str(speech_dir / "sr_english.wav")).returncode == 0
    done = heimdall("sync", "--once", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["synced"] == 1, done.stderr

    monkeypatch.delenv("AWS_REGION")
    kept = heimdall("demo", "--input", str(speech_dir / "sr_english.wav"))
    assert kept.returncode == 0, kept.stderr
    [line] = [
        ln for ln in heimdall("doctor").stdout.splitlines() if ln.split(":")[0].endswith("sync")
    ]
    assert line.startswith("FAIL sync: no AWS region") and "sync.region" in line
    assert "1 pending" in line
    refused = heimdall("sync", "--once")
    assert refused.returncode != 0 and "no AWS region" in refused.stderr
    assert "Traceback" not in refused.stderr
    monkeypatch.setenv("HEIMDALL_LISTENING__WAKE_WORD", "")  # the recording has no wake word
    service = heimdall("run", "--simulate", "--fast", "--input", str(speech_dir / "sr_english.wav"))
    assert service.returncode == 0, service.stderr[-2000:]
    assert service.stderr.count("sync is off until this is fixed") == 1
    states = [c["sync_state"] for c in json.loads(heimdall("captures", "--json").stdout)]
    assert sorted(states) == ["pending", "pending", "synced"]


KEPT_THEN_KILLED = """
import os, signal, sys
from heimdall_edge.audio import read_audio
from heimdall_edge.settings import load_settings
from heimdall_edge.spool.store import Spool
settings = load_settings()
spool = Spool(settings.spool_dir)
record = spool.create(device_id=settings.device_id, trigger="button", frames=[], leased=True,
                      audio_wav=read_audio(sys.argv[1]).to_wav())
print(record.capture_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # after keep, before transcribe
"""


def test_a_turn_killed_after_keep_is_transcribed_after_the_restart_and_synced(
    store: MotoServer, speech_dir: Path
) -> None:
    killed = subprocess.run(
        [sys.executable, "-c", KEPT_THEN_KILLED, str(speech_dir / "sr_english.wav")],
        capture_output=True, text=True, timeout=120, env=dict(os.environ), check=False,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    capture_id = killed.stdout.strip()
    service = subprocess.Popen(
        [sys.executable, "-m", "heimdall_edge.cli", "run", "--simulate"],
        stderr=subprocess.PIPE, text=True, env=dict(os.environ, HEIMDALL_SYNC__INTERVAL_S="3600"),
    )  # fmt: skip
    try:
        assert service.stderr is not None
        seen, transcribed = [], False
        for line in service.stderr:  # the audio may go up first; the transcript follows it
            seen.append(line)
            transcribed = transcribed or f"capture {capture_id} cut short, transcribed" in line
            if transcribed and f"synced capture {capture_id}" in line:
                break
        else:
            raise AssertionError("the service ended first:\n" + "".join(seen[-30:]))
    finally:
        service.terminate()
        service.wait(timeout=60)
    [item] = store.client("dynamodb").scan(TableName=TABLE)["Items"]
    assert item["capture_id"]["S"] == capture_id and int(item["revision"]["N"]) == 2
    assert "one two three" in words(item["transcript"]["S"]) and item["status"]["S"] == "failed"
    s3 = store.client("s3")
    manifest = s3.get_object(Bucket=BUCKET, Key=item["s3_keys"]["M"]["capture.json"]["S"])
    assert json.loads(manifest["Body"].read())["transcript"] == item["transcript"]["S"]
