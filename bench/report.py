"""Measure everything and write docs/PERFORMANCE.md and docs/performance.png.

One command for the whole performance picture, on the machine it runs on:
  - on-device speech-to-text (faster-whisper tiny.en int8) on all shared recordings,
    beam 1 and beam 5: latency, real-time factor and word error rate (jiwer);
  - Piper: time to first audio and real-time factor for sentences of different lengths;
  - one whole turn, stage by stage: end of speech -> transcript -> reply -> first audio
    (bench/latency.py's turn runner);
  - the cloud fallback scenarios against the fake cloud (bench/fallback.py);
  - store-and-forward throughput against moto on loopback (bench/sync.py);
  - RSS idle (started, models loaded, no turn yet) and peak (after turns), start-up to READY=1;
  - an ESTIMATE for a Raspberry Pi 4 and a Pi 5: CPU-bound figures scaled by how much faster
    this machine is (a small fixed CPU workload measured here, against published Pi figures);
    network waits are not scaled.
Every figure is a median with its min and max over several runs.

Usage: python -m bench.report [--quick] [--out docs/] [--runs N] [--sync-captures N]
(HEIMDALL_MODELS_DIR defaults to ../shared/models, HEIMDALL_SPEECH_DIR to ../shared/speech.)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]


PACKAGES = ["faster-whisper", "ctranslate2", "piper-tts", "onnxruntime", "numpy", "openai", "boto3"]
BEAMS = (1, 5)
PIPER_SENTENCES = [
    "Yes.",
    "It's 11:14 PM.",
    "I'm offline, but I've saved that.",
    "The kitchen light is on and the front door is locked.",
    (
        "I saved that, and I will send it to the cloud as soon as the network is back, "
        "so nothing you said is lost."
    ),
    "It's half past seven. The kitchen light is on. Anything else?",
]
DISTURBED_PCT = 15  # other processes' share of the CPU above which a section counts as disturbed
HANGOVER_STAGE = "hang-over (silence_ms, waited in real time)"
STAGE_COLOURS = {
    HANGOVER_STAGE: "#bbbbbb",
    "keep": "#8c564b",
    "transcribe": "#1f77b4",
    "reply": "#2ca02c",
    "speak (first sentence)": "#ff7f0e",
}

# --- Published / assumed figures for the Raspberry Pi estimate (see the report for the basis) ---
PI = {
    "Pi 4": {
        "cpu": "4× Cortex-A72 @ 1.8 GHz (BCM2711)",
        # HPL (High-Performance Linpack, double precision, 4 cores): Jeff Geerling's
        # top500-benchmark results table, "Raspberry Pi 4 (BCM2711 @ 1.8 GHz)".
        "hpl_gflops": 11.889,
        # Pure-Python n-body: Chaitanya Mehta, "Performance analysis of languages on Raspberry
        # Pi" (2020): 5,000,000 steps in 158.3 s on a Pi 4 rev 1.1 (1.5 GHz), Raspbian's
        # Python 3 of the day; scaled by clock to 1.8 GHz, then / 1.25 for CPython 3.11.
        "nbody_us_published": 158.263 / 5e6 * 1e6,
        "nbody_clock_scale": 1.5 / 1.8,
        "python_speedup": 1.25,
        "nbody_vs_pi4": 1.0,
        # faster-whisper (CTranslate2 int8), tiny, beam 1, 4 threads, jfk (11 s): 3.9 s on a
        # Pi 400 (same BCM2711 at 1.8 GHz): fquirin/speech-recognition-experiments, Feb 2023.
        "ct2_jfk_beam1_s": 3.9,
        "ct2_vs_pi4": 1.0,
    },
    "Pi 5": {
        "cpu": "4× Cortex-A76 @ 2.4 GHz (BCM2712)",
        # Same table: "Raspberry Pi 5 (BCM2712 @ 2.4 GHz)".
        "hpl_gflops": 30.249,
        "nbody_us_published": None,
        # Assumed 2.0× a Pi 4 per core: sysbench single-thread 2737 vs 1478 events/s (1.85×,
        # leoncode.co.uk), Raspberry Pi Ltd's "2–3×" launch claim, 2.07× for faster-whisper below.
        "nbody_vs_pi4": 2.0,
        # BotYue/Pi-Whisper-RSS25-Workshop (RSS 2025 workshop): faster-whisper tiny.en on the same
        # ten Common Voice clips, mean 3.42 s on a Pi 4 (4 GB) vs 1.65 s on a Pi 5 (8 GB): 2.07×.
        "ct2_vs_pi4": 3.41509 / 1.64667,
    },
}
BOTYUE_TINY_EN_MEAN_S = {"Pi 4": 3.41509, "Pi 5": 1.64667}
PIPER_PI4_RTF_ANECDOTE = 0.5  # "Piper ... at 200% speed on Raspberry Pi 4" (rhasspy/rhasspy3 #36)


# ----------------------------------------------------------------------------- helpers


def med(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """'median (min–max)' of a list of numbers."""
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(med(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def cpu_busy_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
    return busy, getattr(t, "steal", 0.0)


def own_cpu_seconds() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system + t.children_user + t.children_system


class Section:
    """Times one part of the report and how much CPU other processes took meanwhile."""

    def __init__(self, name: str, log: list[dict[str, Any]], wait_s: float = 0) -> None:
        self.name, self.log, self.wait_s = name, log, wait_s

    def __enter__(self) -> Self:
        self.waited = wait_quiet(self.wait_s) if self.wait_s > 0 else None
        print(f"[report] {self.name} ...", file=sys.stderr, flush=True)
        self.started = time.perf_counter()
        self.busy, self.steal = cpu_busy_seconds()
        self.own = own_cpu_seconds()
        self.load = os.getloadavg()[0]
        return self

    def __exit__(self, *_exc: object) -> None:
        wall = time.perf_counter() - self.started
        busy, steal = cpu_busy_seconds()
        own = own_cpu_seconds()
        capacity = wall * (os.cpu_count() or 1)
        others = max(0.0, (busy - self.busy) - (own - self.own))
        self.log.append(
            {
                "section": self.name,
                "seconds": wall,
                "others_pct": 100 * others / capacity if capacity else 0.0,
                "steal_pct": 100 * (steal - self.steal) / capacity if capacity else 0.0,
                "load_before": self.load,
                "waited_s": self.waited["seconds"] if self.waited else None,
                "failed": False,
            }
        )
        print(f"[report] {self.name}: {wall:.0f} s", file=sys.stderr, flush=True)


def wait_quiet(max_s: float) -> dict[str, Any]:
    """Wait until the CPU is < 10 % busy for two 2 s windows in a row, or `max_s` has passed."""
    import psutil

    started = time.perf_counter()
    calm = 0
    while time.perf_counter() - started < max_s and calm < 2:
        busy = psutil.cpu_percent(interval=2)
        calm = calm + 1 if busy < 10 else 0
        if not calm:
            print(
                f"[report] waiting for a quiet CPU ({busy:.0f} % busy)", file=sys.stderr, flush=True
            )
    return {"seconds": time.perf_counter() - started, "quiet": calm >= 2}


def machine_info() -> dict[str, Any]:
    import psutil

    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "flags": set()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and "model_name" not in info:
                info["model_name"] = value
            elif key == "cpu family" and "family" not in info:
                info["family"] = value
            elif key == "model" and "model" not in info:
                info["model"] = value
            elif key == "cpu MHz" and "mhz" not in info:
                info["mhz"] = float(value)
            elif key == "flags" and not info["flags"]:
                info["flags"] = set(value.split())
    except OSError:
        pass
    os_name = platform.system()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    features = [
        name
        for flag, name in [
            ("avx2", "AVX2"),
            ("avx512f", "AVX-512"),
            ("avx512_vnni", "AVX-512 VNNI"),
            ("avx_vnni", "AVX-VNNI"),
            ("asimddp", "NEON dot product"),
        ]
        if flag in info["flags"]
    ]
    return {
        "cpu": info.get("model_name", info["cpu"]),
        "cpu_detail": ", ".join(
            x
            for x in [
                f"family {info['family']} model {info['model']}" if "family" in info else "",
                f"{info['mhz']:.0f} MHz nominal" if "mhz" in info else "",
                ("SIMD: " + ", ".join(features)) if features else "",
            ]
            if x
        ),
        "virtualised": "hypervisor" in info["flags"],
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": psutil.virtual_memory().total / 1024**3,
        "os": f"{os_name}, {platform.system()} {platform.release()} {platform.machine()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
    }


# ----------------------------------------------------------------------------- CPU probe

# The n-body program of the Computer Language Benchmarks Game, as in pyperformance's bm_nbody.
_SOLAR_MASS = 4 * 3.14159265358979323**2
_DAYS = 365.24


def _bodies() -> list[tuple[list[float], list[float], float]]:
    return [
        ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], _SOLAR_MASS),
        (
            [4.84143144246472090e00, -1.16032004402742839e00, -1.03622044471123109e-01],
            [1.66007664274403694e-03 * _DAYS, 7.69901118419740425e-03 * _DAYS,
             -6.90460016972063023e-05 * _DAYS],
            9.54791938424326609e-04 * _SOLAR_MASS,
        ),
        (
            [8.34336671824457987e00, 4.12479856412430479e00, -4.03523417114321381e-01],
            [-2.76742510726862411e-03 * _DAYS, 4.99852801234917238e-03 * _DAYS,
             2.30417297573763929e-05 * _DAYS],
            2.85885980666130812e-04 * _SOLAR_MASS,
        ),
        (
            [1.28943695621391310e01, -1.51111514016986312e01, -2.23307578892655734e-01],
            [2.96460137564761618e-03 * _DAYS, 2.37847173959480950e-03 * _DAYS,
             -2.96589568540237556e-05 * _DAYS],
            4.36624404335156298e-05 * _SOLAR_MASS,
        ),
        (
            [1.53796971148509165e01, -2.59193146099879641e01, 1.79258772950371181e-01],
            [2.68067772490389322e-03 * _DAYS, 1.62824170038242295e-03 * _DAYS,
             -9.51592254519715870e-05 * _DAYS],
            5.15138902046611451e-05 * _SOLAR_MASS,
        ),
    ]  # fmt: skip


def nbody_us_per_step(steps: int) -> float:
    bodies = _bodies()
    pairs = [(bodies[i], b) for i in range(len(bodies) - 1) for b in bodies[i + 1 :]]
    dt = 0.01
    started = time.perf_counter()
    for _ in range(steps):
        for ([x1, y1, z1], v1, m1), ([x2, y2, z2], v2, m2) in pairs:
            dx, dy, dz = x1 - x2, y1 - y2, z1 - z2
            mag = dt * ((dx * dx + dy * dy + dz * dz) ** (-1.5))
            b1m, b2m = m1 * mag, m2 * mag
            v1[0] -= dx * b2m
            v1[1] -= dy * b2m
            v1[2] -= dz * b2m
            v2[0] += dx * b1m
            v2[1] += dy * b1m
            v2[2] += dz * b1m
        for r, [vx, vy, vz], _m in bodies:
            r[0] += dt * vx
            r[1] += dt * vy
            r[2] += dt * vz
    return (time.perf_counter() - started) / steps * 1e6


def dgemm_gflops(n: int) -> float:
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.random((n, n)), rng.random((n, n))
    started = time.perf_counter()
    a @ b
    return 2 * n**3 / (time.perf_counter() - started) / 1e9


def cpu_probe(reps: int) -> dict[str, list[float]]:
    """Pure-Python n-body (one core) and float64 matrix multiply (numpy/OpenBLAS, every core)."""
    dgemm_gflops(1024)  # warm up threads and caches
    nbody_us_per_step(10_000)
    return {
        "nbody_us": [nbody_us_per_step(100_000) for _ in range(reps)],
        "dgemm_gflops": [dgemm_gflops(3072) for _ in range(reps)],
    }


# ----------------------------------------------------------------------------- speech-to-text


def references() -> dict[str, str]:
    from bench.latency import SPEECH

    rows = (SPEECH / "transcripts.tsv").read_text(encoding="utf-8").splitlines()
    return dict(line.split("\t", 1) for line in rows if line.strip())


async def speech_to_text(runs: int) -> dict[str, Any]:
    """Every recording, `runs` times per beam (after a warm-up), through FasterWhisperEngine."""
    import jiwer

    from bench.latency import SPEECH
    from heimdall_edge.audio import read_audio
    from heimdall_edge.engines.local.faster_whisper import FasterWhisperEngine
    from heimdall_edge.settings import load_settings
    from heimdall_edge.testing.text import words

    settings = load_settings()
    refs = references()
    clips = {name: read_audio(SPEECH / name) for name in refs}
    out: dict[str, Any] = {"recordings": {}, "beams": {}, "model": settings.stt.model,
                           "compute_type": settings.stt.compute_type}  # fmt: skip
    for name, clip in clips.items():
        out["recordings"][name] = {"seconds": clip.seconds, "reference": refs[name]}
    for beam in BEAMS:
        engine = FasterWhisperEngine(
            settings.stt.model_copy(update={"beam_size": beam}), settings.models
        )
        await engine.load()
        for name in list(clips)[:2]:  # warm-up
            await engine.transcribe(clips[name])
        latencies: dict[str, list[float]] = {name: [] for name in clips}
        texts: dict[str, list[str]] = {name: [] for name in clips}
        for _ in range(runs):
            for name, clip in clips.items():
                started = time.perf_counter()
                transcript = await engine.transcribe(clip)
                latencies[name].append((time.perf_counter() - started) * 1000)
                texts[name].append(transcript.text)
        del engine
        per: dict[str, Any] = {}
        for name, clip in clips.items():
            ref, hyp = words(refs[name]), words(texts[name][0])
            per[name] = {
                "ms": latencies[name],
                "rtf": [ms / 1000 / clip.seconds for ms in latencies[name]],
                "text": texts[name][0],
                "stable": len(set(texts[name])) == 1,
                "wer": jiwer.wer(ref, hyp) if hyp else 1.0,
            }
        corpus = jiwer.process_words(
            [words(refs[n]) for n in clips], [words(per[n]["text"]) for n in clips]
        )
        out["beams"][beam] = {
            "per": per,
            "wer": corpus.wer,
            "errors": corpus.substitutions + corpus.deletions + corpus.insertions,
            "ref_words": corpus.hits + corpus.substitutions + corpus.deletions,
            "subs": corpus.substitutions,
            "dels": corpus.deletions,
            "ins": corpus.insertions,
        }
    return out


# ----------------------------------------------------------------------------- Piper


async def piper(runs: int) -> dict[str, Any]:
    from heimdall_edge.engines.local.piper import PiperEngine
    from heimdall_edge.settings import load_settings

    settings = load_settings()
    engine = PiperEngine(settings.tts, settings.models)
    started = time.perf_counter()
    await engine.load()
    load_s = time.perf_counter() - started
    results: dict[str, dict[str, list[float]]] = {}
    for text in PIPER_SENTENCES:
        row: dict[str, list[float]] = {"first_ms": [], "total_ms": [], "audio_s": [], "rtf": []}
        for run in range(runs + 1):  # the first run warms up and is dropped
            started = time.perf_counter()
            first = None
            audio_s = 0.0
            async for chunk in engine.synthesize(text):
                if first is None:
                    first = time.perf_counter() - started
                audio_s += chunk.seconds
            total = time.perf_counter() - started
            if run:
                row["first_ms"].append((first or total) * 1000)
                row["total_ms"].append(total * 1000)
                row["audio_s"].append(audio_s)
                row["rtf"].append(total / audio_s)
        results[text] = row
    return {"voice": settings.tts.voice, "load_s": load_s, "sentences": results}


# ----------------------------------------------------------------------------- whole turns


async def end_to_end(runs: int) -> dict[str, Any]:
    from bench.latency import RECORDINGS, SPEECH, turns
    from heimdall_edge.audio import read_audio
    from heimdall_edge.settings import ListeningSettings

    # Every reply really synthesized: with the cache on, the warm-up turn would cache the
    # reply and the measured turns would skip Piper (see the note in the report).
    os.environ["HEIMDALL_VOICE_CACHE__MAX_MB"] = "0"
    os.environ["HEIMDALL_STATE_DIR"] = tempfile.mkdtemp(prefix="heimdall-report-turns-")
    timings = await turns(runs)
    shutil.rmtree(os.environ["HEIMDALL_STATE_DIR"], ignore_errors=True)
    out: dict[str, Any] = {"hangover_ms": ListeningSettings().silence_ms, "recordings": {}}
    for name in RECORDINGS:
        t = timings[name]
        speak = [
            e2fa - keep - tr - rep
            for e2fa, keep, tr, rep in zip(
                t["end_to_first_audio"], t["keep"], t["transcribe"], t["reply"], strict=True
            )
        ]
        out["recordings"][name] = {
            "seconds": read_audio(SPEECH / name).seconds,
            "keep": t["keep"],
            "transcribe": t["transcribe"],
            "reply": t["reply"],
            "speak (first sentence)": speak,
            "end_to_first_audio": t["end_to_first_audio"],
            "record": t["record"],
        }
    return out


# ----------------------------------------------------------------------------- memory, start-up

MEMORY_CHILD = r"""
import asyncio, json, sys
from pathlib import Path

