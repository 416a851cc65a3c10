"""One turn when things go wrong: every failure is heard by the person and nothing said is lost."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from heimdall_edge.audio import Audio, read_audio
from heimdall_edge.capture import Capture
from heimdall_edge.devices.base import IndicatorState
from heimdall_edge.devices.speaker import WavFileSpeaker
from heimdall_edge.engines.base import ReplyRequest, Transcript
from heimdall_edge.engines.local.offline_reply import OfflineReplyEngine
from heimdall_edge.engines.local.piper import PiperEngine
from heimdall_edge.listen.earcon import ERROR_EARCON
from heimdall_edge.listen.endpointer import EndReason, Utterance
from heimdall_edge.spool.errors import SpoolFullError
from heimdall_edge.spool.store import Spool
from heimdall_edge.turn.interaction import SAY_NOT_UNDERSTOOD, SAY_STORAGE_FULL, Interaction
from heimdall_edge.turn.routing import Engines


class Broken:
    """An engine whose every call fails, as a crashed model or a bug would."""

    name = "broken"

    async def load(self) -> None:
        pass

    async def transcribe(self, audio: Audio) -> Transcript:
        raise RuntimeError("model exploded")

    async def reply(self, request: ReplyRequest) -> AsyncIterator[str]:
        raise RuntimeError("reply exploded")
        yield  # pragma: no cover - makes this an async generator

    async def synthesize(self, text: str) -> AsyncIterator[Audio]:
        raise RuntimeError("voice exploded")
        yield  # pragma: no cover - makes this an async generator


class FixedTranscript:
    name = "fixed"

    def __init__(self, text: str) -> None:
        self.text = text

    async def load(self) -> None:
        pass

    async def transcribe(self, audio: Audio) -> Transcript:
        return Transcript(self.text, self.name)


class RecordingIndicator:
    def __init__(self) -> None:
        self.states: list[IndicatorState] = []

    def show(self, state: IndicatorState) -> None:
        self.states.append(state)

    def close(self) -> None:
        pass


def utterance(speech_dir: Path) -> Utterance:
    return Utterance(
        audio=read_audio(speech_dir / "v2j_what_time_is_it.wav"),
        trigger="button",
        reason=EndReason.SILENCE,
        speech_ms=1500,
        speech_end_ms=1800,
        ended_at=time.monotonic(),
        min_speech_ms=240,
    )


def interaction(
    spool: Spool, engines: Engines, speaker: WavFileSpeaker, indicator: RecordingIndicator
) -> Interaction:
    return Interaction(
        device_id="test-pi", spool=spool, engines=engines, speaker=speaker, indicator=indicator
    )


@pytest.fixture
def spool(tmp_path: Path):
    with Spool(tmp_path / "spool") as spool:
        yield spool


async def test_transcription_failure_keeps_the_capture_and_says_so(
    spool: Spool, piper: PiperEngine, whisper, speech_dir: Path, tmp_path: Path
) -> None:
    speaker = WavFileSpeaker(tmp_path / "out.wav")
    indicator = RecordingIndicator()
    turn = interaction(
        spool, Engines(stt=Broken(), reply=OfflineReplyEngine(), tts=piper), speaker, indicator
    )
    result = await asyncio.wait_for(
        turn.run(Capture(utterance(speech_dir), (b"\xff\xd8jpeg",)), asyncio.Event()), 60
    )
    record = spool.get(result.capture_id)
    assert record.status == "failed" and "model exploded" in record.error
    assert (record.transcript, record.reply) == (None, SAY_NOT_UNDERSTOOD)
    assert {"audio.wav", "frame-00.jpg", "reply.wav"} <= set(record.files)
    heard = await whisper.transcribe(read_audio(tmp_path / "out.wav"))  # what the person heard
    assert "couldn't make that out" in heard.text.lower().replace("could not", "couldn't")
    assert indicator.states[-1] is IndicatorState.ERROR
    assert SAY_NOT_UNDERSTOOD.startswith("Sorry")


async def test_no_speech_is_not_understood_and_never_answered(
    spool: Spool, piper: PiperEngine, whisper, speech_dir: Path, tmp_path: Path
) -> None:
    """An empty transcript (silence, noise, or a stock phrase Whisper made up from them) is
    heard as "not understood", like a failed transcription; the reply engine is never asked."""
    speaker = WavFileSpeaker(tmp_path / "out.wav")
    indicator = RecordingIndicator()
    turn = interaction(
        spool, Engines(stt=FixedTranscript(""), reply=Broken(), tts=piper), speaker, indicator
    )
    result = await asyncio.wait_for(turn.run(Capture(utterance(speech_dir)), asyncio.Event()), 60)
    record = spool.get(result.capture_id)
    assert (record.transcript, record.reply, record.error) == ("", SAY_NOT_UNDERSTOOD, None)
    assert record.status == "complete" and record.engines == {"stt": "fixed", "tts": "piper"}
    assert {"audio.wav", "reply.wav"} <= set(record.files)
    heard = await whisper.transcribe(read_audio(tmp_path / "out.wav"))
    assert "couldn't make that out" in heard.text.lower().replace("could not", "couldn't")
    assert indicator.states[-1] is IndicatorState.IDLE
    assert "reply" not in result.timings_ms


async def test_speech_failure_falls_back_to_an_earcon(
    spool: Spool, speech_dir: Path, tmp_path: Path
) -> None:
    speaker = WavFileSpeaker(None)
    turn = interaction(
        spool,
        Engines(stt=FixedTranscript("what time is it"), reply=OfflineReplyEngine(), tts=Broken()),
        speaker,
        RecordingIndicator(),
    )
    result = await asyncio.wait_for(turn.run(Capture(utterance(speech_dir)), asyncio.Event()), 30)
    assert speaker.seconds_played == pytest.approx(ERROR_EARCON.audio.seconds, abs=0.01)
    record = spool.get(result.capture_id)
    assert record.transcript == "what time is it" and record.reply.startswith("It's")
    assert record.status == "failed" and "voice exploded" in record.error


async def test_reply_failure_still_answers_aloud(
    spool: Spool, piper: PiperEngine, speech_dir: Path
) -> None:
    speaker = WavFileSpeaker(None)
    turn = interaction(
        spool,
        Engines(stt=FixedTranscript("hello"), reply=Broken(), tts=piper),
        speaker,
        RecordingIndicator(),
    )
    result = await asyncio.wait_for(turn.run(Capture(utterance(speech_dir)), asyncio.Event()), 30)
    assert speaker.seconds_played > 1.0
    assert spool.get(result.capture_id).reply == "I kept that, but I can't answer right now."


async def test_full_disk_is_spoken_and_nothing_half_written(
    spool: Spool, piper: PiperEngine, speech_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(**_: object) -> None:
        raise SpoolFullError(f"the disk is full: {errno.ENOSPC}")

    monkeypatch.setattr(spool, "create", full)
    speaker = WavFileSpeaker(None)
    turn = interaction(
        spool,
        Engines(stt=FixedTranscript("x"), reply=OfflineReplyEngine(), tts=piper),
        speaker,
        RecordingIndicator(),
    )
    result = await asyncio.wait_for(turn.run(Capture(utterance(speech_dir)), asyncio.Event()), 30)
    assert result.capture_id is None and "full" in result.error
    assert speaker.seconds_played > 1.0  # SAY_STORAGE_FULL was spoken
    assert SAY_STORAGE_FULL in "My storage is full, so I couldn't keep that."
    assert spool.list() == []


async def test_barge_in_stops_playback_and_keeps_the_capture(
    spool: Spool, piper: PiperEngine, speech_dir: Path
) -> None:
    long_reply = " ".join(["This is a long answer that goes on and on."] * 6)

    class Chatty(OfflineReplyEngine):
        def answer(self, request: ReplyRequest) -> str:
            return long_reply

    speaker = WavFileSpeaker(None, realtime=True)
    indicator = RecordingIndicator()
    stop = asyncio.Event()
    turn = interaction(
        spool,
        Engines(stt=FixedTranscript("talk to me"), reply=Chatty(), tts=piper),
        speaker,
        indicator,
    )
    task = asyncio.create_task(turn.run(Capture(utterance(speech_dir)), stop))
    while IndicatorState.SPEAKING not in indicator.states:
        await asyncio.sleep(0.02)
    await asyncio.sleep(1.0)
    stop.set()  # the person pressed the button a second into the reply
    result = await asyncio.wait_for(task, 10)
    assert result.interrupted
    assert speaker.seconds_played < 3.0  # the full reply is over 15 s
    record = spool.get(result.capture_id)
    assert record.status == "complete" and record.reply == long_reply
