"""One service down, the others used: the real service against two fake clouds and moto.

OpenAI and ElevenLabs each get their own fake cloud (a real HTTP server on loopback,
the official clients pointed at it by base URL), so one can refuse connections while
the other answers; the store is moto's S3 and DynamoDB. Each service has its own
reachability: one being down never sends another's stage to the local engine, and
sync never waits on a speech service.
"""

from __future__ import annotations

import asyncio
import json
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

from heimdall_edge.app import builders
from heimdall_edge.app.appliance import STATUS_FILE, Appliance
from heimdall_edge.audio import read_audio, silence
from heimdall_edge.engines.base import ReplyRequest
from heimdall_edge.engines.local.offline_reply import OFFLINE_ACK, OfflineReplyEngine
from heimdall_edge.settings import Settings, load_settings
from heimdall_edge.spool.record import CaptureRecord
from heimdall_edge.spool.store import Spool
from heimdall_edge.testing.fakecloud.cloud import FakeCloud
from heimdall_edge.testing.fakecloud.wire import Fault
from heimdall_edge.testing.moto import MotoServer, moto_store
from heimdall_edge.turn.interaction import FIXED_PHRASES
from heimdall_edge.turn.preferred_voice import POLL_S, PreferredVoice
from heimdall_edge.turn.routing import Engines
from tests.shared import until

TIMEOUT = 120
REPLY = "The lamp is on."  # no question: no follow-up window between the turns
BUCKET, TABLE = "heimdall-outages", "heimdall-outages-index"
LINES = ["v2j_launch_firefox.wav", "v2j_turn_on_living_room_lamp.wav", "ps_goforward.wav"]
"""Nothing the offline reply answers itself: while OpenAI is away it says OFFLINE_ACK."""


@pytest.fixture
def openai(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCloud]:
    with FakeCloud(transcript="launch firefox", reply=REPLY) as fake:
        monkeypatch.setenv("HEIMDALL_OPENAI_BASE_URL", fake.openai_base_url)
        monkeypatch.setenv("OPENAI_API_KEY", fake.env()["OPENAI_API_KEY"])
        yield fake


@pytest.fixture
def elevenlabs(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCloud]:
    with FakeCloud() as fake:
        monkeypatch.setenv("HEIMDALL_ELEVENLABS_BASE_URL", fake.elevenlabs_base_url)
        monkeypatch.setenv("ELEVENLABS_API_KEY", fake.env()["ELEVENLABS_API_KEY"])
        yield fake


