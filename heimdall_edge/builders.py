"""Factory seams: turn settings into engines, devices and the spool.

The CLI and the tests build the appliance through these, so `run --simulate`,
`demo` and the real service differ only in which devices they ask for.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from heimdall_edge.appliance import Devices
from heimdall_edge.engines.faster_whisper import FasterWhisperEngine
from heimdall_edge.engines.offline_reply import OfflineReplyEngine
from heimdall_edge.engines.piper import PiperEngine
from heimdall_edge.interaction import Engines
from heimdall_edge.settings import Settings, SettingsError
from heimdall_edge.spool import Spool


def build_engines(settings: Settings) -> Engines:
    return Engines(
        stt=FasterWhisperEngine(settings.stt, settings.models),
        reply=OfflineReplyEngine(),
        tts=PiperEngine(settings.tts, settings.models),
    )


def prepare_state_dir(settings: Settings) -> Path:
    """Create the state dir private to the service user, or say plainly why we cannot."""
    state = settings.state_dir
    try:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = state / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        hint = (
            "free some space"
            if exc.errno == errno.ENOSPC
            else "set HEIMDALL_STATE_DIR to a writable folder or run as the service user"
        )
        raise SettingsError(f"state dir {state} is not usable ({exc.strerror}): {hint}") from exc
    return state


def open_spool(settings: Settings) -> Spool:
    prepare_state_dir(settings)
    return Spool(settings.spool_dir)


def build_devices(settings: Settings) -> Devices:
    """The real hardware: gpiozero pins, PyAudio, picamera2."""
    from heimdall_edge.devices.camera import PiCamera
    from heimdall_edge.devices.gpio import GpioButton, GpioIndicator
    from heimdall_edge.devices.microphone import PyAudioMicrophone
    from heimdall_edge.devices.speaker import PyAudioSpeaker

    return Devices(
        microphone=PyAudioMicrophone(settings.microphone),
        button=GpioButton(settings.button),
        indicator=GpioIndicator(settings.led),
        camera=PiCamera(settings.camera),
        speaker=PyAudioSpeaker(settings.speaker),
    )


def build_simulated_devices(
    settings: Settings,
    *,
    inputs: Sequence[Path] = (),
    realtime: bool = True,
    speaker_wav: Path | None = None,
    pin_factory: Any = None,
) -> Devices:
    """Simulated hardware: mock GPIO pins, a file microphone, a synthetic camera, a WAV speaker."""
    from gpiozero.pins.mock import MockFactory

    from heimdall_edge.devices.camera import SyntheticCamera
    from heimdall_edge.devices.gpio import GpioButton, GpioIndicator
    from heimdall_edge.devices.microphone import FileMicrophone
    from heimdall_edge.devices.speaker import WavFileSpeaker

    pin_factory = pin_factory or MockFactory()
    return Devices(
        microphone=FileMicrophone(list(inputs), realtime=realtime),
        button=GpioButton(settings.button, pin_factory=pin_factory),
        indicator=GpioIndicator(settings.led, pin_factory=pin_factory),
        camera=SyntheticCamera(settings.camera),
        speaker=WavFileSpeaker(speaker_wav, realtime=realtime),
    )

