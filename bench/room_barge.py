"""bench/room.py's barge-in table: the wake phrase said over the device's own reply.

There is no echo canceller, so while the device speaks the wake model hears the
person and the reply's echo at once. How loud the echo may be before the model
stops hearing the person differs a lot between the built-in models; it is one
of the reasons for the default wake word.
"""

from __future__ import annotations

import numpy as np

from bench.room_material import FLOOR_DBFS, SPEECH_DBFS, Material, wake_model
from bench.room_tables import Printer, pct
from heimdall_edge.audio import FRAME_SAMPLES, SAMPLE_RATE
from heimdall_edge.audio import frames as split_frames
from heimdall_edge.listen.wakeword import WakeWordDetector
from heimdall_edge.settings import BUILTIN_WAKE_WORDS
from heimdall_edge.testing import voices

ECHO_DB = (-18, -12, -6, 0)
"""The reply's echo against the person's speech level at the microphone."""
START_S = 1.0
"""Where in the reply the person starts speaking."""


def barge_in_section(out: Printer, material: Material, clips: int) -> dict[str, float]:
    """Table 2b; returns each wake word's detection rate with the echo at -6 dB."""
    out.heading("2b. Barge-in: the wake phrase over the device's own reply")
    out.note(
        f"{clips} clips per wake word and echo level: '<wake phrase>, <command>' (Piper, paces and "
        f"pitches rotating) starting {START_S:g} s into a Piper reply (another voice pitch) whose echo "
        f"is the given dB against the person, both through the same RT60 0.45 s room, the person 2 m "
        "away, at the model's own cutoff. Detected: the model fired while the person spoke. "
        "No echo canceller."
    )
    rng = np.random.default_rng(material.seed + 3)
    rows, at_minus_6 = [], {}
    for wake_word in BUILTIN_WAKE_WORDS:
        phrase = wake_model(wake_word)[0]
        said = [
            material.speaker.say(
                f"{phrase}, {voices.COMMANDS[i % len(voices.COMMANDS)]}.",
                pace=(0.8, 1.0, 1.2)[i % 3],
                pitch=(1.0, 1.15)[i % 2],
            )
            for i in range(clips)
        ]
        replies = [material.speaker.say(voices.TALK[60 + i], pitch=0.85) for i in range(clips)]
        cells = []
        for echo_db in ECHO_DB:
            hits = sum(
                _heard(wake_word, person, reply, echo_db, rng)
                for person, reply in zip(said, replies)
            )
            cells.append(pct(hits, clips))
            if echo_db == -6:
                at_minus_6[wake_word] = hits / clips
        rows.append([wake_word, *cells])
    out.table(["wake word", *(f"echo {db:+d} dB" for db in ECHO_DB)], rows)
    return at_minus_6


def _heard(
    wake_word: str, person: np.ndarray, reply: np.ndarray, echo_db: float, rng: np.random.Generator
) -> bool:
    start = round(START_S * SAMPLE_RATE)
    length = max(len(reply), start + len(person)) + SAMPLE_RATE
    voice = np.zeros(length, np.float32)
    voice[start : start + len(person)] = _level(
        voices.reverberate(person, rt60=0.45, distance_m=2.0, seed=0)[: len(person)], person, 0.0
    )
    echo = np.zeros(length, np.float32)
    echo[: len(reply)] = _level(
        voices.reverberate(reply, rt60=0.45, distance_m=0.5, seed=1)[: len(reply)], reply, echo_db
    )
    floor = 10 ** (FLOOR_DBFS / 20) * rng.standard_normal(length).astype(np.float32)
    detector = WakeWordDetector(wake_word, cutoff=None, refractory_ms=0)
    fired = [detector.feed(f) for f in split_frames(voices.to_pcm(voice + echo + floor))]
    first, last = start // FRAME_SAMPLES, (start + len(person)) // FRAME_SAMPLES + 10
    return any(fired[first:last])


def _level(wet: np.ndarray, dry: np.ndarray, relative_db: float) -> np.ndarray:
    """`wet` set so that `dry`'s active speech would be at SPEECH_DBFS + relative_db."""
    return wet * (10 ** ((SPEECH_DBFS + relative_db) / 20) / voices.active_rms(dry))