def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) / 1024
    return 0.0

async def main(inputs):
    from heimdall_edge.app import builders
    from heimdall_edge.app.appliance import Appliance
    from heimdall_edge.settings import load_settings

    settings = load_settings()
    devices = builders.build_simulated_devices(settings, inputs=inputs, realtime=False)
    engines, spool = builders.build_engines(settings), builders.open_spool(settings)
    appliance = Appliance(settings, devices, engines, spool)
    await appliance.start()          # models loaded, fixed phrases rendered: READY=1 here
    await asyncio.sleep(0.5)
    idle, hwm_ready = status('VmRSS'), status('VmHWM')
    await appliance.serve(asyncio.Event())   # hears every input, answers each, ends with them
    peak, after = status('VmHWM'), status('VmRSS')
    counts = spool.counts()
    print(json.dumps({'idle': idle, 'hwm_ready': hwm_ready, 'peak': peak, 'after': after,
                      'turns': sum(counts.values())}))

asyncio.run(main([Path(p) for p in sys.argv[1:]]))
"""


def memory(runs: int, state: Path) -> dict[str, list[float]]:
    from bench.latency import RECORDINGS, SPEECH, rss_mib

    out: dict[str, list[float]] = {"baseline": [], "idle": [], "hwm_ready": [], "peak": [],
                                   "after": [], "turns": []}  # fmt: skip
    for run in range(runs):
        out["baseline"].append(rss_mib("import heimdall_edge.cli"))
        env = dict(os.environ, HEIMDALL_STATE_DIR=tempfile.mkdtemp(dir=state, prefix="memory-"))
        proc = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, *[str(SPEECH / n) for n in RECORDINGS]],
            env=env, capture_output=True, text=True, check=False, timeout=600,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe failed:\n{proc.stderr[-3000:]}")
        values = json.loads(proc.stdout.strip().splitlines()[-1])
        for key, value in values.items():
            out[key].append(value)
    return out


def startup(runs: int, state: Path) -> dict[str, list[float]]:
    from bench.latency import time_import, time_to_ready

    return {
        "import_s": [time_import() for _ in range(runs)],
        "ready_s": [
            time_to_ready(Path(tempfile.mkdtemp(dir=state, prefix="ready-"))) for _ in range(runs)
        ],
    }


# ----------------------------------------------------------------------------- fallback, sync


async def fallback(limit: int | None) -> dict[str, Any]:
    from bench import fallback as fallback_bench

    return await fallback_bench.measure(limit)


def sync(captures: int, runs: int) -> dict[str, Any]:
    from bench import sync as sync_bench

    return sync_bench.measure(captures, runs)


# ----------------------------------------------------------------------------- Pi estimate


def pi_factors(probe: dict[str, list[float]], stt: dict[str, Any] | None) -> dict[str, Any]:
    """How many times slower each Pi is than this machine, per kind of work."""
    # The best run of each: other processes can only ever slow a run down.
    here_nbody = min(probe["nbody_us"])
    here_dgemm = max(probe["dgemm_gflops"])
    jfk_ms = None
    if stt and "jfk.flac" in stt["beams"].get(1, {}).get("per", {}):
        jfk_ms = med(stt["beams"][1]["per"]["jfk.flac"]["ms"])
    pi4 = PI["Pi 4"]
    pi4_nbody = pi4["nbody_us_published"] * pi4["nbody_clock_scale"] / pi4["python_speedup"]
    pi4_ct2 = pi4["ct2_jfk_beam1_s"] * 1000 / jfk_ms if jfk_ms else None
    out: dict[str, Any] = {"here_nbody_us": here_nbody, "here_dgemm": here_dgemm,
                           "here_jfk_beam1_ms": jfk_ms}  # fmt: skip
    for pi, spec in PI.items():
        nbody = pi4_nbody / spec["nbody_vs_pi4"]
        single = nbody / here_nbody
        multi = here_dgemm / spec["hpl_gflops"]
        ct2 = pi4_ct2 / spec["ct2_vs_pi4"] if pi4_ct2 else multi
        out[pi] = {"nbody_us": nbody, "single": single, "multi": multi, "ct2": ct2,
                   "ct2_anchored": pi4_ct2 is not None}  # fmt: skip
    return out


def estimate_turn(stages: dict[str, float], f: dict[str, float]) -> dict[str, float]:
    """Stage medians (ms) of one turn on a Pi: each stage scaled by its kind of work."""
    return {
        "keep": stages["keep"] * f["single"],
        "transcribe": stages["transcribe"] * f["ct2"],
        "reply": stages["reply"] * f["single"],
        "speak (first sentence)": stages["speak (first sentence)"] * f["multi"],
    }


# ----------------------------------------------------------------------------- plot


def plot(path: Path, data: dict[str, Any], factors: dict[str, Any] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(16, 11.5))
    fig.suptitle(
        f"Heimdall Edge performance on {data['machine']['cpu']}, "
        f"{data['machine']['logical_cores']} cores ({data['date']}); "
        "hatched bars: Raspberry Pi ESTIMATES, not measurements",
        fontsize=13,
    )

    # (a) speech-to-text latency against audio length
    ax = axes[0][0]
    stt = data.get("stt")
    if stt:
        for beam, marker, colour in [(1, "o", "#1f77b4"), (5, "s", "#d62728")]:
            per = stt["beams"][beam]["per"]
            xs = [stt["recordings"][n]["seconds"] for n in per]
            ys = [med(per[n]["ms"]) for n in per]
            lo = [y - min(per[n]["ms"]) for y, n in zip(ys, per, strict=True)]
            hi = [max(per[n]["ms"]) - y for y, n in zip(ys, per, strict=True)]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt=marker, color=colour, ecolor=colour,
                        alpha=0.8, capsize=2, markersize=5,
                        label=f"beam {beam}: WER {stt['beams'][beam]['wer'] * 100:.1f} %")  # fmt: skip
        ax.set_xlabel("audio length (s)")
        ax.set_ylabel("transcription latency (ms), median and min–max")
        ax.set_ylim(bottom=0)
        ax.set_title(
            f"Speech-to-text: faster-whisper {stt['model']} {stt['compute_type']}, "
            f"{len(stt['recordings'])} recordings (this machine)"
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")

    # (b) end-of-speech -> first audio, stage by stage
    ax = axes[0][1]
    e2e = data.get("e2e")
    if e2e:
        rows: list[tuple[str, dict[str, float], bool]] = []
        for name, rec in e2e["recordings"].items():
            stages = {HANGOVER_STAGE: e2e["hangover_ms"]}
            stages.update({s: med(rec[s]) for s in list(STAGE_COLOURS)[1:]})
            rows.append((f"{name} ({rec['seconds']:.1f} s)", stages, False))
        if factors:
            name = next(iter(e2e["recordings"]))
            rec = e2e["recordings"][name]
            base = {s: med(rec[s]) for s in list(STAGE_COLOURS)[1:]}
            for pi in ("Pi 5", "Pi 4"):
                est = {HANGOVER_STAGE: e2e["hangover_ms"]}
                est.update(estimate_turn(base, factors[pi]))
                rows.append((f"{pi} ESTIMATE: {name}", est, True))
        for y, (label, stages, estimate) in enumerate(rows):
            left = 0.0
            for stage, ms in stages.items():
                ax.barh(y, ms, left=left, color=STAGE_COLOURS[stage],
                        hatch="//" if estimate else None, edgecolor="white" if not estimate else "black",
                        linewidth=0.5, label=stage if y == 0 else None)  # fmt: skip
                left += ms
            ax.text(left + 20, y, f"{left:.0f} ms", va="center", fontsize=9)
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=9)
        ax.invert_yaxis()
        ax.set_xlabel("end of speech → first reply audio (ms), medians")
        ax.set_title("One whole turn, local engines, stage by stage")
        ax.set_xlim(right=ax.get_xlim()[1] * 1.12)
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(axis="x", alpha=0.3)

    # (c) fallback scenarios
    ax = axes[1][0]
    fb = data.get("fallback")
    if fb:
        names = list(fb["results"])
        ests = fallback_estimates(fb, data, factors) if factors else {}
        width = 0.27 if ests else 0.6
        for i, scenario in enumerate(names):
            values = fb["results"][scenario]
            m = med(values)
            ax.barh(i, m, height=width, color="#1f77b4", label="this machine" if i == 0 else None,
                    xerr=[[m - min(values)], [max(values) - m]], capsize=3)  # fmt: skip
            ax.text(max(values) + 40, i, f"{m:.0f}", va="center", fontsize=8)
            for k, (pi, colour) in enumerate([("Pi 5", "#9ecae1"), ("Pi 4", "#fdae6b")]):
                if pi in ests:
                    v = ests[pi][scenario]
                    ax.barh(i + (k + 1) * width, v, height=width, color=colour, hatch="//",
                            edgecolor="black", linewidth=0.5,
                            label=f"{pi} ESTIMATE" if i == 0 else None)  # fmt: skip
                    ax.text(v + 30, i + (k + 1) * width, f"{v:.0f}", va="center", fontsize=8)
        ax.set_yticks([i + (width if ests else 0) for i in range(len(names))],
                      [n.replace(" (", "\n(") for n in names], fontsize=8)  # fmt: skip
        ax.invert_yaxis()
        ax.set_xlabel("end of utterance → first reply audio (ms); this machine: median, min–max")
        ax.set_title(
            f"Cloud fallback ({fb['recordings']} recordings; injected cloud latency "
            f"{sum(fb['injected_ms'].values()):.0f} ms)"
        )
        ax.set_xlim(right=ax.get_xlim()[1] * 1.1)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=9)
        ax.grid(axis="x", alpha=0.3)

    # (d) Piper
    ax = axes[1][1]
    tts = data.get("piper")
    if tts:
        labels, firsts, totals, audio = [], [], [], []
        for text, row in tts["sentences"].items():
            short = text if len(text) <= 34 else text[:31] + "..."
            labels.append(f"{short} ({len(text)} chars)")
            firsts.append(row["first_ms"])
            totals.append(med(row["total_ms"]))
            audio.append(med(row["audio_s"]))
        ys = range(len(labels))
        ax.barh(ys, totals, color="#ffbb78", label="whole text synthesized")
        m = [med(v) for v in firsts]
        ax.barh(ys, m, color="#ff7f0e", label="first audio",
                xerr=[[a - min(v) for a, v in zip(m, firsts, strict=True)],
                      [max(v) - a for a, v in zip(m, firsts, strict=True)]], capsize=3)  # fmt: skip
        for y, (t, a, f) in enumerate(zip(totals, audio, firsts, strict=True)):
            ax.text(max(t, max(f)) + 8, y, f"{a:.1f} s of audio, RTF {t / 1000 / a:.3f}",
                    va="center", fontsize=8)  # fmt: skip
        ax.set_yticks(list(ys), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms (median; first audio with min–max)")
        ax.set_title(f"Text-to-speech: Piper {tts['voice']} (this machine)")
        ax.set_xlim(right=max(max(totals), max(max(f) for f in firsts)) * 1.6)
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(axis="x", alpha=0.3)

    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fallback_estimates(
    fb: dict[str, Any], data: dict[str, Any], factors: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """Scenario medians on a Pi: the local work scaled, the waiting (network, backoff, hedge) not."""
    results = fb["results"]
    local_name = next(n for n in results if n.startswith("local only"))
    local = med(results[local_name])
    injected = sum(fb["injected_ms"].values())
    ratios = turn_ratios(data, factors)
    out: dict[str, dict[str, float]] = {}
    for pi in ("Pi 4", "Pi 5"):
        if pi not in ratios:
            continue
        est_local = local * ratios[pi]
        row = {}
        for name, values in results.items():
            m = med(values)
            if name == local_name:
                row[name] = est_local
            elif name == "cloud healthy":
                row[name] = injected + max(0.0, m - injected) * factors[pi]["single"]
            else:
                row[name] = est_local + max(0.0, m - local)
        out[pi] = row
    return out


def turn_ratios(data: dict[str, Any], factors: dict[str, Any]) -> dict[str, float]:
    """Per Pi: estimated / measured capture end → first audio, median over the e2e recordings."""
    e2e = data.get("e2e")
    if not e2e:
        return {}
    out = {}
    for pi in ("Pi 4", "Pi 5"):
        ratios = []
        for rec in e2e["recordings"].values():
            stages = {s: med(rec[s]) for s in list(STAGE_COLOURS)[1:]}
            ratios.append(sum(estimate_turn(stages, factors[pi]).values()) / sum(stages.values()))
        out[pi] = med(ratios)
    return out


# ----------------------------------------------------------------------------- markdown


def render(data: dict[str, Any], factors: dict[str, Any] | None, png_name: str) -> str:
    m = data["machine"]
    lines: list[str] = []
    add = lines.append
    add("# Performance")
    add("")
    add(
        f"Generated by `python -m bench.report{' --quick' if data['quick'] else ''}` "
        f"(`make report`) on {data['date']}; measuring took {data['runtime_s'] / 60:.1f} min"
        + (
            f" (and {data['extra_s'] / 60:.1f} min more waiting for a quiet CPU and measuring "
            "again sections other processes had disturbed)"
            if data.get("wait_quiet_s")
            else ""
        )
        + ". "
        "Do not edit by hand: run it again. Every figure is measured on the machine below "
        "and given as **median (min–max)** over the runs stated; the Raspberry Pi columns are "
        "**estimates**, not measurements (basis in [Raspberry Pi estimate](#raspberry-pi-estimate))."
    )
    add("")
    add(f"![performance plots]({png_name})")
    add("")
    add("## Machine")
    add("")
    add("| | |")
    add("|---|---|")
    add(
        f"| CPU | {m['cpu']} ({m['cpu_detail']}){' — virtual machine' if m['virtualised'] else ''} |"
    )
    add(f"| cores | {m['logical_cores']} logical, {m['physical_cores']} physical |")
    add(f"| RAM | {m['ram_gib']:.1f} GiB |")
    add(f"| OS | {m['os']} |")
    add(f"| Python | {m['python']} |")
    add("| packages | " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()) + " |")
    probe = data.get("probe")
    if probe:
        add(
            f"| CPU probe | pure-Python n-body {spread(probe['nbody_us'], '{:.2f}')} µs/step (one core); "
            f"float64 matrix multiply 3072² {spread(probe['dgemm_gflops'], '{:.0f}')} GFLOPS "
            f"(numpy/OpenBLAS, all cores); {plural(len(probe['nbody_us']), 'run')} each, half at the start "
            "and half at the end; the Pi estimate uses the best of each |"
        )
    busy = [s for s in data["sections"] if s["others_pct"] >= DISTURBED_PCT]
    worst = max(data["sections"], key=lambda s: s["others_pct"], default=None)
    if worst:
        note = (
            f"other processes used up to {worst['others_pct']:.0f} % of the CPU during a section "
            f"({worst['section']})"
            + (
                ": figures from busy sections are slower than on a quiet machine"
                if busy
                else ": the machine was quiet"
            )
        )
        if data.get("wait_quiet_s"):
            note += (
                f"; before each section the run waited up to {data['wait_quiet_s']:.0f} s "
                f"for the CPU to be idle and measured a section again (twice at most) when other "
                f"processes took over {DISTURBED_PCT} % of the CPU during it, keeping the least "
                "disturbed attempt (`--wait-quiet`)"
            )
        add(f"| background load | {note}; per section in [Method](#method) |")
    add("")

    # ---- headline
    add("## Summary")
    add("")
    rows = headline_rows(data, factors)
    if rows:
        add("| measure | this machine | Pi 5 (estimate) | Pi 4 (estimate) |")
        add("|---|---:|---:|---:|")
        for row in rows:
            add("| " + " | ".join(row) + " |")
        add("")
        if factors:
            add(
                "Pi columns: estimates, good to about ±50 %, from the basis in "
                "[Raspberry Pi estimate](#raspberry-pi-estimate); Piper's are the least sure "
                "(see the cross-checks there)."
            )
            add("")

    # ---- STT
    stt = data.get("stt")
    add("## On-device speech-to-text")
    add("")
    if isinstance(stt, dict):
        n = len(stt["recordings"])
        total_audio = sum(r["seconds"] for r in stt["recordings"].values())
        add(
            f"faster-whisper `{stt['model']}` `{stt['compute_type']}` through "
            f"`FasterWhisperEngine` (language `en`, no timestamps, one inference at a time, "
            f"CTranslate2 choosing the threads), on all {n} recordings in `HEIMDALL_SPEECH_DIR` "
            f"({total_audio:.0f} s of audio, {min(r['seconds'] for r in stt['recordings'].values()):.1f}–"
            f"{max(r['seconds'] for r in stt['recordings'].values()):.1f} s each); "
            f"{plural(data['runs']['stt'], 'run')} per recording and beam after a warm-up "
            "(the appliance uses beam 1 unless `stt.beam_size` says otherwise). "
            "Latency is the `transcribe()` call on PCM already in memory; real-time factor (RTF) = "
            "latency ÷ audio length. Word error rate with jiwer after the tests' normalisation "
            "(lowercase, punctuation dropped: `heimdall_edge/testing/text.py` `words()`), "
            "over all reference words."
        )
        add("")
        add("| | beam 1 | beam 5 |")
        add("|---|---:|---:|")
        b1, b5 = stt["beams"][1], stt["beams"][5]

        def across(beam: dict[str, Any], key: str, fmt: str) -> str:
            return spread([med(p[key]) for p in beam["per"].values()], fmt)

        add(
            f"| latency, ms: median (min–max) of per-recording medians | {across(b1, 'ms', '{:.0f}')} | {across(b5, 'ms', '{:.0f}')} |"
        )
        add(
            f"| real-time factor: median (min–max) | {across(b1, 'rtf', '{:.3f}')} | {across(b5, 'rtf', '{:.3f}')} |"
        )
        for beam in (b1, b5):
            beam["total_rtf"] = sum(med(p["ms"]) for p in beam["per"].values()) / 1000 / total_audio
        add(f"| all audio: Σ latency ÷ Σ audio | {b1['total_rtf']:.3f} | {b5['total_rtf']:.3f} |")
        add(
            f"| word error rate (all {b1['ref_words']} reference words) | **{b1['wer'] * 100:.1f} %** ({b1['errors']} errors: {b1['subs']} sub, {b1['dels']} del, {b1['ins']} ins) | **{b5['wer'] * 100:.1f} %** ({b5['errors']} errors: {b5['subs']} sub, {b5['dels']} del, {b5['ins']} ins) |"
        )
        add(
            f"| recordings with no error | {sum(p['wer'] == 0 for p in b1['per'].values())} of {n} | {sum(p['wer'] == 0 for p in b5['per'].values())} of {n} |"
        )
        unstable = [nm for b in (b1, b5) for nm, p in b["per"].items() if not p["stable"]]
        add(
            f"| transcript identical in every run | {'yes' if not unstable else 'no: ' + ', '.join(sorted(set(unstable)))} | |"
        )
        add("")
        add(
            "Latency hardly grows with the audio: Whisper encodes a fixed 30 s window whatever the "
            "length, so short commands have the worst real-time factor and the decoder's share "
            "(and beam 5's extra cost) grows with the number of words."
        )
        add("")
        add("<details><summary>Every recording (latency ms and RTF: median (min–max))</summary>")
        add("")
        add(
            "| recording | audio s | words | beam 1 ms | beam 1 RTF | beam 1 WER | beam 5 ms | beam 5 RTF | beam 5 WER |"
        )
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, rec in stt["recordings"].items():
            p1, p5 = b1["per"][name], b5["per"][name]
            add(
                f"| {name} | {rec['seconds']:.1f} | {len(rec['reference'].split())} | "
                f"{spread(p1['ms'])} | {med(p1['rtf']):.3f} | {p1['wer'] * 100:.0f} % | "
                f"{spread(p5['ms'])} | {med(p5['rtf']):.3f} | {p5['wer'] * 100:.0f} % |"
            )
        add("")
        add("</details>")
        add("")
        errors = [(nm, p) for nm, p in b1["per"].items() if p["wer"] > 0]
        if errors:
            add(
                "<details><summary>What beam 1 heard where it made errors (reference → transcript)</summary>"
            )
            add("")
            add("| recording | WER | reference | beam 1 | beam 5 |")
            add("|---|---:|---|---|---|")
            for name, p in errors:
                add(
                    f"| {name} | {p['wer'] * 100:.0f} % | {md_cell(stt['recordings'][name]['reference'])} | "
                    f"{md_cell(p['text'])} | {md_cell(b5['per'][name]['text'])} |"
                )
            add("")
            add(
                "Some of these are the normalisation's rather than the model's: numbers "
                'written as digits ("10 of clubs" for "ten of clubs"), "Mr." for "mister" '
                'and "there under" for "thereunder" count as errors.'
            )
            add("")
            add("</details>")
            add("")
    else:
        add(failed(stt))

    # ---- Piper
    tts = data.get("piper")
    add("## Text-to-speech: Piper")
    add("")
    if isinstance(tts, dict):
        add(
            f"`PiperEngine`, voice `{tts['voice']}` (loaded in {tts['load_s']:.2f} s), "
            f"{plural(data['runs']['piper'], 'run')} per text after a warm-up; no voice cache. First audio = "
            "the first chunk out of `synthesize()` (Piper works sentence by sentence, so a "
            "multi-sentence reply starts after its first sentence); RTF = whole text ÷ audio length."
        )
        add("")
        add("| text | chars | audio s | first audio ms | whole text ms | RTF |")
        add("|---|---:|---:|---:|---:|---:|")
        for text, row in tts["sentences"].items():
            add(
                f"| {md_cell(text)} | {len(text)} | {med(row['audio_s']):.2f} | {spread(row['first_ms'])} | "
                f"{spread(row['total_ms'])} | {spread(row['rtf'], '{:.3f}')} |"
            )
        add("")
    else:
        add(failed(tts))

    # ---- e2e
    e2e = data.get("e2e")
    add("## End of speech → first reply audio")
    add("")
    if isinstance(e2e, dict):
        add(
            f"Whole turns through the appliance (`bench/latency.py`'s turn runner: simulated "
            f"button, microphone fed from the file as fast as it is read, WAV speaker, real "
            f"models, offline reply, no cloud), {plural(data['runs']['e2e'], 'turn')} per recording after a "
            f"warm-up. The endpointer's hang-over ({e2e['hangover_ms']} ms of silence) is waited "
            "in real time on a device before the capture ends, so it is added, not measured. "
            "*speak* = capture end → first audio minus keep, transcribe and reply: Piper's first "
            "sentence and the start of playback. The voice cache is off here, so every reply is "
            "synthesized; in service, replies that repeat (the fixed phrases, rendered at "
            "start-up) come from the cache and *speak* drops to the cache hit time of the "
            "fallback section. ms, median (min–max):"
        )
        add("")
        add(
            "| recording | audio s | keep | transcribe | reply | speak (first sentence) | capture end → first audio | + hang-over = end of speech → first audio | record (after) |"
        )
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, rec in e2e["recordings"].items():
            add(
                f"| {name} | {rec['seconds']:.1f} | {spread(rec['keep'])} | {spread(rec['transcribe'])} | "
                f"{spread(rec['reply'])} | {spread(rec['speak (first sentence)'])} | "
                f"{spread(rec['end_to_first_audio'])} | **{med(rec['end_to_first_audio']) + e2e['hangover_ms']:.0f}** | "
                f"{spread(rec['record'])} |"
            )
        add("")
    else:
        add(failed(e2e))

    # ---- fallback
    fb = data.get("fallback")
    add("## Cloud, fallback and hedging")
    add("")
    if isinstance(fb, dict):
        injected = sum(fb["injected_ms"].values())
        add(
            "`bench/fallback.py`: real turns (real local models, the official OpenAI and ElevenLabs "
            "clients) against the fake cloud on loopback with fixed injected latencies ("
            + ", ".join(f"{k} {v:.0f} ms" for k, v in fb["injected_ms"].items())
            + f"; {injected:.0f} ms in all), one turn per recording over {fb['recordings']} "
            f"recordings; hedge delay {fb['hedge_ms']} ms per stage. Capture end → first reply "
            "audio, ms:"
        )
        add("")
        local = med(next(v for k, v in fb["results"].items() if k.startswith("local only")))
        add("| scenario | median (min–max) | ratio to local only | above injected latency |")
        add("|---|---:|---:|---:|")
        for name, values in fb["results"].items():
            over = f"{med(values) - injected:.0f} ms" if name == "cloud healthy" else ""
            add(f"| {name} | {spread(values)} | {med(values) / local:.2f} | {over} |")
        hits = fb["cache_hits_ms"]
        add(
            f"| voice-cache hit, request → first audio chunk ({len(hits)} runs) | {spread(hits, '{:.2f}')} | | |"
        )
        add("")
    else:
        add(failed(fb))

    # ---- sync
    sy = data.get("sync")
    add("## Store and forward")
    add("")
    if isinstance(sy, dict):
        mb = sy["bytes"] / 1e6
        runs = len(sy["sync_s"])
        rate = [sy["captures"] / s for s in sy["sync_s"]]
        mbs = [mb / s for s in sy["sync_s"]]
        base_rate = [sy["captures"] / s for s in sy["baseline_s"]]
        cpu_ms = [c / sy["captures"] * 1000 for c in sy["cpu_s"]]
        add(
            f"`bench/sync.py` against moto's S3 and DynamoDB on loopback (the store shares this "
            f"machine's CPU): {sy['captures']} captures ({mb:.0f} MB: 2 s of audio and a 40 KB "
            f"frame each), {plural(runs, 'run')}."
        )
        add("")
        add("| | median (min–max) |")
        add("|---|---:|")
        add(
            f"| `heimdall-edge sync --once` (a real process: S3 + DynamoDB, SSE, checksums, conditional writes), s | {spread(sy['sync_s'], '{:.1f}')} |"
        )
        add(f"| captures/s | {spread(rate)} |")
        add(f"| MB/s | {spread(mbs, '{:.1f}')} |")
        add(
            f"| syncer CPU per capture (the process's own, start-up included), ms | {spread(cpu_ms, '{:.1f}')} |"
        )
        add(f"| syncer peak RSS, MiB | {spread(sy['peak_rss_mib'])} |")
        add(
            f"| baseline: plain boto3 `put_object` of the same files, 2 threads, no checks, no index: captures/s | {spread(base_rate)} |"
        )
        add(f"| ratio, sync ÷ baseline time | {med(sy['sync_s']) / med(sy['baseline_s']):.2f}× |")
        add(
            f"| connectivity back → first object uploaded (probe every 100 ms), ms | {spread([s * 1000 for s in sy['reconnect_s']])} |"
        )
        add(
            f"| resume after SIGKILL half-way: the rerun, s | {sy['resume_s']:.1f} ({sy['resume_s'] / sy['full_sync_median_s']:.2f}× a full sync); {sy['items_after_resume']} DynamoDB items for {sy['captures']} captures |"
        )
        add("")
    else:
        add(failed(sy))

    # ---- memory & start-up
    mem, st = data.get("memory"), data.get("startup")
    add("## Memory and start-up")
    add("")
    if isinstance(mem, dict):
        add(
            f"Each run a fresh process builds the service as `run --simulate --fast` does "
            f"(simulated devices, real engines), calls `Appliance.start()` (models loaded, the fixed "
            f"phrases rendered with Piper: the point where systemd gets READY=1), waits 0.5 s and "
            f"reads VmRSS (**idle**), then serves {int(med(mem['turns']))} turns (the recordings of "
            f"the end-to-end table, one after another) and reads VmHWM (**peak**). "
            f"{plural(len(mem['idle']), 'run')}; MiB."
        )
        add("")
        add("| | MiB, median (min–max) |")
        add("|---|---:|")
        add(
            f"| baseline: interpreter with `heimdall_edge.cli` imported (peak) | {spread(mem['baseline'])} |"
        )
        add(
            f"| **idle**: started, models loaded, before any turn (RSS) | **{spread(mem['idle'])}** |"
        )
        add(f"| peak while starting (VmHWM at READY) | {spread(mem['hwm_ready'])} |")
        add(f"| **peak** after the turns (VmHWM) | **{spread(mem['peak'])}** |")
        add(f"| RSS after the turns | {spread(mem['after'])} |")
        add("")
    else:
        add(failed(mem))
    if isinstance(st, dict):
        add(
            f"Start-up: `heimdall-edge run --simulate` as a process with a real `NOTIFY_SOCKET`, "
            f"from exec to READY=1 (models loaded, fixed phrases rendered), "
            f"{plural(len(st['ready_s']), 'run')}, page cache warm; baseline: a process importing the CLI."
        )
        add("")
        add("| | s, median (min–max) |")
        add("|---|---:|")
        add(f"| import `heimdall_edge.cli` (baseline) | {spread(st['import_s'], '{:.2f}')} |")
        add(f"| **start → READY=1** | **{spread(st['ready_s'], '{:.2f}')}** |")
        add("")
    else:
        add(failed(st))

    # ---- Pi estimate
    add("## Raspberry Pi estimate")
    add("")
    if factors:
        lines.extend(pi_section(data, factors))
    else:
        add("Not computed: the CPU probe failed.")
        add("")

    # ---- method
    add("## Method")
    add("")
    add(
        "One process runs the sections in order (the CPU probe is split around them); the "
        "start-up, memory and sync figures come from child processes. The state directory is "
        "a fresh temporary folder; API keys, bucket and table settings of the calling "
        "environment are ignored (the cloud appears only as the loopback fake in the fallback "
        "section). Speech models from `HEIMDALL_MODELS_DIR`, recordings from `HEIMDALL_SPEECH_DIR`."
    )
    add("")
    add(
        "| section | wall time, s | other processes' CPU | steal | load average at start "
        "| waited for a quiet CPU first, s | attempts | |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|---|")
    for s in data["sections"]:
        waited = "–" if s.get("waited_s") is None else f"{s['waited_s']:.0f}"
        add(
            f"| {s['section']} | {s['seconds']:.0f} | {s['others_pct']:.0f} % | {s['steal_pct']:.0f} % | "
            f"{s['load_before']:.2f} | {waited} | {s.get('attempts', 1)} | "
            f"{'FAILED' if s['failed'] else ''} |"
        )
    add("")
    add(
        "Other processes' CPU = the machine's busy CPU time during the section minus this "
        "report's own (and its children's), as a share of all cores; above ~15 % the figures of "
        "that section are slower than a quiet machine would give."
    )
    add("")
    return "\n".join(lines)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def failed(value: Any) -> str:
    if isinstance(value, str):
        return f"**Not measured: this section failed** (`{md_cell(value.splitlines()[-1])}`).\n"
    return "Not measured in this run.\n"


def headline_rows(data: dict[str, Any], factors: dict[str, Any] | None) -> list[list[str]]:
    rows: list[list[str]] = []
    est = factors or {}

    def pis(fn: Any) -> list[str]:
        return [fn(est[pi]) if pi in est else "–" for pi in ("Pi 5", "Pi 4")]

    stt = data.get("stt")
    if isinstance(stt, dict):
        for beam in BEAMS:
            per = stt["beams"][beam]["per"]
            meds = [med(p["ms"]) for p in per.values()]
            rtfs = [med(p["rtf"]) for p in per.values()]
            rows.append(
                [f"speech-to-text latency, beam {beam}, ms (33 recordings: median of medians, min–max)",
                 spread(meds)] + pis(lambda f, meds=meds: spread([x * f["ct2"] for x in meds]))
            )  # fmt: skip
            rows.append(
                [f"speech-to-text real-time factor, beam {beam}", spread(rtfs, "{:.3f}")]
                + pis(lambda f, rtfs=rtfs: spread([x * f["ct2"] for x in rtfs], "{:.2f}"))
            )
            rows.append(
                [f"word error rate, beam {beam}", f"{stt['beams'][beam]['wer'] * 100:.1f} %",
                 "same", "same"]
            )  # fmt: skip
    tts = data.get("piper")
    if isinstance(tts, dict):
        firsts = [med(r["first_ms"]) for r in tts["sentences"].values()]
        rtfs = [med(r["rtf"]) for r in tts["sentences"].values()]
        rows.append(
            [
                f"Piper time to first audio, ms ({len(firsts)} texts: median, min–max)",
                spread(firsts),
            ]
            + pis(lambda f: spread([x * f["multi"] for x in firsts]))
        )
        rows.append(
            ["Piper real-time factor", spread(rtfs, "{:.3f}")]
            + pis(lambda f: spread([x * f["multi"] for x in rtfs], "{:.2f}"))
        )
    e2e = data.get("e2e")
    if isinstance(e2e, dict):
        totals = [
            med(r["end_to_first_audio"]) + e2e["hangover_ms"] for r in e2e["recordings"].values()
        ]

        def est_e2e(f: dict[str, float]) -> str:
            vals = []
            for rec in e2e["recordings"].values():
                stages = {s: med(rec[s]) for s in list(STAGE_COLOURS)[1:]}
                vals.append(sum(estimate_turn(stages, f).values()) + e2e["hangover_ms"])
            return spread(vals)

        rows.append(
            [f"**end of speech → first reply audio**, local engines, ms ({len(totals)} recordings, incl. {e2e['hangover_ms']} ms hang-over)",
             f"**{spread(totals)}**"] + pis(lambda f: f"**{est_e2e(f)}**")
        )  # fmt: skip
    fb = data.get("fallback")
    if isinstance(fb, dict) and factors:
        ests = fallback_estimates(fb, data, factors)
        for name in ["cloud healthy", "cloud down: breaker open"]:
            if name in fb["results"]:
                rows.append(
                    [f"first reply audio, {name}, ms", spread(fb["results"][name])]
                    + [f"{ests[pi][name]:.0f}" if pi in ests else "–" for pi in ("Pi 5", "Pi 4")]
                )
    sy = data.get("sync")
    if isinstance(sy, dict):
        rate = [sy["captures"] / s for s in sy["sync_s"]]
        cpu = med(sy["cpu_s"]) / sy["captures"]
        rows.append(
            [f"sync to S3 + DynamoDB (moto on loopback), captures/s ({sy['captures']} captures)",
             spread(rate)]
            + pis(lambda f: f"the syncer's own CPU allows ≈ {1 / (cpu * f['single']):.0f}; the uplink decides")
        )  # fmt: skip
    mem = data.get("memory")
    if isinstance(mem, dict):
        rows.append(
            ["RSS idle (started, models loaded), MiB", spread(mem["idle"]), "≈ same", "≈ same"]
        )
        rows.append(["RSS peak after turns, MiB", spread(mem["peak"]), "≈ same", "≈ same"])
    st = data.get("startup")
    if isinstance(st, dict):
        rows.append(
            ["start-up to READY=1, s", spread(st["ready_s"], "{:.2f}")]
            + pis(lambda f: f"{med(st['ready_s']) * f['single']:.1f} + reading the models from SD")
        )
    return rows


def pi_section(data: dict[str, Any], factors: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    add = lines.append
    p4, p5 = factors["Pi 4"], factors["Pi 5"]
    pi4 = PI["Pi 4"]
    add(
        "**These are estimates, not measurements: nothing here ran on a Pi.** They scale this "
        "machine's CPU-bound figures by how many times slower a Pi is at the same kind of work, "
        "from a small fixed workload measured here against published Pi figures. Waiting that "
        "does not depend on the CPU (the fake cloud's injected latency, retry backoff, hedge "
        "delays, the endpointer's hang-over) is not scaled. Treat them as ±50 %: they are to "
        "decide what to expect and what to measure on the device "
        "(`python -m bench.report` runs there unchanged)."
    )
    add("")
    add(
        "| kind of work | measured here | assumed Raspberry Pi 4 | assumed Raspberry Pi 5 | Pi 4 slower by | Pi 5 slower by | used for |"
    )
    add("|---|---:|---:|---:|---:|---:|---|")
    add(
        f"| one core, pure Python: n-body, µs/step (lower is faster) | {factors['here_nbody_us']:.2f} | "
        f"{p4['nbody_us']:.1f} | {p5['nbody_us']:.1f} | {p4['single']:.1f}× | {p5['single']:.1f}× | "
        "keep, reply, record, start-up, our overhead on cloud calls, the voice cache, the syncer |"
    )
    add(
        f"| all cores, float64 matrix multiply (HPL on the Pi), GFLOPS | {factors['here_dgemm']:.0f} | "
        f"{PI['Pi 4']['hpl_gflops']:.1f} | {PI['Pi 5']['hpl_gflops']:.1f} | {p4['multi']:.1f}× | "
        f"{p5['multi']:.1f}× | Piper (onnxruntime, float32) |"
    )
    if factors["here_jfk_beam1_ms"]:
        add(
            f"| faster-whisper int8, tiny, beam 1, jfk.flac (11 s), ms | {factors['here_jfk_beam1_ms']:.0f} | "
            f"{pi4['ct2_jfk_beam1_s'] * 1000:.0f} | {pi4['ct2_jfk_beam1_s'] * 1000 / PI['Pi 5']['ct2_vs_pi4']:.0f} | "
            f"{p4['ct2']:.1f}× | {p5['ct2']:.1f}× | speech-to-text |"
        )
    add("")
    add("Where the assumed Pi figures come from:")
    add("")
    add(
        f"- **Pure Python, one core.** The n-body program of the Computer Language Benchmarks "
        f"Game (as in pyperformance), run here for 100,000 steps. For the Pi 4, Chaitanya Mehta's "
        f'"Performance analysis of languages on Raspberry Pi" (2020) reports 5,000,000 steps of '
        f"the same benchmark in Python in 158.3 s on a Pi 4 rev 1.1 at 1.5 GHz "
        f"({pi4['nbody_us_published']:.1f} µs/step; the page does not show its source, so the "
        f"program may differ in detail); scaled by clock to the current 1.8 GHz and divided by "
        f"{pi4['python_speedup']} because that was an older CPython and 3.11 is about 25 % faster "
        f'("What\'s New in Python 3.11"): {p4["nbody_us"]:.1f} µs/step. The Pi 5 is assumed '
        f"{PI['Pi 5']['nbody_vs_pi4']:.1f}× a Pi 4 per core: sysbench single-thread 2737 vs 1478 "
        f"events/s (1.85×, leoncode.co.uk's Pi benchmark table), Raspberry Pi Ltd's \"2–3×\" "
        f"launch claim, and the 2.07× of faster-whisper below."
    )
    add(
        f"- **All cores, floating point.** A 3072×3072 float64 matrix multiply with numpy "
        f"(OpenBLAS) here, against the Pis' HPL (High-Performance Linpack) results in Jeff "
        f"Geerling's top500-benchmark table: {PI['Pi 4']['hpl_gflops']} GFLOPS for a Pi 4 "
        f"(BCM2711 @ 1.8 GHz) and {PI['Pi 5']['hpl_gflops']} GFLOPS for a Pi 5 (BCM2712 @ "
        "2.4 GHz). HPL reaches less than a bare multiply on the same machine, so this makes "
        "the Pi look somewhat slower than it is; on the other hand onnxruntime here uses "
        "AVX-512, which this probe (OpenBLAS) does not, which errs the other way."
    )
    add(
        f"- **faster-whisper (CTranslate2 int8).** A generic probe does not carry over: "
        f"here CTranslate2 runs int8 with AVX-512 VNNI, on a Pi 4 with plain NEON (the A72 has no "
        f"int8 dot-product instructions; the Pi 5's A76 has), so the engine is anchored on a "
        f"published measurement of the same engine on the same file: faster-whisper int8 "
        f"`tiny` (multilingual, language given), beam 1, 4 threads, on jfk (11 s): "
        f"{pi4['ct2_jfk_beam1_s']} s on a Pi 400 (the Pi 4's BCM2711 at 1.8 GHz; "
        f"fquirin/speech-recognition-experiments, Feb 2023, CTranslate2 3.x, timing includes "
        f"reading the WAV; newer releases may be faster on ARM), divided by our beam-1 median on "
        f"jfk.flac in this run. Pi 5: "
        f"{PI['Pi 5']['ct2_vs_pi4']:.2f}× faster than a Pi 4, the ratio BotYue/Pi-Whisper-RSS25-"
        f"Workshop (RSS 2025 workshop) measured for faster-whisper `tiny.en` on the same ten "
        f"Common Voice clips (mean 3.42 s on a Pi 4 4 GB, 1.65 s on a Pi 5 8 GB; 1.26 s on a Pi "
        f"5 4 GB). The generic float probe would have said {p4['multi']:.1f}× and "
        f"{p5['multi']:.1f}×"
        + (": for this engine it underestimates the gap." if p4["multi"] < p4["ct2"] else ".")
    )
    add("")

    # cross-checks
    add("Cross-checks against other published Pi measurements (not used in the factors):")
    add("")
    stt = data.get("stt")
    if isinstance(stt, dict):
        short = [n for n, r in stt["recordings"].items() if 3.0 <= r["seconds"] <= 7.0]
        for beam in BEAMS:
            meds = [med(stt["beams"][beam]["per"][n]["ms"]) for n in short]
            if meds:
                m = med(meds)
                add(
                    f"- faster-whisper `tiny.en`, beam {beam}, our {len(short)} recordings of 3–7 s "
                    f"(Common Voice clips are about that long): estimate {m * p4['ct2'] / 1000:.1f} s "
                    f"on a Pi 4 and {m * p5['ct2'] / 1000:.1f} s on a Pi 5; BotYue measured a mean of "
                    f"{BOTYUE_TINY_EN_MEAN_S['Pi 4']:.1f} s and {BOTYUE_TINY_EN_MEAN_S['Pi 5']:.1f} s "
                    "(their beam size is not stated; faster-whisper's default is 5, and their time "
                    "may include decoding the MP3)."
                )
    tts = data.get("piper")
    if isinstance(tts, dict):
        rtf = med([med(r["rtf"]) for r in tts["sentences"].values()])
        add(
            f"- Piper, medium voice: estimated real-time factor {rtf * p4['multi']:.2f} on a Pi 4; "
            f"users report medium voices at about twice real time there (RTF ≈ "
            f"{PIPER_PI4_RTF_ANECDOTE}, rhasspy/rhasspy3 issue 36: an anecdote, not a benchmark). "
            + (
                "If that holds, our Piper estimates are optimistic by about "
                f"{PIPER_PI4_RTF_ANECDOTE / (rtf * p4['multi']):.1f}×."
                if rtf * p4["multi"] < PIPER_PI4_RTF_ANECDOTE * 0.75
                else "Consistent."
            )
        )
    add("")

    # estimate tables
    e2e = data.get("e2e")
    if isinstance(e2e, dict):
        add(
            "End of speech → first reply audio, local engines, estimated per stage (ms; medians scaled):"
        )
        add("")
        add(
            "| recording | machine | keep | transcribe | reply | speak (first sentence) | + hang-over | = end of speech → first audio |"
        )
        add("|---|---|---:|---:|---:|---:|---:|---:|")
        for name, rec in e2e["recordings"].items():
            stages = {s: med(rec[s]) for s in list(STAGE_COLOURS)[1:]}
            add(
                f"| {name} | this machine (measured) | "
                + " | ".join(f"{v:.0f}" for v in stages.values())
                + f" | {e2e['hangover_ms']} | {sum(stages.values()) + e2e['hangover_ms']:.0f} |"
            )
            for pi in ("Pi 5", "Pi 4"):
                est = estimate_turn(stages, factors[pi])
                add(
                    f"| | {pi} (estimate) | "
                    + " | ".join(f"{v:.0f}" for v in est.values())
                    + f" | {e2e['hangover_ms']} | **{sum(est.values()) + e2e['hangover_ms']:.0f}** |"
                )
        add("")
    fb = data.get("fallback")
    if isinstance(fb, dict):
        ests = fallback_estimates(fb, data, factors)
        ratios = turn_ratios(data, factors)
        add(
            "Fallback scenarios (ms): the local turn scaled as above (×"
            f"{ratios.get('Pi 5', 0):.1f} on a Pi 5, ×{ratios.get('Pi 4', 0):.1f} on a Pi 4, the "
            "median ratio of the table above), plus each scenario's extra waiting over local-only "
            "unscaled; cloud healthy = the injected latency plus our own overhead scaled as "
            "single-core Python. The hedge delays are settings: on a Pi they should be tuned to "
            "these figures."
        )
        add("")
        add("| scenario | this machine (measured, median) | Pi 5 (estimate) | Pi 4 (estimate) |")
        add("|---|---:|---:|---:|")
        for name, values in fb["results"].items():
            add(
                f"| {name} | {med(values):.0f} | {ests.get('Pi 5', {}).get(name, 0):.0f} | "
                f"{ests.get('Pi 4', {}).get(name, 0):.0f} |"
            )
        hit = med(fb["cache_hits_ms"])
        add(
            f"| voice-cache hit, request → first chunk | {hit:.2f} | {hit * p5['single']:.2f} | "
            f"{hit * p4['single']:.2f} |"
        )
        add("")
    add(
        "Not scaled: memory (the ARM builds of CTranslate2 and onnxruntime are assumed to need "
        "about the same; on a 1 GB Pi 4 the idle and peak figures above are what matters), "
        "network waits, and the sync rate, which on a device is set by the uplink (the summary's "
        "figure is only the rate the syncer's own CPU time per capture here would allow, "
        "scaled as single-core Python). Also not modelled: a microSD card is much slower than this "
        "machine's disk at `fsync` (keep, record) and at the first read of the ~120 MB of "
        "models after boot, thermal throttling without a heatsink, and a Pi 4 at 1.5 GHz "
        "(older boards)."
    )
    add("")
    return lines


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer runs and recordings: a smoke run"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "docs",
        help="folder for PERFORMANCE.md and performance.png",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help="runs per figure (default 3 for speech-to-text, 5 elsewhere; 1 with --quick)",
    )
    parser.add_argument(
        "--sync-captures",
        type=int,
        default=None,
        help="captures in the sync benchmark (default 300; 50 with --quick)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each section, wait up to this long for the CPU to be idle (< 10 %%)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also save the raw measurements to this file"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="measure nothing: rewrite the report from a file saved with --json",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        data = json.loads(args.from_json.read_text(encoding="utf-8"))
        if isinstance(data.get("stt"), dict):
            data["stt"]["beams"] = {int(k): v for k, v in data["stt"]["beams"].items()}
        return write_outputs(data, args.out)

    quick = args.quick
    runs = {
        "stt": args.runs or (1 if quick else 3),
        "piper": args.runs or (2 if quick else 5),
        "e2e": args.runs or (1 if quick else 5),
        "memory": 1 if quick else 3,
        "startup": args.runs or (2 if quick else 5),
        "probe": 2 if quick else 3,
        "sync": 1 if quick else 3,
    }
    sync_captures = args.sync_captures or (50 if quick else 300)
    fallback_limit = 6 if quick else None

    logging.basicConfig(level=logging.ERROR)  # fallbacks and warnings are expected here
    models = Path(os.environ.get("HEIMDALL_MODELS_DIR", REPO.parent / "shared" / "models"))
    speech = Path(os.environ.get("HEIMDALL_SPEECH_DIR", REPO.parent / "shared" / "speech"))
    for what, path in [("HEIMDALL_MODELS_DIR", models), ("HEIMDALL_SPEECH_DIR", speech)]:
        if not path.is_dir():
            print(f"report: {what} {path} does not exist: point {what} at it", file=sys.stderr)
            return 2
    state = Path(tempfile.mkdtemp(prefix="heimdall-report-"))
    for key in ["OPENAI_API_KEY", "ELEVENLABS_API_KEY", "HEIMDALL_S3_BUCKET",
                "HEIMDALL_DYNAMODB_TABLE", "HEIMDALL_OPENAI_BASE_URL", "HEIMDALL_ELEVENLABS_BASE_URL"]:  # fmt: skip
        os.environ.pop(key, None)
    os.environ.update(
        HEIMDALL_MODELS_DIR=str(models.resolve()),
        HEIMDALL_SPEECH_DIR=str(speech.resolve()),
        HEIMDALL_STATE_DIR=str(state),
        HEIMDALL_CLOUD__ENABLED="false",
        HF_HUB_OFFLINE="1",
    )
    clean_env = dict(os.environ)
    out_dir = args.out

    started = time.perf_counter()
    data: dict[str, Any] = {
        "wait_quiet_s": args.wait_quiet,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": quick,
        "runs": runs,
        "sections": [],
        "machine": machine_info(),
    }
    failures = 0

    def section(key: str, title: str, fn: Any) -> None:
        """Measure one section; with --wait-quiet, again (twice at most) if others disturbed it,
        keeping the least disturbed attempt (chosen on the CPU others took, not on the result)."""
        nonlocal failures
        tried: list[tuple[dict[str, Any], Any]] = []
        for attempt in range(1, (3 if args.wait_quiet > 0 else 1) + 1):
            log: list[dict[str, Any]] = []
            with Section(title, log, args.wait_quiet):
                try:
                    result = fn()
                except Exception:  # noqa: BLE001 - one failed section must not lose the others
                    result = traceback.format_exc()
                    print(result, file=sys.stderr)
                finally:
                    os.environ.clear()
                    os.environ.update(clean_env)
            entry = log[0] | {"failed": isinstance(result, str)}
            tried.append((entry, result))
            if entry["failed"] or entry["others_pct"] < DISTURBED_PCT:
                break
            print(
                f"[report] {title} (attempt {attempt}): other processes took "
                f"{entry['others_pct']:.0f} % of the CPU",
                file=sys.stderr,
            )
        entry, result = (
            tried[-1] if tried[-1][0]["failed"] else min(tried, key=lambda t: t[0]["others_pct"])
        )
        entry["attempts"] = len(tried)
        data["sections"].append(entry)
        data[key] = result
        failures += entry["failed"]

    probe_half = max(1, runs["probe"])
    section("probe_start", "CPU probe (start)", lambda: cpu_probe(probe_half))
    section("stt", "speech-to-text", lambda: asyncio.run(speech_to_text(runs["stt"])))
    section("piper", "Piper", lambda: asyncio.run(piper(runs["piper"])))
    section("e2e", "whole turns", lambda: asyncio.run(end_to_end(runs["e2e"])))
    section("memory", "memory", lambda: memory(runs["memory"], state))
    section("startup", "start-up", lambda: startup(runs["startup"], state))
    section("fallback", "cloud fallback", lambda: asyncio.run(fallback(fallback_limit)))
    section("sync", "store and forward", lambda: sync(sync_captures, runs["sync"]))
    section("probe_end", "CPU probe (end)", lambda: cpu_probe(probe_half))

    data["runtime_s"] = sum(x["seconds"] for x in data["sections"])
    data["extra_s"] = time.perf_counter() - started - data["runtime_s"]
    data["failures"] = failures
    shutil.rmtree(state, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return write_outputs(data, out_dir)


def write_outputs(data: dict[str, Any], out_dir: Path) -> int:
    """Pi factors, the plot and the markdown, from the measurements."""
    failures = data.get("failures", 0)
    probes = [p for p in (data.get("probe_start"), data.get("probe_end")) if isinstance(p, dict)]
    factors = None
    if probes:
        data["probe"] = {k: [v for p in probes for v in p[k]] for k in probes[0]}
        stt = data["stt"] if isinstance(data.get("stt"), dict) else None
        factors = pi_factors(data["probe"], stt)
    png = out_dir / "performance.png"
    try:
        plot(png, {k: v for k, v in data.items() if not isinstance(v, str) or k == "date"}, factors)
    except Exception:  # noqa: BLE001 - the figures are still worth writing
        failures += 1
        traceback.print_exc()
    markdown = render(data, factors, png.name)
    (out_dir / "PERFORMANCE.md").write_text(markdown + "\n", encoding="utf-8")
    print(
        f"[report] wrote {out_dir / 'PERFORMANCE.md'} and {png} "
        f"(measuring took {data['runtime_s'] / 60:.1f} min)"
        + (f"; {failures} section(s) FAILED" if failures else ""),
        file=sys.stderr,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
