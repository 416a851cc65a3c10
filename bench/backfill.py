"""What background transcription costs a live turn: its speech-to-text time, alone and contended.

The backfill (a capture cut short by a crash, transcribed after the restart) starts only
while no turn is in progress, and with the cloud reachable it uses cloud Whisper. The
worst case is offline: the backfill has just started a local transcription when a
person starts talking. The device's one faster-whisper model runs one inference at a
time, so the live turn's transcription may wait for the backfill's. This measures that,
in one run, on the device's engine (tiny.en, int8):

* alone: the live command transcribed with nothing else running (the baseline);
* contended: the same, started when a backfill transcription of a longer capture
  started `--lead-ms` earlier (as if the person began speaking then and spoke for
  that long: the capture of the command itself hides that much of the backfill).

The upgrade (cloud Whisper on offline transcripts) uses no local CPU; it is not measured here.

Usage: python -m bench.backfill [--runs 7] [--lead-ms 0 1500 2900]
(2900 ms: the 2.2 s live command plus the 700 ms hang-over, the shortest real lead.)
(HEIMDALL_MODELS_DIR defaults to ../shared/models, HEIMDALL_SPEECH_DIR to ../shared/speech.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from heimdall_edge.audio import Audio, read_audio
from heimdall_edge.engines.local.faster_whisper import FasterWhisperEngine
from heimdall_edge.settings import SpeechToTextSettings

REPO = Path(__file__).resolve().parents[1]

LIVE = "v2j_what_time_is_it.wav"
BACKFILLS = ("ps_goforward.wav", "librivox_sense_sensibility_0870.wav")
PI4_FACTOR = 6.3
"""A Pi 4's time for the same inference, as estimated in docs/LISTENING.md (an estimate)."""


async def live_ms(
    engine: FasterWhisperEngine, live: Audio, backfill: Audio | None, lead_s: float
) -> float:
    """Milliseconds from the live transcription's start to its transcript."""
    background = None
    if backfill is not None:
        background = asyncio.create_task(engine.transcribe(backfill))
        await asyncio.sleep(lead_s)
    started = time.perf_counter()
    await engine.transcribe(live)
    elapsed = (time.perf_counter() - started) * 1000
    if background is not None:
        await background
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--lead-ms", type=float, nargs="+", default=[0.0, 1500.0, 2900.0])
    args = parser.parse_args()
    models = Path(os.environ.get("HEIMDALL_MODELS_DIR", REPO.parent / "shared" / "models"))
    speech = Path(os.environ.get("HEIMDALL_SPEECH_DIR", REPO.parent / "shared" / "speech"))
    engine = FasterWhisperEngine(SpeechToTextSettings(), models)
    await engine.load()
    live = read_audio(speech / LIVE)
    await engine.transcribe(live)  # warm

    async def median_of(measure: Callable[[], Awaitable[float]]) -> float:
        return statistics.median([await measure() for _ in range(args.runs)])

    async def median(backfill: Audio | None, lead_s: float) -> float:
        return await median_of(lambda: live_ms(engine, live, backfill, lead_s))

    alone = await median(None, 0.0)
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, CPython {platform.python_version()}; median of {args.runs} runs"
    )
    print(f"live command: {LIVE} ({live.seconds:.1f} s); engine faster-whisper tiny.en int8\n")
    print(
        "| backfill capture | its STT ms alone | person speaks for (lead) | live STT ms | "
        "× alone | added ms | Pi 4 added ms (est.) |"
    )
    print("|---|---|---|---|---|---|---|")
    print(f"| none (baseline) | - | - | {alone:.0f} | 1.00 | 0 | 0 |")
    for name in BACKFILLS:
        backfill = read_audio(speech / name)
        own = await median_of(lambda clip=backfill: live_ms(engine, clip, None, 0.0))
        for lead_ms in args.lead_ms:
            contended = await median(backfill, lead_ms / 1000)
            added = max(0.0, contended - alone)
            # On a Pi the backfill takes PI4_FACTOR times longer and the person speaks as
            # long: the wait left is what of the backfill outlasts the lead.
            pi_added = max(0.0, own * PI4_FACTOR - lead_ms)
            print(
                f"| {name} ({backfill.seconds:.1f} s) | {own:.0f} | {lead_ms:.0f} ms | "
                f"{contended:.0f} | {contended / alone:.2f} | {added:.0f} | {pi_added:.0f} |"
            )


if __name__ == "__main__":
    asyncio.run(main())
