"""The device's own voice must never wake it.

While it speaks, the microphone is listened to for the wake word (barge-in by
voice), and it hears the device too. A reply that happens to say the wake word
("I'm Jarvis...") would then stop itself. So the same wake model also runs on
what is sent to the speaker (its twin), and wherever it comes near the wake
word there, a detection on the microphone within a window around that moment
(output latency and the room's tail included) is the device's own voice, not a
person's. The twin is eager: the room changes the sound (echo, noise, a
different level), and Piper says the wake word a little differently each time,
so the microphone may cross the cutoff where the clean stream does not.

Both streams are counted in microphone frames: playback starts at the frame
the microphone has reached, and the audio sent to the speaker runs on from
there, frame for frame. Where the speaker ran dry (the next sentence was still
being synthesized) the microphone heard none of the reply, so the twin hears
silence for as long, a frame as each is read: the model's front end adapts to
its input's level for seconds, and a gap changes what it makes of the next
words.
"""

from __future__ import annotations

import numpy as np

from heimdall_edge.audio import FRAME_BYTES, SAMPLE_RATE, Audio, frames, silence
from heimdall_edge.listen.wakeword import WakeWord

PRIMING_MS = 500
"""Silence the detector hears first: its front end learns the noise floor from the first audio,
and must not learn it from speech (it then misses a wake word in the first reply)."""
TWIN_CUTOFF = 0.2
"""The twin's cutoff. Piper's renderings of "Hey Jarvis" in a reply scored 0.39-1.0 on the clean
stream (the microphone's cutoff is 0.985), ordinary replies 0.0-0.03."""
MARGIN_FRAMES = 10
"""Slack around an own-voice detection (300 ms): the two detectors need not fire on the same frame."""


class OwnVoiceGuard:
    def __init__(self, wake: WakeWord, settle_frames: int) -> None:
        """`wake`: the microphone's wake-word detector (the twin runs its model)."""
        self._detector = wake.twin(cutoff=TWIN_CUTOFF)
        for frame in frames(silence(PRIMING_MS)):
            self._detector.feed(frame)
        self._settle = settle_frames
        self._muted: list[tuple[int, int]] = []
        self._cursor = 0
        self._pending = b""
        self._resampler: tuple[int, object] | None = None

    def playback_started(self, mic_frame: int) -> None:
        """A new playback begins at this microphone frame (the speaker's stream runs on).

        Between playbacks the microphone heard the room, the twin nothing: it picks up here."""
        self._cursor = max(self._cursor, mic_frame)
        self._pending = b""
        self._resampler = None
        self._muted = [window for window in self._muted if window[1] >= mic_frame]

    def heard(self, mic_frame: int) -> None:
        """The microphone has read `mic_frame` frames during a playback: where the speaker
        had nothing to play, the twin hears silence up to there."""
        if mic_frame <= self._cursor:
            return
        if self._pending:  # the last partial frame went out, then nothing
            self._feed(self._pending.ljust(FRAME_BYTES, b"\0"))
            self._pending = b""
        quiet = bytes(FRAME_BYTES)
        while self._cursor < mic_frame:
            self._feed(quiet)

    def played(self, chunk: Audio, mic_frame: int) -> None:
        """`chunk` is going to the speaker now (the microphone has reached `mic_frame`)."""
        self.heard(mic_frame)
        self._pending += self._to_16k(chunk)
        whole = len(self._pending) - len(self._pending) % FRAME_BYTES
        for start in range(0, whole, FRAME_BYTES):
            self._feed(self._pending[start : start + FRAME_BYTES])
        self._pending = self._pending[whole:]

    def _feed(self, frame: bytes) -> None:
        """One frame of what the speaker plays, heard at microphone frame `_cursor`."""
        if self._detector.feed(frame):  # every frame above the cutoff: the window grows
            start, end = self._cursor - MARGIN_FRAMES, self._cursor + self._settle + MARGIN_FRAMES
            if self._muted and self._muted[-1][1] >= start:
                start = self._muted[-1][0]
                self._muted.pop()
            self._muted.append((start, end))
        self._cursor += 1

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
