"""The upgrade: what the device transcribed without the cloud is transcribed again by cloud Whisper."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from heimdall_edge.app import builders
from heimdall_edge.audio import Audio, read_audio
from heimdall_edge.cloud.errors import CloudError, ErrorKind
from heimdall_edge.engines.base import Transcript
from heimdall_edge.settings import load_settings
from heimdall_edge.spool.store import Spool
from heimdall_edge.testing.fakecloud.cloud import FakeCloud
from heimdall_edge.testing.moto import MotoServer, heimdall_store_env, use_aws_test_env
from heimdall_edge.turn.upgrade import ON_DEVICE, Upgrade, upgradable

CLOUD_TEXT = "One, two, three, as the cloud heard it."
BUCKET, TABLE = "heimdall-upgrade", "heimdall-upgrade-index"


def kept(spool: Spool, wav: Path, transcript: str, engine: str) -> str:
    record = spool.create(
        device_id="pi-test", trigger="button", frames=[], audio_wav=read_audio(wav).to_wav()
    )
    spool.update(record.capture_id, transcript=transcript, engines={"stt": engine, "tts": "piper"},
                 status="complete")  # fmt: skip
    return record.capture_id


async def test_only_offline_transcripts_are_upgraded_while_idle_and_both_are_kept(
    tmp_path: Path, speech_dir: Path
) -> None:
    wav = speech_dir / "sr_english.wav"
    with Spool(tmp_path / "spool") as spool:
        offline = kept(spool, wav, "one two tree", "faster-whisper")
        kept(spool, wav, "one two three", "openai")  # the cloud heard it already
        kept(spool, wav, "", "faster-whisper")  # heard nothing: cloud Whisper would invent
        refused = kept(spool, wav, "garbled", "faster-whisper")
        assert {r.capture_id for r in upgradable(spool, "faster-whisper")} == {offline, refused}
        before = spool.get(offline).revision

        looks = {"idle": [False, False, True], "cloud": [False, True]}
        sent: list[Audio] = []

        async def transcribe(audio: Audio) -> Transcript:
            assert looks["idle"][0] and looks["cloud"][0], "sent while busy or offline"
            sent.append(audio)
            if len(sent) == 2:
                raise CloudError("openai", ErrorKind.CLIENT, "400: audio refused")
            return Transcript(CLOUD_TEXT, "openai")

        async def sleep(_s: float) -> None:
            for states in looks.values():
                if len(states) > 1:
                    states.pop(0)
            if len(sent) >= 2:
                stop.set()

        stop = asyncio.Event()
        recorded: list[str] = []
        upgrade = Upgrade(
            spool, transcribe, local_engine="faster-whisper",
            cloud_available=lambda: looks["cloud"][0], idle=lambda: looks["idle"][0],
            requests_per_minute=60, on_recorded=lambda: recorded.append("x"), sleep=sleep,
        )  # fmt: skip
        await asyncio.wait_for(upgrade.run(stop), 30)

        record = spool.get(offline)
        assert record.transcript == CLOUD_TEXT and record.transcript_on_device == "one two tree"
        assert record.engines == {"stt": "openai", ON_DEVICE: "faster-whisper", "tts": "piper"}
        assert record.revision == before + 1 and record.sync_state == "pending"
        assert spool.get(refused).transcript == "garbled"  # left as it was
        assert upgrade.done == 1 and recorded == ["x"]
        assert [r.capture_id for r in upgradable(spool, "faster-whisper")] == [refused]


async def test_a_capture_evicted_during_its_upgrade_is_left_to_the_store_quietly(
    tmp_path: Path, speech_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by the long chaos run under the smallest quota: the keeper evicted the (synced)
    # capture while cloud Whisper was transcribing it, and the upgrade logged a traceback.
    caplog.set_level(logging.INFO, logger="heimdall_edge.turn.upgrade")
    with Spool(tmp_path / "spool") as spool:
        offline = kept(spool, speech_dir / "sr_english.wav", "one two tree", "faster-whisper")
        stop = asyncio.Event()

        async def transcribe(audio: Audio) -> Transcript:
            spool.delete(offline, unchanged=spool.get(offline))  # the quota's sweep, meanwhile
            stop.set()
            return Transcript(CLOUD_TEXT, "openai")

        async def sleep(_s: float) -> None:
            await asyncio.sleep(0)

        upgrade = Upgrade(
            spool, transcribe, local_engine="faster-whisper", cloud_available=lambda: True,
            idle=lambda: True, requests_per_minute=60, sleep=sleep,
        )  # fmt: skip
        await asyncio.wait_for(upgrade.run(stop), 30)
    assert upgrade.done == 0
    assert "left the spool before its upgrade was recorded" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info]


async def test_a_stock_phrase_from_cloud_whisper_upgrades_to_no_speech(
    tmp_path: Path, speech_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cloud Whisper (the fake, through the real client) writes "Thank you." where the device
    heard "Okay.": the cloud heard no speech, so the transcript becomes "", the device's kept."""
    with FakeCloud(transcript="Thank you.") as cloud, Spool(tmp_path / "spool") as spool:
        for name, value in cloud.env().items():
            monkeypatch.setenv(name, value)
        engines = builders.build_engines(load_settings(), voice_cache=False)
        capture_id = kept(spool, speech_dir / "sr_english.wav", "Okay.", "faster-whisper")
        stop = asyncio.Event()

        async def sleep(_s: float) -> None:
            if not upgradable(spool, "faster-whisper"):
                stop.set()
            await asyncio.sleep(0)

        upgrade = Upgrade(
            spool, engines.transcribe_in_cloud, local_engine="faster-whisper",
            cloud_available=lambda: True, idle=lambda: True, requests_per_minute=60, sleep=sleep,
        )  # fmt: skip
        await asyncio.wait_for(upgrade.run(stop), 30)
        assert cloud.count("transcriptions") == 1 and upgrade.done == 1
        record = spool.get(capture_id)
        assert (record.transcript, record.transcript_on_device) == ("", "Okay.")
        assert record.engines["stt"] == "openai"


