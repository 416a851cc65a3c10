"""Noise suppression and automatic gain on the microphone path (webrtc-noise-gain).

The same processing wyoming-satellite and linux-voice-assistant use: WebRTC's
audio processing module in 10 ms steps. Everything after it (the wake word,
the VAD, the capture that is transcribed) hears the processed audio. Both
are off by default: measured in bench/room.py, they did not lower the word
error rate of what is captured (docs/LISTENING.md).
"""

from __future__ import annotations

from heimdall_edge.audio import FRAME_BYTES, SAMPLE_WIDTH
from heimdall_edge.settings import ListeningSettings

STEP_BYTES = 160 * SAMPLE_WIDTH  # 10 ms at 16 kHz: WebRTC's processing unit


class NoiseAndGain:
    """One 30 ms frame in, one out, through WebRTC's noise suppressor and AGC."""

    def __init__(self, noise_suppression: int, auto_gain_dbfs: int) -> None:
        from webrtc_noise_gain import AudioProcessor

        self.noise_suppression = noise_suppression
        self.auto_gain_dbfs = auto_gain_dbfs
        self._processor = AudioProcessor(auto_gain_dbfs, noise_suppression)

    @classmethod
    def from_settings(cls, settings: ListeningSettings) -> NoiseAndGain | None:
        """None when both are off: the frames pass untouched, at no cost."""
        if not settings.noise_suppression and not settings.auto_gain_dbfs:
            return None
        return cls(settings.noise_suppression, settings.auto_gain_dbfs)

    def process(self, frame: bytes) -> bytes:
        assert len(frame) == FRAME_BYTES
        return b"".join(
            self._processor.Process10ms(frame[i : i + STEP_BYTES]).audio
            for i in range(0, FRAME_BYTES, STEP_BYTES)
        )
