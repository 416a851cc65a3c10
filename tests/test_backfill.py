"""The backfill: captures cut short are transcribed after a restart, only while nothing else runs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from heimdall_edge.audio import Audio, read_audio
from heimdall_edge.backfill import CUT_SHORT, Backfill, cut_short
from heimdall_edge.engines.base import Transcript
from heimdall_edge.spool import Spool

LEFT_BY_A_DEAD_PROCESS = """
import sys
from heimdall_edge.audio import read_audio
from heimdall_edge.spool import Spool
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
