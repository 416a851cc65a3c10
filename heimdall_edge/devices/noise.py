"""Background noise for the simulated room: pink, brown, mains hum, or a recording, looped.

The white noise of audio.noise is a poor stand-in for a room. Real rooms are
loudest at low frequencies (traffic, ventilation: pink to brown noise) and
often carry mains hum from a power supply, and those are what trip up a VAD or
a wake-word model. Each source is made once as a loop of about 24 s, which
nobody hears repeat, and is handed out in 30 ms frames at unit RMS, so the room
can set it at any SNR.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from heimdall_edge.audio import FRAME_SAMPLES, SAMPLE_RATE, AudioError, frames, read_audio

NOISE_KINDS = ("pink", "brown", "hum")
LOOP_S = 24
"""Length of a synthetic loop. 50 Hz fits it a whole number of times, so hum loops too."""
HIGH_PASS_HZ = 20.0
"""Below this is rumble no microphone passes; left in, it would only swell the RMS (brown
noise would drift)."""
MAINS_HZ = 50
HUM_TOP_HZ = 1000
BUZZ_DB = -25.0
"""The broadband buzz under the hum's harmonics, relative to them."""
CROSSFADE_S = 0.5
"""How much of a recording's end is faded into its start to hide the seam."""
SPEECH_RANGE_DB = 30.0
"""Frames this far below the loudest one are pauses, not speech."""


class NoiseSource:
    """A loop of noise at unit RMS, handed out frame by frame and repeating without a click."""

    def __init__(self, loop: np.ndarray, name: str) -> None:
        self.name = name
        self._loop = (loop / _rms(loop)).astype(np.float32)
        self._at = 0

    def frame(self) -> np.ndarray:
        """The next FRAME_SAMPLES float32 samples."""
        samples = self._loop.take(np.arange(self._at, self._at + FRAME_SAMPLES), mode="wrap")
        self._at = (self._at + FRAME_SAMPLES) % len(self._loop)
        return samples


def noise_source(kind: str, *, seed: int = 0) -> NoiseSource:
    """Noise of one of NOISE_KINDS, made from `seed`, or the audio file at path `kind`, looped.

    Raises ValueError naming `kind` and what it may be.
    """
    if kind in NOISE_KINDS:
        rng = np.random.default_rng(seed)
        n = LOOP_S * SAMPLE_RATE
        loop = _hum(rng, n) if kind == "hum" else _shaped(rng, n, 1.0 if kind == "pink" else 2.0)
        return NoiseSource(loop, kind)
    allowed = f"{', '.join(NOISE_KINDS)} or the path of an audio file"
    path = Path(kind)
    if not path.is_file():
        raise ValueError(f"noise {kind!r} is neither a kind of noise nor a file: use {allowed}")
    try:
        samples = np.frombuffer(read_audio(path).pcm, dtype="<i2").astype(np.float64)
    except AudioError as exc:
        raise AudioError(f"{exc} (noise is {allowed})") from exc
    if not samples.any():
        raise AudioError(f"noise file {path} holds only silence: use {allowed}")
    return NoiseSource(_seamless(samples), path.name)


def speech_level(pcm: bytes) -> float:
    """RMS (int16 units) of the speech in 16 kHz s16le PCM: its 30 ms frames within 30 dB of
    the loudest, so that pauses and silence around it do not count. 0.0 for silence."""
    if not pcm:
        return 0.0
    samples = np.frombuffer(b"".join(frames(pcm)), dtype="<i2").astype(np.float64)
    power = np.mean(np.square(samples.reshape(-1, FRAME_SAMPLES)), axis=1)
    active = power >= power.max() * 10 ** (-SPEECH_RANGE_DB / 10)
    return float(np.sqrt(power[active].mean()))


def _shaped(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Gaussian noise whose power falls as 1/f**exponent above HIGH_PASS_HZ.

    Shaped in one FFT over the whole loop, so it is circular: its end runs into its start.
    """
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    audible = freqs >= HIGH_PASS_HZ
    spectrum[~audible] = 0
    spectrum[audible] *= freqs[audible] ** (-exponent / 2)
    return np.fft.irfft(spectrum, n)


def _hum(rng: np.random.Generator, n: int) -> np.ndarray:
    """Mains hum: 50 Hz and its harmonics to 1 kHz, falling as 1/k, over a little pink buzz."""
    t = np.arange(n) / SAMPLE_RATE
    hum = sum(
        np.sin(2 * np.pi * MAINS_HZ * k * t + rng.uniform(0, 2 * np.pi)) / k
        for k in range(1, HUM_TOP_HZ // MAINS_HZ + 1)
    )
    buzz = _shaped(rng, n, 1.0)
    return hum / _rms(hum) + 10 ** (BUZZ_DB / 20) * buzz / _rms(buzz)


def _seamless(samples: np.ndarray) -> np.ndarray:
    """A recording as a loop: its last CROSSFADE_S faded (at equal power) into its start."""
    fade = min(int(CROSSFADE_S * SAMPLE_RATE), len(samples) // 2)
    if not fade:
        return samples
    ramp = np.linspace(0, np.pi / 2, fade)
    loop = samples[:-fade].copy()
    loop[:fade] = samples[:fade] * np.sin(ramp) + samples[-fade:] * np.cos(ramp)
    return loop


def _rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples))))
