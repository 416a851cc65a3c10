"""The chaos driver: the real service, killed and restarted, while the cloud and the store flap.

Shared by `tests/test_chaos.py` (short form, in CI) and `bench/chaos.py` (long form):

    report = await Chaos(ChaosConfig(work_dir=..., speech_dir=..., models_dir=...)).run()
    assert not report.failures, report.summary()

What it does:

* a `FakeCloud` (OpenAI + ElevenLabs over real HTTP on loopback) whose faults a
  background thread changes at seeded random intervals: healthy, down (connections
  refused), slow (latency past the hedge delay, or a hang), 429 (with Retry-After),
  500/502/503, garbage (malformed or truncated bodies); on all routes or some;
* a `MotoServer` (S3 + DynamoDB) that another thread stops and starts (same port,
  same data); the bucket is versioned, so an object written twice would show;
* `heimdall-edge run --simulate --fast` as real processes, in voice mode, each given a
  batch of real recordings from the shared speech folder; some are SIGKILLed at a
  seeded random point (during start-up, while listening, mid-turn, mid-sync) and the
  next batch starts a new process on the same state dir;
* then, with the store up and the cloud healthy, `heimdall-edge sync --once` drains
  what is left, and the checks run (see `Chaos.check`): every turn of a batch that
  was not killed produced a capture and was answered aloud (reply.wav), no capture
  that reached the spool is ever lost, every capture is in S3 exactly once (one
  version per key) and in DynamoDB exactly once, nothing orphaned, the spool
  consistent, and every process that was not killed exited 0.

A capture whose turn a SIGKILL cut short is on disk (acknowledged) but was never
answered: it keeps status "captured" and has no reply.wav. Its lease names the
killed process, so the final `sync --once` must take it at once, as it is: a capture
that drain leaves waiting is a failure.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
import json
import os
import random
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moto_server import AWS_ENV_TO_UNSET, DEFAULT_REGION, MotoServer, aws_test_env

from heimdall_edge.backfill import CUT_SHORT
from heimdall_edge.fakecloud import ROUTES, FakeCloud, Fault

BUCKET = "heimdall-chaos"
TABLE = "heimdall-chaos-index"
DEVICE = "chaos-pi"
CLOUD_MODES = ("healthy", "down", "slow", "429", "500", "garbage")

CAPTURE_LINE = re.compile(r"heimdall_edge\.appliance: capture (\d{8}T\d{9}Z-[0-9a-f]{8}): ")
SYNCED_LINE = re.compile(r"synced capture (\d{8}T\d{9}Z-[0-9a-f]{8}):")
READY_LINE = "ready: listening"
REPAIRED_LINE = re.compile(r"spool .* repaired: ")
TURN_FAILED = "turn failed; the loop carries on"
# Lines that mean something went wrong beyond what the chaos explains.
ALARMS = (TURN_FAILED, "quarantined capture", "is damaged", "Traceback (most recent call last)")


@dataclass
class ChaosConfig:
    work_dir: Path
    """Scratch folder: the state dir (spool, voice cache) and nothing else go here."""
    speech_dir: Path
    models_dir: Path
    interactions: int = 30
    """Turns to run: batches go on until this many captures were kept (recordings played
    to a process that was killed before keeping them do not count)."""
    minutes: float | None = None
    """Also stop starting new batches after this long (None: no time limit)."""
    seed: int = 20261127
    batch_size: tuple[int, int] = (2, 6)
    kill_probability: float = 0.6
    """Chance that a batch's process is SIGKILLed at a random point."""
    cloud_phase_s: tuple[float, float] = (0.3, 2.5)
    store_up_s: tuple[float, float] = (0.5, 4.0)
    store_down_s: tuple[float, float] = (0.3, 2.5)
    batch_timeout_s: float = 120.0
    """A batch process still running after this is hung: a failure (and it is killed)."""
    drain_timeout_s: float = 180.0
    log: Any = None
    """A callable(str) for progress lines (the bench prints them); None: quiet."""


