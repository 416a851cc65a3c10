"""bench/room.py's CPU table: each front-end component alone, per second of audio.

Gating the wake model with webrtcvad (feed it only around speech webrtcvad
hears, replaying a short ring when it wakes) is measured here for real, CPU and
detections both, since the issue asks whether it is worth doing on a Pi.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import numpy as np

from bench.machine import cpu_probe
from bench.pi_estimate import pi_factors
from bench.room_material import (
    FLOOR_DBFS,
    SPEECH_DBFS,
    Acoustics,
    Material,
    _noise_loop,
    in_the_room,
)
from bench.room_tables import Printer
from heimdall_edge.audio import FRAME_MS, SAMPLE_RATE
from heimdall_edge.audio import frames as split_frames
from heimdall_edge.listen.frontend import NoiseAndGain
from heimdall_edge.listen.vad import SileroJudge, WebRtcJudge
from heimdall_edge.listen.wakeword import WakeWordDetector
from heimdall_edge.testing import voices

GATE_REPLAY_FRAMES = 30
"""Frames kept while the gate is shut and fed on waking: 0.9 s, longer than webrtcvad's onset lag."""
GATE_HANG_FRAMES = 30
"""Frames the wake model keeps running after webrtcvad last heard speech."""
COMMANDS_IN_CPU_RUN = 8


class GatedWakeWord:
    """The wake model fed only while webrtcvad hears speech (and a hang-over), with a replay ring."""

    def __init__(self, wake_word: str) -> None:
        self._detector = WakeWordDetector(wake_word, cutoff=None, refractory_ms=2000)
        self._vad = WebRtcJudge(2)
        self._ring: collections.deque[bytes] = collections.deque(maxlen=GATE_REPLAY_FRAMES)
        self._open_for = 0
        self.fed = 0

    def __call__(self, frame: bytes) -> bool:
        heard = False
        if self._vad(frame):
            if not self._open_for:
                heard = sum(self._detector.feed(f) for f in self._ring) > 0  # every frame fed
                self.fed += len(self._ring)
                self._ring.clear()
            self._open_for = GATE_HANG_FRAMES
        if not self._open_for:
            self._ring.append(frame)
            return heard
        self._open_for -= 1
        self.fed += 1
        return self._detector.feed(frame) or heard


def cpu_section(out: Printer, material: Material, wake_word: str, seconds: float) -> None:
    """Table 6."""
    phrase = WakeWordDetector(wake_word, cutoff=None, refractory_ms=0).model.phrase
    conditions = _conditions(material, phrase, seconds)
    components: dict[str, Callable[[], Callable[[bytes], object]]] = {
        "webrtc-noise-gain (ns 2, gain 16)": lambda: NoiseAndGain(2, 16).process,
        f"wake model ({wake_word})": lambda: (
            WakeWordDetector(wake_word, cutoff=None, refractory_ms=2000).feed
        ),
        f"wake model ({wake_word}) gated by webrtcvad (incl. webrtcvad)": lambda: GatedWakeWord(
            wake_word
        ),
        "webrtcvad": lambda: WebRtcJudge(2),
        "Silero always on": lambda: SileroJudge(0.5),
        "Silero woken by webrtcvad (incl. webrtcvad)": lambda: SileroJudge(0.5, WebRtcJudge(2)),
    }
    factor = pi_factors(cpu_probe(2), None)["Pi 4"]["single"]
    out.heading("6. CPU per second of audio (% of one core)")
    out.note(
        f"time.process_time around each component alone over {seconds:.0f} s of the same audio per "
        f"condition. Gated: the wake model fed only while webrtcvad hears speech and {GATE_HANG_FRAMES} "
        f"frames after, replaying the {GATE_REPLAY_FRAMES} frames before on waking. Detections: how "
        f"often a wake component fired ({COMMANDS_IN_CPU_RUN} wake phrases in the last condition, none "
        f"elsewhere). Pi 4 column: an ESTIMATE, this machine's figure × {factor:.1f} (bench/pi_estimate.py's "
        "single-core pure-Python factor; the models are native code, so treat it as a rough bound)."
    )
    rows = []
    for condition, samples in conditions.items():
        frames = split_frames(voices.to_pcm(samples))
        for component, make in components.items():
            run = make()
            started = time.process_time()
            fired = sum(bool(run(frame)) for frame in frames)
            share = 100 * (time.process_time() - started) / (len(frames) * FRAME_MS / 1000)
            detections = str(fired) if component.startswith("wake model") else ""
            if isinstance(run, GatedWakeWord):
                detections += f" (model fed {100 * run.fed / len(frames):.0f} % of frames)"
            rows.append(
                [condition, component, f"{share:.2f}", f"{share * factor:.1f} (est.)", detections]
            )
    out.table(
        ["condition", "component", "this machine, % of a core", "Pi 4, % of a core", "detections"],
        rows,
    )


def _conditions(material: Material, phrase: str, seconds: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(material.seed + 2)
    fan_room = Acoustics(0.45, 2.0, "pink", 10, 0)
    n = round(seconds * SAMPLE_RATE)
    dry = _spoken(material, [voices.TALK[i % 50] for i in range(200)], n)
    commands = [f"{phrase}, {c}" for c in voices.COMMANDS[:COMMANDS_IN_CPU_RUN]]
    said = _spoken(material, commands, 0)
    floor = 10 ** (FLOOR_DBFS / 20) * rng.standard_normal(n).astype(np.float32)
    fan = 10 ** ((SPEECH_DBFS - 10) / 20) * np.resize(_noise_loop("pink", 0), n)
    return {
        "quiet room, nobody talking": floor,
        "quiet room, talk": in_the_room(dry, Acoustics(0.45, 2.0, "pink", 40, 0), material, rng),
        "fan (pink, 10 dB SNR), talk": in_the_room(dry, fan_room, material, rng),
        "fan alone": fan + floor,
        f"fan, {COMMANDS_IN_CPU_RUN} × '{phrase}, <command>' 4 s apart": in_the_room(
            said, fan_room, material, rng
        ),
    }


def _spoken(material: Material, lines: list[str], samples: int) -> np.ndarray:
    """`lines` said one after another with gaps (a second, or 4 s when `samples` is 0: all of them)."""
    gap = np.zeros(SAMPLE_RATE * (4 if samples == 0 else 1), np.float32)
    parts: list[np.ndarray] = [gap]
    for line in lines:
        if samples and sum(map(len, parts)) >= samples:
            break
        parts += [material.speaker.say(line), gap]
    joined = np.concatenate(parts)
    return joined[:samples] if samples else joined
