"""Soak, short form: 84 whole turns on one appliance; memory and open files stay flat.

The same soak as `bench/soak.py` (see its docstring), shortened for CI: the real
models, the official cloud clients against the fake cloud (in a child process) with
its faults changing every two turns (healthy, slow, hung, server errors, broken
streams, refused keys, refused connections), the voice cache and the spool both
evicting. The recordings are the shared ones up to 3 s long, so a turn is short.

After the warm-up (28 turns: two whole cycles of faults, so every path has run), the
median RSS and the median count of open file descriptors over the last cycle may be
at most 5 % above their medians over the cycle right after the warm-up. A sample after
every turn, after gc.collect(); the windows are whole cycles, so like is compared with
like (the open sockets, for one, go from 0 to 2 with the faults: idle keep-alive
connections to the fake cloud). The gc-tracked objects (within 1 %) and the asyncio
tasks (5 %) are held too: a sharper check on Python-level leaks than RSS, which
glibc's allocator blurs. `python -m bench.soak --interactions 500` is the long form.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import pytest_asyncio

from bench import soak  # bench/soak.py: the long form of this test
from bench.soak_report import report

TURNS = 6 * soak.CYCLE_TURNS  # 84 (under a minute): a warm-up of 2 cycles, then 4 more
OBJECTS_LIMIT = 0.01  # the noise is about 0.1 %: a leak of some 30 objects a turn shows
MAX_CLIP_S = 3.0


@pytest_asyncio.fixture(scope="module")
async def result(
    tmp_path_factory: pytest.TempPathFactory, speech_dir: Path, models_dir: Path
) -> soak.SoakResult:
    """One soak for the whole module (it takes a minute or so)."""
    outcome = await asyncio.wait_for(
        soak.soak(
            TURNS,
            tmp_path_factory.mktemp("soak") / "state",
            speech_dir=speech_dir,
            models_dir=models_dir,
            max_clip_s=MAX_CLIP_S,
            every=1,
        ),
        timeout=240,
    )
    print("\n" + report(outcome))  # shown with -s, or in the report when a test fails
    return outcome


def test_the_soak_ran_every_path(result: soak.SoakResult) -> None:
    assert result.turns == TURNS and result.samples[-1].turn == TURNS
    assert result.warmup_turns == 2 * soak.CYCLE_TURNS
    assert result.window_turns == soak.CYCLE_TURNS
    assert set(result.phases) == {name for name, _ in soak.PHASES}
    assert result.no_speech == 0
    # Whatever the cloud did, every stage was answered locally in the same turn, and every
    # capture was kept: the quota always made room by evicting the oldest.
    assert not result.errors, result.errors
    # Both the cloud and the local engine answered each stage, many times over.
    assert result.engines["stt"]["openai"] >= 5 and result.engines["stt"]["faster-whisper"] >= 20
    assert result.engines["reply"]["openai"] >= 5 and result.engines["reply"]["offline"] >= 20
    assert result.engines["tts"]["elevenlabs"] >= 5 and result.engines["tts"]["piper"] >= 5
    # The disk stayed bounded: the spool evicted the oldest captures to stay in its quota
    # (checked before a capture is kept: its reply.wav, added later, may overshoot it a bit).
    assert result.sync["totals"]["evicted_unsynced"] > 0
    assert result.spool_bytes <= 11 * 2**20
    assert result.log_counts.get("CRITICAL", 0) == 0


@pytest.mark.parametrize("metric", ["rss", "fds"])
def test_no_growth_after_warmup(result: soak.SoakResult, metric: str) -> None:
    growth = result.growth(metric)
    assert growth.final <= (1 + soak.LIMIT) * growth.warm, (
        f"{metric} grew {growth.percent:+.1f} % after the warm-up "
        f"({growth.warm:.0f} -> {growth.final:.0f}, max {growth.peak:.0f})"
    )


@pytest.mark.parametrize(("metric", "limit"), [("objects", OBJECTS_LIMIT), ("tasks", soak.LIMIT)])
def test_no_python_objects_or_tasks_pile_up(
    result: soak.SoakResult, metric: str, limit: float
) -> None:
    growth = result.growth(metric)
    assert growth.final <= (1 + limit) * growth.warm, (
        f"{metric} grew {growth.percent:+.1f} % after the warm-up "
        f"({growth.warm:.0f} -> {growth.final:.0f})"
    )
