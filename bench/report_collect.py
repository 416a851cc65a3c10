"""The measuring half of bench/report.py: runs every section and returns the raw figures.

Each section runs in turn in this process (start-up, memory and sync in children), timed
together with the CPU other processes took meanwhile, so the report can say which figures a
busy machine slowed down. The result is the dict `--json` saves and `--from-json` re-renders.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from bench.machine import cpu_busy_seconds, cpu_probe, machine_info, own_cpu_seconds, wait_quiet

REPO = Path(__file__).resolve().parents[1]
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


# ----------------------------------------------------------------------------- the whole run


def measure(args: argparse.Namespace) -> dict[str, Any] | None:
    """Every section in turn, as the command line asks; None if the models or speech are missing."""
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
    state = isolate()
    if state is None:
        return None
    clean_env = dict(os.environ)

    started = time.perf_counter()
    data: dict[str, Any] = {
        "wait_quiet_s": args.wait_quiet,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": quick,
        "runs": runs,
        "sections": [],
        "machine": machine_info(),
    }

    def section(key: str, title: str, fn: Callable[[], Any]) -> None:
        data["sections"].append(entry := run_section(title, fn, args.wait_quiet, clean_env))
        data[key] = entry.pop("result")

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
    data["failures"] = sum(x["failed"] for x in data["sections"])
    shutil.rmtree(state, ignore_errors=True)
    return data


def isolate() -> Path | None:
    """Point the environment at the shared models and speech and a fresh state directory, with
    the caller's cloud settings removed, so that nothing outside the run changes its figures."""
    models = Path(os.environ.get("HEIMDALL_MODELS_DIR", REPO.parent / "shared" / "models"))
    speech = Path(os.environ.get("HEIMDALL_SPEECH_DIR", REPO.parent / "shared" / "speech"))
    for what, path in [("HEIMDALL_MODELS_DIR", models), ("HEIMDALL_SPEECH_DIR", speech)]:
        if not path.is_dir():
            print(f"report: {what} {path} does not exist: point {what} at it", file=sys.stderr)
            return None
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
    return state


def run_section(
    title: str, fn: Callable[[], Any], wait_s: float, clean_env: dict[str, str]
) -> dict[str, Any]:
    """Measure one section; with --wait-quiet, again (twice at most) if others disturbed it,
    keeping the least disturbed attempt (chosen on the CPU others took, not on the result).
    Returns the section's log entry with its figures (or traceback) under "result"."""
    tried: list[dict[str, Any]] = []
    for attempt in range(1, (3 if wait_s > 0 else 1) + 1):
        log: list[dict[str, Any]] = []
        with Section(title, log, wait_s):
            try:
                result = fn()
            except Exception:  # noqa: BLE001 - one failed section must not lose the others
                result = traceback.format_exc()
                print(result, file=sys.stderr)
            finally:
                os.environ.clear()
                os.environ.update(clean_env)
        entry = log[0] | {"failed": isinstance(result, str), "result": result}
        tried.append(entry)
        if entry["failed"] or entry["others_pct"] < DISTURBED_PCT:
            break
        print(
            f"[report] {title} (attempt {attempt}): other processes took "
            f"{entry['others_pct']:.0f} % of the CPU",
            file=sys.stderr,
        )
    entry = tried[-1] if tried[-1]["failed"] else min(tried, key=lambda t: t["others_pct"])
    entry["attempts"] = len(tried)
    return entry
