"""bench/room.py's listening runs: a Listener over one stream, judged against where the words are.

The workers fork from the parent and read MATERIAL, which the parent sets first.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from bench.room_material import (
    BASELINE,
    LEAD_S,
    START_SLACK_MS,
    WHOLE_MARGIN_MS,
    Material,
    Positive,
    positive_stream,
)
from heimdall_edge.audio import FRAME_BYTES, FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE, Audio
from heimdall_edge.devices.base import MicrophoneEnded
from heimdall_edge.settings import ListeningSettings
from heimdall_edge.testing import voices
from heimdall_edge.testing.text import words


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
    from heimdall_edge.engines.local.faster_whisper import FasterWhisperEngine
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
