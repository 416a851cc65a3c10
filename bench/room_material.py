"""What bench/room.py hears: rooms, noises, synthesized wake phrases and long streams without them.

Everything is made once in the parent process (Material) before the workers fork.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from heimdall_edge.audio import SAMPLE_RATE
from heimdall_edge.settings import BUILTIN_WAKE_WORDS, ListeningSettings
from heimdall_edge.testing import voices

ROOMS = (0.3, 0.45, 0.6)
DISTANCES = (1.0, 2.0, 3.0)
NOISES = ("pink", "brown", "hum", "babble")
SNRS = (5, 10, 20)
PACES = (0.8, 1.0, 1.2, 1.4)
PITCHES = (0.85, 1.0, 1.15)
KINDS = ("one breath", "pause", "recording")
"""Positives: "<Wake>, <command>" synthesized at once; wake, pause, command; wake, pause, a real recording."""
PAUSE_MS = 600
GEOMETRIES = 2
"""Room shapes and placements per (RT60, distance)."""
SPEECH_DBFS = -26.0
"""Active speech level at the microphone (a voice at a few metres, a modest gain)."""
FLOOR_DBFS = -60.0
"""The microphone's own hiss, under everything (digital silence is a step webrtcvad hears)."""
LEAD_S = 1.5
START_SLACK_MS = 100
"""A capture holds the command if it starts no later than this after the command's first word."""
WHOLE_MARGIN_MS = 300
"""The command's whole stretch of the stream, for the reference WER: its words plus this either side."""
BASELINE = ListeningSettings(mode="voice", wake_word="", vad="webrtc")
SETTINGS_GRID = [(ns, ag) for ns in (0, 2, 4) for ag in (0, 16)]
"""(noise_suppression, auto_gain_dbfs) tried on the chosen wake word's positives."""
NEGATIVE_SHARES = {"recordings": 0.2, "talk": 0.5, "babble": 0.2, "noise alone": 0.1}
AMBIENT = ("babble", "noise alone")
"""Negative groups that are not one talker: their sound keeps its own level."""


def new_front_end(
    wake_word: str, cutoff: float | None = None, ns: int = 0, ag: int = 0
) -> ListeningSettings:
    return ListeningSettings(
        mode="voice", wake_word=wake_word, wake_cutoff=cutoff, vad="silero",
        noise_suppression=ns, auto_gain_dbfs=ag,
    )  # fmt: skip


@cache
def wake_model(wake_word: str) -> tuple[str, float]:
    """(phrase, own cutoff) of a built-in model."""
    from heimdall_edge.listen.wakeword import WakeWordDetector

    model = WakeWordDetector(wake_word, cutoff=None, refractory_ms=0).model
    return model.phrase, model.own_cutoff


def cutoffs(wake_word: str) -> tuple[float, float, float]:
    """The model's own cutoff, and ones that double and halve its distance to 1."""
    own = wake_model(wake_word)[1]
    return round(1 - 2 * (1 - own), 3), own, round(1 - (1 - own) / 2, 4)


@dataclass(frozen=True)
class Acoustics:
    rt60: float
    distance_m: float
    noise: str
    snr_db: float
    geometry: int

    @property
    def label(self) -> str:
        return f"RT60 {self.rt60} s, {self.distance_m:g} m, {self.noise} {self.snr_db:g} dB"


@dataclass(frozen=True)
class Positive:
    wake_word: str
    kind: str
    pace: float
    pitch: float
    clip: voices.Clip
    room: Acoustics
    transcribe: bool


