"""The device's own voice must never wake it.

While it speaks, the microphone is listened to for the wake word (barge-in by
voice), and it hears the device too. A reply that happens to say the wake word
("I'm Jarvis...") would then stop itself. So the same wake model also runs on
what is sent to the speaker, and wherever it fires there, a detection on the
microphone within a window around that moment (output latency and the room's
tail included) is the device's own voice, not a person's.

Both streams are counted in microphone frames: playback starts at the frame
the microphone has reached, and the audio sent to the speaker runs on from
there, frame for frame.
"""

from __future__ import annotations

import numpy as np

from heimdall_edge.audio import FRAME_BYTES, SAMPLE_RATE, Audio, frames, silence
from heimdall_edge.listen.wakeword import WakeWord

PRIMING_MS = 500
"""Silence the detector hears first: its front end learns the noise floor from the first audio,
and must not learn it from speech (it then misses a wake word in the first reply)."""
MARGIN_FRAMES = 10
"""Slack around an own-voice detection (300 ms): the two detectors need not fire on the same frame."""


class OwnVoiceGuard:
    def __init__(self, detector: WakeWord, settle_frames: int) -> None:
        """`detector`: a twin of the microphone's wake-word detector, for the speaker's stream."""
        self._detector = detector
        for frame in frames(silence(PRIMING_MS)):
            detector.feed(frame)
        self._settle = settle_frames
        self._muted: list[tuple[int, int]] = []
        self._cursor = 0
        self._pending = b""
        self._resampler: tuple[int, object] | None = None

    def playback_started(self, mic_frame: int) -> None:
        """A new playback begins at this microphone frame (the speaker's stream runs on)."""
        self._cursor = mic_frame
        self._pending = b""
        self._resampler = None
        self._muted = [window for window in self._muted if window[1] >= mic_frame]

    def played(self, chunk: Audio, mic_frame: int) -> None:
        """`chunk` is going to the speaker now (the microphone has reached `mic_frame`)."""
        self._cursor = max(self._cursor, mic_frame)
        self._pending += self._to_16k(chunk)
        whole = len(self._pending) - len(self._pending) % FRAME_BYTES
        for start in range(0, whole, FRAME_BYTES):
            if self._detector.feed(self._pending[start : start + FRAME_BYTES]):
                self._muted.append(
                    (self._cursor - MARGIN_FRAMES, self._cursor + self._settle + MARGIN_FRAMES)
                )
            self._cursor += 1
        self._pending = self._pending[whole:]

    def covers(self, mic_frame: int) -> bool:
        """Would a wake word heard at this microphone frame be the device's own?"""
        return any(start <= mic_frame <= end for start, end in self._muted)

    def _to_16k(self, chunk: Audio) -> bytes:
        if chunk.sample_rate == SAMPLE_RATE:
            return chunk.pcm
        import soxr

        if self._resampler is None or self._resampler[0] != chunk.sample_rate:
            stream = soxr.ResampleStream(chunk.sample_rate, SAMPLE_RATE, 1, dtype="int16")
            self._resampler = (chunk.sample_rate, stream)
        stream = self._resampler[1]
        samples = np.frombuffer(chunk.pcm, dtype="<i2")
        return stream.resample_chunk(samples).astype("<i2").tobytes()  # type: ignore[attr-defined]
