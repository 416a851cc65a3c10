"""Store-and-forward throughput, memory, reconnect and crash-resume, against moto on loopback.

Prints, each beside a baseline measured in the same run:
  1. syncing N captures with `heimdall-edge sync --once` (a real process): captures/s,
     MB/s and peak RSS; baseline: plain boto3 put_object of the same bytes, same
     concurrency, no checks (what the network and moto allow);
  2. connectivity back -> first upload, for the service's syncer waiting offline;
  3. resume after a crash: SIGKILL `sync --once` part-way, then time the rerun.

Usage: python -m bench.sync [--captures 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psutil

from bench.latency import machine
from heimdall_edge.testing.moto import DEFAULT_REGION, MotoServer, aws_test_env

BUCKET, TABLE = "heimdall-bench", "heimdall-bench-index"


def make_spool(root: Path, count: int) -> int:
    """A spool of `count` captures (2 s of audio and one ~40 KB frame each); returns the bytes."""
    from heimdall_edge.audio import noise, wav_bytes
    from heimdall_edge.spool.store import Spool

    rng = np.random.default_rng(0)
    total = 0
    start = datetime.now(UTC) - timedelta(hours=1)
    with Spool(root) as spool:
        for i in range(count):
            audio = wav_bytes(noise(2000, -30, seed=i), 16000)
            frame = rng.bytes(40_000)
            record = spool.create(
                device_id="bench-pi", trigger="button", audio_wav=audio, frames=[frame],
                created_at=start + timedelta(milliseconds=i),
            )  # fmt: skip
            spool.update(record.capture_id, status="complete", transcript="bench", reply="ok")
            total += len(audio) + len(frame)
    return total


def env_for(server: MotoServer, state: Path) -> dict[str, str]:
    return {
        **os.environ,
        **aws_test_env(),
        "HEIMDALL_STATE_DIR": str(state),
        "HEIMDALL_DEVICE_ID": "bench-pi",
        "HEIMDALL_S3_BUCKET": BUCKET,
        "HEIMDALL_DYNAMODB_TABLE": TABLE,
        "HEIMDALL_S3_ENDPOINT_URL": server.url,
        "HEIMDALL_DYNAMODB_ENDPOINT_URL": server.url,
        "HEIMDALL_SYNC__REGION": DEFAULT_REGION,
        "HEIMDALL_SYNC__RETENTION_DAYS": "30",
    }


def timed_sync(env: dict[str, str]) -> tuple[float, float, float]:
    """Seconds, peak RSS (MiB) and CPU seconds (user + system, sampled every 20 ms) of one `sync --once` process."""
    started = time.perf_counter()
    process = psutil.Popen(
        [sys.executable, "-m", "heimdall_edge.cli", "sync", "--once", "--json"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    peak, cpu = 0, 0.0
    while process.poll() is None:
        try:
            with process.oneshot():
                peak = max(peak, process.memory_info().rss)
                times = process.cpu_times()
                cpu = times.user + times.system
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    if process.returncode != 0:
        raise RuntimeError(f"sync --once exited {process.returncode}")
    return time.perf_counter() - started, peak / 1024**2, cpu


def baseline_put(server: MotoServer, spool_dir: Path) -> float:
    """Plain boto3: every file put once, two threads, no conditions, checksums or index."""
    s3 = server.client("s3")
    files = sorted(
        p for p in (spool_dir / "captures").rglob("*") if p.is_file() and p.suffix != ".json"
    )
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(
            pool.map(
                lambda p: s3.put_object(
                    Bucket=BUCKET, Key=f"baseline/{p.parent.name}/{p.name}", Body=p.read_bytes()
                ),
                files,
            )
        )
    return time.perf_counter() - started


def fresh_store(server: MotoServer) -> None:
    server.reset()
    server.create_bucket(BUCKET)
    server.create_table(TABLE)


async def reconnect_latency(server: MotoServer, state: Path) -> float:
    """The service's syncer waits offline; the store (and the network) come back: time to first upload."""
    from heimdall_edge.app import builders
    from heimdall_edge.cloud.errors import ErrorKind
    from heimdall_edge.settings import load_settings

    settings = load_settings()
    spool = builders.open_spool(settings)
    syncer = builders.build_syncer(settings, spool)
    connectivity = syncer.connectivity  # the store's own, probing its endpoint; run() runs it
    assert connectivity is not None
    connectivity.probe_interval_s = connectivity.max_probe_interval_s = 0.1
    server.stop()
    connectivity.record_failure(ErrorKind.CONNECTION)
    connectivity.record_failure(ErrorKind.CONNECTION)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(syncer.run(stop))]
    await asyncio.sleep(1.0)
    s3 = server.client("s3")
    server.start()
    back = time.perf_counter()
    while not s3.list_objects_v2(Bucket=BUCKET, Prefix="captures/").get("KeyCount"):
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - back
    stop.set()
    for task in tasks:
        task.cancel()
    spool.close()
    return elapsed


