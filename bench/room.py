"""The listening front end in simulated rooms: today's beside the new one, on the same audio.

Today's front end wakes on any speech (webrtcvad onset) and end-points with
webrtcvad; the new one wakes on a wake word and end-points with Silero woken by
webrtcvad. Both hear the same streams in the same run: Piper's voice (paces
0.8-1.4, pitches 0.85-1.15) and the shared recordings, through shoebox rooms
(RT60 0.3-0.6 s, 1-3 m away) with pink, brown, hum or babble noise at 5-20 dB SNR.
  1. false wakes: captures in long streams of talk, babble and noise without a
     wake word (per hour), and in near-miss phrases;
  2. wake phrase + command found, per built-in wake word and cutoff;
  3. end-pointing: capture end minus the command's last word, captures that ran to max_ms;
  4. words kept: faster-whisper tiny.en's WER on the capture vs on the command's whole stretch;
  5. noise suppression and auto gain: detection and WER;
  6. CPU per second of audio of each component, with a Pi 4 ESTIMATE;
  7. the device's own voice: captures while and after it speaks (devices/room.py).
A benchmark: it prints figures, it never passes or fails.

Usage: python bench/room.py [--quick] [--negatives-minutes 30] [--seed 0] [--markdown]
(HEIMDALL_MODELS_DIR defaults to ../shared/models, HEIMDALL_SPEECH_DIR to ../shared/speech.)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import report  # it puts tests/ on the path too
from shared import words

from heimdall_edge.audio import FRAME_BYTES, FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE, Audio
from heimdall_edge.audio import frames as split_frames
from heimdall_edge.devices.base import MicrophoneEnded
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
    return model.phrase, model.cutoff


def cutoffs(wake_word: str) -> tuple[float, float, float]:
    """The model's own cutoff, and ones that double and halve its distance to 1."""
    own = wake_model(wake_word)[1]
    return round(1 - 2 * (1 - own), 3), own, round(1 - (1 - own) / 2, 4)


# ----------------------------------------------------------------------------- material


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


# ----------------------------------------------------------------------------- listening


@dataclass(frozen=True)
class Capture:
    start: int
    """Frame of the stream where the capture's audio starts."""
    end: int
    reason: str
    trigger: str
    has_speech: bool
    pcm: bytes = b""


class TracingMicrophone(voices.ArrayMicrophone):
    """An ArrayMicrophone that notes the wake model's newest probability before every frame it hands out."""

    def __init__(self, pcm: bytes) -> None:
        super().__init__(pcm)
        self.probe: Callable[[], float] | None = None
        self.trace: list[float] = []

    async def read(self) -> bytes:
        if self.probe is not None:
            self.trace.append(self.probe())
        return await super().read()


async def listen(
    pcm: bytes,
    settings: ListeningSettings,
    *,
    until_frame: int | None = None,
    keep_audio: bool = False,
) -> tuple[list[Capture], list[float]]:
    """Every capture the Listener makes in `pcm` (up to the one ending at or after `until_frame`),
    and the wake model's probability after each frame."""
    from heimdall_edge.listen.listener import build_listener

    mic = TracingMicrophone(pcm)
    listener = build_listener(mic, None, settings)
    if (wake := listener.wake_word) is not None:
        mic.probe = lambda: wake.probability
    captures = []
    try:
        while True:
            utterance = await listener.next_utterance()
            assert utterance is not None
            end = listener.frames_read
            captures.append(
                Capture(
                    end - len(utterance.audio.pcm) // FRAME_BYTES, end, utterance.reason.value,
                    utterance.trigger, utterance.has_speech, utterance.audio.pcm if keep_audio else b"",
                )
            )  # fmt: skip
            if until_frame is not None and end >= until_frame:
                break
    except MicrophoneEnded:
        pass
    return captures, mic.trace[1:] + ([wake.probability] if wake else [])


@cache
def whisper() -> Any:
    from heimdall_edge.engines.faster_whisper import FasterWhisperEngine
    from heimdall_edge.settings import SpeechToTextSettings

    models = Path(os.environ["HEIMDALL_MODELS_DIR"])
    return FasterWhisperEngine(SpeechToTextSettings(cpu_threads=1), models)


