"""Cloud first, local always: the official SDKs against a real HTTP fake of OpenAI and ElevenLabs.

Every fault the cloud can throw must be answered by the local engine in the same
call, leave the right breaker state, and never cost a timeout once the breaker is
open. Requests are counted at the server, so hidden SDK retries would show.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from heimdall_edge.app import builders
from heimdall_edge.audio import read_audio
from heimdall_edge.cloud.breaker import BreakerState
from heimdall_edge.engines.base import ReplyRequest
from heimdall_edge.settings import load_settings
from heimdall_edge.testing.fakecloud.cloud import FakeCloud
from heimdall_edge.testing.fakecloud.wire import Fault
from heimdall_edge.turn.routing import Engines
from tests.shared import streams_left_to_the_gc

CLOUD_TEXT = "turn on the porch light"  # what the fake "hears": never what the local model hears


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCloud]:
    with FakeCloud(transcript=CLOUD_TEXT, reply="The porch light is on. Anything else?") as fake:
        for name, value in fake.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("HEIMDALL_RESILIENCE__STT_HEDGE_AFTER_MS", "3000")
        monkeypatch.setenv("HEIMDALL_RESILIENCE__REPLY_HEDGE_AFTER_MS", "3000")
        monkeypatch.setenv("HEIMDALL_RESILIENCE__TTS_HEDGE_AFTER_MS", "3000")
        monkeypatch.setenv("HEIMDALL_RESILIENCE__STT_DEADLINE_S", "4")
        monkeypatch.setenv("HEIMDALL_RESILIENCE__REPLY_DEADLINE_S", "4")
        monkeypatch.setenv("HEIMDALL_RESILIENCE__TTS_DEADLINE_S", "4")
        monkeypatch.setenv("HEIMDALL_RESILIENCE__PROBE_INTERVAL_S", "0.2")
        yield fake


@pytest.fixture
def engines(cloud: FakeCloud, whisper, piper, tmp_path: Path) -> Engines:
    """The appliance's engines as built from settings, with the warm local models swapped in."""
    built = builders.build_engines(load_settings())
    built.stt, built.tts = whisper, piper
    return built


@pytest.fixture
def clip(speech_dir: Path):
    return read_audio(speech_dir / "v2j_what_time_is_it.wav")


def openai_breaker(engines: Engines):
    assert engines.cloud_stt is not None
    return engines.cloud_stt.policy.breaker


async def transcribe(engines: Engines, clip) -> tuple[str, str, float]:
    started = time.monotonic()
    transcript = await asyncio.wait_for(engines.transcribe(clip), 30)
    return transcript.engine, transcript.text, time.monotonic() - started


