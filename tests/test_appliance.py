"""The service on simulated hardware: mock button, file microphone, real models, real sd_notify socket."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from heimdall_edge.app import builders
from heimdall_edge.cli import serve
from heimdall_edge.settings import load_settings
from heimdall_edge.spool.store import Spool
from tests.shared import NotifyListener, until

TIME_REPLY = re.compile(r"^It's \d{1,2}:\d\d [AP]M\.$")


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    listener = NotifyListener(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    yield listener
    listener.close()


def complete_captures(spool_dir: Path) -> list:
    with Spool(spool_dir) as spool:
        return [r for r in spool.list() if r.status == "complete"]


async def test_button_press_on_simulated_service_runs_a_whole_interaction(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    models_dir: Path,
    speech_dir: Path,
    notify: NotifyListener,
) -> None:
    monkeypatch.setenv("HEIMDALL_LISTENING__MODE", "button")
    settings = load_settings()
    pins = MockFactory()
    devices = builders.build_simulated_devices(settings, realtime=True, pin_factory=pins)

    async def scenario() -> None:
        service = asyncio.create_task(serve(settings, devices, simulate=True))
        await until(lambda: notify.has("READY=1"), 30, "READY=1", alive=service)
        assert not complete_captures(settings.spool_dir)
        pin = pins.pin(settings.button.pin)
        pin.drive_low()  # the person taps the button...
        pin.drive_high()
        devices.microphone.person.queue(speech_dir / "v2j_what_time_is_it.wav")  # ...and speaks
        await until(
            lambda: len(complete_captures(settings.spool_dir)) == 1,
            30,
            "a complete capture",
            alive=service,
        )
        await until(lambda: notify.has("WATCHDOG=1"), 5, "WATCHDOG=1")
        os.kill(os.getpid(), signal.SIGTERM)
        await service

    await asyncio.wait_for(scenario(), timeout=90)
    [record] = complete_captures(settings.spool_dir)
    assert record.trigger == "button"
    assert "what time is it" in record.transcript.lower()
    assert TIME_REPLY.match(record.reply)
    assert record.engines == {"stt": "faster-whisper", "reply": "offline", "tts": "piper"}
    assert {"keep", "transcribe", "reply", "speak", "end_to_first_audio"} <= set(record.timings_ms)
    assert {"audio.wav", "reply.wav", "frame-00.jpg"} <= set(record.files)
    lines = notify.lines()
    assert lines.index("READY=1") < lines.index("WATCHDOG=1") < lines.index("STOPPING=1")
    # Start-up asked for time before READY (a recovery or a slow card never hits TimeoutStartSec).
    assert lines.index("EXTEND_TIMEOUT_USEC=30000000") < lines.index("READY=1")
    assert "STATUS=listening (button)" in lines
    status = json.loads((settings.state_dir / "status.json").read_text())
    assert status["captures"]["pending"] == 1 and status["breakers"] == {}
    assert status["online"] is True and status["reachable"] == {}  # no cloud service to reach


async def service_until_sigterm(recording: Path, ready_to_stop) -> tuple[int, bytes]:
    """`heimdall-edge run --simulate` in voice mode as a real process, fed `recording`.

    SIGTERM is sent once `ready_to_stop()` (a coroutine) returns; gives (exit code, stderr).
    """
    env = dict(os.environ, HEIMDALL_LISTENING__MODE="voice", HEIMDALL_LISTENING__WAKE_WORD="")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "heimdall_edge.cli", "run", "--simulate", "--input", str(recording),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip

    async def scenario() -> bytes:
        await ready_to_stop()
        process.send_signal(signal.SIGTERM)
        _, stderr = await process.communicate()
        return stderr

    try:
        stderr = await asyncio.wait_for(scenario(), timeout=120)
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode is not None
    return process.returncode, stderr


async def test_voice_wake_on_the_real_service_process(
    speech_dir: Path, notify: NotifyListener
) -> None:
    """Speech wakes the service process; SIGTERM then stops it cleanly."""
    spool_dir = Path(os.environ["HEIMDALL_STATE_DIR"]) / "spool"

    async def answered() -> None:
        await until(lambda: notify.has("READY=1"), 60, "READY=1")
        await until(
            lambda: spool_dir.is_dir() and len(complete_captures(spool_dir)) == 1, 60, "a capture"
        )
        await until(lambda: notify.has("WATCHDOG=1"), 5, "WATCHDOG=1")

    code, stderr = await service_until_sigterm(speech_dir / "ps_goforward.wav", answered)
    assert code == 0, stderr.decode()
    [record] = complete_captures(spool_dir)
    assert record.trigger == "voice"
    assert "go forward" in record.transcript.lower()
    assert notify.has("STOPPING=1")
    assert b"stopped cleanly" in stderr


async def test_sigterm_mid_utterance_keeps_what_was_said(
    speech_dir: Path, notify: NotifyListener
) -> None:
    """systemd stops the service while someone is talking: the capture is finished and kept."""

    async def mid_sentence() -> None:
        await until(lambda: notify.has("STATUS=capturing"), 60, "the capture to start")
        await asyncio.sleep(2.5)  # JFK is 11 s long: he is mid-sentence

    code, stderr = await service_until_sigterm(speech_dir / "jfk.flac", mid_sentence)
    assert code == 0, stderr.decode()
    with Spool(Path(os.environ["HEIMDALL_STATE_DIR"]) / "spool") as spool:
        [record] = spool.list()
    assert record.trigger == "voice"
    listened_s = record.timings_ms["listen"] / 1000
    assert 1.5 < listened_s < 6.0  # cut at the stop, not at the end of the file
    assert "fellow americans" in record.transcript.lower()
    lines = notify.lines()
    assert lines.index("STATUS=capturing") < lines.index("STOPPING=1")


async def test_button_press_while_speaking_stops_the_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, models_dir: Path, speech_dir: Path, piper
) -> None:
    from heimdall_edge.app.appliance import Appliance
    from heimdall_edge.engines.base import ReplyRequest
    from heimdall_edge.engines.local.offline_reply import OfflineReplyEngine
    from heimdall_edge.turn.routing import Engines

    long_reply = " ".join(["Here is a very long answer that keeps going."] * 8)

    class Chatty(OfflineReplyEngine):
        def answer(self, request: ReplyRequest) -> str:
            return long_reply

    monkeypatch.setenv("HEIMDALL_LISTENING__MODE", "button")
    settings = load_settings()
    pins = MockFactory()
    devices = builders.build_simulated_devices(
        settings, inputs=[speech_dir / "v2j_what_time_is_it.wav"], realtime=True, pin_factory=pins
    )
    engines = Engines(stt=builders.build_engines(settings).stt, reply=Chatty(), tts=piper)
    appliance = Appliance(settings, devices, engines, builders.open_spool(settings))
    pin = pins.pin(settings.button.pin)

    async def scenario():
        await appliance.start()
        pin.drive_low()
        pin.drive_high()
        turn = asyncio.create_task(appliance.one_turn())
        await until(
            lambda: devices.indicator.state.value == "speaking",
            30,
            "the reply to start",
            alive=turn,
        )
        await asyncio.sleep(1.0)
        pin.drive_low()  # barge-in
        pin.drive_high()
        return await turn

    result = await asyncio.wait_for(scenario(), timeout=60)
    await devices.aclose()
    assert result.interrupted
    assert result.timings_ms["speak"] < 5000  # the whole reply is over 20 s
