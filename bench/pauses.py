"""Where to speculate: how often speech resumes after a pause, and the head start it buys.

Every shared recording is heard as one capture (the real endpointer and speech judge,
frame by frame, no engines). For each candidate `speculate_after_ms` it counts the
speculations a capture would start (one per pause), how many the person talked over
(dropped), and so the cloud calls a capture costs: a speculation that runs to the end
makes three (transcription, reply, speech), a dropped one at most three, and a turn
without speculation makes three. The head start is what is left of the hang-over
(silence_ms) once the pause is confirmed.

Usage: HEIMDALL_SPEECH_DIR=../shared/speech python -m bench.pauses [--vad silero|webrtc]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench.latency import SPEECH, machine
from heimdall_edge.audio import FRAME_BYTES, read_audio, silence
from heimdall_edge.listen.endpointer import Endpointer
from heimdall_edge.settings import ListeningSettings

CANDIDATES_MS = (150, 200, 250, 300, 350, 400, 500)
CLOUD_CALLS_PER_TURN = 3


def recordings() -> list[Path]:
    lines = (SPEECH / "transcripts.tsv").read_text().splitlines()
    return [SPEECH / line.split("\t", 1)[0] for line in lines if line]


def pauses_in(pcm: bytes, settings: ListeningSettings) -> tuple[int, int]:
    """(speculations started, dropped) for one capture of `pcm`, as the Listener sees them."""
    endpointer = Endpointer(settings)
    frames = [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES)]
    started = dropped = 0
    capturing = paused = False
    for frame in frames:
        if not capturing:
            if endpointer.idle_feed(frame):
                endpointer.start("voice")
                capturing = True
            continue
        if endpointer.feed(frame) is not None:
            break
        if endpointer.paused != paused:
            paused = endpointer.paused
            started += paused
            dropped += not paused
    return started, dropped


def main(vad: str) -> None:
    clips = [(path.name, read_audio(path).pcm) for path in recordings()]
    print(f"machine: {machine()}")
    print(f"{len(clips)} recordings from {SPEECH}; vad {vad}; silence_ms 700\n")
    print(
        "| speculate_after_ms | head start ms | captures talked on after a pause | "
        "dropped per capture (mean, max) | cloud calls per capture, mean (x plain) |"
    )
    print("|---:|---:|---:|---|---:|")
    for after_ms in CANDIDATES_MS:
        settings = ListeningSettings(vad=vad, speculate_after_ms=after_ms)  # type: ignore[arg-type]
        counts = [pauses_in(silence(600) + pcm + silence(1500), settings) for _, pcm in clips]
        dropped = [d for _, d in counts]
        resumed = sum(1 for d in dropped if d)
        calls = statistics.mean(CLOUD_CALLS_PER_TURN * s for s, _ in counts)
        print(
            f"| {after_ms} | {settings.silence_ms - after_ms} | {resumed} of {len(clips)} "
            f"({100 * resumed / len(clips):.0f} %) | {statistics.mean(dropped):.2f}, {max(dropped)} | "
            f"{calls:.2f} ({calls / CLOUD_CALLS_PER_TURN:.2f}) |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vad", choices=("silero", "webrtc"), default="silero")
    main(parser.parse_args().vad)
