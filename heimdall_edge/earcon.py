"""Earcons: short tones the device can always play, even when no voice engine works."""

from __future__ import annotations

import numpy as np

from heimdall_edge.audio import SAMPLE_RATE, Audio, to_int16


def tone(frequencies: list[float], note_ms: int = 120, gap_ms: int = 40) -> Audio:
    """A few soft sine notes with short fades, so they do not click."""
    parts: list[np.ndarray] = []
    fade = int(SAMPLE_RATE * 0.01)
    envelope = np.ones(SAMPLE_RATE * note_ms // 1000, dtype=np.float32)
    envelope[:fade] = np.linspace(0, 1, fade)
    envelope[-fade:] = np.linspace(1, 0, fade)
    t = np.arange(envelope.size) / SAMPLE_RATE
    for frequency in frequencies:
        parts.append(0.3 * np.sin(2 * np.pi * frequency * t) * envelope)
        parts.append(np.zeros(SAMPLE_RATE * gap_ms // 1000, dtype=np.float32))
    return Audio(to_int16(np.concatenate(parts)).tobytes(), SAMPLE_RATE)


ERROR_EARCON = tone([660.0, 440.0])