@dataclass
class Stream:
    """One long microphone stream and what is where in it (sample ranges)."""

    pcm: bytes
    segments: list[tuple[int, int, str]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / SAMPLE_RATE

    def label_before(self, sample: int) -> str:
        """What was said last before `sample` (a wake word fires just after its phrase)."""
        return next((label for start, _, label in reversed(self.segments) if start <= sample), "-")


class Material:
    """Everything heard, made once in the parent before the workers fork (they share it)."""

    def __init__(self, models_dir: Path, speech_dir: Path, seed: int) -> None:
        self.seed = seed
        self.speaker = voices.PiperSpeaker(models_dir)
        rows = (speech_dir / "transcripts.tsv").read_text(encoding="utf-8").splitlines()
        transcripts = dict(line.split("\t", 1) for line in rows if line.strip())
        from heimdall_edge.audio import read_audio

        self.recordings = [
            (text, np.frombuffer(read_audio(speech_dir / name).pcm, np.int16) / 32768.0)
            for name, text in sorted(transcripts.items())
        ]
        self.positives: list[Positive] = []
        self.negatives: dict[str, Stream] = {}
        self._babble: dict[int, np.ndarray] = {}

    def babble_loop(self, seed: int) -> np.ndarray:
        """30 s of four real voices at once, made once per seed."""
        if seed not in self._babble:
            self._babble[seed] = voices.babble([r for _, r in self.recordings], 4, 30.0, seed)
        return self._babble[seed]

    def noise(self, kind: str, samples: int, rng: np.random.Generator) -> np.ndarray:
        """`samples` of a noise at unit RMS, from a random point of one of a few loops."""
        seed = int(rng.integers(4))
        loop = self.babble_loop(seed) if kind == "babble" else _noise_loop(kind, seed)
        return np.resize(np.roll(loop, -int(rng.integers(len(loop)))), samples)


@cache
def _noise_loop(kind: str, seed: int) -> np.ndarray:
    from heimdall_edge.devices.noise import LOOP_S

    return voices.noise(kind, LOOP_S * SAMPLE_RATE, seed=seed)


def in_the_room(
    dry: np.ndarray, room: Acoustics, material: Material, rng: np.random.Generator
) -> np.ndarray:
    """`dry` speech across `room`, at SPEECH_DBFS, with its noise at its SNR and the floor under it."""
    wet = voices.reverberate(dry, rt60=room.rt60, distance_m=room.distance_m, seed=room.geometry)
    wet = wet[: len(dry)] * (10 ** (SPEECH_DBFS / 20) / voices.active_rms(dry))
    noisy = voices.mix(wet, material.noise(room.noise, len(wet), rng), room.snr_db)
    return noisy + 10 ** (FLOOR_DBFS / 20) * rng.standard_normal(len(noisy)).astype(np.float32)


def acoustics(quick: bool) -> list[Acoustics]:
    rooms, distances, snrs = ((0.45,), (2.0,), (5, 20)) if quick else (ROOMS, DISTANCES, SNRS)
    return [
        Acoustics(rt60, d, noise, snr, geometry)
        for (rt60, d, noise, snr), geometry in zip(
            itertools.product(rooms, distances, NOISES, snrs), itertools.cycle(range(GEOMETRIES))
        )
    ]


def make_positives(material: Material, rooms: list[Acoustics], per_room: int) -> list[Positive]:
    """Per wake word, `per_room` positives in each room, rotating kind, voice and command."""
    rng = np.random.default_rng(material.seed)
    voices_ = list(itertools.product(PACES, PITCHES))
    made = []
    for wake_word in BUILTIN_WAKE_WORDS:
        phrase = wake_model(wake_word)[0]
        for i, (room, n) in enumerate(itertools.product(rooms, range(per_room))):
            kind = KINDS[(i + BUILTIN_WAKE_WORDS.index(wake_word)) % len(KINDS)]
            pace, pitch = voices_[int(rng.integers(len(voices_)))]
            if kind == "recording":
                text, recording = material.recordings[int(rng.integers(len(material.recordings)))]
            else:
                text, recording = voices.COMMANDS[int(rng.integers(len(voices.COMMANDS)))], None
            clip = voices.wake_command(
                material.speaker, phrase, text, pace=pace, pitch=pitch,
                pause_ms=0 if kind == "one breath" else PAUSE_MS, recording=recording,
            )  # fmt: skip
            made.append(Positive(wake_word, kind, pace, pitch, clip, room, transcribe=n == 0))
    return made


def positive_stream(p: Positive, material: Material, max_ms: int) -> np.ndarray:
    """LEAD_S of room, the clip, then long enough for a capture to run to max_ms."""
    rng = np.random.default_rng([material.seed, *map(ord, p.clip.command[:8]), len(p.clip.samples)])
    lead = np.zeros(round(LEAD_S * SAMPLE_RATE), np.float32)
    tail = np.zeros(SAMPLE_RATE * (max_ms // 1000 + 1), np.float32)
    return in_the_room(np.concatenate([lead, p.clip.samples, tail]), p.room, material, rng)


def make_negatives(material: Material, minutes: float, quick: bool) -> dict[str, Stream]:
    """The negative groups, each one long stream of segments in random rooms."""
    rng = np.random.default_rng(material.seed + 1)
    rooms = acoustics(quick)
    talk = list(voices.TALK)
    rng.shuffle(talk)
    budget = {group: share * minutes * 60 for group, share in NEGATIVE_SHARES.items()}

    def room() -> Acoustics:
        return rooms[int(rng.integers(len(rooms)))]

    def pace_pitch() -> dict[str, float]:
        return {"pace": float(rng.choice(PACES)), "pitch": float(rng.choice(PITCHES))}

    recordings = itertools.cycle(material.recordings)
    sentences = itertools.cycle(talk)
    makers: dict[str, Callable[[], tuple[np.ndarray, Acoustics, str]]] = {
        "recordings": lambda: (next(recordings)[1], room(), "recording"),
        "talk": lambda: (material.speaker.say(next(sentences), **pace_pitch()), room(), "talk"),
        "babble": lambda: _babble_segment(material, rng, room()),
        "noise alone": lambda: _noise_segment(rng, room()),
    }
    streams = {
        group: _concatenate(make, material, rng, seconds=budget[group], ambient=group in AMBIENT)
        for group, make in makers.items()
    }
    near = [
        (phrase, wake_word)
        for wake_word, phrases in voices.NEAR_MISSES.items()
        for phrase in phrases
        for _ in range(1 if quick else 3)
    ]
    items = iter(near)

    def near_miss() -> tuple[np.ndarray, Acoustics, str]:
        phrase, wake_word = next(items)
        quiet = Acoustics(float(rng.choice(ROOMS)), float(rng.choice(DISTANCES)), "pink", 20, 0)
        return material.speaker.say(f"{phrase}.", **pace_pitch()), quiet, f"{wake_word}: {phrase}"

    streams["near misses"] = _concatenate(near_miss, material, rng, count=len(near))
    return streams


def _babble_segment(
    material: Material, rng: np.random.Generator, room: Acoustics
) -> tuple[np.ndarray, Acoustics, str]:
    """20 s of two to six people talking (real voices and Piper's), a few dB either side of a talker."""
    lines = [r for _, r in material.recordings] + [
        material.speaker.say(s) for s in voices.TALK[:40]
    ]
    talkers = int(rng.integers(2, 7))
    crowd = voices.babble(lines, talkers, 20.0, int(rng.integers(1 << 30)))
    return crowd * 10 ** ((SPEECH_DBFS - rng.uniform(0, 10)) / 20), room, f"babble of {talkers}"


def _noise_segment(rng: np.random.Generator, room: Acoustics) -> tuple[np.ndarray, Acoustics, str]:
    """30 s with nobody speaking: the noise alone, as loud as under speech at its SNR."""
    kind = str(rng.choice(["pink", "brown", "hum"]))
    level = 10 ** ((SPEECH_DBFS - float(rng.choice(SNRS))) / 20)
    return (
        level * _noise_loop(kind, int(rng.integers(4)))[: 30 * SAMPLE_RATE],
        room,
        f"{kind} alone",
    )


def _concatenate(
    make: Callable[[], tuple[np.ndarray, Acoustics, str]],
    material: Material,
    rng: np.random.Generator,
    *,
    seconds: float = 0.0,
    count: int = 0,
    ambient: bool = False,
) -> Stream:
    """Segments (each in its room, 1-3 s of its room after it) until `seconds` or `count`.

    A talker's segment is set to SPEECH_DBFS with the room's noise at its SNR;
    an `ambient` one (a crowd, a fan) keeps its own level and hears no other noise.
    """
    parts, segments, at = [], [], 0
    while at < seconds * SAMPLE_RATE or len(parts) < count:
        dry, room, label = make()
        sound = np.concatenate(
            [dry, np.zeros(int(rng.uniform(1.0, 3.0) * SAMPLE_RATE), np.float32)]
        )
        heard = _ambient(sound, room, rng) if ambient else in_the_room(sound, room, material, rng)
        parts.append(heard)
        segments.append((at, at + len(dry), label))
        at += len(heard)
    return Stream(voices.to_pcm(np.concatenate(parts)), segments)


def _ambient(sound: np.ndarray, room: Acoustics, rng: np.random.Generator) -> np.ndarray:
    """A sound that is not a talker (a crowd, a fan) through the room, at its own level, over the floor."""
    wet = voices.reverberate(sound, rt60=room.rt60, distance_m=room.distance_m, seed=room.geometry)
    level = np.sqrt(np.mean(np.square(sound))) / max(np.sqrt(np.mean(np.square(wet))), 1e-12)
    return wet[: len(sound)] * level + 10 ** (FLOOR_DBFS / 20) * rng.standard_normal(len(sound))
