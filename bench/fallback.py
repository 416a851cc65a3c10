"""End of speech -> first reply audio with the cloud healthy, down, hung, and not there at all.

Runs real turns (real faster-whisper and Piper, the official OpenAI and ElevenLabs
clients) against the fake cloud on loopback, which injects fixed latencies:
transcription 300 ms, chat first token 200 ms, text-to-speech first audio 150 ms.
For each scenario it prints the median over the shared recordings, the ratio to
local-only (the baseline, measured in the same run), and for the healthy cloud
our own overhead above the injected provider latency. Then the time to first
audio of a voice-cache hit. Then, side by side in the same run:

- a hung cloud (connections accepted, never answered) over 10 successive turns on
  the same engines, with the shipped hedge delays, against 10 local-only turns;
- one speech service down (connections refused) and the other up, 6 turns each way,
  OpenAI and ElevenLabs served by two fake clouds: which engine spoke each turn;
- speculative against plain turns, local engines and a healthy cloud: the
  recordings of at most 5 s from a real-time microphone through the Listener, so
  the 700 ms hang-over is really waited; capture end -> first audio.

Usage: HEIMDALL_MODELS_DIR=../shared/models python -m bench.fallback [--recordings N]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.latency import SPEECH, machine
from bench.machine import nbody_us_per_step

LATENCY_S = {"transcriptions": 0.30, "chat": 0.20, "tts": 0.15}
HEDGE_MS = 300


def recordings(limit: int | None) -> list[Path]:
    names = [
        line.split("\t", 1)[0]
        for line in (SPEECH / "transcripts.tsv").read_text().splitlines()
        if line
    ]
    return [SPEECH / name for name in names[:limit]]


CACHE_HIT_RUNS = 20


async def measure(limit: int | None = None) -> dict:
    """Run every scenario; returns {"results": {scenario: [ms per recording]}, "cache_hits_ms": [...],
    "recordings": N, "injected_ms": {...}, "hedge_ms": HEDGE_MS}.

    Sets HEIMDALL_* variables in os.environ as it goes (state dir, hedge delays, the fake
    cloud's URLs and keys): callers that go on afterwards should restore the environment.
    """
    from heimdall_edge.app import builders
    from heimdall_edge.audio import read_audio
    from heimdall_edge.capture import Capture
    from heimdall_edge.devices.speaker import WavFileSpeaker
    from heimdall_edge.listen.endpointer import EndReason, Utterance
    from heimdall_edge.settings import load_settings
    from heimdall_edge.spool.store import Spool
    from heimdall_edge.testing.fakecloud.cloud import FakeCloud
    from heimdall_edge.testing.fakecloud.wire import Fault
    from heimdall_edge.turn.interaction import Interaction
    from heimdall_edge.turn.routing import Engines

    class QuietIndicator:
        def show(self, state: object) -> None:
            pass

        def close(self) -> None:
            pass

    state = Path(tempfile.mkdtemp(prefix="heimdall-bench-"))
    os.environ.update(
        HEIMDALL_STATE_DIR=str(state),
        HF_HUB_OFFLINE="1",
        HEIMDALL_VOICE_CACHE__MAX_MB="0",  # every turn really synthesizes
        HEIMDALL_RESILIENCE__STT_HEDGE_AFTER_MS=str(HEDGE_MS),
        HEIMDALL_RESILIENCE__REPLY_HEDGE_AFTER_MS=str(HEDGE_MS),
        HEIMDALL_RESILIENCE__TTS_HEDGE_AFTER_MS=str(HEDGE_MS),
    )
    clips = [read_audio(path) for path in recordings(limit)]
    counter = itertools.count()
    cloud = FakeCloud(
        transcript=lambda _record: "what can you see",
        reply=lambda _request: f"I can see a kitchen, view {next(counter)}. Anything else?",
    ).start()
    os.environ.update(cloud.env())
    local = builders.build_engines(load_settings())
    await local.load()
    spool = Spool(state / "spool")

    def fresh_engines(with_cloud: bool) -> Engines:
        os.environ["HEIMDALL_CLOUD__ENABLED"] = "true" if with_cloud else "false"
        engines = builders.build_engines(load_settings())
        engines.stt, engines.tts = local.stt, local.tts  # warm local models, shared
        return engines

    async def first_audio_ms(engines: Engines, clip) -> float:
        turn = Interaction(
            device_id="bench",
            spool=spool,
            engines=engines,
            speaker=WavFileSpeaker(None),
            indicator=QuietIndicator(),
        )
        utterance = Utterance(clip, "button", EndReason.SILENCE, 1000, None, time.monotonic(), 240)
        result = await turn.run(Capture(utterance), asyncio.Event())
        return result.timings_ms["end_to_first_audio"]

    def set_faults(fault_for: dict[str, Fault | None]) -> None:
        for route, fault in fault_for.items():
            cloud.fault(route, fault)

    healthy = {route: Fault(latency_s=s) for route, s in LATENCY_S.items()}
    results: dict[str, list[float]] = {}

    local_only = fresh_engines(with_cloud=False)
    results["local only (baseline)"] = [await first_audio_ms(local_only, c) for c in clips]

    set_faults(healthy)
    engines = fresh_engines(with_cloud=True)
    results["cloud healthy"] = [await first_audio_ms(engines, c) for c in clips]

    set_faults({route: Fault(status=503) for route in LATENCY_S})
    results["cloud down: first failure (503, retried once)"] = [
        await first_audio_ms(fresh_engines(with_cloud=True), c) for c in clips
    ]
    engines = fresh_engines(with_cloud=True)
    await first_audio_ms(engines, clips[0])  # opens the breakers
    results["cloud down: breaker open"] = [await first_audio_ms(engines, c) for c in clips]

    set_faults({route: Fault(hang=True) for route in LATENCY_S})
    results[f"cloud hung (hedged after {HEDGE_MS} ms per stage)"] = [
        await first_audio_ms(fresh_engines(with_cloud=True), c) for c in clips
    ]
    cloud.stop()

    # A cache hit: the phrase is rendered once, then spoken from disk.
    os.environ["HEIMDALL_VOICE_CACHE__MAX_MB"] = "16"
    cached = fresh_engines(with_cloud=False)
    phrase = "I'm offline, but I've saved that."
    await cached.prerender([phrase])
    hits = []
    for _ in range(CACHE_HIT_RUNS):
        started = time.perf_counter()
        speech = await cached.speak(phrase)
        assert speech.cached
        hits.append((time.perf_counter() - started) * 1000)
    return {
        "results": results,
        "cache_hits_ms": hits,
        "recordings": len(clips),
        "injected_ms": {k: v * 1000 for k, v in LATENCY_S.items()},
        "hedge_ms": HEDGE_MS,
    }


HUNG_TURNS = 10
COMMAND_MAX_S = 5.0


async def measure_turns(limit: int | None = None) -> dict:
    """The hung cloud over successive turns and speculative against plain turns (ms)."""
    from bench.turn_scenarios import speculative_against_plain, successive_turns
    from heimdall_edge.app import builders
    from heimdall_edge.audio import read_audio
    from heimdall_edge.settings import load_settings
    from heimdall_edge.spool.store import Spool
    from heimdall_edge.testing.fakecloud.cloud import FakeCloud
    from heimdall_edge.testing.fakecloud.wire import Fault

    state = Path(tempfile.mkdtemp(prefix="heimdall-bench-"))
    for name in [k for k in os.environ if k.startswith("HEIMDALL_RESILIENCE__")]:
        del os.environ[name]  # the shipped hedge delays and deadlines
    os.environ.update(HEIMDALL_STATE_DIR=str(state), HEIMDALL_VOICE_CACHE__MAX_MB="0")
    cloud = FakeCloud(transcript="what can you see", reply="I can see a kitchen. Anything else?")
    os.environ.update(cloud.start().env())
    os.environ["HEIMDALL_CLOUD__ENABLED"] = "false"
    local = builders.build_engines(load_settings())
    await local.load()
    spool = Spool(state / "spool")

    def engines(with_cloud: bool):
        os.environ["HEIMDALL_CLOUD__ENABLED"] = "true" if with_cloud else "false"
        built = builders.build_engines(load_settings())
        built.stt, built.tts = local.stt, local.tts
        return built

    clip = read_audio(SPEECH / "v2j_what_time_is_it.wav")
    one_down = await one_service_down(engines, spool, clip)
    hung = {
        "local only (baseline)": await successive_turns(engines(False), spool, clip, HUNG_TURNS)
    }
    for route in LATENCY_S:
        cloud.fault(route, Fault(hang=True))
    hung["cloud hung"] = await successive_turns(engines(True), spool, clip, HUNG_TURNS)

    for route, seconds in LATENCY_S.items():
        cloud.fault(route, Fault(latency_s=seconds))
    commands = [p for p in recordings(limit) if read_audio(p).seconds <= COMMAND_MAX_S]
    speculation = await speculative_against_plain(
        {"local": lambda: engines(False), "cloud": lambda: engines(True)}, spool, commands
    )
    cloud.stop()
    return {
        "hung": hung,
        "one_down": one_down,
        "speculation": speculation,
        "commands": len(commands),
    }


ONE_DOWN_TURNS = 6


async def one_service_down(engines, spool, clip) -> dict[str, list[dict]]:
    """OpenAI refusing connections while ElevenLabs answers, and the reverse: each speech
    service on a fake cloud of its own, so that one can be unreachable alone."""
    from bench.turn_scenarios import successive_turns
    from heimdall_edge.testing.fakecloud.cloud import FakeCloud

    names = ("OPENAI", "ELEVENLABS")
    saved = {k: os.environ[k] for n in names for k in (f"HEIMDALL_{n}_BASE_URL", f"{n}_API_KEY")}
    results: dict[str, list[dict]] = {}
    for down in ("openai", "elevenlabs"):
        with FakeCloud(transcript="what can you see", reply="A kitchen.") as oa, FakeCloud() as el:
            for name, value in oa.env().items():
                if "OPENAI" in name:
                    os.environ[name] = value
            for name, value in el.env().items():
                if "ELEVENLABS" in name:
                    os.environ[name] = value
            (oa if down == "openai" else el).refuse_connections()
            results[f"{down} down"] = await successive_turns(
                engines(True), spool, clip, ONE_DOWN_TURNS
            )
    os.environ.update(saved)
    return results


def print_turns(measured: dict) -> None:
    hung = measured["hung"]
    local = [t["ms"] for t in hung["local only (baseline)"]]
    print(f"\n### A hung cloud, {HUNG_TURNS} successive turns (shipped hedge delays)\n")
    print("| turn | " + " | ".join(hung) + " |")
    print("|---:|" + "---:|" * len(hung))
    for n in range(HUNG_TURNS):
        cells = [f"{runs[n]['ms']:.0f} ({_short(runs[n]['engines'])})" for runs in hung.values()]
        print(f"| {n + 1} | " + " | ".join(cells) + " |")
    later = [t["ms"] for t in hung["cloud hung"][3:]]
    print(
        f"\nfrom the 4th turn on: median {statistics.median(later):.0f} ms against "
        f"{statistics.median(local[3:]):.0f} ms local only: "
        f"{statistics.median(later) / statistics.median(local[3:]):.2f}x"
    )
    print(f"\n### One speech service down, the other up ({ONE_DOWN_TURNS} turns each)\n")
    print("| down | engines per turn (stt/reply/tts) | turns spoken by the service that is up |")
    print("|---|---|---:|")
    for name, runs in measured["one_down"].items():
        up = "elevenlabs" if name.startswith("openai") else "openai"
        stage = "tts" if up == "elevenlabs" else "stt"
        used = sum(1 for t in runs if t["engines"].get(stage) == up)
        print(
            f"| {name} | {', '.join(_short(t['engines']) for t in runs)} | {used} of {len(runs)} |"
        )
    spec = measured["speculation"]
    injected = sum(LATENCY_S.values()) * 1000
    print(
        f"\n### Speculative against plain turns ({measured['commands']} recordings of at most "
        f"{COMMAND_MAX_S:g} s, real-time microphone, silence_ms 700, speculate_after_ms 250)\n"
    )
    print("| turns | capture end -> first audio, median ms (min-max) | ratio to plain |")
    print("|---|---:|---:|")
    for name, values in spec.items():
        plain = statistics.median(spec[name.replace("speculative", "plain")])
        print(
            f"| {name} | {statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f}) "
            f"| {statistics.median(values) / plain:.2f} |"
        )
    print(f"\ninjected cloud latencies add up to {injected:.0f} ms")


def _short(engines: dict[str, str]) -> str:
    return "/".join(engines.get(stage, "-") for stage in ("stt", "reply", "tts"))


def speed() -> str:
    """The machine's CPU speed now: a host that slows down makes every CPU-bound figure move."""
    return f"pure-Python n-body {nbody_us_per_step(30_000):.2f} us/step (one core)"


async def main(limit: int | None) -> None:
    print(f"CPU probe at the start: {speed()}", flush=True)
    measured = await measure(limit)
    results, hits = measured["results"], measured["cache_hits_ms"]
    baseline = statistics.median(results["local only (baseline)"])
    injected = sum(LATENCY_S.values()) * 1000
    print(f"machine: {machine()}")
    print(
        f"recordings: {measured['recordings']} from {SPEECH}; injected cloud latency: "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in LATENCY_S.items())
    )
    print(
        "\n| scenario | end of utterance -> first reply audio, median ms (min-max) | ratio to local only | our overhead above injected latency |"
    )
    print("|---|---:|---:|---:|")
    for name, values in results.items():
        median = statistics.median(values)
        overhead = f"{median - injected:.0f} ms" if name == "cloud healthy" else ""
        print(
            f"| {name} | {median:.0f} ({min(values):.0f}-{max(values):.0f}) | {median / baseline:.2f} | {overhead} |"
        )

    print(
        f"\nvoice cache hit, request -> first audio chunk: median {statistics.median(hits):.2f} ms "
        f"(min {min(hits):.2f}, max {max(hits):.2f}, {len(hits)} runs)"
    )
    print_turns(await measure_turns(limit))
    print(f"\nCPU probe at the end: {speed()}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)  # fallbacks are the point here, not news
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recordings", type=int, default=None, help="use only the first N recordings"
    )
    asyncio.run(main(parser.parse_args().recordings))