def measure(captures: int = 1000, runs: int = 3) -> dict:
    """Every figure above, measured; returns a dict of raw values (seconds, MiB, counts).

    Keys: captures, bytes, sync_s / peak_rss_mib / cpu_s / baseline_s (one value per run),
    reconnect_s (per run), resume_s, full_sync_median_s, items_after_resume.
    Sets AWS test credentials and HEIMDALL_* variables in os.environ: callers that go on
    afterwards should restore the environment.
    """
    work = Path(tempfile.mkdtemp(prefix="heimdall-sync-bench-"))
    os.environ.update(aws_test_env())
    with MotoServer() as server:
        template = work / "template"
        size = make_spool(template / "spool", captures)
        throughput, peaks, cpus, baselines = [], [], [], []
        for run in range(runs):
            state = work / f"run-{run}"
            subprocess.run(["cp", "-a", str(template), str(state)], check=True)
            fresh_store(server)
            seconds, peak, cpu = timed_sync(env_for(server, state))
            throughput.append(seconds)
            peaks.append(peak)
            cpus.append(cpu)
            baselines.append(baseline_put(server, state / "spool"))
        sync_s = statistics.median(throughput)

        reconnects = []
        for run in range(runs):
            state = work / f"reconnect-{run}"
            subprocess.run(["cp", "-a", str(template), str(state)], check=True)
            fresh_store(server)
            os.environ.update(env_for(server, state))
            reconnects.append(asyncio.run(reconnect_latency(server, state)))

        state = work / "crash"
        subprocess.run(["cp", "-a", str(template), str(state)], check=True)
        fresh_store(server)
        env = env_for(server, state)
        victim = subprocess.Popen(
            [sys.executable, "-m", "heimdall_edge.cli", "sync", "--once"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(sync_s / 2)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        resumed, _, _ = timed_sync(env)
        items = server.client("dynamodb").scan(TableName=TABLE, Select="COUNT")["Count"]
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return {
        "captures": captures,
        "bytes": size,
        "sync_s": throughput,
        "peak_rss_mib": peaks,
        "cpu_s": cpus,
        "baseline_s": baselines,
        "reconnect_s": reconnects,
        "resume_s": resumed,
        "full_sync_median_s": sync_s,
        "items_after_resume": items,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captures", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    m = measure(args.captures, args.runs)
    sync_s, base_s = statistics.median(m["sync_s"]), statistics.median(m["baseline_s"])
    mb = m["bytes"] / 1e6
    print(f"machine: {machine()}")
    print(
        f"\n## Sync {args.captures} captures ({mb:.0f} MB) to moto on loopback, median of {args.runs}\n"
    )
    print("| | seconds | captures/s | MB/s | peak RSS |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| `sync --once` (S3 + DynamoDB, SSE, checksums, conditional writes) | {sync_s:.1f} | {args.captures / sync_s:.0f} | {mb / sync_s:.1f} | {statistics.median(m['peak_rss_mib']):.0f} MiB |"
    )
    print(
        f"| baseline: plain boto3 put_object, same files, 2 threads | {base_s:.1f} | {args.captures / base_s:.0f} | {mb / base_s:.1f} | |"
    )
    print(f"| ratio | {sync_s / base_s:.2f}x | | | |")
    reconnects = m["reconnect_s"]
    print(
        f"\nconnectivity back -> first object uploaded: median {statistics.median(reconnects) * 1000:.0f} ms "
        f"(min {min(reconnects) * 1000:.0f}, max {max(reconnects) * 1000:.0f}; probe every 100 ms)"
    )
    print(
        f"\nresume after SIGKILL half-way: rerun took {m['resume_s']:.1f} s "
        f"({m['resume_s'] / sync_s:.2f}x a full sync); DynamoDB items afterwards: {m['items_after_resume']} for {args.captures} captures"
    )


if __name__ == "__main__":
    main()