@pytest.fixture
def settings(openai: FakeCloud, elevenlabs: FakeCloud, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in {
        "HEIMDALL_LISTENING__MODE": "voice",
        "HEIMDALL_LISTENING__WAKE_WORD": "",  # plain speech onset: any line is a turn
        "HEIMDALL_RESILIENCE__STT_HEDGE_AFTER_MS": "3000",
        "HEIMDALL_RESILIENCE__REPLY_HEDGE_AFTER_MS": "3000",
        "HEIMDALL_RESILIENCE__TTS_HEDGE_AFTER_MS": "3000",
        "HEIMDALL_RESILIENCE__PROBE_INTERVAL_S": "0.2",
        "HEIMDALL_RESILIENCE__REQUESTS_PER_MINUTE": "600",
    }.items():
        monkeypatch.setenv(name, value)
    return load_settings()


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    with moto_store(monkeypatch, BUCKET, TABLE) as server:
        yield server


class Replies(OfflineReplyEngine):
    """The offline reply, keeping every request it was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[ReplyRequest] = []

    def answer(self, request: ReplyRequest) -> str:
        self.requests.append(request)
        return super().answer(request)


def engines_for(settings: Settings, whisper, piper) -> Engines:
    """The engines as the service builds them, with the warm local models and a recording reply."""
    built = builders.build_engines(settings)
    built.stt, built.tts, built.reply_engine = whisper, piper, Replies()
    return built


def records(settings: Settings) -> list[CaptureRecord]:
    with Spool(settings.spool_dir) as spool:
        return sorted(spool.list(), key=lambda r: r.created_at)


def reply_pcm(settings: Settings, record: CaptureRecord) -> bytes:
    """The audio the person heard as the reply (reply.wav, kept with the capture)."""
    with (
        Spool(settings.spool_dir) as spool,
        wave.open(str(spool.path(record.capture_id) / "reply.wav"), "rb") as wav,
    ):
        return wav.readframes(wav.getnframes())


def status_json(settings: Settings) -> dict:
    return json.loads((settings.state_dir / STATUS_FILE).read_text())


def tts_texts(cloud: FakeCloud) -> list[str]:
    return [request.json["text"] for request in cloud.requests["tts"]]


async def serve_lines(settings: Settings, engines: Engines, speech_dir: Path) -> list:
    """The service in a room where a person says LINES, one turn each, as fast as it runs."""
    settings = settings.model_copy(
        update={"engines": settings.engines.model_copy(update={"preload": False})}
    )
    inputs = [silence(600) + read_audio(speech_dir / name).pcm for name in LINES]
    devices = builders.build_simulated_devices(settings, inputs=inputs, realtime=False)
    appliance = Appliance(settings, devices, engines, builders.open_spool(settings))
    try:
        await appliance.start()
        await asyncio.wait_for(appliance.serve(asyncio.Event()), TIMEOUT)
    finally:
        await devices.aclose()
    return records(settings)


async def test_openai_down_every_turn_still_speaks_with_elevenlabs(
    settings: Settings,
    openai: FakeCloud,
    elevenlabs: FakeCloud,
    whisper,
    piper,
    speech_dir: Path,
) -> None:
    """The measured bug: with OpenAI unreachable, 0 of 6 turns spoke with ElevenLabs."""
    openai.refuse_connections()
    engines = engines_for(settings, whisper, piper)
    kept = await serve_lines(settings, engines, speech_dir)
    assert len(kept) == len(LINES)
    for record in kept:
        assert record.engines == {"stt": "faster-whisper", "reply": "offline", "tts": "elevenlabs"}
        assert record.reply == OFFLINE_ACK
        assert reply_pcm(settings, record) == elevenlabs.synthesize(OFFLINE_ACK, 16000)
    assert engines.online == {"openai": False, "elevenlabs": True}
    status = status_json(settings)
    assert status["online"] is False and status["reachable"] == engines.online
    assert status["breakers"]["elevenlabs"]["state"] == "closed"
    asked = engines.reply_engine.requests  # type: ignore[attr-defined]
    assert {r.status["online_openai"] for r in asked} == {"false"}
    assert {r.status["online_elevenlabs"] for r in asked} == {"true"}
    assert {r.status["online"] for r in asked} == {"false"}  # not every speech service is there


async def test_elevenlabs_down_every_turn_still_uses_openai(
    settings: Settings,
    openai: FakeCloud,
    elevenlabs: FakeCloud,
    whisper,
    piper,
    speech_dir: Path,
) -> None:
    elevenlabs.refuse_connections()
    engines = engines_for(settings, whisper, piper)
    kept = await serve_lines(settings, engines, speech_dir)
    assert len(kept) == len(LINES)
    for record in kept:
        assert record.engines == {"stt": "openai", "reply": "openai", "tts": "piper"}
        assert (record.transcript, record.reply) == ("launch firefox", REPLY)
    assert openai.count("transcriptions") == openai.count("chat") == len(LINES)
    assert engines.online == {"openai": True, "elevenlabs": False}
    assert status_json(settings)["reachable"] == {"openai": True, "elevenlabs": False}


class LiveService:
    """The service with its syncer, in a real-time room, until the test is done with it."""

    def __init__(self, settings: Settings, engines: Engines) -> None:
        self.settings = settings
        self.engines = engines
        self.devices = builders.build_simulated_devices(settings, realtime=True)
        self.spool = builders.open_spool(settings)
        self.syncer = builders.build_syncer(settings, self.spool)
        self.appliance = Appliance(settings, self.devices, engines, self.spool, syncer=self.syncer)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.appliance.start()
        self._task = asyncio.create_task(self.appliance.serve(self._stop))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        try:
            if self._task is not None:
                await asyncio.wait_for(self._task, 30)
        finally:
            await self.devices.aclose()
            self.spool.close()

    async def until(self, condition, what: str) -> None:
        await until(condition, TIMEOUT, what, alive=self._task)

    async def answer(self, speech: Path) -> CaptureRecord:
        """The person says `speech`; the recorded turn once it is complete."""
        done = len(records(self.settings))
        self.devices.microphone.person.queue(speech)
        await self.until(
            lambda: len([r for r in records(self.settings) if r.status == "complete"]) > done,
            f"the answer to {speech.name}",
        )
        return records(self.settings)[-1]


def synced(settings: Settings, record: CaptureRecord) -> bool:
    with Spool(settings.spool_dir) as spool:
        return spool.get(record.capture_id).sync_state == "synced"


async def test_sync_goes_on_while_openai_is_down(
    settings: Settings,
    moto: MotoServer,
    openai: FakeCloud,
    whisper,
    piper,
    speech_dir: Path,
) -> None:
    openai.refuse_connections()
    settings = load_settings()  # with the store

    async def scenario() -> None:
        async with LiveService(settings, engines_for(settings, whisper, piper)) as service:
            record = await service.answer(speech_dir / LINES[0])
            assert (
                record.engines["stt"] == "faster-whisper" and record.engines["tts"] == "elevenlabs"
            )
            await service.until(lambda: synced(settings, record), "the capture in S3")
            assert service.engines.online == {"openai": False, "elevenlabs": True}
            assert service.syncer.connectivity is not None and service.syncer.connectivity.online
            assert service.syncer.status()["state"] != "offline"
            assert status_json(settings)["reachable"] == {
                "openai": False,
                "elevenlabs": True,
                "store": True,
            }

    await asyncio.wait_for(scenario(), TIMEOUT)
    assert openai.count("transcriptions") == 0  # it stayed down throughout


async def test_store_down_keeps_speech_online_and_its_own_probe_finds_it_back(
    settings: Settings,
    moto: MotoServer,
    openai: FakeCloud,
    elevenlabs: FakeCloud,
    whisper,
    piper,
    speech_dir: Path,
) -> None:
    moto.stop()
    settings = load_settings()  # with the store

    async def scenario() -> None:
        async with LiveService(settings, engines_for(settings, whisper, piper)) as service:
            store = service.syncer.connectivity
            assert store is not None
            first = await service.answer(speech_dir / LINES[0])
            await service.until(lambda: not store.online, "the store marked offline")
            second = await service.answer(speech_dir / LINES[1])
            for record in (first, second):
                assert record.engines == {"stt": "openai", "reply": "openai", "tts": "elevenlabs"}
            assert service.engines.online == {"openai": True, "elevenlabs": True}
            status = status_json(settings)
            assert status["online"] is True
            assert status["reachable"] == {"openai": True, "elevenlabs": True, "store": False}
            assert status["sync"]["online"] is False and status["sync"]["pending"] == 2
            moto.start()  # the store's probe, not a speech service's, finds it back
            await service.until(
                lambda: synced(settings, first) and synced(settings, second), "both in S3"
            )
            assert store.online

    await asyncio.wait_for(scenario(), TIMEOUT)


async def test_fixed_phrases_take_the_elevenlabs_voice_once_reachable_and_keep_it(
    settings: Settings,
    openai: FakeCloud,
    elevenlabs: FakeCloud,
    whisper,
    piper,
    speech_dir: Path,
) -> None:
    """OpenAI stays down, so every turn is answered with a fixed phrase (OFFLINE_ACK)."""
    openai.refuse_connections()
    elevenlabs.refuse_connections()
    engines = engines_for(settings, whisper, piper)
    line = speech_dir / LINES[0]

    async def scenario() -> None:
        async with LiveService(settings, engines) as service:
            before = await service.answer(line)  # ElevenLabs never reached yet: Piper's
            assert (before.reply, before.engines["tts"]) == (OFFLINE_ACK, "piper")

            elevenlabs.accept_connections()  # in the background, each phrase once
            await service.until(
                lambda: sorted(tts_texts(elevenlabs)) == sorted(FIXED_PHRASES),
                "the fixed phrases rendered by ElevenLabs",
            )
            await service.until(
                lambda: service.appliance.preferred_voice.rendered == len(FIXED_PHRASES),  # type: ignore[union-attr]
                "the fixed phrases in the voice cache",
            )

            elevenlabs.refuse_connections()  # down again, and known to be down...
            novel = await engines.speak("A sentence it never said.")
            assert novel.engine == "piper"  # (what was never said in its voice cannot be had)
            assert [chunk async for chunk in novel.items()]
            assert engines.online == {"openai": False, "elevenlabs": False}
            for _ in range(2):  # ...yet the fixed phrases keep its voice
                after = await service.answer(line)
                assert (after.reply, after.engines["tts"]) == (OFFLINE_ACK, "elevenlabs")
                assert reply_pcm(settings, after) == elevenlabs.synthesize(OFFLINE_ACK, 16000)

    await asyncio.wait_for(scenario(), TIMEOUT)
    assert sorted(tts_texts(elevenlabs)) == sorted(FIXED_PHRASES)  # once per phrase, no more

    # A restart finds them in the cache and asks for nothing.
    elevenlabs.accept_connections()
    again = PreferredVoice(engines, FIXED_PHRASES, idle=lambda: True, requests_per_minute=600)
    await asyncio.wait_for(again.run(asyncio.Event()), TIMEOUT)
    assert again.rendered == 0 and len(tts_texts(elevenlabs)) == len(FIXED_PHRASES)


async def test_fixed_phrases_wait_for_an_idle_device_and_a_refused_one_is_not_asked_again(
    settings: Settings, elevenlabs: FakeCloud, whisper, piper
) -> None:
    engines = engines_for(settings, whisper, piper)
    in_turn = True
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        nonlocal in_turn
        waits.append(seconds)
        in_turn = False  # the turn under way ends
        await asyncio.sleep(0)

    elevenlabs.fault("tts", Fault(status=400, times=1))  # the first phrase is refused
    voice = PreferredVoice(
        engines, FIXED_PHRASES, idle=lambda: not in_turn, requests_per_minute=600, sleep=sleep
    )
    await asyncio.wait_for(voice.run(asyncio.Event()), TIMEOUT)
    assert waits[0] == POLL_S  # nothing was asked while the turn ran
    assert tts_texts(elevenlabs) == FIXED_PHRASES  # one request each, the refused one too
    assert voice.rendered == len(FIXED_PHRASES) - 1
    assert not await engines.in_cloud_voice(FIXED_PHRASES[0])
    assert all([await engines.in_cloud_voice(p) for p in FIXED_PHRASES[1:]])
    assert engines.cloud_tts is not None
    assert engines.cloud_tts.policy.breaker.state.value == "closed"