async def test_healthy_cloud_answers_every_stage(engines: Engines, cloud: FakeCloud, clip) -> None:
    engine, text, _ = await transcribe(engines, clip)
    assert (engine, text) == ("openai", CLOUD_TEXT)
    upload = cloud.last("transcriptions")
    assert upload.form["model"] == "whisper-1" and upload.form["language"] == "en"
    assert upload.file_bytes == clip.to_wav()  # the utterance as an in-memory WAV

    answer = await asyncio.wait_for(
        engines.reply(ReplyRequest(text, image_jpeg=b"\xff\xd8jpeg")), 30
    )
    sentences = [s async for s in answer.items()]
    assert answer.engine == "openai" and sentences == ["The porch light is on.", "Anything else?"]
    content = cloud.last("chat").json["messages"][-1]["content"]
    assert content[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert cloud.last("chat").json["stream"] is True

    speech = await asyncio.wait_for(engines.speak("The porch light is on."), 30)
    audio = [chunk async for chunk in speech.items()]
    assert speech.engine == "elevenlabs" and not speech.cached
    assert {chunk.sample_rate for chunk in audio} == {16000}
    assert sum(len(c.pcm) for c in audio) // 2 == cloud.tts_samples("The porch light is on.", 16000)
    assert (cloud.count("transcriptions"), cloud.count("chat"), cloud.count("tts")) == (1, 1, 1)


@pytest.mark.parametrize(
    ("fault", "requests", "state"),
    [
        (Fault(status=401), 1, BreakerState.OPEN),  # auth: opens at once, never retried
        (Fault(status=500), 2, BreakerState.CLOSED),  # retried once, then local
        (Fault(status=503, retry_after_s=0.1), 2, BreakerState.CLOSED),
        (Fault(malformed=True), 1, BreakerState.CLOSED),  # not retried: it would only repeat
        (Fault(truncate=True), 2, BreakerState.CLOSED),
    ],
    ids=["401", "500", "503", "malformed", "truncated"],
)
async def test_each_fault_falls_back_to_the_local_engine(
    engines: Engines, cloud: FakeCloud, clip, fault: Fault, requests: int, state: BreakerState
) -> None:
    cloud.fault("transcriptions", fault)
    engine, text, _ = await transcribe(engines, clip)
    assert engine == "faster-whisper" and "time" in text.lower()
    assert cloud.count("transcriptions") == requests  # ours only: no hidden SDK retries
    assert openai_breaker(engines).state is state


async def test_breaker_opens_after_repeated_failures_and_then_costs_nothing(
    engines: Engines, cloud: FakeCloud, clip, monkeypatch: pytest.MonkeyPatch
) -> None:
    cloud.fault("transcriptions", Fault(status=500))
    for _ in range(2):  # 2 calls x 2 attempts = 4 failures >= threshold 3
        assert (await transcribe(engines, clip))[0] == "faster-whisper"
    assert openai_breaker(engines).state is BreakerState.OPEN
    seen = cloud.count("transcriptions")
    cloud.fault("transcriptions", Fault(hang=True))  # even a hung cloud costs nothing now
    engine, _, _ = await transcribe(engines, clip)
    assert engine == "faster-whisper"
    assert cloud.count("transcriptions") == seen  # the cloud was not asked at all


async def test_rate_limit_retry_after_is_honoured(engines: Engines, cloud: FakeCloud, clip) -> None:
    cloud.fault("transcriptions", Fault(status=429, retry_after_s=0.5, times=1))
    engine, text, _ = await transcribe(engines, clip)
    assert (engine, text) == ("openai", CLOUD_TEXT)  # the retry succeeded
    first, second = cloud.requests["transcriptions"]
    assert second.received_at - first.received_at >= 0.5


async def test_refused_connections_go_offline_and_skip_the_cloud(
    engines: Engines, cloud: FakeCloud, clip
) -> None:
    cloud.refuse_connections()
    for _ in range(2):
        assert (await transcribe(engines, clip))[0] == "faster-whisper"
    # OpenAI's calls failed: OpenAI is offline; ElevenLabs, not asked, is not marked down.
    assert engines.online == {"openai": False, "elevenlabs": True}
    reply = await engines.reply(ReplyRequest("tell me a joke", status={"online": "false"}))
    assert reply.engine == "offline" and reply.first == "I'm offline, but I've saved that."
    openai = engines.connectivities["openai"]
    prober = asyncio.create_task(openai.run())
    try:
        cloud.accept_connections()
        await asyncio.wait_for(openai.wait_online(), 10)  # the probe found it back
    finally:
        prober.cancel()
    engine, text, _ = await transcribe(engines, clip)
    assert (engine, text) == ("openai", CLOUD_TEXT)


async def test_hung_cloud_costs_only_the_hedge_delay(
    engines: Engines, cloud: FakeCloud, clip, monkeypatch: pytest.MonkeyPatch
) -> None:
    engines._hedge["stt"] = 0.3
    cloud.fault("transcriptions", Fault(hang=True))
    engine, text, elapsed = await transcribe(engines, clip)
    assert engine == "faster-whisper" and "time" in text.lower()
    assert elapsed < 3.0  # the 4 s cloud deadline was not paid
    breaker = openai_breaker(engines)
    # A lost hedge counts against the service (one is not yet an outage), never the network.
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["failures_in_window"] == 1
    assert breaker.snapshot()["last_error"] == "slow"
    assert engines.online == {"openai": True, "elevenlabs": True}


async def test_hung_cloud_opens_the_breaker_then_costs_nothing_until_it_is_fast_again(
    engines: Engines, cloud: FakeCloud, clip
) -> None:
    engines._hedge["stt"] = 0.3
    breaker = openai_breaker(engines)
    breaker.reset_s = 0.5
    cloud.fault("transcriptions", Fault(hang=True))
    for _ in range(breaker.failure_threshold):  # each turn loses its hedge
        assert (await transcribe(engines, clip))[0] == "faster-whisper"
    assert breaker.state is BreakerState.OPEN
    asked = cloud.count("transcriptions")
    assert (await transcribe(engines, clip))[0] == "faster-whisper"
    assert cloud.count("transcriptions") == asked
    await asyncio.sleep(0.5)  # half-open: the next turn probes, and the cloud still hangs
    assert (await transcribe(engines, clip))[0] == "faster-whisper"
    assert breaker.state is BreakerState.OPEN and cloud.count("transcriptions") == asked + 1
    cloud.clear_faults()  # fast again: the next probe finds out and the cloud is back
    await asyncio.sleep(0.5)
    assert (await transcribe(engines, clip))[:2] == ("openai", CLOUD_TEXT)
    assert breaker.state is BreakerState.CLOSED
    assert (await transcribe(engines, clip))[0] == "openai"


async def test_hedging_keeps_the_faster_engine(engines: Engines, cloud: FakeCloud, clip) -> None:
    engines._hedge["stt"] = 0.05
    cloud.fault(
        "transcriptions", Fault(latency_s=0.05)
    )  # cloud slower than the hedge, faster than local
    engine, _, _ = await transcribe(engines, clip)
    assert engine == "openai"
    cloud.fault("transcriptions", Fault(latency_s=2.5))  # now local is faster
    engine, _, _ = await transcribe(engines, clip)
    assert engine == "faster-whisper"


async def test_truncated_reply_stream_keeps_what_arrived(
    engines: Engines, cloud: FakeCloud
) -> None:
    cloud.reply = "First part is here. " + "Second part goes on and on. " * 20
    cloud.fault("chat", Fault(truncate=True))
    answer = await asyncio.wait_for(engines.reply(ReplyRequest("hi")), 30)
    sentences = [s async for s in answer.items()]
    if answer.engine == "openai":
        assert sentences[0] == "First part is here." and len(sentences) < 21
    else:  # cut before the first sentence was complete: answered offline
        assert answer.engine == "offline"


async def test_tts_faults_fall_back_to_piper(engines: Engines, cloud: FakeCloud) -> None:
    for fault in (Fault(status=401), Fault(malformed=True)):
        cloud.fault("tts", fault)
        speech = await asyncio.wait_for(engines.speak(f"Fault {fault.status or 'garbage'}."), 30)
        assert speech.engine == "piper"
        assert {chunk.sample_rate async for chunk in speech.items()} == {22050}


@pytest.mark.parametrize(
    ("chat", "tts", "read"),
    [
        (None, None, "all"),
        (None, None, "first"),  # the person pressed the button: playback stopped early
        (Fault(malformed=True), Fault(malformed=True), "all"),
        (Fault(truncate=True), Fault(truncate=True), "all"),
        (Fault(latency_s=1.0), Fault(latency_s=1.0), "all"),  # hedged: the cloud loses
    ],
    ids=["healthy", "stopped-early", "malformed", "truncated", "hedge-lost"],
)
async def test_every_stream_is_closed_not_left_to_the_garbage_collector(
    engines: Engines, cloud: FakeCloud, chat: Fault | None, tts: Fault | None, read: str
) -> None:
    cloud.reply = "The porch light is on. It has been on since dusk. Anything else?"
    for route, fault in (("chat", chat), ("tts", tts)):
        if fault is not None:
            cloud.fault(route, fault)
    engines._hedge.update(reply=0.2, tts=0.2)
    with streams_left_to_the_gc() as left:
        for n in range(3):
            answer = await asyncio.wait_for(engines.reply(ReplyRequest("hi")), 30)
            sentences = answer.items()
            async for sentence in sentences:
                speech = await asyncio.wait_for(engines.speak(f"{sentence} ({n})"), 30)
                chunks = speech.items()
                async for _chunk in chunks:
                    if read == "first":
                        break
                await chunks.aclose()
                if read == "first":
                    break
            await sentences.aclose()
    assert left == [], sorted(set(left))


async def test_voice_cache_hit_needs_no_network(engines: Engines, cloud: FakeCloud) -> None:
    text = "The front door is locked."
    first = await engines.speak(text)
    heard = b"".join([c.pcm async for c in first.items()])
    assert first.engine == "elevenlabs" and not first.cached
    cloud.refuse_connections()
    again = await asyncio.wait_for(engines.speak(text), 10)
    assert again.engine == "elevenlabs" and again.cached
    assert b"".join([c.pcm async for c in again.items()]) == heard
    assert cloud.count("tts") == 1


async def test_fixed_phrases_are_rendered_locally_and_play_offline(
    engines: Engines, cloud: FakeCloud
) -> None:
    from heimdall_edge.turn.interaction import FIXED_PHRASES

    assert await engines.prerender(FIXED_PHRASES) == len(FIXED_PHRASES)
    assert await engines.prerender(FIXED_PHRASES) == 0  # already there
    cloud.fault("tts", Fault(status=401))
    await engines.speak("anything")  # opens the ElevenLabs breaker
    speech = await engines.speak(FIXED_PHRASES[0])
    assert speech.engine == "piper" and speech.cached


async def test_canary_key_never_reaches_logs_spool_or_cache(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    speech_dir: Path,
    tmp_path: Path,
) -> None:
    canary = "sk-canary-9f8e7d6c5b4a"
    caplog.set_level(logging.DEBUG)
    with FakeCloud(
        openai_key="sk-other", elevenlabs_key="el-other"
    ) as fake:  # the canary is refused: 401s
        for name, value in fake.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("OPENAI_API_KEY", canary)
        monkeypatch.setenv("ELEVENLABS_API_KEY", canary)
        from heimdall_edge.cli import _demo

        settings = load_settings()
        said = read_audio(speech_dir / "v2j_what_time_is_it.wav").pcm
        result = await asyncio.wait_for(_demo(settings, said, None, {}), 60)  # a press, no room
        assert result.engines == {"stt": "faster-whisper", "reply": "offline", "tts": "piper"}
        assert fake.count("transcriptions") == 1 and fake.count("tts") >= 1
    assert canary not in caplog.text
    assert canary not in repr(result) + repr(settings)
    for path in settings.state_dir.rglob("*"):
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), path
