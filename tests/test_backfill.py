"""The backfill: captures cut short are transcribed after a restart, only while nothing else runs."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from heimdall_edge.app import builders
from heimdall_edge.audio import Audio, read_audio
from heimdall_edge.engines.base import Transcript
from heimdall_edge.settings import load_settings
from heimdall_edge.spool.store import Spool
from heimdall_edge.testing.fakecloud.cloud import FakeCloud
from heimdall_edge.turn.backfill import CUT_SHORT, Backfill, cut_short

LEFT_BY_A_DEAD_PROCESS = """
import sys
from heimdall_edge.audio import read_audio
from heimdall_edge.spool.store import Spool
with Spool(sys.argv[1]) as spool:
    record = spool.create(device_id="pi-test", trigger="button", frames=[], leased=True,
                          audio_wav=read_audio(sys.argv[2]).to_wav())
print(record.capture_id)
"""


def left_by_a_dead_process(root: Path, wav: Path) -> str:
    child = subprocess.run(
        [sys.executable, "-c", LEFT_BY_A_DEAD_PROCESS, str(root), str(wav)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return child.stdout.strip()


async def test_it_waits_for_the_live_turn_then_transcribes_and_records(
    tmp_path: Path, speech_dir: Path
) -> None:
    root = tmp_path / "spool"
    dead = left_by_a_dead_process(root, speech_dir / "sr_english.wav")
    with Spool(root) as spool:
        live = spool.create(
            device_id="pi-test", trigger="button", audio_wav=b"RIFF", frames=[], leased=True
        )  # this process is still recording that turn: not the backfill's
        assert [r.capture_id for r in cut_short(spool)] == [dead]

        in_turn = [True, True, False]  # a live turn for two looks, then idle
        heard: list[Audio] = []
        recorded: list[str] = []

        async def transcribe(audio: Audio) -> Transcript:
            assert not in_turn[0], "transcribed while a turn was in progress"
            heard.append(audio)
            return Transcript(text="One, two, three.", engine="faster-whisper")

        async def sleep(_s: float) -> None:
            in_turn.pop(0)

        backfill = Backfill(
            spool, transcribe, idle=lambda: not in_turn[0], on_recorded=lambda: recorded.append("x"), sleep=sleep
        )  # fmt: skip
        await asyncio.wait_for(backfill.run(asyncio.Event()), 30)
        assert backfill.done == 1 and recorded == ["x"] and in_turn == [False]
        assert heard[0].pcm == read_audio(spool.path(dead) / "audio.wav").pcm  # what was kept
        record = spool.get(dead)
        assert (record.transcript, record.engines["stt"]) == ("One, two, three.", "faster-whisper")
        assert (record.status, record.error, record.lease) == ("failed", CUT_SHORT, None)
        assert (record.revision, record.sync_state) == (2, "pending")
        assert spool.get(live.capture_id).transcript is None
        assert cut_short(spool) == []  # once only


async def test_a_capture_evicted_while_it_is_transcribed_is_let_go_quietly(
    tmp_path: Path, speech_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The quota (this process's keeper or another syncer's) removes it under the backfill."""
    caplog.set_level(logging.INFO, logger="heimdall_edge.turn.backfill")
    root = tmp_path / "spool"
    dead = left_by_a_dead_process(root, speech_dir / "sr_english.wav")
    with Spool(root) as spool:

        async def transcribe(_audio: Audio) -> Transcript:
            spool.delete(dead)
            return Transcript(text="One, two, three.", engine="faster-whisper")

        backfill = Backfill(spool, transcribe, idle=lambda: True)
        await asyncio.wait_for(backfill.run(asyncio.Event()), 30)
        assert backfill.done == 0 and cut_short(spool) == []
    assert "Traceback" not in caplog.text and "removed while it was transcribed" in caplog.text


async def test_a_stock_phrase_from_cloud_whisper_is_recorded_as_no_speech(
    tmp_path: Path, speech_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engines as the service builds them, cloud Whisper (the fake) writing "Thank you.":
    the capture is recorded as transcribed, with no speech in it, and not transcribed again."""
    root = tmp_path / "spool"
    dead = left_by_a_dead_process(root, speech_dir / "sr_english.wav")
    with FakeCloud(transcript="Thank you.") as cloud, Spool(root) as spool:
        for name, value in cloud.env().items():
            monkeypatch.setenv(name, value)
        engines = builders.build_engines(load_settings(), voice_cache=False)
        backfill = Backfill(spool, engines.transcribe, idle=lambda: True)
        await asyncio.wait_for(backfill.run(asyncio.Event()), 30)
        assert cloud.count("transcriptions") == 1
        record = spool.get(dead)
        assert (record.transcript, record.engines["stt"]) == ("", "openai")
        assert (record.status, record.error) == ("failed", CUT_SHORT)
        assert cut_short(spool) == []
