"""Start-up with a full spool: `run --simulate` to READY=1 with a 2 GB unsynced backlog.

Against, in the same run: the same start-up with an empty spool, and what start-up
used to do before READY (read and hash every unsynced capture, as Spool.verify does),
timed over the same backlog. The page cache is dropped before each measured run when
this process may (root), since a Pi reads its SD card, not RAM; the output says which.

Usage: python -m bench.backlog [--gb 2] [--runs 3]
(HEIMDALL_MODELS_DIR defaults to ../shared/models.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from bench.latency import time_to_ready
from heimdall_edge.spool.store import Spool

REPO = Path(__file__).resolve().parents[1]

CAPTURE_MB = 8
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def fill(state: Path, gigabytes: float) -> int:
    """An unsynced backlog of `gigabytes` in `state`'s spool; the number of captures."""
    count = round(gigabytes * 1024 / CAPTURE_MB)
    audio = os.urandom(CAPTURE_MB * 1024 * 1024)
    with Spool(state / "spool") as spool:
        for _ in tqdm(range(count), desc="backlog", unit="capture"):
            spool.create(device_id="bench", trigger="button", audio_wav=audio, frames=[])
    return count


def drop_caches() -> bool:
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def hash_everything(state: Path) -> float:
    """What start-up did before: every unsynced capture read and checked against its SHA-256."""
    with Spool(state / "spool") as spool:
        started = time.perf_counter()
        for record in spool.list(sync_state="pending"):
            assert spool.verify(record.capture_id) == []
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="backlog size (default 2)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs per figure")
    args = parser.parse_args()
    os.environ.setdefault("HEIMDALL_MODELS_DIR", str(REPO.parent / "shared" / "models"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("HEIMDALL_S3_BUCKET", None)  # sync off: start-up alone
    with tempfile.TemporaryDirectory(prefix="heimdall-backlog-", dir=REPO) as tmp:
        empty, full = Path(tmp) / "empty", Path(tmp) / "full"
        empty.mkdir()
        count = fill(full, args.gb)
        time_to_ready(empty)  # warm-up: imports and models in the page cache
        cold = drop_caches()
        figures: dict[str, list[float]] = {"empty": [], "full": [], "hash": []}
        for _ in range(args.runs):
            for name, measure in (
                ("empty", lambda: time_to_ready(empty)),
                ("full", lambda: time_to_ready(full)),
                ("hash", lambda: hash_everything(full)),
            ):
                drop_caches()
                figures[name].append(measure())
    med = {name: statistics.median(values) for name, values in figures.items()}
    print(f"backlog: {count} unsynced captures of {CAPTURE_MB} MB ({args.gb:g} GB); "
          f"median of {args.runs} runs; page cache dropped before each: {'yes' if cold else 'no'}")  # fmt: skip
    print("| | seconds (median) | min–max |")
    print("|---|---:|---:|")
    for name, label in (
        ("empty", "`run --simulate` to READY=1, empty spool (baseline)"),
        ("full", "`run --simulate` to READY=1, 2 GB backlog"),
        ("hash", "reading and hashing the backlog (what start-up did before READY)"),
    ):
        values = figures[name]
        print(f"| {label} | {med[name]:.2f} | {min(values):.2f}–{max(values):.2f} |")
    print(f"\nREADY with the backlog / empty: {med['full'] / med['empty']:.2f}×; "
          f"the old hash alone / empty start-up: {med['hash'] / med['empty']:.2f}×")  # fmt: skip


if __name__ == "__main__":
    main()
