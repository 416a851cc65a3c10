"""Chaos, short form: the real service SIGKILLed and restarted while the cloud and the store flap.

The engine is `chaos_driver.py` (its docstring says what happens and what is checked);
`bench/chaos.py` runs the same driver for longer. Here: about 40 turns from the real
recordings, in service processes of 2 to 6 recordings each, most of them SIGKILLed at
a seeded random point, with the fake cloud and moto flapping all along. Every check
must hold:

* every recording of a process that was not killed became a capture, answered aloud
  (a "capture <id>: ..." log line, status complete/failed, reply.wav kept);
* a killed process kept at most one capture it did not answer (the turn in flight:
  status "captured", no reply.wav), and no capture that ever reached the spool is lost;
* after the drain every capture is in S3 once (one version per key, bytes as recorded)
  and in DynamoDB once, with nothing orphaned; the spool reopens clean and verifies;
* every process that was not killed exited 0; the service synced while it ran.

Then the extended modes (issue 10, item 9), each about 45 s:

* clock steps: the service processes under libfaketime, their wall clock stepped +1 h,
  +1 day, -10 min and back (the monotonic clock untouched) at random and shortly after a
  turn began, while the store refuses a signature more than 15 minutes off, as AWS does;
* two syncers at once and SIGKILLs between revisions: `heimdall-edge sync` (a daemon, or
  `--once` again and again) on the same state dir beside the service, under the smallest
  quota (10 MB, with ballast in the spool's folder so a short run reaches it), and kills
  planned right after a capture was kept, right after the backfill recorded a capture
  cut short, and (for the second syncer) when a capture's newest revision is newer than
  its record in S3.

Both keep every check of the first test (none lost, every capture in S3 and DynamoDB at
its last revision, capture.json at the index's revision), add their own (nothing evicted
unsynced with evict_unsynced off, every evicted capture in the store at its last revision,
no eviction freeing more than its need plus one capture), and assert that the run really
did what it claims: a step during a turn, the store refusing for the clock, both
processes evicting, kills that cut a turn and a revision newer than the store's. A short
run is timing-dependent (a kill aimed at a window of a few ms; how many batches, so how
many kills, fit in the time), so in all three tests a run that passed every check but
missed an exercise is followed by one with the next seed, at most three.

On failure the message carries the whole summary (interactions, kills, captures,
fault timeline). `HEIMDALL_CHAOS_SEED=N` replays another schedule; each process's
stderr is kept under the test's tmp_path (chaos/logs/).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.chaos_clock import probe_steps
from tests.chaos_driver import MID_TURN, Chaos, ChaosConfig, ChaosReport
from tests.chaos_spool import EvictionLog, cut_during, over_evicted

pytestmark = pytest.mark.serial  # alone, after the rest: see `make test`

INTERACTIONS = 40
MINUTES = 0.75  # no new service process after this, so the test stays well under 90 s
EXTENDED_MINUTES = 0.6  # each extended mode: about 45 s in all
SEED = int(os.environ.get("HEIMDALL_CHAOS_SEED", "20261127"))


async def run_chaos(
    tmp_path: Path,
    speech_dir: Path,
    models_dir: Path,
    minutes: float,
    seed: int = SEED,
    **mode: Any,
) -> tuple[ChaosReport, str]:
    """One seeded run in `tmp_path`; its report and summary, with every check passed."""
    config = ChaosConfig(
        work_dir=tmp_path / "chaos",
        speech_dir=speech_dir,
        models_dir=models_dir,
        interactions=INTERACTIONS,
        minutes=minutes,
        seed=seed,
        **mode,
    )
    report = await asyncio.wait_for(Chaos(config).run(), timeout=200)
    summary = report.summary()
    print(summary)  # shown with -s, and in the assertion message on failure
    assert not report.failures, summary
    return report, summary


EXERCISE_RUNS = 3


async def run_until_exercised(
    tmp_path: Path,
    speech_dir: Path,
    models_dir: Path,
    exercises: Callable[[ChaosReport], dict[str, bool]],
    minutes: float = EXTENDED_MINUTES,
    **mode: Any,
) -> ChaosReport:
    """Seeded runs (every check must pass in each) until one did every exercise (each named,
    with whether the run did it); a short run is timing-dependent (a kill aimed at a window
    of a few ms, a step that must land in a turn), so the next seed is tried, at most
    EXERCISE_RUNS."""
    missing: list[str] = []
    for attempt in range(EXERCISE_RUNS):
        report, summary = await run_chaos(
            tmp_path / f"run-{attempt}", speech_dir, models_dir, minutes,
            seed=SEED + attempt, **mode,
        )  # fmt: skip
        missing = [name for name, done in exercises(report).items() if not done]
        if not missing:
            return report
        print(f"seed {SEED + attempt}: not exercised: {', '.join(missing)}")
    pytest.fail(f"not exercised in {EXERCISE_RUNS} runs: {', '.join(missing)}\n{summary}")


@pytest.mark.timeout(600)
async def test_chaos_no_capture_lost_every_turn_answered_every_capture_synced_once(
    tmp_path: Path, speech_dir: Path, models_dir: Path
) -> None:
    def exercises(report: ChaosReport) -> dict[str, bool]:
        # How many batches fit in the time (and so how many kills) depends on the machine's
        # speed: 4 batches and 1 kill were seen on a slow host.
        return {
            "two SIGKILLs": report.kills >= 2,
            "a store outage": report.store_outages >= 1,
            "four cloud phases": len(report.cloud_phases) >= 4,
            "the service syncing while running": report.synced_by_service > 0,
            "a batch run to the end": any(b.finished for b in report.batches),
        }

    await run_until_exercised(tmp_path, speech_dir, models_dir, exercises, minutes=MINUTES)


def test_libfaketime_steps_the_wall_clock_and_not_the_monotonic_one(tmp_path: Path) -> None:
    # The mechanism of the clock-step mode: a Python process under libfaketime sees each
    # step of its timestamp file in time.time() at once, and time.monotonic() untouched.
    for step in probe_steps(tmp_path):
        assert abs(step["wall_step_s"] - step["expected_s"]) < 1.0, step
        assert abs(step["monotonic_step_s"]) < 1.0, step


@pytest.mark.timeout(600)
async def test_chaos_clock_steps_mid_turn_nothing_lost_nothing_behind_its_revision(
    tmp_path: Path, speech_dir: Path, models_dir: Path
) -> None:
    def exercises(report: ChaosReport) -> dict[str, bool]:
        # Whether a refusal names a capture ("capture X not synced: ... clock") or stops a
        # pass before any upload ("sync pass skipped") depends on which call meets it first:
        # the store's own count is the exercise check.
        return {
            "a clock step during a turn": report.steps_in_turn >= 1,
            "a capture kept under a stepped clock": report.stamped_off >= 1,
            "the store refusing the clock": sum(report.store_refused.values()) >= 1,
            "a SIGKILL": report.kills >= 1,
            "a batch run to the end": any(b.finished for b in report.batches),
        }

    await run_until_exercised(
        tmp_path,
        speech_dir,
        models_dir,
        exercises,
        clock_steps=True,
        kill_probability=0.4,  # fewer kills: more turns for the steps to land in
    )


@pytest.mark.timeout(600)
async def test_chaos_two_syncers_under_a_quota_and_kills_between_revisions(
    tmp_path: Path, speech_dir: Path, models_dir: Path
) -> None:
    def exercises(report: ChaosReport) -> dict[str, bool]:
        evictors = {e.process.split(" #")[0] for e in report.evicted.values()}
        kills = report.kills_between_revisions()
        return {
            "both processes evicting": {"service", "sync"} <= evictors,
            "a second syncer SIGKILLed": any(p.killed for p in report.syncer_runs),
            "a second syncer stopped": any(p.terminated for p in report.syncer_runs),
            "a kill mid-turn": kills[MID_TURN] >= 1,
            "a kill with S3 behind": kills["newest revision newer than the one in S3"] >= 1,
        }

    report = await run_until_exercised(
        tmp_path,
        speech_dir,
        models_dir,
        exercises,
        second_syncer="mixed",
        quota_mb=10,  # the smallest allowed
        ballast_mb=8,  # other data: 8 MB growing to 8.8 MB and cut back, again and again
        ballast_growth_kb_s=50,
        ballast_max_mb=8.8,
        revision_kills=True,
    )
    assert all(e.exact for e in report.events if e.evictions), report.summary()


def test_an_eviction_is_not_blamed_for_the_ballast_cut_while_it_ran() -> None:
    # The lines of the eviction seen in a run: the ballast was cut back by 0.8 MB between
    # the keeper's two measurements, so "used now" fell by more than the capture it evicted.
    log = EvictionLog("service #4")
    log.scan(10.0, "making room: 10422960 bytes used + 195827 needed > 10485760 quota: evicting")
    log.scan(
        10.1,
        "evicted synced capture 20261207T221000123Z-0a1b2c3d (236611 bytes, created "
        "2026-12-07T22:10:00Z) to stay within 10485760; it is in S3",
    )
    log.scan(10.2, "made room: evicted 1 captures (236611 bytes) for 195827 needed: "
             "9368568 bytes used now")  # fmt: skip
    [event] = log.exact_events()
    assert over_evicted([event])  # taken alone, 0.8 MB more than it needed went
    cut = [(10.05, 838860)]
    event.freed_by_others = cut_during(event, cut)
    assert event.freed_by_others == 838860 and not over_evicted([event])
    event.freed_by_others = cut_during(event, [(11.0, 838860)])  # a cut after it: no excuse
    assert over_evicted([event])
