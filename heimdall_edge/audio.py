"""PCM helpers shared by devices, engines and the spool.

Everything inside the appliance speaks one format: 16 kHz, mono, signed 16-bit
little-endian PCM, cut into 30 ms frames (the frame sizes webrtcvad accepts).
Files and sound cards in other formats are converted at the edge.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
SAMPLE_WIDTH = 2
FRAME_MS = 30
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000
FRAME_BYTES = FRAME_SAMPLES * SAMPLE_WIDTH
MIN_FILE_RATE = 4_000
"""Lowest sample rate read_audio accepts (telephone speech is 8 kHz)."""


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty or in a format we cannot convert."""


@dataclass(frozen=True)
class Audio:
    """Mono signed 16-bit PCM at a known rate."""

    pcm: bytes
    sample_rate: int

    @property
    def seconds(self) -> float:
        return len(self.pcm) / (SAMPLE_WIDTH * self.sample_rate)

    def to_wav(self) -> bytes:
        """This audio as a WAV file, encoded on the first call only: a capture's WAV goes
        to the spool and to cloud Whisper (each attempt), from one encoding."""
        return self._wav

    @cached_property
    def _wav(self) -> bytes:
        return wav_bytes(self.pcm, self.sample_rate)


def wav_bytes(pcm: bytes, sample_rate: int) -> bytes:
    """Wrap mono s16le PCM in a WAV container."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(SAMPLE_WIDTH)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm)
    return buffer.getvalue()


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] to int16, clipping rather than wrapping."""
    return np.clip(samples * 32767.0, -32768, 32767).astype(np.int16)


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample float32 mono samples with soxr's high-quality filter."""
    if from_rate == to_rate:
        return samples.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(samples, from_rate, to_rate).astype(np.float32, copy=False)


def joined(chunks: list[Audio], sample_rate: int) -> bytes:
    """Chunks (at any rates) as one stretch of PCM at `sample_rate`."""
    parts = []
    for chunk in chunks:
        samples = np.frombuffer(chunk.pcm, dtype=np.int16)
        if chunk.sample_rate != sample_rate:
            samples = to_int16(
                resample(samples.astype(np.float32) / 32768, chunk.sample_rate, sample_rate)
            )
        parts.append(samples.tobytes())
    return b"".join(parts)


def read_audio(path: Path | str, sample_rate: int = SAMPLE_RATE) -> Audio:
    """Decode a WAV/FLAC/OGG file to mono PCM at `sample_rate`.

    Raises AudioError naming the file and the problem, never a bare codec error.
    """
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file {path} does not exist: give the path of a WAV or FLAC file")
    try:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise AudioError(
            f"audio file {path} cannot be decoded ({exc}): use a WAV, FLAC or OGG file"
        ) from exc
    if samples.shape[0] == 0:
        raise AudioError(f"audio file {path} holds no samples: record again")
    if rate < MIN_FILE_RATE:  # a damaged header: resampling would inflate it rate-fold
        raise AudioError(
            f"audio file {path} says it runs at {rate} Hz, below any speech recording "
            f"({MIN_FILE_RATE} Hz or more): the file is damaged or not audio"
        )
    # NaN has no int16 value; a float file holding it is damaged there: make it silence.
    mono = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0).mean(axis=1)
    pcm = to_int16(resample(mono, rate, sample_rate)).tobytes()
    if not pcm:
        raise AudioError(
            f"audio file {path} is too short to hold a single sample at {sample_rate} Hz"
        )
    return Audio(pcm, sample_rate)


def frames(pcm: bytes, frame_bytes: int = FRAME_BYTES) -> list[bytes]:
    """Cut PCM into whole frames, padding the last one with silence."""
    if len(pcm) % frame_bytes:
        pcm = pcm + bytes(frame_bytes - len(pcm) % frame_bytes)
    return [pcm[i : i + frame_bytes] for i in range(0, len(pcm), frame_bytes)]


def silence(ms: int, sample_rate: int = SAMPLE_RATE) -> bytes:
    return bytes(sample_rate * ms // 1000 * SAMPLE_WIDTH)


def noise(ms: int, dbfs: float, seed: int = 0, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Low white noise, for tests and benchmarks that want a realistic room floor."""
    rng = np.random.default_rng(seed)
    amplitude = 10 ** (dbfs / 20)
    samples = rng.normal(0.0, amplitude, sample_rate * ms // 1000)
    return to_int16(samples).tobytes()