async def transcribe(pcm: bytes) -> str:
    return words((await whisper().transcribe(Audio(pcm, SAMPLE_RATE))).text) if pcm else ""


MATERIAL: Material | None = None
"""Set in the parent before the workers fork; they read it."""


def frame_of(sample: int) -> int:
    return sample // FRAME_SAMPLES


def judge(p: Positive, captures: list[Capture], wake: bool) -> dict[str, Any]:
    """Which capture holds the command, and how it went."""
    lead = round(LEAD_S * SAMPLE_RATE)
    clip = p.clip
    wake_start, command_start = frame_of(lead), lead + clip.command_start
    command_end = lead + clip.command_end
    latest = frame_of(command_start + START_SLACK_MS * SAMPLE_RATE // 1000)
    covering = next(
        (
            c
            for c in captures
            if c.end * FRAME_SAMPLES > command_start and c.start * FRAME_SAMPLES < command_end
        ),
        None,
    )
    if wake:
        woken = next(
            (c for c in captures if c.trigger == "wake_word" and c.start >= wake_start), None
        )
        started = woken is not None and woken.start <= latest
        holder = woken if started else None
        early = sum(c.start < wake_start for c in captures)
    else:
        holder = next(
            (c for c in captures if c.start <= latest and c.end * FRAME_SAMPLES >= command_end),
            None,
        )
        started, woken, early = holder is not None, None, 0
    found = holder is not None and holder.end * FRAME_SAMPLES >= command_end and holder.has_speech
    return {
        "started": started,
        "found": found,
        "early": early,
        "detect_ms": None
        if woken is None
        else (woken.start * FRAME_SAMPLES - lead - clip.wake_end) / 16,
        "lag_ms": (holder.end * FRAME_SAMPLES - command_end) / 16 if found else None,
        "max_length": holder is not None and holder.reason == "max_length",
        "covering": covering,
    }


async def _run_positive(
    index: int, fronts: list[tuple[str, ListeningSettings]], whole: bool
) -> dict[str, Any]:
    assert MATERIAL is not None
    p = MATERIAL.positives[index]
    samples = positive_stream(p, MATERIAL, BASELINE.max_ms)
    pcm = voices.to_pcm(samples)
    lead = round(LEAD_S * SAMPLE_RATE)
    until = frame_of(lead + p.clip.command_end) + 1
    out: dict[str, Any] = {"index": index}
    for name, settings in fronts:
        captures, trace = await listen(pcm, settings, until_frame=until, keep_audio=p.transcribe)
        result = judge(p, captures, wake=bool(settings.wake_word))
        covering = result.pop("covering")
        if p.transcribe:
            result["text"] = await transcribe(covering.pcm) if covering else None
        if settings.wake_word:
            window = slice(
                frame_of(lead), frame_of(lead + p.clip.command_start) + START_SLACK_MS // FRAME_MS
            )
            result["peak"] = max(trace[window], default=0.0)
        out[name] = result
    if whole and p.transcribe:
        margin = WHOLE_MARGIN_MS * SAMPLE_RATE // 1000
        stretch = samples[lead + p.clip.command_start - margin : lead + p.clip.command_end + margin]
        out["whole_text"] = await transcribe(voices.to_pcm(stretch))
    return out


def run_positive(job: tuple[int, list[tuple[str, ListeningSettings]], bool]) -> dict[str, Any]:
    return asyncio.run(_run_positive(*job))


def run_negative(job: tuple[str, str, ListeningSettings]) -> tuple[str, str, list[Capture]]:
    assert MATERIAL is not None
    group, name, settings = job
    captures, _ = asyncio.run(listen(MATERIAL.negatives[group].pcm, settings))
    return group, name, captures


def _init_worker() -> None:
    logging.disable(logging.ERROR)


def pool_map(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int, what: str) -> list[Any]:
    """`fn` over `jobs` in forked workers (sharing MATERIAL), with a progress line."""
    started = time.perf_counter()
    results = []
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
        for i, result in enumerate(
            pool.map(fn, jobs, chunksize=max(1, len(jobs) // (workers * 20)))
        ):
            results.append(result)
            if (i + 1) % max(1, len(jobs) // 10) == 0 or i + 1 == len(jobs):
                print(
                    f"[room] {what}: {i + 1}/{len(jobs)} ({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    return results


# ----------------------------------------------------------------------------- figures


def pct(hits: int, n: int) -> str:
    return f"{100 * hits / n:.0f} % ({hits}/{n})" if n else "–"


def quantiles(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values):.0f} / {np.percentile(values, 90):.0f}"


def wer(pairs: Iterable[tuple[str, str | None]]) -> tuple[float, int]:
    """Corpus word error rate (errors / reference words) and how many utterances it covers."""
    import jiwer

    errors = total = n = 0
    for reference, hypothesis in pairs:
        ref = words(reference)
        out = jiwer.process_words(ref, hypothesis or "")
        errors += out.substitutions + out.deletions + out.insertions
        total += len(ref.split())
        n += 1
    return (100 * errors / total if total else float("nan")), n


def wer_cell(pairs: Iterable[tuple[str, str | None]]) -> str:
    rate, n = wer(pairs)
    return f"{rate:.0f} % (n={n})" if n else "–"


def leaked(p: Positive, text: str | None) -> bool:
    """Whether a word of the wake phrase reached the transcript (and is not in the command)."""
    if not text:
        return False
    phrase = set(words(wake_model(p.wake_word)[0]).split())
    if "okay" in phrase:
        phrase.add("ok")
    return bool((phrase & set(text.split())) - set(words(p.clip.command).split()))


class Printer:
    def __init__(self, markdown: bool) -> None:
        self.markdown = markdown

    def heading(self, text: str) -> None:
        print(f"\n## {text}\n" if self.markdown else f"\n=== {text} ===\n")

    def note(self, text: str) -> None:
        print(text + "\n" if self.markdown else text)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
        if self.markdown:
            print("| " + " | ".join(cells[0]) + " |")
            print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
            for row in cells[1:]:
                print("| " + " | ".join(row) + " |")
        else:
            widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
            for j, row in enumerate(cells):
                print(
                    "  ".join(
                        c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))
                    )
                )
                if j == 0:
                    print("  ".join("-" * w for w in widths))
        print()


def negative_hours(material: Material) -> float:
    return sum(s.seconds for g, s in material.negatives.items() if g != "near misses") / 3600


def false_wakes(
    out: Printer, material: Material, negatives: list[tuple[str, str, list[Capture]]]
) -> dict[str, int]:
    """Table 1; returns the false wakes (all groups but near misses) per front end."""
    hours = negative_hours(material)
    by: dict[str, dict[str, list[Capture]]] = {}
    for group, name, captures in negatives:
        by.setdefault(name, {})[group] = captures
    groups = [g for g in material.negatives if g != "near misses"]
    out.heading("1. False wakes: captures without a wake word")
    minutes = {g: f"{material.negatives[g].seconds / 60:.1f}" for g in material.negatives}
    out.note(
        f"{hours * 60:.1f} minutes of audio without any wake word ("
        + ", ".join(f"{g} {minutes[g]} min" for g in groups)
        + f"), streamed through each front end as one microphone stream per group; "
        f"near misses ({minutes['near misses']} min) apart. Every capture counts; "
        '"with speech" ones are those the appliance would transcribe and answer.'
    )
    totals = {}
    rows = []
    for name, per_group in by.items():
        caps = [c for g in groups for c in per_group.get(g, [])]
        totals[name] = len(caps)
        near = per_group.get("near misses", [])
        rows.append(
            [name, len(caps), f"{len(caps) / hours:.1f}", sum(c.has_speech for c in caps),
             *[len(per_group.get(g, [])) for g in groups], len(near)]
        )  # fmt: skip
    out.table(["front end", "false wakes", "per hour", "with speech", *groups, "near misses"], rows)
    near_stream = material.negatives["near misses"]
    rows = []
    for name, per_group in by.items():
        if not name.startswith("new"):
            continue
        fired: dict[str, int] = {}
        for c in per_group.get("near misses", []):
            label = near_stream.label_before(c.start * FRAME_SAMPLES)
            fired[label] = fired.get(label, 0) + 1
        rows.append([name, ", ".join(f"{k} ×{v}" for k, v in sorted(fired.items())) or "none"])
    out.note(
        "Near-miss phrases that woke each new front end (phrase: the wake word it was written against):"
    )
    out.table(["front end", "near misses that woke it"], rows)
    return totals


def detection(
    out: Printer,
    material: Material,
    results: list[dict[str, Any]],
    totals: dict[str, int],
    hours: float,
) -> tuple[str, float | None]:
    """Table 2; returns the chosen wake word and cutoff (None: the model's own)."""
    out.heading("2. Wake phrase + command found")
    out.note(
        "Found: a capture started by the wake word between the wake phrase's start and "
        f"{START_SLACK_MS} ms into the command, ending after the command's last word, with speech "
        "(today's: a capture holding the command). Detected at a cutoff: the wake model's probability "
        "passed it in that window (from the probability trace of the same run). "
        "False wakes are table 1's, at each cutoff."
    )
    rows, score = [], {}
    for wake_word in BUILTIN_WAKE_WORDS:
        mine = [
            (material.positives[r["index"]], r)
            for r in results
            if material.positives[r["index"]].wake_word == wake_word
        ]
        loud = [(p, r) for p, r in mine if p.room.snr_db >= 10]
        soft = [(p, r) for p, r in mine if p.room.snr_db < 10]
        own = wake_model(wake_word)[1]
        key = f"new {wake_word} @{own:g}"
        found = [sum(r[key]["found"] for _, r in group) for group in (loud, soft)]
        today = [sum(r["today"]["found"] for _, r in group) for group in (loud, soft)]
        delays = [r[key]["detect_ms"] for _, r in mine if r[key]["started"]]
        for cutoff in cutoffs(wake_word):
            name = f"new {wake_word} @{cutoff:g}"
            hit = [sum(r[key]["peak"] > cutoff for _, r in group) for group in (loud, soft)]
            wakes = totals.get(name)
            rows.append(
                [wake_word, f"{cutoff:g}" + (" (own)" if cutoff == own else ""),
                 pct(found[0], len(loud)) if cutoff == own else "", pct(found[1], len(soft)) if cutoff == own else "",
                 pct(hit[0], len(loud)), pct(hit[1], len(soft)),
                 "–" if wakes is None else f"{wakes} ({wakes / hours:.1f}/h)",
                 quantiles(delays) if cutoff == own else ""]
            )  # fmt: skip
            score[(wake_word, cutoff)] = (
                wakes or 0,
                hit[0] / max(1, len(loud)),
                hit[1] / max(1, len(soft)),
            )
        rows.append(
            [
                f"today's (same {wake_word} clips)",
                "–",
                pct(today[0], len(loud)),
                pct(today[1], len(soft)),
                "",
                "",
                f"{totals.get('today', 0)}",
                "",
            ]
        )
    out.table(
        ["wake word", "cutoff", "found, SNR ≥ 10 dB", "found, 5 dB", "detected ≥ 10 dB", "detected 5 dB",
         "false wakes", "detection after phrase end, ms (median / p90)"],
        rows,
    )  # fmt: skip
    by_kind = []
    for wake_word in BUILTIN_WAKE_WORDS:
        key = f"new {wake_word} @{wake_model(wake_word)[1]:g}"
        cells = []
        for kind in KINDS:
            group = [
                r
                for r in results
                if (p := material.positives[r["index"]]).wake_word == wake_word and p.kind == kind
            ]
            cells.append(pct(sum(r[key]["found"] for r in group), len(group)))
        by_kind.append([wake_word, *cells])
    out.note("Found at the model's own cutoff, by how the phrase was said (all SNRs):")
    out.table(["wake word", *KINDS], by_kind)
    # The default: fewest false wakes first (zero wanted), then detection at >= 10 dB, then at 5 dB.
    (wake_word, cutoff), _ = min(score.items(), key=lambda kv: (kv[1][0], -kv[1][1], -kv[1][2]))
    return wake_word, None if cutoff == wake_model(wake_word)[1] else cutoff


def endpointing(out: Printer, material: Material, results: list[dict[str, Any]]) -> None:
    out.heading("3. End-pointing: capture end minus the command's last word")
    out.note(
        "Over the captures that hold the command (found), by the noise still running after the words; "
        "ms, median / 90th percentile; max_ms: captures holding the command that ran to the "
        f"{BASELINE.max_ms} ms limit. The hang-over (silence_ms {BASELINE.silence_ms}) is part of every lag."
    )
    rows = []
    for noise in NOISES:
        row: list[Any] = [noise]
        for name in ("today", "new"):
            lags, maxed, n = [], 0, 0
            for r in results:
                p = material.positives[r["index"]]
                if p.room.noise != noise:
                    continue
                res = (
                    r["today"]
                    if name == "today"
                    else r[f"new {p.wake_word} @{wake_model(p.wake_word)[1]:g}"]
                )
                n += 1
                maxed += res["max_length"]
                if res["lag_ms"] is not None:
                    lags.append(res["lag_ms"])
            row += [quantiles(lags), f"{maxed}/{n}"]
        rows.append(row)
    out.table(["noise", "today's lag", "today's max_ms", "new lag", "new max_ms"], rows)


def words_kept(out: Printer, material: Material, results: list[dict[str, Any]]) -> None:
    out.heading("4. Words kept: WER of the capture vs the command's whole stretch")
    out.note(
        "faster-whisper tiny.en (int8, beam 1) on what each front end captured and on the command's "
        f"own stretch of the same noisy stream (its words ± {WHOLE_MARGIN_MS} ms); lowercase words without "
        "punctuation. Over positives where the front end made a capture overlapping the command "
        "(misses are table 2's); whole: over all transcribed positives. Wake leak: a word of the wake "
        "phrase in the transcript."
    )
    rows = []
    transcribed = [r for r in results if material.positives[r["index"]].transcribe]

    def cells(selected: list[dict[str, Any]]) -> list[str]:
        ref = [(material.positives[r["index"]].clip.command, r) for r in selected]
        today = [(c, r["today"]["text"]) for c, r in ref if r["today"]["text"] is not None]
        new = [
            (c, r[new_key(material, r)]["text"])
            for c, r in ref
            if r[new_key(material, r)]["text"] is not None
        ]
        return [wer_cell((c, r["whole_text"]) for c, r in ref), wer_cell(today), wer_cell(new)]

    for noise, snr in itertools.product(
        NOISES, sorted({p.room.snr_db for p in material.positives})
    ):
        group = [
            r
            for r in transcribed
            if (p := material.positives[r["index"]]).room.noise == noise and p.room.snr_db == snr
        ]
        rows.append([f"{noise} {snr:g} dB", *cells(group)])
    for rt60 in sorted({p.room.rt60 for p in material.positives}):
        group = [r for r in transcribed if material.positives[r["index"]].room.rt60 == rt60]
        rows.append([f"RT60 {rt60} s (all noises)", *cells(group)])
    rows.append(["all", *cells(transcribed)])
    out.table(["condition", "whole stretch", "today's capture", "new capture"], rows)
    rows = []
    for wake_word in BUILTIN_WAKE_WORDS:
        group = [r for r in transcribed if material.positives[r["index"]].wake_word == wake_word]
        leaks = [
            sum(leaked(material.positives[r["index"]], r[key]["text"]) for r in group)
            for key in ("today", f"new {wake_word} @{wake_model(wake_word)[1]:g}")
        ]
        rows.append(
            [wake_word, *cells(group), f"{leaks[0]}/{len(group)}", f"{leaks[1]}/{len(group)}"]
        )
    out.table(
        [
            "wake word",
            "whole stretch",
            "today's capture",
            "new capture",
            "today's wake leaks",
            "new wake leaks",
        ],
        rows,
    )


def new_key(material: Material, r: dict[str, Any]) -> str:
    wake_word = material.positives[r["index"]].wake_word
    return f"new {wake_word} @{wake_model(wake_word)[1]:g}"


def front_end_settings(
    out: Printer, material: Material, tried: list[dict[str, Any]], wake_word: str
) -> tuple[int, int]:
    """Table 5; returns the (noise_suppression, auto_gain_dbfs) to use."""
    out.heading(f"5. Noise suppression and auto gain ({wake_word}, new front end)")
    out.note(
        "The same transcribed positives through webrtc-noise-gain before everything else. "
        "Found and WER as in tables 2 and 4."
    )
    rows, score = [], {}
    for ns, ag in SETTINGS_GRID:
        results = [(material.positives[r["index"]], r[f"ns{ns} ag{ag}"]) for r in tried]
        loud = [res for p, res in results if p.room.snr_db >= 10]
        soft = [res for p, res in results if p.room.snr_db < 10]
        rate, n = wer(
            (p.clip.command, res["text"]) for p, res in results if res["text"] is not None
        )
        found = sum(res["found"] for _, res in results)
        score[(ns, ag)] = (rate, -found)
        rows.append(
            [f"{ns}", f"{ag}", pct(sum(r["found"] for r in loud), len(loud)), pct(sum(r["found"] for r in soft), len(soft)),
             f"{rate:.0f} % (n={n})"]
        )  # fmt: skip
    out.table(
        [
            "noise_suppression",
            "auto_gain_dbfs",
            "found ≥ 10 dB",
            "found 5 dB",
            "WER of the capture",
        ],
        rows,
    )
    best = min(score, key=lambda k: score[k])
    off = score[(0, 0)]
    # Worth turning on only for a clear gain: 2 points of WER and no fewer commands found.
    return best if score[best][0] <= off[0] - 2 and score[best][1] <= off[1] else (0, 0)


# ----------------------------------------------------------------------------- CPU


def cpu_section(out: Printer, material: Material, wake_word: str, seconds: float) -> None:
    from heimdall_edge.listen.frontend import NoiseAndGain
    from heimdall_edge.listen.vad import SileroJudge, WebRtcJudge
    from heimdall_edge.listen.wakeword import WakeWordDetector

    rng = np.random.default_rng(material.seed + 2)
    room = Acoustics(0.45, 2.0, "pink", 10, 0)
    n = round(seconds * SAMPLE_RATE)
    talk: list[np.ndarray] = []
    while sum(map(len, talk)) < n:
        talk += [
            material.speaker.say(voices.TALK[len(talk) % 50]),
            np.zeros(SAMPLE_RATE, np.float32),
        ]
    dry = np.concatenate(talk)[:n]
    floor = 10 ** (FLOOR_DBFS / 20) * rng.standard_normal(n).astype(np.float32)
    fan = 10 ** ((SPEECH_DBFS - 10) / 20) * _noise_loop("pink", 0)[:n]
    quiet_talk = in_the_room(dry, Acoustics(0.45, 2.0, "pink", 40, 0), material, rng)
    conditions = {
        "quiet room, nobody talking": floor,
        "quiet room, talk": quiet_talk,
        "fan (pink, 10 dB SNR), talk": in_the_room(dry, room, material, rng),
        "fan alone": fan + floor,
    }
    components: dict[str, Callable[[], Callable[[bytes], object]]] = {
        "webrtc-noise-gain (ns 2, gain 16)": lambda: NoiseAndGain(2, 16).process,
        f"wake model ({wake_word})": lambda: (
            WakeWordDetector(wake_word, cutoff=None, refractory_ms=2000).feed
        ),
        "webrtcvad": lambda: WebRtcJudge(2),
        "Silero always on": lambda: SileroJudge(0.5),
        "Silero woken by webrtcvad (incl. webrtcvad)": lambda: SileroJudge(0.5, WebRtcJudge(2)),
    }
    factor = report.pi_factors(report.cpu_probe(2), None)["Pi 4"]["single"]
    out.heading("6. CPU per second of audio (% of one core)")
    out.note(
        f"time.process_time around each component alone over {seconds:.0f} s of the same audio per condition. "
        f"Pi 4 column: an ESTIMATE, this machine's figure × {factor:.1f} (bench/report.py's single-core "
        "pure-Python factor; the models are native code, so treat it as a rough bound)."
    )
    rows = []
    speech_share = {}
    for condition, samples in conditions.items():
        frames = split_frames(voices.to_pcm(samples))
        vad = WebRtcJudge(2)
        speech_share[condition] = sum(vad(f) for f in frames) / len(frames)
        for component, make in components.items():
            judge_ = make()
            started = time.process_time()
            for frame in frames:
                judge_(frame)
            share = 100 * (time.process_time() - started) / (len(frames) * FRAME_MS / 1000)
            rows.append([condition, component, f"{share:.2f}", f"{share * factor:.1f} (est.)"])
            if component.startswith("wake model"):
                rows.append(
                    [condition, "wake model gated by webrtcvad (estimate)",
                     f"{share * speech_share[condition]:.2f} (webrtcvad speech {100 * speech_share[condition]:.0f} % of frames)",
                     f"{share * speech_share[condition] * factor:.1f} (est.)"]
                )  # fmt: skip
    out.table(["condition", "component", "this machine, % of a core", "Pi 4, % of a core"], rows)


# ----------------------------------------------------------------------------- own voice


async def own_voice(
    material: Material, fronts: dict[str, ListeningSettings], replies: list[str]
) -> list[list[Any]]:
    """Captures of the device's own replies, played with echo at -6 dB, guarded and unguarded."""
    rows = []
    for name, settings in fronts.items():
        phrase = wake_model(settings.wake_word)[0] if settings.wake_word else "Okay Nabu"
        lines = [*replies, f"You can say {phrase} whenever you need me."]
        for guarded in (True, False):
            captures, interrupted = await _own_voice_run(material, settings, lines, guarded)
            rows.append(
                [name, "ListeningSpeaker (as the appliance plays)" if guarded else "plain speaker, listening throughout",
                 len(lines), len(captures), sum(c.has_speech for c in captures), interrupted]
            )  # fmt: skip
    return rows


async def _own_voice_run(
    material: Material, settings: ListeningSettings, lines: list[str], guarded: bool
) -> tuple[list[Any], int]:
    from heimdall_edge.devices.microphone import FileMicrophone
    from heimdall_edge.devices.room import SimulatedRoom
    from heimdall_edge.devices.speaker import WavFileSpeaker
    from heimdall_edge.listen.listener import build_listener
    from heimdall_edge.listen.playback import ListeningSpeaker

    room = SimulatedRoom(
        FileMicrophone(tail_silence_ms=3_600_000), WavFileSpeaker(None), echo_db=-6
    )
    listener = build_listener(room.microphone, None, settings)
    speaker = ListeningSpeaker(room.speaker, listener) if guarded else room.speaker
    captures, interrupted = [], 0
    window = round(2000 / FRAME_MS)

    async def one(audio: Audio) -> AsyncIterator[Audio]:
        yield audio

    async def listen_between() -> None:
        """Listen for `window` frames; a capture still going then is ended there, and counts."""
        task = asyncio.create_task(listener.next_utterance())
        start = room.microphone.position
        while not task.done():
            if room.microphone.position - start >= window:
                listener.finish()
            await asyncio.sleep(0)
        utterance = task.result()
        if utterance is not None and utterance.audio.pcm:
            captures.append(utterance)

    background = None if guarded else asyncio.create_task(_listen_always(listener, captures))
    for line in lines:
        audio = Audio(voices.to_pcm(material.speaker.say(line)), SAMPLE_RATE)
        playback = await speaker.play(one(audio), asyncio.Event())
        interrupted += playback.interrupted
        if guarded:
            await listen_between()
    if background is not None:
        start = room.microphone.position
        while room.microphone.position - start < window:
            await asyncio.sleep(0)
        listener.finish()
        background.cancel()
        await asyncio.gather(background, return_exceptions=True)
    await room.microphone.aclose()
    return captures, interrupted


async def _listen_always(listener: Any, captures: list[Any]) -> None:
    while True:
        utterance = await listener.next_utterance()
        if utterance is not None and utterance.audio.pcm:
            captures.append(utterance)


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a few conditions: minutes, a smoke run"
    )
    parser.add_argument(
        "--negatives-minutes",
        type=float,
        default=None,
        help="minutes of audio without a wake word (default 30; 3 with --quick)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of rooms, voices, noise and babble"
    )
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: one per core)"
    )
    args = parser.parse_args()
    global MATERIAL

    logging.basicConfig(level=logging.ERROR)
    models = Path(
        os.environ.setdefault("HEIMDALL_MODELS_DIR", str(REPO.parent / "shared" / "models"))
    )
    speech = Path(
        os.environ.setdefault("HEIMDALL_SPEECH_DIR", str(REPO.parent / "shared" / "speech"))
    )
    os.environ["HF_HUB_OFFLINE"] = "1"
    quick = args.quick
    minutes = args.negatives_minutes or (3.0 if quick else 30.0)
    started = time.perf_counter()
    out = Printer(args.markdown)

    def stage(text: str) -> None:
        print(f"[room] {text} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    material = MATERIAL = Material(models, speech, args.seed)
    rooms = acoustics(quick)
    for room in rooms:  # the responses, once, before the workers fork
        voices.room_impulse_response(room.rt60, room.distance_m, room.geometry)
    stage("rooms ready")
    material.positives = make_positives(material, rooms, 1 if quick else 2)
    stage(f"{len(material.positives)} positives synthesized")
    material.negatives = make_negatives(material, minutes, quick)
    stage("negatives synthesized")

    negative_fronts = [("today", BASELINE)] + [
        (f"new {w} @{c:g}", new_front_end(w, c)) for w in BUILTIN_WAKE_WORDS for c in cutoffs(w)
    ]
    jobs = [
        (group, name, settings)
        for group in material.negatives
        for name, settings in negative_fronts
    ]
    negatives = pool_map(run_negative, jobs, args.workers, "false wakes")
    jobs = [
        (
            i,
            [
                ("today", BASELINE),
                (f"new {p.wake_word} @{wake_model(p.wake_word)[1]:g}", new_front_end(p.wake_word)),
            ],
            True,
        )
        for i, p in enumerate(material.positives)
    ]
    results = pool_map(run_positive, jobs, args.workers, "positives")

    info = report.machine_info()
    hours = negative_hours(material)
    print(
        ("# " if args.markdown else "") + "Listening front end in simulated rooms (bench/room.py)"
    )
    out.note(
        f"\n{datetime.now(UTC):%Y-%m-%d %H:%M UTC}; machine: {info['cpu']}, {info['logical_cores']} cores, "
        f"{info['python']}, {info['os']}; seed {args.seed}{', --quick' if quick else ''}. "
        f"{len(material.positives)} positives ({len(rooms)} rooms × noises × SNRs, {len(BUILTIN_WAKE_WORDS)} wake words); "
        "today's = no wake word (webrtcvad speech onset), vad webrtc; new = wake word, vad silero."
    )
    totals = false_wakes(out, material, negatives)
    wake_word, cutoff = detection(out, material, results, totals, hours)
    endpointing(out, material, results)
    words_kept(out, material, results)

    chosen = [
        i for i, p in enumerate(material.positives) if p.wake_word == wake_word and p.transcribe
    ]
    grid = [
        (f"ns{ns} ag{ag}", new_front_end(wake_word, cutoff, ns, ag)) for ns, ag in SETTINGS_GRID
    ]
    tried = pool_map(
        run_positive, [(i, grid, False) for i in chosen], args.workers, "front-end settings"
    )
    ns, ag = front_end_settings(out, material, tried, wake_word)

    stage("CPU")
    cpu_section(out, material, wake_word, 15.0 if quick else 60.0)
    stage("own voice")
    out.heading("7. The device's own voice")
    replies = [s for s in voices.TALK[:100]][: 3 if quick else 15]
    fronts = {"today's": BASELINE, f"new ({wake_word})": new_front_end(wake_word, cutoff)}
    rows = asyncio.run(own_voice(material, fronts, replies))
    out.note(
        "devices/room.py's SimulatedRoom: Piper replies (TALK sentences, and one that says the wake phrase) "
        "played with their echo at -6 dB (20 ms late, no reverberation), nobody else speaking. "
        "Guarded: the appliance's way, ListeningSpeaker around each reply and next_utterance() for 2 s "
        "between replies; unguarded: next_utterance() running throughout while a plain speaker plays."
    )
    out.table(
        ["front end", "playback", "replies", "captures", "with speech", "replies interrupted"], rows
    )

    out.heading("Chosen defaults")
    out.note(
        f"wake_word = {wake_word!r}, wake_cutoff = {cutoff if cutoff is not None else 'unset (the model’s own, ' + format(wake_model(wake_word)[1], 'g') + ')'}, "
        f"noise_suppression = {ns}, auto_gain_dbfs = {ag} (rules: fewest false wakes, then best detection at ≥ 10 dB, "
        "then at 5 dB; noise suppression / gain only for ≥ 2 points less WER with no fewer commands found)."
    )
    stage("done")
    out.note(f"The whole run took {(time.perf_counter() - started) / 60:.1f} min.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
