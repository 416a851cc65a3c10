"""The speculative turn: a head start at each pause, dropped when speech resumes.

Through the real service (the Appliance in a simulated room on the microphone's clock,
real models), the same command answered with and without speculation gives the same
transcript; a pause the person talks on after is dropped and the answer is taken from
the last pause. Against the fake cloud: a dropped speculation's cloud calls are
cancelled and counted, never against a breaker; garbage from the cloud while
speculating, a stream cut by a drop and a drop racing the hang-over's end leave no
traceback, no stream for the garbage collector, and one answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from heimdall_edge.app import builders
from heimdall_edge.app.appliance import Appliance
from heimdall_edge.audio import FRAME_BYTES, Audio, read_audio, silence
from heimdall_edge.capture import Capture
from heimdall_edge.cloud.breaker import BreakerState
from heimdall_edge.devices.base import Playback
from heimdall_edge.engines.base import ReplyRequest, Transcript
from heimdall_edge.engines.local.offline_reply import OfflineReplyEngine
from heimdall_edge.listen.endpointer import Endpointer, EndReason, Utterance
from heimdall_edge.settings import ListeningSettings, Settings, load_settings
from heimdall_edge.spool.record import CaptureRecord
from heimdall_edge.spool.store import Spool
from heimdall_edge.testing.fakecloud.cloud import FakeCloud
from heimdall_edge.testing.fakecloud.wire import Fault
from heimdall_edge.turn.interaction import Interaction, answerable
from heimdall_edge.turn.routing import Engines
from heimdall_edge.turn.speculation import Speculation
from tests.shared import streams_left_to_the_gc, until

NOON = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)

CLOUD_TEXT = "what is on the shopping list"
CLOUD_REPLY = "Milk and bread. Anything else?"
TIMEOUT = 60


def words_only(path: Path, margin: int = 2) -> bytes:
    """A recording cut to where the speech judge hears speech (and `margin` frames more)."""
    pcm = read_audio(path).pcm
    frames = [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES)]
    judge = Endpointer(ListeningSettings()).judge
    heard = [i for i, frame in enumerate(frames) if judge(frame)]
    return b"".join(frames[max(0, heard[0] - margin) : heard[-1] + 1 + margin])


def said_with_a_pause(speech_dir: Path, pause_ms: int = 400) -> bytes:
    """Two phrases with a pause longer than speculate_after_ms, shorter than silence_ms."""
    first = words_only(speech_dir / "v2j_turn_on_living_room_lamp.wav")
    second = words_only(speech_dir / "v2j_what_time_is_it.wav")
    return silence(600) + first + silence(pause_ms) + second


async def serve(settings: Settings, engines: Engines, said: bytes) -> list[CaptureRecord]:
    devices = builders.build_simulated_devices(settings, inputs=[said], realtime=False)
    spool = builders.open_spool(settings)
    appliance = Appliance(settings, devices, engines, spool)
    try:
        await appliance.start()
        await asyncio.wait_for(appliance.serve(asyncio.Event()), TIMEOUT)
    finally:
        await devices.aclose()
    with Spool(settings.spool_dir) as kept:
        return list(kept.list())


@pytest.fixture
def voice_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("HEIMDALL_LISTENING__MODE", "voice")
    monkeypatch.setenv("HEIMDALL_LISTENING__WAKE_WORD", "")  # any speech starts a turn
    monkeypatch.setenv("HEIMDALL_ENGINES__PRELOAD", "false")
    monkeypatch.setenv("HEIMDALL_CLOUD__ENABLED", "false")
    yield


async def test_the_same_transcript_with_and_without_a_head_start(
    voice_settings: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    whisper,
    piper,
    speech_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    said = said_with_a_pause(speech_dir)
    turns = {}
    caplog.set_level(logging.DEBUG, logger="heimdall_edge.turn.speculation")
    for after_ms in (0, 250):
        monkeypatch.setenv("HEIMDALL_STATE_DIR", str(tmp_path / f"state-{after_ms}"))
        monkeypatch.setenv("HEIMDALL_LISTENING__SPECULATE_AFTER_MS", str(after_ms))
        settings = load_settings()
        engines = builders.build_engines(settings)
        engines.stt, engines.tts = whisper, piper
        engines.reply_engine = OfflineReplyEngine(now=lambda: NOON)  # both turns, one minute
        [turns[after_ms]] = await serve(settings, engines, said)
    plain, speculative = turns[0], turns[250]
    assert not plain.speculative and speculative.speculative
    assert "lamp" in plain.transcript.lower() and "time" in plain.transcript.lower()
    assert speculative.transcript == plain.transcript
    assert caplog.text.count("speech resumed: speculation 1 dropped") == 1  # the inner pause
    assert speculative.reply == plain.reply
    assert {"keep", "speculation", "transcribe", "reply", "speak"} <= set(speculative.timings_ms)


# --- against the fake cloud -----------------------------------------------------------------


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCloud]:
    with FakeCloud(transcript=CLOUD_TEXT, reply=CLOUD_REPLY) as fake:
        for name, value in fake.env().items():
            monkeypatch.setenv(name, value)
        for stage in ("STT", "REPLY", "TTS"):
            monkeypatch.setenv(f"HEIMDALL_RESILIENCE__{stage}_HEDGE_AFTER_MS", "5000")
            monkeypatch.setenv(f"HEIMDALL_RESILIENCE__{stage}_DEADLINE_S", "10")
        yield fake


@pytest.fixture
def engines(cloud: FakeCloud, whisper, piper) -> Engines:
    built = builders.build_engines(load_settings())
    built.stt, built.tts = whisper, piper
    return built


def speculation_on(engines: Engines) -> Speculation:
    async def request_for(transcript: Transcript) -> ReplyRequest:
        return ReplyRequest(transcript.text)

    return Speculation(engines, request_for, answerable)


def breaker_failures(engines: Engines) -> dict[str, int]:
    return {p.service: p.breaker.snapshot()["failures_in_window"] for p in engines.policies}


async def test_a_dropped_speculation_cancels_its_cloud_calls_and_blames_no_breaker(
    engines: Engines, cloud: FakeCloud, clip: Path
) -> None:
    audio = read_audio(clip)
    cloud.fault("transcriptions", Fault(latency_s=2.0))
    speculation = speculation_on(engines)
    with streams_left_to_the_gc() as left:
        speculation.paused(audio)
        await until(lambda: cloud.count("transcriptions") == 1, 10, "the speculative request")
        speculation.resumed()  # the person went on: the call in flight is cancelled
        await asyncio.wait_for(speculation.aclose(), TIMEOUT)
    assert left == []
    assert engines.call_stats()["openai"]["cancelled"] == 1
    assert breaker_failures(engines) == {"openai": 0, "elevenlabs": 0}
    assert (speculation.started, speculation.dropped) == (1, 1)
    assert await speculation.take() is None  # nothing left to answer from

    cloud.clear_faults()  # the next pause runs to the end, cloud all the way
    speculation.paused(audio)
    head = await asyncio.wait_for(speculation.take(), TIMEOUT)
    assert head is not None and head.transcript.text == CLOUD_TEXT
    assert head.reply is not None and head.reply.first == "Milk and bread."
    assert head.speech is not None and head.speech.engine == "elevenlabs"
    await head.aclose()


@pytest.mark.parametrize(
    ("route", "fault", "read"),
    [
        ("chat", Fault(malformed=True), "take"),  # garbage while speculating: answered locally
        ("tts", Fault(hang=True), "drop"),  # dropped with the reply stream open, speech hung
        ("tts", Fault(truncate=True), "drop-after"),  # dropped after it finished
    ],
    ids=["garbage-reply", "stream-cut-by-a-drop", "dropped-when-done"],
)
async def test_faults_while_speculating_leave_no_traceback_and_no_stream(
    engines: Engines,
    cloud: FakeCloud,
    clip: Path,
    route: str,
    fault: Fault,
    read: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cloud.fault(route, fault)
    speculation = speculation_on(engines)
    with caplog.at_level(logging.INFO), streams_left_to_the_gc() as left:
        speculation.paused(read_audio(clip))
        if read == "take":
            head = await asyncio.wait_for(speculation.take(), TIMEOUT)
            assert head is not None and head.reply is not None
            assert head.reply.engine == "offline"  # the cloud's garbage was not spoken
            await head.aclose()
        elif read == "drop":
            await until(lambda: cloud.count("tts") == 1, TIMEOUT, "the speech request")
            speculation.resumed()
        else:
            await until(lambda: cloud.count("tts") == 1, TIMEOUT, "the speech request")
            await asyncio.sleep(0.5)  # the head is complete, its streams open
            speculation.resumed()
        await asyncio.wait_for(speculation.aclose(), TIMEOUT)
    assert left == [], sorted(set(left))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


class CountingSpeaker:
    """A speaker that plays instantly and counts what it was given."""

    def __init__(self) -> None:
        self.playbacks: list[int] = []

    async def play(self, chunks: AsyncIterator[Audio], stop: asyncio.Event) -> Playback:
        count = 0
        async for _chunk in chunks:
            count += 1
        self.playbacks.append(count)
        return Playback(first_audio_at=asyncio.get_running_loop().time(), interrupted=False)


class QuietIndicator:
    def show(self, state: object) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("drop_after_steps", [0, 1, 5, 50])
async def test_a_drop_racing_the_hang_overs_end_answers_once(
    engines: Engines, cloud: FakeCloud, clip: Path, tmp_path: Path, drop_after_steps: int
) -> None:
    audio = read_audio(clip)
    speaker = CountingSpeaker()
    turn = Interaction(
        device_id="test",
        spool=Spool(tmp_path / "spool"),
        engines=engines,
        speaker=speaker,  # type: ignore[arg-type]
        indicator=QuietIndicator(),  # type: ignore[arg-type]
    )
    speculation = speculation_on(engines)
    speculation.paused(audio)

    async def late_resumption() -> None:
        for _ in range(drop_after_steps):
            await asyncio.sleep(0)
        speculation.resumed()  # a frame of speech judged just as the capture ended

    utterance = Utterance(audio, "button", EndReason.SILENCE, 1000, 2000, 0.0, 240)
    with streams_left_to_the_gc() as left:
        racer = asyncio.create_task(late_resumption())
        result = await asyncio.wait_for(
            turn.run(Capture(utterance), asyncio.Event(), speculation=speculation), TIMEOUT
        )
        await racer
    assert left == []
    assert len(speaker.playbacks) == 1 and result.error is None  # answered once
    assert (result.transcript, result.reply) == (CLOUD_TEXT, CLOUD_REPLY)
    assert breaker_failures(engines) == {"openai": 0, "elevenlabs": 0}
    assert all(p.breaker.state is BreakerState.CLOSED for p in engines.policies)
