"""Slowness is failure: a hung cloud through the real service, turn after turn.

The Appliance serves a simulated room on the microphone's clock (`--fast`) with the
official SDKs against the fake cloud, which accepts every connection and never
answers. Each stage loses its hedge to the local engine; those losses count against
the service's breaker, so after a few turns the service skips the cloud entirely
(counted at the server: not one more request), and once the cloud is fast again the
half-open probe finds out and the cloud answers the next turns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from heimdall_edge.app import builders
from heimdall_edge.app.appliance import Appliance
from heimdall_edge.cloud.breaker import BreakerState
from heimdall_edge.settings import Settings, load_settings
from heimdall_edge.spool.record import CaptureRecord
from heimdall_edge.spool.store import Spool
from heimdall_edge.testing.fakecloud.cloud import FakeCloud
from heimdall_edge.testing.fakecloud.wire import Fault
from heimdall_edge.turn.routing import Engines

CLOUD_TEXT = "what time is it up in the cloud"
ROUTES = ("transcriptions", "chat", "tts")


class SteppedClock:
    """time.monotonic, plus the steps a test adds: the breakers' time, moved without waiting."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCloud]:
    with FakeCloud(transcript=CLOUD_TEXT, reply="It is noon in the cloud.") as fake:
        for name, value in fake.env().items():
            monkeypatch.setenv(name, value)
        for stage in ("STT", "REPLY", "TTS"):
            # Long enough that a healthy cloud on a loaded machine answers before the local
            # engine starts: once the cloud is fast again, the probe must win its race.
            monkeypatch.setenv(f"HEIMDALL_RESILIENCE__{stage}_HEDGE_AFTER_MS", "1500")
            monkeypatch.setenv(f"HEIMDALL_RESILIENCE__{stage}_DEADLINE_S", "20")
        monkeypatch.setenv("HEIMDALL_RESILIENCE__RESET_S", "30")
        monkeypatch.setenv("HEIMDALL_LISTENING__MODE", "voice")
        monkeypatch.setenv("HEIMDALL_LISTENING__WAKE_WORD", "")  # any speech starts a turn
        monkeypatch.setenv("HEIMDALL_ENGINES__PRELOAD", "false")
        # No head start at a pause: whether a dropped speculation's request reaches the server
        # before it is cancelled depends on the machine's load (tests/test_speculation.py
        # counts those); here every request is a whole turn's.
        monkeypatch.setenv("HEIMDALL_LISTENING__SPECULATE_AFTER_MS", "0")
        # No voice cache, so no phrase rendered in the cloud voice in the background: every
        # request the fake counts is a turn's.
        monkeypatch.setenv("HEIMDALL_VOICE_CACHE__MAX_MB", "0")
        yield fake


async def serve(settings: Settings, engines: Engines, said: list[Path]) -> list[CaptureRecord]:
    """One service run in a fast simulated room until the person has said `said`; the
    captures it kept, oldest first. The engines (and so the breakers) outlive the run."""
    devices = builders.build_simulated_devices(settings, inputs=said, realtime=False)
    spool = builders.open_spool(settings)
    before = {r.capture_id for r in spool.list()}
    appliance = Appliance(settings, devices, engines, spool)
    try:
        await appliance.start()
        await asyncio.wait_for(appliance.serve(asyncio.Event()), 120)
    finally:
        await devices.aclose()
    with Spool(settings.spool_dir) as kept:
        return sorted(
            (r for r in kept.list() if r.capture_id not in before), key=lambda r: r.created_at
        )


def breakers(engines: Engines) -> dict[str, BreakerState]:
    return {p.service: p.breaker.state for p in engines.policies}


async def test_hung_cloud_opens_the_breakers_and_the_probe_closes_them_when_fast(
    cloud: FakeCloud, whisper, piper, clip: Path
) -> None:
    settings = load_settings()
    clock = SteppedClock()
    engines = builders.build_engines(settings, breaker_clock=clock)
    engines.stt, engines.tts = whisper, piper
    for route in ROUTES:
        cloud.fault(route, Fault(hang=True))

    turns = await serve(settings, engines, [clip] * 4)

    assert len(turns) == 4 and all(t.status == "complete" for t in turns)
    local = {"stt": "faster-whisper", "reply": "offline", "tts": "piper"}
    assert [t.engines for t in turns] == [local] * 4  # every turn answered, locally
    # OpenAI (transcription and reply share it) failed 3 times by turn 2 (stt, reply, stt),
    # ElevenLabs by turn 3; then the cloud was not asked again: a hung cloud costs nothing.
    assert cloud.count("transcriptions") == 2 and cloud.count("chat") == 1
    assert cloud.count("tts") == 3
    assert breakers(engines) == {"openai": BreakerState.OPEN, "elevenlabs": BreakerState.OPEN}
    assert all(p.breaker.snapshot()["last_error"] == "slow" for p in engines.policies)
    # Hung is slow, not unreachable: the network was never blamed.
    assert engines.online == {"openai": True, "elevenlabs": True}
    stats = engines.call_stats()
    assert stats["openai"]["slow"] == 3 and stats["elevenlabs"]["slow"] == 3
    assert stats["openai"]["skipped"] >= 3 and stats["elevenlabs"]["skipped"] >= 1

    cloud.clear_faults()
    clock.offset += 30  # the breakers' reset time passes: the next turn's calls are the probes
    again = await serve(settings, engines, [clip] * 2)

    cloud_engines = {"stt": "openai", "reply": "openai", "tts": "elevenlabs"}
    assert [t.engines for t in again] == [cloud_engines] * 2
    assert [t.transcript for t in again] == [CLOUD_TEXT] * 2
    assert set(breakers(engines).values()) == {BreakerState.CLOSED}