# --- end to end: the real service, the fake cloud, moto --------------------------------------


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    use_aws_test_env(monkeypatch)
    with MotoServer() as server:
        server.reset()
        server.create_bucket(BUCKET)
        server.create_table(TABLE)
        for name, value in heimdall_store_env(server, BUCKET, TABLE).items():
            monkeypatch.setenv(name, value)
        yield server


def test_a_capture_made_offline_is_upgraded_and_indexed_once_the_cloud_is_back(
    store: MotoServer, speech_dir: Path
) -> None:
    offline = subprocess.run(
        [
            sys.executable,
            "-m",
            "heimdall_edge.cli",
            "demo",
            "--json",
            "--input",
            str(speech_dir / "sr_english.wav"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
        check=False,
    )  # fmt: skip  (no OpenAI key: the device's engines only)
    assert offline.returncode == 0, offline.stderr
    turn = json.loads(offline.stdout)
    capture_id, on_device = turn["capture_id"], turn["transcript"]
    assert turn["engines"]["stt"] == "faster-whisper"

    with FakeCloud(transcript=CLOUD_TEXT) as cloud:
        service = subprocess.Popen(
            [sys.executable, "-m", "heimdall_edge.cli", "run", "--simulate"],
            stderr=subprocess.PIPE, text=True, env={**os.environ, **cloud.env()},
        )  # fmt: skip
        try:
            assert service.stderr is not None
            seen, upgraded = [], False
            for line in service.stderr:
                seen.append(line)
                upgraded = upgraded or f"capture {capture_id} upgraded by openai" in line
                if upgraded and f"synced capture {capture_id}" in line:
                    break
            else:
                raise AssertionError("the service ended first:\n" + "".join(seen[-30:]))
        finally:
            service.terminate()
            service.wait(timeout=60)
        assert cloud.count("transcriptions") == 1

    [item] = store.client("dynamodb").scan(TableName=TABLE)["Items"]
    assert item["capture_id"]["S"] == capture_id
    assert item["transcript"]["S"] == CLOUD_TEXT
    assert item["transcript_on_device"]["S"] == on_device
    assert item["engines"]["M"]["stt"]["S"] == "openai"
    assert item["engines"]["M"][ON_DEVICE]["S"] == "faster-whisper"
    manifest_key = item["s3_keys"]["M"]["capture.json"]["S"]
    assert manifest_key.endswith(f"capture.r{item['revision']['N']}.json")
    body = store.client("s3").get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read()
    assert json.loads(body)["transcript_on_device"] == on_device
