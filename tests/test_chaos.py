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

On failure the message carries the whole summary (interactions, kills, captures,
fault timeline). `HEIMDALL_CHAOS_SEED=N` replays another schedule; each process's
stderr is kept under the test's tmp_path (chaos/logs/).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from chaos_driver import Chaos, ChaosConfig

INTERACTIONS = 40
MINUTES = 0.75  # no new service process after this, so the test stays well under 90 s
SEED = int(os.environ.get("HEIMDALL_CHAOS_SEED", "20261127"))


@pytest.mark.timeout(240)
async def test_chaos_no_capture_lost_every_turn_answered_every_capture_synced_once(
    tmp_path: Path, speech_dir: Path, models_dir: Path
) -> None:
    config = ChaosConfig(
        work_dir=tmp_path / "chaos",
        speech_dir=speech_dir,
        models_dir=models_dir,
        interactions=INTERACTIONS,
        minutes=MINUTES,
        seed=SEED,
    )
    report = await asyncio.wait_for(Chaos(config).run(), timeout=200)
    summary = report.summary()
    print(summary)  # shown with -s, and in the assertion message on failure
    assert not report.failures, summary
    # The run must have exercised what it claims to.
    assert report.kills >= 2, summary
    assert report.store_outages >= 1, summary
    assert len(report.cloud_phases) >= 4, summary
    assert report.synced_by_service > 0, "the service never synced while running\n" + summary
