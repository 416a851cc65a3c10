"""The wake word: a microWakeWord model (pymicro-wakeword, TFLite in its wheel) fed 30 ms frames.

The model sees 10 ms feature windows and answers every third one with a
probability averaged over its sliding window; a frame is a detection when the
newest probability passes the cutoff. One phrase keeps the probability high
for several frames, so a refractory period turns it into one detection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from heimdall_edge.audio import FRAME_MS
from heimdall_edge.settings import BUILTIN_WAKE_WORDS, ListeningSettings

log = logging.getLogger(__name__)


MEASURED_CUTOFFS = {"hey_jarvis": 0.985, "hey_mycroft": 0.975}
"""Built-ins whose own cutoff woke on talk in bench/room.py (once in 30 minutes of talk, babble and
noise): the lowest cutoff tried there that woke on none of it. The others keep their own."""


class WakeWordError(RuntimeError):
    """The wake-word runtime or model cannot be used here; the message says what to do."""


@dataclass(frozen=True)
class WakeModel:
    """A loaded model and what it answers to."""

    name: str
    phrase: str
    cutoff: float
    """The probability that wakes it: the setting, else MEASURED_CUTOFFS, else own_cutoff."""
    own_cutoff: float
    """The cutoff the model's author calibrated (its .json's probability_cutoff)."""


class WakeWord(Protocol):
    """What the Listener needs of a wake-word detector."""

    model: WakeModel

    def feed(self, frame: bytes) -> bool:
        """Add one 30 ms frame; True if the wake word was just heard."""
        ...

    def twin(self, cutoff: float) -> WakeWord:
        """A detector with this one's model for another stream, true on every frame above `cutoff`."""
        ...


class WakeWordDetector:
    """One stream of frames in, detections out (at most one per refractory period)."""

    def __init__(self, wake_word: str, *, cutoff: float | None, refractory_ms: int) -> None:
        """Load `wake_word` (a built-in name or a model .json); WakeWordError if it cannot run here."""
        self._wake_word = wake_word
        self._model, self._features = _load(wake_word)
        own = float(self._model.probability_cutoff)
        if cutoff is None:
            cutoff = MEASURED_CUTOFFS.get(wake_word, own)
        self.model = WakeModel(
            name=self._model.id, phrase=self._model.wake_word, cutoff=cutoff, own_cutoff=own
        )
        self._refractory_frames = -(-refractory_ms // FRAME_MS)
        self._quiet_for = 0
        self.probability = 0.0
        """The newest probability the model gave (for logs and benchmarks)."""

    @classmethod
    def from_settings(cls, settings: ListeningSettings) -> WakeWordDetector:
        return cls(
            settings.wake_word,
            cutoff=settings.wake_cutoff,
            refractory_ms=settings.wake_refractory_ms,
        )

    def twin(self, cutoff: float) -> WakeWordDetector:
        """A detector with this one's model for another stream, true on every frame above `cutoff`."""
        return WakeWordDetector(self._wake_word, cutoff=cutoff, refractory_ms=0)

    def feed(self, frame: bytes) -> bool:
        """Add one 30 ms frame; True if the wake word was just heard."""
        newest: float | None = None
        for features in self._features.process_streaming(frame):
            probability = self._model.process_streaming_prob(features)
            # Between the model's strides it answers 0.0 ("not yet"): keep the real answers.
            if probability:
                newest = probability if newest is None else max(newest, probability)
        if newest is not None:
            self.probability = newest
        if self._quiet_for:
            self._quiet_for -= 1
            return False
        if newest is not None and newest > self.model.cutoff:
            self._quiet_for = self._refractory_frames
            return True
        return False

    def close(self) -> None:
        self._model.close()


def _load(wake_word: str) -> tuple[Any, Any]:
    try:
        from pymicro_wakeword import MicroWakeWord, MicroWakeWordFeatures, Model

        if wake_word in BUILTIN_WAKE_WORDS:
            model = MicroWakeWord.from_builtin(Model(wake_word))
        else:
            model = MicroWakeWord.from_config(Path(wake_word))
        return model, MicroWakeWordFeatures()
    except Exception as exc:  # ImportError, OSError from the TFLite library, ValueError, ...
        raise WakeWordError(
            f"the wake word {wake_word!r} cannot run on this device ({type(exc).__name__}: {exc}): "
            "pymicro-wakeword needs glibc 2.35+ (Debian bookworm / Raspberry Pi OS bookworm); "
            'the button still works, or set listening.wake_word = "" to wake on any speech'
        ) from exc