@dataclass
class Batch:
    index: int
    inputs: list[str]
    kill_plan: str
    """"none", "startup +0.4s" or "after turn 2 +0.3s": when the SIGKILL was planned."""
    started_wall: float = 0.0
    ended_wall: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None
    killed: bool = False
    hung: bool = False
    ready: bool = False
    kept: int = 0
    """Captures that reached the spool while this process ran."""
    logged: list[str] = field(default_factory=list)
    """Capture ids in order of their "capture <id>: ..." log lines (answered turns)."""
    synced_by_service: set[str] = field(default_factory=set)
    resumed_syncs: int = 0
    """Syncs that found some of their writes already done (an earlier attempt was cut off)."""
    repairs: list[str] = field(default_factory=list)
    """The spool's "repaired: ..." lines at start-up (what an earlier kill left behind)."""
    alarms: list[str] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    stderr_tail: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return not self.killed and not self.hung


@dataclass
class ChaosReport:
    config: ChaosConfig
    batches: list[Batch] = field(default_factory=list)
    cloud_phases: collections.Counter[str] = field(default_factory=collections.Counter)
    cloud_requests: collections.Counter[str] = field(default_factory=collections.Counter)
    store_outages: int = 0
    store_down_s: float = 0.0
    seconds: float = 0.0
    captures: int = 0
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    engines: collections.Counter[str] = field(default_factory=collections.Counter)
    interrupted: list[str] = field(default_factory=list)
    """Captures kept whose turn a SIGKILL cut short (status "captured", no reply.wav)."""
    not_reached: int = 0
    """Recordings given to a killed process that it never kept: at most one was being captured
    at the kill (unacknowledged, so nothing promised was lost); the rest were never played."""
    synced_by_service: int = 0
    drain: dict[str, Any] | None = None
    s3_objects: int = 0
    ddb_items: int = 0
    acknowledged_seen: int = 0
    failures: list[str] = field(default_factory=list)

    # -- figures -------------------------------------------------------------------------------

    @property
    def given(self) -> int:
        return sum(len(b.inputs) for b in self.batches)

    @property
    def kills(self) -> int:
        return sum(b.killed for b in self.batches)

    def exits(self) -> collections.Counter[str]:
        out: collections.Counter[str] = collections.Counter()
        for b in self.batches:
            if b.returncode is None:
                out["none"] += 1
            elif b.returncode < 0:
                out[f"signal {signal.Signals(-b.returncode).name}"] += 1
            else:
                out[f"code {b.returncode}"] += 1
        return out

    def rows(self) -> list[tuple[str, str]]:
        answered = sum(len(b.logged) for b in self.batches)
        errors: collections.Counter[str] = collections.Counter()
        for b in self.batches:
            errors.update(b.errors)
        drained = (self.drain or {}).get("synced", "?")
        rows = [
            ("seed", str(self.config.seed)),
            ("wall time", f"{self.seconds:.1f} s"),
            ("service processes (batches)", str(len(self.batches))),
            ("SIGKILLs", str(self.kills)),
            ("exits", ", ".join(f"{k}: {v}" for k, v in sorted(self.exits().items()))),
            ("recordings given to service processes", str(self.given)),
            ("captures kept", str(self.captures)),
            ("  answered aloud (log line + reply.wav)", str(answered)),
            ("  kept, turn cut by SIGKILL (unanswered)", str(len(self.interrupted))),
            ("recordings not reached (process killed first)", str(self.not_reached)),
            ("statuses", _fmt(self.statuses)),
            ("engines used", _fmt(self.engines)),
            ("acknowledged captures seen during the run", str(self.acknowledged_seen)),
            ("synced by the service while running", str(self.synced_by_service)),
            (
                "  of which resumed an interrupted upload",
                str(sum(b.resumed_syncs for b in self.batches)),
            ),
            ("synced by the final drain", str(drained)),
            ("S3 objects / DynamoDB items", f"{self.s3_objects} / {self.ddb_items}"),
            ("cloud phases", _fmt(self.cloud_phases)),
            ("cloud requests", _fmt(self.cloud_requests)),
            ("store outages", f"{self.store_outages} ({self.store_down_s:.1f} s down)"),
            ("spool repairs at start-up", str(sum(len(b.repairs) for b in self.batches))),
            ("service ERROR lines", _fmt(errors) if errors else "0"),
            ("failures", str(len(self.failures))),
        ]
        return rows

    def summary(self) -> str:
        width = max(len(name) for name, _ in self.rows())
        lines = ["chaos run:"] + [f"  {name:<{width}}  {value}" for name, value in self.rows()]
        lines.append("  batches:")
        for b in self.batches:
            outcome = "hung" if b.hung else "killed" if b.killed else f"exit {b.returncode}"
            lines.append(
                f"    #{b.index:<3} {len(b.inputs)} inputs, {b.kept} kept, {len(b.logged)} answered, "
                f"{b.seconds:5.1f} s, {outcome:8} kill plan: {b.kill_plan}"
            )
        if self.failures:
            lines.append("  FAILURES:")
            lines += [f"    - {f}" for f in self.failures]
        return "\n".join(lines)

    def table(self) -> str:
        """Markdown, for the bench."""
        lines = ["| measure | value |", "|---|---:|"]
        lines += [f"| {name.strip()} | {value} |" for name, value in self.rows()]
        return "\n".join(lines)


