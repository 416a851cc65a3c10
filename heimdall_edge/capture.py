"""One capture as it flows from listening to the spool: the utterance, its frames, its WAV.

The appliance builds it once the listener has closed the utterance and the camera has
stopped; the turn keeps it in the spool and answers it. It lives here, beside the
pipeline rather than in listen/ or turn/, so every stage imports it without cycles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from heimdall_edge.audio import Audio
    from heimdall_edge.listen.endpointer import Utterance

Trigger = Literal["button", "voice", "wake_word", "follow_up"]
"""What started a capture: a press, speech onset (no wake word set), the wake word, or speech in a follow-up window."""


@dataclass(frozen=True)
class Capture:
    """What the device heard and saw in one capture, handed from the listener to the turn."""

    utterance: Utterance
    """The audio (pre-roll included), its trigger, why it ended and when."""
    frames: tuple[bytes, ...] = ()
    """JPEG camera frames taken while the person spoke, oldest first."""

    @property
    def trigger(self) -> Trigger:
        return self.utterance.trigger

    @property
    def audio(self) -> Audio:
        return self.utterance.audio

    @property
    def wav(self) -> bytes:
        """The audio as a WAV file, encoded once (`Audio.to_wav`) for the spool and cloud Whisper."""
        return self.audio.to_wav()
