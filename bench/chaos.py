"""Chaos, long form: the same driver as tests/test_chaos.py, for many more interactions.

The real service (`heimdall-edge run --simulate --fast`, voice mode, real recordings)
is SIGKILLed and restarted at seeded random points while the fake cloud flaps
(down, slow or hung, 429, 5xx, garbage, healthy) and the S3/DynamoDB store (moto)
goes up and down. Then the store comes back, `sync --once` drains, and every check
of the short test runs (see tests/chaos_driver.py). Prints one line per service
process while it runs, then the summary table, and any failure with the logs'
folder (kept on failure, or with --keep; otherwise everything goes: nothing is
written into the repo).

Usage: python -m bench.chaos [--interactions 300] [--minutes 20] [--seed N]
       [--kill-probability 0.6] [--mode plain|clock|syncers] [--keep] [--quiet]

`--interactions`: turns to run (captures kept); `--minutes`: stop starting new
service processes after this long, whichever comes first. Exit status 1 if a
check failed (the figures are printed either way).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.latency import machine
from heimdall_edge.testing.data import shared_dir
from tests.chaos_driver import Chaos, ChaosConfig


def shared(env: str, name: str) -> Path:
    try:
        return shared_dir(env, name)
    except FileNotFoundError as exc:
        sys.exit(str(exc))


MODES: dict[str, dict[str, object]] = {
    "plain": {},
    "clock": {"clock_steps": True},
    "syncers": {
        "second_syncer": "mixed",
        "quota_mb": 10,
        "ballast_mb": 8,
        "ballast_growth_kb_s": 50,
        "ballast_max_mb": 8.8,
        "revision_kills": True,
    },
}
"""The same settings as the short tests' modes (tests/test_chaos.py)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=int, default=300)
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--kill-probability", type=float, default=0.6)
    parser.add_argument("--mode", choices=sorted(MODES), default="plain")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder (state, logs).")
    parser.add_argument("--quiet", action="store_true", help="No line per service process.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="heimdall-chaos-"))
    config = ChaosConfig(
        work_dir=work,
        speech_dir=shared("HEIMDALL_SPEECH_DIR", "speech"),
        models_dir=shared("HEIMDALL_MODELS_DIR", "models"),
        interactions=args.interactions,
        minutes=args.minutes,
        seed=args.seed,
        kill_probability=args.kill_probability,
        batch_size=(3, 10),
        batch_timeout_s=300.0,
        log=None if args.quiet else lambda line: print(line, flush=True),
        **MODES[args.mode],
    )
    print(f"machine: {machine()}")
    print(
        f"chaos ({args.mode}): {args.interactions} interactions"
        + (f", at most {args.minutes:g} minutes" if args.minutes else "")
        + f", seed {args.seed}, work folder {work}\n",
        flush=True,
    )
    failed = True
    try:
        report = asyncio.run(Chaos(config).run())
        failed = bool(report.failures)
        print(f"\n## Chaos ({args.mode}): seed {args.seed}\n")
        print(report.table())
        if failed:
            print("\n" + report.summary())
    finally:
        if failed or args.keep:
            print(f"\nwork folder kept: {work} (logs/batch-NNN.log: each process's stderr)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
