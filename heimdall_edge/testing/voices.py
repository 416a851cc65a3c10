"""Voices and rooms for tests and benchmarks, made here instead of shipped as recordings.

The wake word, the speech judges and the end-pointer have to be measured on many
voices, paces, rooms and noises, with the moment every word ends known to the
millisecond. Recordings of all of that cannot be shipped, and their word times
would have to be marked by hand. So the speech here is Piper's voice (paced and
pitched into different speakers), the shared recordings carry the real-voice
part, pyroomacoustics puts either into a room, and the noise sits at a known
SNR. Rooms, placements, noise and babble come from a seed; Piper's durations
are its mean ones, so word times repeat exactly (its timbre still varies a
little from run to run).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from heimdall_edge.audio import FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE, resample, to_int16
from heimdall_edge.devices.base import MicrophoneEnded
from heimdall_edge.engines.local.models import piper_voice_files

VOICE = "en_US-joe-medium"
WINDOW = SAMPLE_RATE // 100
"""Words are found in 10 ms windows."""
WORD_FLOOR_DB = -40.0
"""A 10 ms window this far below the loudest one is not a word (the tests' rule)."""
NOISE_MARGIN_DB = 10.0
"""...nor one less than this above the recording's own noise (its 10th-percentile window)."""
WORD_RUN_WINDOWS = 3
"""A word lasts at least 30 ms: shorter bursts are clicks."""

COMMANDS = (
    "what time is it",
    "turn on the kitchen light",
    "turn off the bedroom lamp",
    "set a timer for ten minutes",
    "what's the weather like tomorrow",
    "play some quiet music",
    "stop the music",
    "add eggs to the shopping list",
    "how many grams in a pound",
    "remind me to call my mother at six",
    "dim the living room lights to fifty percent",
    "is the front door locked",
    "what's on my calendar today",
    "turn the heating up two degrees",
    "cancel the timer",
    "how long until sunset",
    "open the garage door",
    "read me the news",
    "what is twelve times fifteen",
    "wake me up at seven tomorrow",
)
"""Short home-assistant commands, written for these benchmarks."""

_EVERYDAY = (
    "Did you remember to buy milk on the way home?",
    "The train was twenty minutes late again this morning.",
    "I think we should paint the hallway a lighter colour.",
    "Can you pass me the salt, please?",
    "My sister is coming over for dinner on Sunday.",
    "The dog keeps barking at the postman.",
    "We ran out of coffee, so I had tea instead.",
    "It looks like it might rain later this afternoon.",
    "Have you seen my reading glasses anywhere?",
    "The football match starts at half past seven.",
    "I left the car keys on the kitchen table.",
    "Let's order pizza tonight, I'm too tired to cook.",
    "The children need new shoes before school starts.",
    "He fixed the leaking tap in the bathroom yesterday.",
    "Could you turn the music down a little?",
    "I'm reading a book about the history of bridges.",
    "The neighbours are having a party on Saturday night.",
    "Don't forget your umbrella, it's pouring outside.",
    "We should book the holiday before the prices go up.",
    "The bread is a bit stale, but it's fine for toast.",
    "She works at the hospital on the night shift.",
    "I can never remember where I parked the bicycle.",
    "The garden needs watering, the soil is very dry.",
    "What did the doctor say about your knee?",
    "There's a new bakery opening on the corner next week.",
    "I'll pick up the kids from school at three.",
    "This soup needs a little more pepper.",
    "The washing machine is making a strange noise.",
    "My phone battery dies before lunch every day.",
    "We watched a documentary about whales last night.",
    "Grandma sent a postcard from the seaside.",
    "The printer is out of ink again.",
    "I need to renew my passport before the summer.",
    "Put the leftovers in the fridge, please.",
    "The cat has been sleeping on the sofa all day.",
    "Our flight leaves early on Thursday morning.",
    "I tried a new recipe with lentils and spinach.",
    "The bus stop has moved to the other side of the road.",
    "Would you like another cup of tea?",
    "The heating comes on at six in the morning.",
    "He is learning to play the guitar.",
    "The shop closes at nine on weekdays.",
    "I haven't finished the crossword yet.",
    "The baby finally fell asleep after lunch.",
    "We need to clean the windows before the guests arrive.",
    "The tomatoes in the greenhouse are almost ripe.",
    "I'm going for a run along the river.",
    "Can you help me carry these boxes upstairs?",
    "The film was much longer than I expected.",
    "Remember to lock the back door tonight.",
    "My brother moved to a flat near the station.",
    "The roads are icy, so drive carefully.",
    "I think the milk has gone off.",
    "The library has a sale of old books this weekend.",
    "Why is the remote control always under the cushion?",
    "We planted three apple trees in the spring.",
    "That was the best curry I've had in years.",
    "I'll call the plumber first thing tomorrow.",
    "The museum is free on the first Sunday of the month.",
    "She painted the fence a lovely shade of green.",
    "Are you still coming to the concert on Friday?",
    "The queue at the post office was enormous.",
    "I dropped my sandwich on the floor.",
    "The weather forecast says sunshine all week.",
    "We should invite the new neighbours for a drink.",
    "The kettle takes ages to boil.",
    "My favourite season is autumn, when the leaves change.",
    "The teacher gave them a lot of homework.",
    "There's a spider in the bath again.",
    "I'm saving up for a new bicycle.",
    "Let me know when dinner is ready.",
    "The clocks go back an hour this weekend.",
    "I found an old photo of us at the beach.",
    "Somebody left the gate open and the sheep got out.",
    "The lasagne needs another ten minutes in the oven.",
    "I wonder what time the match finishes.",
    "The river flooded the fields last winter.",
    "He always sings in the shower.",
    "I'm not sure this jumper goes with these trousers.",
    "We could go for a walk in the woods after lunch.",
    "The car needs a service before the long drive.",
    "Thank you for the lovely flowers.",
    "The batteries in the smoke alarm need changing.",
    "I've lost track of what day it is.",
    "The soup is too hot to eat right now.",
    "She won a prize for her photographs.",
    "There are too many tabs open on my computer.",
    "It's my turn to do the washing up.",
    "The lift in our building is broken again.",
    "Please wipe your feet before you come in.",
    "I love the smell of fresh coffee in the morning.",
    "The garage door gets stuck when it's cold.",
    "We're having fish and chips on Friday.",
    "Have you fed the goldfish today?",
    "The bookshelf is full, we need another one.",
    "My knees hurt after climbing all those stairs.",
    "The electricity bill was higher than last month.",
    "I'm meeting an old friend for lunch in town.",
    "Could you check if the post has arrived?",
    "The light in the hallway keeps flickering.",
)
_PROSE_MODULES = (
    "argparse", "calendar", "collections", "csv", "datetime", "decimal", "email.message",
    "fractions", "functools", "heapq", "http.client", "itertools", "json", "logging",
    "pathlib", "random", "shutil", "statistics", "string", "textwrap", "threading", "zipfile",
)  # fmt: skip
"""Standard-library modules whose docstrings give the rest of TALK: ordinary English prose."""
_NEAR_WAKE = re.compile(
    r"jarv|nabu|naboo|alex|lexa|lexi|mycro|micro|craft|okay|\bok\b|\bhey\b|\bhay\b", re.IGNORECASE
)
"""Anything that is, or sounds close to, a built-in wake word: kept out of TALK."""
TALK_WORDS = (5, 16)
"""A docstring sentence joins TALK if it has this many words (fewer is a fragment, more a lecture)."""


def _prose_sentences() -> Iterator[str]:
    """Plain sentences from the docstrings of _PROSE_MODULES and what they define, in a fixed order."""
    import importlib

    seen: set[str] = set()
    for name in _PROSE_MODULES:
        module = importlib.import_module(name)
        members = sorted(vars(module).items())
        for _, item in [(name, module), *members]:
            for sentence in re.split(
                r"(?<=[.!?])\s+", " ".join((inspect.getdoc(item) or "").split())
            ):
                words = sentence.rstrip(".!?").split()
                plain = sentence[:1].isupper() and all(
                    re.fullmatch(r"[A-Za-z][a-z']*,?", word) for word in words
                )
                if plain and TALK_WORDS[0] <= len(words) <= TALK_WORDS[1] and sentence not in seen:
                    seen.add(sentence)
                    yield sentence


def _far_from_wake_words(sentences: Sequence[str] | Iterator[str]) -> tuple[str, ...]:
    return tuple(s for s in sentences if not _NEAR_WAKE.search(s))


TALK = _far_from_wake_words([*_EVERYDAY, *_prose_sentences()])
"""A few hundred sentences without any wake word or anything near one: what a room hears all day."""

NEAR_MISSES = {
    "hey_jarvis": (
        "hey Travis",
        "hey, Jarvis's friend said so",
        "hey Mavis, come here",
        "hey Davis",
        "hey, service is slow today",
        "a jar of this, please",
        "hey Charles",
        "hey, harvest is early",
    ),
    "okay_nabu": (
        "okay, nobody",
        "okay, now you",
        "okay, Nabil called",
        "okay, no boots",
        "okay, maybe",
        "okay, Nairobi it is",
        "a canopy",
        "okay, I'm new",
    ),
    "alexa": (
        "Alexander",
        "Alexis",
        "a Lexus",
        "Alexandra",
        "I'll ask her",
        "electric",
        "Alaska",
        "relax a bit",
    ),
    "hey_mycroft": (
        "hey Microsoft",
        "hey, my craft",
        "hey, my crops",
        "hey Mike, left",
        "hey, Minecraft",
        "hey, microwave it",
        "my croft",
        "hey, my cropped photo",
    ),
}
"""Phrases that sound close to each built-in wake word (some contain it in passing)."""


# --- Piper's voice ----------------------------------------------------------------------------


class PiperSpeaker:
    """Piper's voice as a speaker of any pace and pitch, every phrase made once."""

    def __init__(self, models_dir: Path, voice: str = VOICE) -> None:
        files = piper_voice_files(models_dir, voice)
        from piper import PiperVoice

        self._voice = PiperVoice.load(files.onnx, config_path=files.config)
        self._said: dict[tuple[str, float, float], np.ndarray] = {}

    def say(self, text: str, *, pace: float = 1.0, pitch: float = 1.0) -> np.ndarray:
        """`text` as float32 at 16 kHz (read-only: it is cached).

        `pace` stretches the speech (Piper's length_scale: above 1 is slower);
        `pitch` raises the voice by playing it faster, which Piper's pace then
        makes up for, so the length stays what `pace` asked. Piper's noise is
        off (noise 0, noise_w 0): the same text always gives the same audio,
        so tests and benchmarks repeat exactly, and a phrase said alone lasts
        as long as inside a sentence.
        """
        key = (text, pace, pitch)
        if key not in self._said:
            samples = self._synthesize(text, length_scale=pace * pitch)
            rate = self._voice.config.sample_rate
            self._said[key] = resample(samples, round(rate * pitch), SAMPLE_RATE)
            self._said[key].flags.writeable = False
        return self._said[key]

    def _synthesize(self, text: str, length_scale: float) -> np.ndarray:
        from piper import SynthesisConfig

        config = SynthesisConfig(length_scale=length_scale, noise_scale=0.0, noise_w_scale=0.0)
        chunks = self._voice.synthesize(text, syn_config=config)
        return np.concatenate([chunk.audio_float_array for chunk in chunks]).astype(np.float32)


@dataclass(frozen=True)
class Clip:
    """A wake phrase and a command, and where the command's words are (sample offsets)."""

    samples: np.ndarray
    """float32 at 16 kHz, dry (no room, no noise)."""
    command: str
    wake_end: int
    """Where the wake phrase's last word ends."""
    command_start: int
    command_end: int


def wake_command(
    speaker: PiperSpeaker,
    wake_phrase: str,
    command: str,
    *,
    pace: float,
    pitch: float,
    pause_ms: int,
    recording: np.ndarray | None = None,
) -> Clip:
    """ "<Wake>, <command>" in one breath (pause_ms 0), or the wake phrase, a pause, then the command.

    With `recording` (16 kHz float32 of someone saying `command`) that is the
    command, after the synthesized wake phrase and the pause (which must not be 0).
    """
    wake = speaker.say(f"{wake_phrase}.", pace=pace, pitch=pitch)
    if pause_ms == 0:
        if recording is not None:
            raise ValueError("a recording cannot follow a synthesized wake phrase in one breath")
        samples = speaker.say(f"{wake_phrase}, {command}.", pace=pace, pitch=pitch)
        wake_end, start = _pause_near(samples, speech_bounds(wake)[1])
        return Clip(samples, command, wake_end, start, speech_bounds(samples)[1])
    said = speaker.say(f"{command}.", pace=pace, pitch=pitch) if recording is None else recording
    offset = len(wake) + SAMPLE_RATE * pause_ms // 1000
    start, end = speech_bounds(said)
    samples = np.concatenate([wake, np.zeros(offset - len(wake), np.float32), said])
    return Clip(samples, command, speech_bounds(wake)[1], offset + start, offset + end)


def speech_bounds(samples: np.ndarray) -> tuple[int, int]:
    """(first word start, last word end) in samples, by energy in 10 ms windows (see _in_words)."""
    words = np.flatnonzero(_in_words(samples))
    if not len(words):
        raise ValueError("no words found: the audio is silent or only noise")
    return int(words[0]) * WINDOW, int(words[-1] + 1) * WINDOW


def _in_words(samples: np.ndarray) -> np.ndarray:
    """For each 10 ms window, whether it is part of a word.

    A word is at least 30 ms of windows above max(-40 dB of the loudest, the
    noise + 10 dB). Clean synthetic speech has no noise: for it this is the
    -40 dB rule; recordings with a noise floor above that get the second.
    """
    usable = len(samples) // WINDOW * WINDOW
    power = np.square(samples[:usable].astype(np.float64)).reshape(-1, WINDOW).mean(axis=1)
    level = 10 * np.log10((power + 1e-12) / (power.max() + 1e-12))
    loud = level > max(WORD_FLOOR_DB, float(np.percentile(level, 10)) + NOISE_MARGIN_DB)
    runs = np.convolve(loud, np.ones(WORD_RUN_WINDOWS), mode="valid") == WORD_RUN_WINDOWS
    return np.convolve(runs, np.ones(WORD_RUN_WINDOWS), mode="full") > 0


def _pause_near(samples: np.ndarray, at: int) -> tuple[int, int]:
    """The pause between two words nearest sample `at`: (where it starts, where it ends).

    Said alone a phrase ends a little later or sooner than inside a sentence
    (final lengthening), but the comma after it is always a pause nearby.
    """
    change = np.diff(_in_words(samples).astype(np.int8))
    ends, starts = np.flatnonzero(change == -1) + 1, np.flatnonzero(change == 1) + 1
    pauses = [
        (int(e) * WINDOW, int(starts[starts > e][0]) * WINDOW) for e in ends if e < starts[-1]
    ]
    if not pauses:
        raise ValueError("no pause between words: the phrases run together")
    return min(pauses, key=lambda pause: abs(min(max(at, pause[0]), pause[1]) - at))


# --- rooms and noise --------------------------------------------------------------------------


def active_rms(samples: np.ndarray) -> float:
    """RMS of the speech: the 30 ms frames within 30 dB of the loudest (noise.speech_level's rule)."""
    from heimdall_edge.devices.noise import speech_level

    scale = float(np.abs(samples).max()) or 1.0
    return speech_level(to_pcm(samples / scale)) / 32767 * scale


@functools.lru_cache(maxsize=64)
def room_impulse_response(rt60: float, distance_m: float, seed: int) -> tuple[np.ndarray, int]:
    """A shoebox room's response for a talker `distance_m` from the device, and where its direct path is.

    The room (4-7 m x 3-5 m x 2.5-3 m), where the device stands (table height)
    and where the talker's mouth is (sitting or standing) all come from `seed`.
    The direct path's index is where the image-source method put it (the delay
    plus half the fractional-delay filter), not the peak: at 3 m coinciding
    reflections can beat it.
    """
    import pyroomacoustics as pra

    rng = np.random.default_rng(seed)
    dims = np.array([rng.uniform(4, 7), rng.uniform(3, 5), rng.uniform(2.5, 3)])
    device, mouth = _placement(rng, dims, distance_m)
    absorption, max_order = pra.inverse_sabine(rt60, dims)
    room = pra.ShoeBox(
        dims, fs=SAMPLE_RATE, materials=pra.Material(absorption), max_order=max_order
    )
    room.add_source(mouth)
    room.add_microphone(device)
    room.compute_rir()
    rir = np.asarray(room.rir[0][0], dtype=np.float32)
    rir.flags.writeable = False
    delay = np.linalg.norm(mouth - device) / room.c * SAMPLE_RATE
    return rir, round(delay) + pra.constants.get("frac_delay_length") // 2


def _placement(
    rng: np.random.Generator, dims: np.ndarray, distance_m: float
) -> tuple[np.ndarray, np.ndarray]:
    """A device 0.3 m or more from the walls, a mouth above it `distance_m` away, inside the room."""
    margin = 0.3
    for _ in range(10_000):
        device = np.array([*rng.uniform(margin, dims[:2] - margin), rng.uniform(0.7, 1.1)])
        rise = rng.uniform(0.1, min(0.8, 0.7 * distance_m))
        across = np.sqrt(distance_m**2 - rise**2)
        angle = rng.uniform(0, 2 * np.pi)
        mouth = np.array(
            [*(device[:2] + across * np.array([np.cos(angle), np.sin(angle)])), device[2] + rise]
        )
        if np.all(mouth[:2] > margin) and np.all(mouth[:2] < dims[:2] - margin):
            return device, mouth
    raise ValueError(f"no place {distance_m} m from the device in a {dims.round(1)} m room")


def reverberate(samples: np.ndarray, *, rt60: float, distance_m: float, seed: int) -> np.ndarray:
    """`samples` as the device hears them across a room, at the dry speech's level.

    The direct path stays at the input's time (the flight time is dropped), so
    the dry signal's word offsets hold; the reverberant tail runs on past its end.
    """
    from scipy.signal import fftconvolve

    rir, direct = room_impulse_response(rt60, distance_m, seed)
    wet = fftconvolve(samples, rir)[direct:]
    return (wet * (active_rms(samples) / active_rms(wet))).astype(np.float32)


def noise(kind: str, samples: int, *, seed: int) -> np.ndarray:
    """`samples` of devices.noise's `kind` noise (pink, brown, hum or a file) at unit RMS."""
    from heimdall_edge.devices.noise import noise_source

    source = noise_source(kind, seed=seed)
    frames = [source.frame() for _ in range(-(-samples // FRAME_SAMPLES))]
    return np.concatenate(frames)[:samples] if frames else np.zeros(0, np.float32)


def babble(recordings: Sequence[np.ndarray], talkers: int, seconds: float, seed: int) -> np.ndarray:
    """Several people talking at once (a party, a TV), `seconds` long at unit RMS.

    Each talker says recordings one after another with short pauses, from a
    random point in their talk, at a gain within 6 dB of the others.
    """
    rng = np.random.default_rng(seed)
    length = round(seconds * SAMPLE_RATE)
    mixed = np.zeros(length)
    for _ in range(talkers):
        parts, said = [], 0
        while said < length + 5 * SAMPLE_RATE:
            line = recordings[rng.integers(len(recordings))]
            parts += [line / active_rms(line), np.zeros(int(rng.uniform(0.1, 0.8) * SAMPLE_RATE))]
            said += len(parts[-2]) + len(parts[-1])
        talk = np.concatenate(parts)
        start = int(rng.integers(0, len(talk) - length))
        mixed += 10 ** (rng.uniform(-6, 0) / 20) * talk[start : start + length]
    return (mixed / np.sqrt(np.mean(np.square(mixed)))).astype(np.float32)


def mix(signal: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """`signal` plus `noise` (looped or cut to its length), set `snr_db` below the active speech."""
    noise = np.resize(noise, len(signal)).astype(np.float64)
    gain = active_rms(signal) / (np.sqrt(np.mean(np.square(noise))) * 10 ** (snr_db / 20))
    return (signal + gain * noise).astype(np.float32)


# --- into the appliance -----------------------------------------------------------------------


def to_pcm(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as 16 kHz s16le PCM, clipped."""
    return to_int16(np.asarray(samples)).astype("<i2").tobytes()


class ArrayMicrophone:
    """A finite microphone over PCM: 30 ms frames (the last padded with silence), then MicrophoneEnded."""

    def __init__(self, pcm: bytes, name: str = "array") -> None:
        self.name = name
        self._pcm = pcm
        self._frames = -(-len(pcm) // FRAME_BYTES)
        self.position = 0
        """Frames handed out so far."""

    async def read(self) -> bytes:
        await asyncio.sleep(0)  # a real read awaits the device: let other tasks run
        if self.position >= self._frames:
            raise MicrophoneEnded(f"microphone {self.name}: no more audio")
        frame = self._pcm[self.position * FRAME_BYTES : (self.position + 1) * FRAME_BYTES]
        self.position += 1
        return frame.ljust(FRAME_BYTES, b"\0")

    def flush(self) -> None:
        """Nothing is buffered: the audio is all there is."""

    async def aclose(self) -> None:
        """Nothing to release."""
