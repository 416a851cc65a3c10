"""A real crash test: SIGKILL a process that is writing captures, again and again.

The writer prints a line only after create(), update() or add_file() returned, so
every printed line is a promise. After each kill the next writer opens the spool
(and so repairs it, sometimes itself killed half-way through); at the end every
promise must hold and nothing partial may remain anywhere.

A SIGKILL tests the order of renames and the repairs, not fsync: the page cache
survives a killed process. Power cuts need the hardware.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from heimdall_edge.spool.record import CaptureRecord
from heimdall_edge.spool.store import Spool

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 22
SEED = 20261126
# How many times slower than a desktop this machine runs everything (scripts/pi-check
# sets 10 under emulation): each writer gets that much longer before its kill, so it
# gets as far, and the whole run that much longer.
SLOWDOWN = float(os.environ.get("HEIMDALL_TEST_SLOWDOWN", "1"))

WRITER = r"""
import hashlib, random, sys
from heimdall_edge.spool.store import Spool

def sha(data):
    return hashlib.sha256(data).hexdigest()

root, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
spool = Spool(root)
print("READY", flush=True)
while True:
    audio = rng.randbytes(rng.randint(1, 200_000))
    frames = [rng.randbytes(rng.randint(1, 200_000)) for _ in range(rng.randint(0, 3))]
    record = spool.create(
        device_id="crash-test", trigger=rng.choice(["button", "voice"]), audio_wav=audio, frames=frames
    )
    print("CREATED", record.capture_id, sha(audio), ",".join(map(sha, frames)), flush=True)
    roll = rng.random()
    if roll < 0.35:
        spool.update(
            record.capture_id, transcript="said " + record.capture_id, status="complete",
            sync_state="synced", timings_ms={"stt": rng.random() * 1000}, engines={"stt": "test"},
        )
        print("UPDATED", record.capture_id, flush=True)
    elif roll < 0.65:
        reply = rng.randbytes(rng.randint(1, 200_000))
        spool.add_file(record.capture_id, "reply.wav", reply)
        print("ADDED", record.capture_id, sha(reply), flush=True)
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_and_kill(root: Path, seed: int, delay_s: float, after_ready: bool) -> list[str]:
    """Start a writer, SIGKILL it `delay_s` after it started (or after it opened the spool)."""
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(seed)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        if after_ready:
            assert writer.stdout is not None
            ready = writer.stdout.readline()
            assert ready == b"READY\n", (ready, writer.stderr.read() if writer.stderr else b"")
        time.sleep(delay_s)
        writer.send_signal(signal.SIGKILL)
        out, err = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == -signal.SIGKILL, f"the writer stopped on its own:\n{err.decode()}"
    # A line cut short by the kill is no promise; whole lines are.
    return [line for line in out.decode().split("\n")[:-1] if line != "READY"]


def test_acknowledged_captures_survive_sigkill(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    rng = random.Random(SEED)
    created: dict[str, tuple[str, list[str]]] = {}
    updated: set[str] = set()
    added: dict[str, str] = {}
    started = time.monotonic()
    for n in range(ROUNDS):
        # Every fourth kill lands during start-up, often in the middle of a repair.
        after_ready = n % 4 != 3
        delay = rng.uniform(0.02, 0.3) if after_ready else rng.uniform(0.0, 0.25)
        for line in run_and_kill(root, rng.randrange(2**32), delay * SLOWDOWN, after_ready):
            kind, capture_id, *rest = line.split(" ")
            if kind == "CREATED":
                created[capture_id] = (rest[0], rest[1].split(",") if rest[1] else [])
            elif kind == "UPDATED":
                updated.add(capture_id)
            else:
                assert kind == "ADDED", line
                added[capture_id] = rest[0]
    assert len(created) >= 30, "too few captures were acknowledged for the test to mean much"
    assert updated and added

    with Spool(root) as spool:
        assert spool.recovered.quarantined == 0, spool.recovered
        assert not spool.recovered.index_rebuilt
        assert list((root / "tmp").iterdir()) == []
        assert list((root / "quarantine").iterdir()) == []
        folders = {p.name for p in (root / "captures").iterdir()}
        indexed = {r.capture_id for r in spool.list()}
        assert folders == indexed, "index and capture folders disagree"
        assert created.keys() <= folders, f"lost: {sorted(created.keys() - folders)}"
        assert sum(spool.counts().values()) == len(folders)

        for capture_id in sorted(folders):
            folder = root / "captures" / capture_id
            record = CaptureRecord.from_dict(json.loads((folder / "capture.json").read_text()))
            assert spool.get(capture_id) == record
            assert {p.name for p in folder.iterdir()} == set(record.files) | {"capture.json"}
            for name, info in record.files.items():
                data = (folder / name).read_bytes()
                assert (len(data), sha(data)) == (info["bytes"], info["sha256"]), (
                    f"{capture_id}/{name}"
                )
            if capture_id in created:
                audio_sha, frame_shas = created[capture_id]
                assert record.files["audio.wav"]["sha256"] == audio_sha
                frames = sorted(name for name in record.files if name.startswith("frame-"))
                assert [record.files[name]["sha256"] for name in frames] == frame_shas
            if capture_id in updated:
                assert record.transcript == "said " + capture_id
                assert (record.status, record.sync_state) == ("complete", "synced")
            if capture_id in added:
                assert record.files["reply.wav"]["sha256"] == added[capture_id]
    assert time.monotonic() - started < 30 * SLOWDOWN
