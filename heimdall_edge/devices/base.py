"""The device Protocols the appliance is written against.

Real implementations import their libraries (pyaudio, picamera2, gpiozero pin
drivers) lazily, so this package imports and tests on any Linux box.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from heimdall_edge.audio import Audio


class DeviceError(RuntimeError):
    """A device that is missing or failed; the message says which and what to check."""


class MicrophoneEnded(DeviceError):
    """A finite source (a file) has no more frames."""


class ButtonEvent(enum.Enum):
    PRESSED = "pressed"
    RELEASED = "released"
    HELD = "held"  # held for long_press_s: cancel


class IndicatorState(enum.Enum):
    IDLE = "idle"
    LISTENING = "listening"
    THINKING = "thinking"
    SPEAKING = "speaking"
    FOLLOW_UP = "follow_up"  # listening for an answer without the wake word
    ERROR = "error"


class Button(Protocol):
    @property
    def is_pressed(self) -> bool: ...

    async def next_event(self) -> ButtonEvent:
        """Wait for the next press, release or long hold."""
        ...

    def pending(self) -> ButtonEvent | None:
        """The next queued event without waiting, or None."""
        ...

    def clear(self) -> None:
        """Forget queued events (e.g. presses made while the device was busy)."""
        ...

    def close(self) -> None: ...


class Indicator(Protocol):
    def show(self, state: IndicatorState) -> None: ...

    def close(self) -> None: ...


class Microphone(Protocol):
    name: str

    async def read(self) -> bytes:
        """The next 30 ms frame: 16 kHz mono s16le, 960 bytes. Raises MicrophoneEnded at the end of a finite source."""
        ...

    def flush(self) -> None:
        """Drop buffered frames, e.g. our own voice recorded while speaking."""
        ...

    async def aclose(self) -> None: ...


class Camera(Protocol):
    @property
    def available(self) -> bool: ...

    async def capture_jpeg(self) -> bytes | None:
        """One JPEG frame, or None when there is no camera."""
        ...

    async def aclose(self) -> None: ...


@dataclass
class Playback:
    """What happened while playing: when sound started, how much, and whether it was stopped."""

    first_audio_at: float | None = None  # time.monotonic() when the first chunk went to the device
    seconds: float = 0.0
    interrupted: bool = False


class Speaker(Protocol):
    async def play(self, chunks: AsyncIterator[Audio], stop: asyncio.Event) -> Playback:
        """Play chunks as they arrive; return early (interrupted) when `stop` is set."""
        ...

    async def aclose(self) -> None: ...
