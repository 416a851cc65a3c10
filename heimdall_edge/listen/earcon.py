"""Earcons: short tones the device can always play, even when no voice engine works.

Each is a few pure sine notes under smooth (raised-cosine) envelopes, so its
spectrum is a few narrow lines: the microphone path can take exactly those
lines out again (listen/earcon_canceller.py) and the capture never hears it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from heimdall_edge.audio import SAMPLE_RATE, Audio, to_int16


@dataclass(frozen=True)
class Earcon:
    audio: Audio
    frequencies: tuple[float, ...]
    """The notes' pitches, in Hz: all the sound there is in it (apart from the envelopes' slow sway)."""


def tone(
    frequencies: list[float], note_ms: int = 120, gap_ms: int = 40, level: float = 0.3
) -> Earcon:
    """A few soft sine notes in a row, each faded in and out over its first and last quarter."""
    parts: list[np.ndarray] = []
    samples = SAMPLE_RATE * note_ms // 1000
    fade = samples // 4
    envelope = np.ones(samples, dtype=np.float32)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, fade, dtype=np.float32))
    envelope[:fade], envelope[-fade:] = ramp, ramp[::-1]
    t = np.arange(samples) / SAMPLE_RATE
    for frequency in frequencies:
        parts.append(level * np.sin(2 * np.pi * frequency * t) * envelope)
        parts.append(np.zeros(SAMPLE_RATE * gap_ms // 1000, dtype=np.float32))
    audio = Audio(to_int16(np.concatenate(parts)).tobytes(), SAMPLE_RATE)
    return Earcon(audio, tuple(frequencies))


ERROR_EARCON = tone([660.0, 440.0])
"""Something failed and not even speech works: falling."""
WAKE_EARCON = tone([880.0, 1320.0], note_ms=90, gap_ms=0, level=0.2)
"""Woken: rising, short, soft."""
FOLLOW_UP_EARCON = tone([1320.0], note_ms=90, gap_ms=0, level=0.2)
"""Listening again for an answer: one note."""
