"""End of speech -> first reply audio with the cloud healthy, down, hung, and not there at all.

Runs real turns (real faster-whisper and Piper, the official OpenAI and ElevenLabs
clients) against the fake cloud on loopback, which injects fixed latencies:
transcription 300 ms, chat first token 200 ms, text-to-speech first audio 150 ms.
For each scenario it prints the median over the shared recordings, the ratio to
local-only (the baseline, measured in the same run), and for the healthy cloud
our own overhead above the injected provider latency. Then the time to first
audio of a voice-cache hit.

Usage: HEIMDALL_MODELS_DIR=../shared/models python bench/fallback.py [--recordings N]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from latency import SPEECH, machine

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
    from heimdall_edge import builders
    from heimdall_edge.audio import read_audio
    from heimdall_edge.devices.speaker import WavFileSpeaker
    from heimdall_edge.fakecloud import FakeCloud, Fault
    from heimdall_edge.interaction import Interaction
    from heimdall_edge.listen.endpointer import EndReason, Utterance
    from heimdall_edge.routing import Engines
    from heimdall_edge.settings import load_settings
    from heimdall_edge.spool import Spool

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
        result = await turn.run(utterance, [], asyncio.Event())
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


async def main(limit: int | None) -> None:
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


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)  # fallbacks are the point here, not news
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recordings", type=int, default=None, help="use only the first N recordings"
    )
    asyncio.run(main(parser.parse_args().recordings))