def _fmt(counter: collections.Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "-"


# --- the flapping outside world -------------------------------------------------------------


class CloudFlapper:
    """A thread that changes what the fake cloud does at seeded random intervals."""

    def __init__(self, cloud: FakeCloud, rng: random.Random, phase_s: tuple[float, float]):
        self.cloud = cloud
        self.rng = rng
        self.phase_s = phase_s
        self.phases: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()
        self.timeline: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-cloud", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.healthy()
        self._trim()

    def healthy(self) -> None:
        self.cloud.clear_faults()
        self.cloud.accept_connections()

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            mode = self.rng.choice(CLOUD_MODES)
            routes = list(ROUTES)
            if mode not in ("healthy", "down") and self.rng.random() < 0.3:
                routes = self.rng.sample(routes, self.rng.randint(1, len(routes) - 1))
            self._apply(mode, routes)
            self.phases[mode] += 1
            self.timeline.append((time.monotonic() - started, mode))
            self._trim()
            self._stop.wait(self.rng.uniform(*self.phase_s))

    def _apply(self, mode: str, routes: list[str]) -> None:
        cloud, rng = self.cloud, self.rng
        cloud.clear_faults()
        if mode == "down":
            cloud.refuse_connections()
            return
        cloud.accept_connections()
        for route in routes:
            if mode == "slow":
                fault = (
                    Fault(hang=True)
                    if rng.random() < 0.25
                    else Fault(latency_s=rng.uniform(0.2, 1.5))
                )
            elif mode == "429":
                fault = Fault(status=429, retry_after_s=rng.choice((0.1, 0.5, 1.0, 5.0)))
            elif mode == "500":
                fault = Fault(status=rng.choice((500, 502, 503)))
            elif mode == "garbage":
                fault = Fault(malformed=True) if rng.random() < 0.5 else Fault(truncate=True)
            else:
                continue
            cloud.fault(route, fault)  # type: ignore[arg-type]

    def _trim(self) -> None:
        """Count and forget recorded requests (uploaded audio would pile up in a long run)."""
        for route in ROUTES:
            recorded = self.cloud.requests[route]
            n = len(recorded)
            self.requests[route] += n
            del recorded[:n]


class StoreFlapper:
    """A thread that stops and starts the moto server (same port, same data)."""

    def __init__(
        self,
        server: MotoServer,
        rng: random.Random,
        up_s: tuple[float, float],
        down_s: tuple[float, float],
    ):
        self.server = server
        self.rng = rng
        self.up_s, self.down_s = up_s, down_s
        self.outages = 0
        self.down_total_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-store", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        self.server.start()  # up for the drain and the checks

    def _run(self) -> None:
        while not self._stop.wait(self.rng.uniform(*self.up_s)):
            self.server.stop()
            self.outages += 1
            went_down = time.monotonic()
            self._stop.wait(self.rng.uniform(*self.down_s))
            self.server.start()
            self.down_total_s += time.monotonic() - went_down


# --- the driver --------------------------------------------------------------------------------


class Chaos:
    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.state_dir = config.work_dir / "state"
        self.spool_dir = self.state_dir / "spool"
        self.report = ChaosReport(config)
        self.recordings = self._recordings()
        self.acknowledged: set[str] = set()
        self.env: dict[str, str] = {}
        self._replies = itertools.count(1)

    def _log(self, text: str) -> None:
        if self.config.log is not None:
            self.config.log(text)

    def _recordings(self) -> list[Path]:
        tsv = self.config.speech_dir / "transcripts.tsv"
        names = [line.split("\t", 1)[0] for line in tsv.read_text().splitlines() if line.strip()]
        paths = [self.config.speech_dir / name for name in names]
        missing = [p for p in paths if not p.is_file()]
        if missing or not paths:
            raise FileNotFoundError(f"recordings listed in {tsv} are missing: {missing}")
        return paths

    async def run(self) -> ChaosReport:
        started = time.monotonic()
        cloud = FakeCloud(
            transcript=lambda record: f"chaos turn {record.received_at:.3f}",
            reply=self._cloud_reply,
        )
        server = MotoServer()
        cloud_flapper: CloudFlapper | None = None
        store_flapper: StoreFlapper | None = None
        try:
            cloud.start()
            server.start()
            server.reset()  # moto's state is per process: start from an empty store
            server.create_bucket(BUCKET)
            server.create_table(TABLE)
            server.client("s3").put_bucket_versioning(
                Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"}
            )
            self.env = self._child_env(cloud, server)
            cloud_flapper = CloudFlapper(
                cloud, random.Random(self.rng.random()), self.config.cloud_phase_s
            )
            store_flapper = StoreFlapper(
                server,
                random.Random(self.rng.random()),
                self.config.store_up_s,
                self.config.store_down_s,
            )
            cloud_flapper.start()
            store_flapper.start()
            await self._batches(started)
            store_flapper.stop()
            cloud_flapper.stop()
            self._snapshot()
            await self._drain()
            self.check(server)
        except Exception:  # noqa: BLE001
            # Reported with everything else (the caller prints the summary), not raised alone.
            self.report.failures.append("the driver failed:\n" + traceback.format_exc())
        finally:
            if store_flapper is not None:
                store_flapper.stop()
                self.report.store_outages = store_flapper.outages
                self.report.store_down_s = store_flapper.down_total_s
            if cloud_flapper is not None:
                cloud_flapper.stop()
                self.report.cloud_phases = cloud_flapper.phases
                self.report.cloud_requests = cloud_flapper.requests
            cloud.stop()
            server.stop()
            self.report.seconds = time.monotonic() - started
        return self.report

    def _cloud_reply(self, request: dict[str, Any]) -> str:
        # A different text each time, so speech really goes to ElevenLabs, not the voice cache.
        return f"Noted, number {next(self._replies)}. Anything else?"

    def _child_env(self, cloud: FakeCloud, server: MotoServer) -> dict[str, str]:
        drop = set(AWS_ENV_TO_UNSET) | {
            "OPENAI_API_KEY", "ELEVENLABS_API_KEY", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
        }  # fmt: skip
        env = {
            k: v for k, v in os.environ.items() if k not in drop and not k.startswith("HEIMDALL_")
        }
        env |= aws_test_env() | cloud.env()
        env |= {
            "HEIMDALL_STATE_DIR": str(self.state_dir),
            "HEIMDALL_MODELS_DIR": str(self.config.models_dir),
            "HF_HUB_OFFLINE": "1",
            "HEIMDALL_DEVICE_ID": DEVICE,
            "HEIMDALL_LISTENING__MODE": "voice",
            "HEIMDALL_LISTENING__WAKE_WORD": "",  # every recording is a command
            "HEIMDALL_S3_BUCKET": BUCKET,
            "HEIMDALL_DYNAMODB_TABLE": TABLE,
            "HEIMDALL_S3_ENDPOINT_URL": server.url,
            "HEIMDALL_DYNAMODB_ENDPOINT_URL": server.url,
            "HEIMDALL_SYNC__REGION": DEFAULT_REGION,
            "HEIMDALL_SYNC__RETENTION_DAYS": "30",  # keep synced captures, to check them
            "HEIMDALL_SYNC__INTERVAL_S": "1",
            "HEIMDALL_SYNC__RETRY_MAX_S": "2",
            "HEIMDALL_RESILIENCE__STT_HEDGE_AFTER_MS": "300",
            "HEIMDALL_RESILIENCE__REPLY_HEDGE_AFTER_MS": "300",
            "HEIMDALL_RESILIENCE__TTS_HEDGE_AFTER_MS": "300",
            "HEIMDALL_RESILIENCE__STT_DEADLINE_S": "2",
            "HEIMDALL_RESILIENCE__REPLY_DEADLINE_S": "2",
            "HEIMDALL_RESILIENCE__TTS_DEADLINE_S": "2",
            "HEIMDALL_RESILIENCE__RESET_S": "1",
            "HEIMDALL_RESILIENCE__PROBE_INTERVAL_S": "0.2",
        }
        return env

    # -- batches -------------------------------------------------------------------------------

    async def _batches(self, started: float) -> None:
        """Batch after batch until `interactions` captures were kept (or the time is up)."""
        config = self.config
        kept = given = index = 0
        while kept < config.interactions and given < 3 * config.interactions:
            if config.minutes is not None and time.monotonic() - started > config.minutes * 60:
                self._log(f"time is up after {kept} interactions")
                break
            size = min(self.rng.randint(*config.batch_size), config.interactions - kept)
            inputs = [str(p) for p in self.rng.choices(self.recordings, k=size)]
            if self.rng.random() < config.kill_probability:
                if self.rng.random() < 0.15:
                    plan = ("startup", 0, self.rng.uniform(0.0, 2.5))
                else:
                    plan = ("turn", self.rng.randrange(size), self.rng.uniform(0.0, 0.4))
            else:
                plan = ("none", 0, 0.0)
            batch = Batch(index, inputs, _plan_text(plan))
            self.report.batches.append(batch)
            before = len(self.acknowledged)
            await self._run_batch(batch, plan)
            self._snapshot()
            batch.kept = len(self.acknowledged) - before
            kept += batch.kept
            given += size
            index += 1
            self._log(
                f"batch {batch.index}: {len(inputs)} inputs, {batch.kept} kept, "
                f"{len(batch.logged)} answered, "
                f"{'killed' if batch.killed else f'exit {batch.returncode}'} "
                f"({batch.kill_plan}), {batch.seconds:.1f} s; {kept}/{config.interactions}"
            )

    async def _run_batch(self, batch: Batch, plan: tuple[str, int, float]) -> None:
        args = [sys.executable, "-m", "heimdall_edge.cli", "run", "--simulate", "--fast"]
        for path in batch.inputs:
            args += ["--input", path]
        batch.started_wall = time.time()
        t0 = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *args,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 20,
        )
        turn_done = asyncio.Condition()
        lines: list[str] = []

        async def read_stderr() -> None:
            assert process.stderr is not None
            while True:
                try:
                    line = await process.stderr.readline()
                except ValueError:  # a line over the limit: keep draining the pipe
                    line = await process.stderr.read(1 << 16) or b""
                if not line:
                    return
                text = line.decode(errors="replace").rstrip("\n")
                lines.append(text)
                self._scan(batch, text)
                if READY_LINE in text or CAPTURE_LINE.search(text):
                    async with turn_done:
                        turn_done.notify_all()

        async def watch_spool() -> None:
            while True:
                self._snapshot()
                await asyncio.sleep(0.1)

        async def kill_when_planned() -> None:
            kind, turns, delay = plan
            if kind == "none":
                return
            if kind == "turn":
                async with turn_done:
                    await turn_done.wait_for(lambda: batch.ready and len(batch.logged) >= turns)
            await asyncio.sleep(delay)
            if process.returncode is None:
                process.send_signal(signal.SIGKILL)
                batch.killed = True

        reader = asyncio.create_task(read_stderr())
        helpers = [asyncio.create_task(watch_spool()), asyncio.create_task(kill_when_planned())]
        try:
            try:
                await asyncio.wait_for(process.wait(), timeout=self.config.batch_timeout_s)
            except TimeoutError:
                batch.hung = True
            # the process is gone (or hung): let the reader take the last lines
            if process.returncode is None:
                process.kill()
            await asyncio.wait_for(process.wait(), timeout=30)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader, timeout=10)
        finally:
            for task in [reader, *helpers]:
                task.cancel()
            await asyncio.gather(reader, *helpers, return_exceptions=True)
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), timeout=30)
            batch.returncode = process.returncode
            # A planned kill that came after the process had already exited is no kill.
            batch.killed = batch.killed and batch.returncode == -signal.SIGKILL
            batch.ended_wall = time.time()
            batch.seconds = time.monotonic() - t0
            batch.stderr_tail = lines[-60:]
            _write_log(self.config.work_dir / "logs" / f"batch-{batch.index:03d}.log", lines)

    @staticmethod
    def _scan(batch: Batch, text: str) -> None:
        """What one line of a service's stderr tells."""
        if READY_LINE in text:
            batch.ready = True
        if match := CAPTURE_LINE.search(text):
            batch.logged.append(match.group(1))
        if match := SYNCED_LINE.search(text):
            batch.synced_by_service.add(match.group(1))
            batch.resumed_syncs += "writes were already done" in text
        if REPAIRED_LINE.search(text):
            batch.repairs.append(text)
        if text.startswith(("ERROR ", "CRITICAL ")):
            batch.errors[_error_kind(text)] += 1
        batch.alarms += [text for alarm in ALARMS if alarm in text]

    def _snapshot(self) -> None:
        """Remember every capture that reached the spool: none of them may ever go missing."""
        with contextlib.suppress(FileNotFoundError):
            self.acknowledged.update(os.listdir(self.spool_dir / "captures"))

    # -- the drain -------------------------------------------------------------------------------

    async def _drain(self) -> None:
        code, out, err = await self._child(
            [sys.executable, "-m", "heimdall_edge.cli", "sync", "--once", "--json"]
        )
        try:
            self.report.drain = json.loads(out)
        except json.JSONDecodeError:
            self.report.failures.append(f"sync --once printed no JSON (exit {code}): {err[-2000:]}")
            return
        if code != 0:
            self.report.failures.append(
                f"sync --once exited {code} with the store up: {self.report.drain}; {err[-2000:]}"
            )
        if self.report.drain.get("waiting"):
            self.report.failures.append(
                f"{self.report.drain['waiting']} captures still leased after every service "
                "process ended: a dead process's lease must not hold a capture back"
            )

    async def _child(self, args: list[str]) -> tuple[int | None, str, str]:
        process = await asyncio.create_subprocess_exec(
            *args,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(
                process.communicate(), timeout=self.config.drain_timeout_s
            )
        finally:
            if process.returncode is None:
                process.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), timeout=30)
        return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    # -- the checks ------------------------------------------------------------------------------

    def check(self, server: MotoServer) -> None:
        from heimdall_edge.spool import Spool

        report, fail = self.report, self.report.failures.append
        with Spool(self.spool_dir) as spool:
            recovered = spool.recovered
            records = {r.capture_id: r for r in spool.list()}
            problems = {cid: spool.verify(cid) for cid in records}
        quarantine = sorted(os.listdir(self.spool_dir / "quarantine"))
        report.captures = len(records)
        report.acknowledged_seen = len(self.acknowledged)
        report.statuses = collections.Counter(r.status for r in records.values())
        for r in records.values():
            report.engines.update(f"{k}:{v}" for k, v in r.engines.items())

        # The spool: consistent, nothing quarantined, every file as recorded.
        if recovered.quarantined or quarantine:
            fail(f"spool quarantine is not empty: {recovered}, {quarantine}")
        for cid, found in problems.items():
            if found:
                fail(f"capture {cid} does not verify: {found}")

        # No acknowledged capture lost.
        lost = self.acknowledged - records.keys()
        if lost:
            fail(f"{len(lost)} captures reached the spool and then vanished: {sorted(lost)}")

        # The processes: no hang, no crash loop.
        for b in report.batches:
            if b.hung:
                fail(f"batch {b.index} hung (still running after {self.config.batch_timeout_s} s)")
            elif not b.killed and b.returncode != 0:
                fail(f"batch {b.index} exited {b.returncode} (not killed):\n" + _tail(b))
            elif not b.killed and not b.ready:
                fail(f"batch {b.index} never said it was ready:\n" + _tail(b))
            for alarm in b.alarms:
                fail(f"batch {b.index} logged: {alarm}")

        # Every turn accounted for, batch by batch.
        seen: set[str] = set()
        for b in report.batches:
            mine = sorted(
                cid
                for cid, r in records.items()
                if b.started_wall <= r.created_at.timestamp() <= b.ended_wall
            )
            if set(mine) & seen:
                fail(f"batch {b.index}: captures counted twice: {sorted(set(mine) & seen)}")
            seen.update(mine)
            missing_logged = [cid for cid in b.logged if cid not in records]
            if missing_logged:
                fail(f"batch {b.index}: answered captures missing from the spool: {missing_logged}")
            if len(set(b.logged)) != len(b.logged):
                fail(f"batch {b.index}: a capture was answered twice: {b.logged}")
            unlogged = [cid for cid in mine if cid not in b.logged]
            if b.finished:
                if len(b.logged) != len(b.inputs) or unlogged:
                    fail(
                        f"batch {b.index} (not killed): {len(b.inputs)} recordings played, "
                        f"{len(b.logged)} answered, {len(mine)} kept ({unlogged} unanswered)"
                    )
            else:
                # A kill may cut one turn short: that capture is kept, never answered.
                if len(unlogged) > 1:
                    fail(
                        f"batch {b.index} (killed): {len(unlogged)} unanswered captures {unlogged}"
                    )
                for cid in unlogged:
                    if b.logged and cid < max(b.logged):
                        fail(f"batch {b.index}: unanswered capture {cid} is not the last one")
                report.not_reached += len(b.inputs) - len(mine)
            for cid in unlogged:
                r = records[cid]
                # Cut short: still "captured", or transcribed by a later process's backfill.
                if r.status == "captured" or (r.error == CUT_SHORT and r.transcript is not None):
                    report.interrupted.append(cid)
        strays = records.keys() - seen
        if strays:
            fail(f"captures made outside any batch's lifetime: {sorted(strays)}")

        # Every answered capture: complete or failed, and the person heard something.
        for cid, r in records.items():
            if cid in report.interrupted:
                continue  # kept, never answered: the SIGKILL came mid-turn (counted above)
            if r.status not in ("complete", "failed"):
                fail(f"capture {cid} has status {r.status!r}")
            if "reply.wav" not in r.files:
                fail(f"capture {cid} ({r.status}) has no reply.wav: the person heard nothing")
            if r.status == "failed" and not r.error:
                fail(f"capture {cid} failed without an error recorded")
            if r.status == "complete" and not (r.transcript is not None and r.reply):
                fail(f"capture {cid} is complete without a transcript and reply: {r}")

        # Synced: every capture, exactly once in S3 (one version per key) and DynamoDB.
        report.synced_by_service = len(
            set().union(*(b.synced_by_service for b in report.batches)) if report.batches else set()
        )
        unsynced = sorted(cid for cid, r in records.items() if r.sync_state != "synced")
        if unsynced:
            fail(f"{len(unsynced)} captures not synced after the drain: {unsynced[:10]}")
        wanted: dict[str, tuple[str, str]] = {}  # key -> (capture id, file)
        superseded: set[str] = set()  # the records of revisions before each capture's last
        for cid, r in records.items():
            keys = r.extra.get("s3_keys") or {}
            if r.sync_state == "synced" and set(keys) != {*r.files, "capture.json"}:
                fail(
                    f"capture {cid}: synced keys {sorted(keys)} != files {sorted(r.files)} + record"
                )
            manifest = keys.get("capture.json", "")
            if r.sync_state == "synced" and not manifest.endswith(f"/capture.r{r.revision}.json"):
                fail(f"capture {cid}: the record in S3 ({manifest}) is not revision {r.revision}")
            for revision in range(1, r.revision):
                superseded.add(manifest.replace(f".r{r.revision}.json", f".r{revision}.json"))
            for name, key in keys.items():
                wanted[key] = (cid, name)
        s3, ddb = server.client("s3"), server.client("dynamodb")
        versions: list[dict[str, Any]] = []
        markers: list[dict[str, Any]] = []
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=BUCKET):
            versions += page.get("Versions", [])
            markers += page.get("DeleteMarkers", [])
        report.s3_objects = len(versions)
        if markers:
            fail(f"{len(markers)} delete markers in the bucket")
        per_key = collections.Counter(v["Key"] for v in versions)
        twice = sorted(k for k, n in per_key.items() if n > 1)
        if twice:
            fail(f"{len(twice)} S3 keys written more than once: {twice[:5]}")
        orphans = sorted(per_key.keys() - wanted.keys() - superseded)
        if orphans:
            fail(f"{len(orphans)} S3 objects belong to no capture in the spool: {orphans[:5]}")
        absent = sorted(wanted.keys() - per_key.keys())
        if absent:
            fail(f"{len(absent)} synced files are not in S3: {absent[:5]}")
        for key, (cid, name) in sorted(wanted.items()):
            if key not in per_key:
                continue
            data = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            if name == "capture.json":
                expected = hashlib.sha256(records[cid].manifest()).hexdigest()
            else:
                expected = records[cid].files[name]["sha256"]
            if hashlib.sha256(data).hexdigest() != expected:
                fail(f"{key}: the bytes in S3 are not those the spool recorded")
        items: list[dict[str, Any]] = []
        for page in ddb.get_paginator("scan").paginate(TableName=TABLE):
            items += page["Items"]
        report.ddb_items = len(items)
        per_item = collections.Counter((i["device_id"]["S"], i["capture_id"]["S"]) for i in items)
        ids = collections.Counter(cid for _dev, cid in per_item.elements())
        if any(n > 1 for n in ids.values()):
            fail(f"DynamoDB items duplicated: {[c for c, n in ids.items() if n > 1][:5]}")
        if set(ids) - records.keys():
            fail(
                f"DynamoDB items for captures not in the spool: {sorted(set(ids) - records.keys())}"
            )
        if records.keys() - set(ids):
            fail(f"captures without a DynamoDB item: {sorted(records.keys() - set(ids))[:10]}")
        if {dev for dev, _cid in per_item} - {DEVICE}:
            fail(f"DynamoDB items of another device: {per_item}")
        for item in items:
            record = records.get(item["capture_id"]["S"])
            if record is None or "s3_keys" not in item:
                continue
            indexed = {name: value["S"] for name, value in item["s3_keys"]["M"].items()}
            if indexed != record.extra.get("s3_keys"):
                fail(f"DynamoDB item of {record.capture_id} points at other keys: {indexed}")
            if int(item.get("revision", {"N": "0"})["N"]) != record.revision:
                fail(f"DynamoDB item of {record.capture_id} is behind revision {record.revision}")
        uploads = s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
        if uploads:
            fail(f"{len(uploads)} multipart uploads left open")

        if not any(b.finished for b in report.batches):
            fail("no batch ran to the end: the run proves little (more interactions?)")


def _plan_text(plan: tuple[str, int, float]) -> str:
    kind, turns, delay = plan
    if kind == "none":
        return "none"
    if kind == "startup":
        return f"startup +{delay:.2f}s"
    return f"after turn {turns} +{delay:.2f}s"


def _error_kind(line: str) -> str:
    """An ERROR line reduced to its logger and the start of its message (ids cut out)."""
    text = re.sub(r"\d{8}T\d{9}Z-[0-9a-f]{8}", "<id>", line)
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return text[:90]


def _write_log(path: Path, lines: list[str]) -> None:
    """A batch's stderr, kept in the work dir for a person to read after a failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def _tail(batch: Batch) -> str:
    return "\n".join("      " + line for line in batch.stderr_tail[-25:])
