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

Extended modes (ChaosConfig; each can be combined with the others):

* `clock_steps`: every service (and second syncer) process runs under libfaketime,
  and a thread steps their shared wall clock (+1 h, +1 day, -10 min, back to the real
  time; the monotonic clock untouched, as an NTP step does), at random and shortly
  after a turn began, so steps land in the middle of turns. The store checks the
  signature's time as AWS does (15 minutes; see chaos_clock.py): while the clock is an
  hour or a day off, S3 and DynamoDB refuse the device, and its captures must go once
  the clock is back. Captures are attributed to processes by when the driver first saw
  them, never by their (stepped) time stamps.
* `second_syncer`: another process syncs the same state dir all along (`heimdall-edge
  sync` as a daemon, stopped with SIGTERM or SIGKILLed, or `sync --once` again and
  again), with `quota_mb` (and `ballast_mb` of other data in the spool's folder, so a
  short run reaches the quota) making both evict. Checked: no capture evicted unsynced
  unless `evict_unsynced`; every capture evicted was in S3 and DynamoDB at its last
  revision; no eviction freed more than its need plus one capture (an estimate: see
  chaos_spool.py for what the log lines lack).
* `revision_kills`: some SIGKILLs are planned at moments when a capture has been
  revised but its newest revision is not in the store yet: right after a turn's
  capture was kept (before its outcome is recorded), right after the backfill recorded
  the transcript of a capture cut short earlier (a revision after one already synced),
  and (for the second syncer) as soon as a capture's newest revision is newer than its
  record in S3. What each kill cut is recorded, and in the end every such capture must
  be in S3 (capture.r<N>.json) and DynamoDB (item revision N) at its last revision.

In every mode the spool's own capture.json of each capture must be at the index's
revision, and no record in S3 nor index item behind its capture's last revision.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heimdall_edge.testing.fakecloud.cloud import FakeCloud
from heimdall_edge.testing.fakecloud.wire import ROUTES, Fault
from heimdall_edge.testing.moto import AWS_ENV_TO_UNSET, DEFAULT_REGION, MotoServer, aws_test_env
from heimdall_edge.turn.backfill import CUT_SHORT
from tests.chaos_clock import ClockStepper, SkewCheckingMotoServer, Step, faketime_env
from tests.chaos_spool import (
    CUT_DELETION_LINE,
    OVER_QUOTA_LINE,
    Eviction,
    EvictionEvent,
    EvictionLog,
    SpoolWatcher,
    concurrent_pairs,
    cut_during,
    group_events,
    measure_events,
    over_evicted,
)

BUCKET = "heimdall-chaos"
TABLE = "heimdall-chaos-index"
DEVICE = "chaos-pi"
CLOUD_MODES = ("healthy", "down", "slow", "429", "500", "garbage")
MiB = 1024 * 1024

ID = r"\d{8}T\d{9}Z-[0-9a-f]{8}"
CAPTURE_LINE = re.compile(rf"heimdall_edge\.app\.appliance: capture ({ID}): ")
SYNCED_LINE = re.compile(rf"synced capture ({ID}):")
NOT_SYNCED_LINE = re.compile(rf"capture ({ID}) not synced: (.*)")
BACKFILLED_LINE = re.compile(rf"capture ({ID}) cut short, transcribed")
CLOCK_REFUSALS = ("the device clock is wrong", "InvalidSignatureException")
"""How a refusal for the clock shows in a "not synced" line (S3's code, DynamoDB's)."""
NOT_KEPT_LINE = "capture not kept:"
MID_TURN = "mid-turn (kept, outcome not recorded)"
"""Kills that cut a turn: their key in ChaosReport.kills_between_revisions()."""
READY_LINE = "ready: listening"
SYNCING_LINE = "syncing until Ctrl-C"
"""A sync daemon's "ready": its SIGTERM handler is in place from here on."""
REPAIRED_LINE = re.compile(r"spool .* repaired: ")
EVICTING_LINE = re.compile(rf"evicting (?:synced|unsynced) capture ({ID}) ")
"""Said just before an eviction's deletion: a capture gone after it, with no "evicted" line,
was evicted by a process that a SIGKILL cut between the deletion and the line after it."""
TURN_FAILED = "turn failed; the loop carries on"
# Lines that mean something went wrong beyond what the chaos explains.
ALARMS = (TURN_FAILED, "quarantined capture", "is damaged", "Traceback (most recent call last)")
SECOND_SYNCER_MODES = ("daemon", "once", "mixed")
SECOND_SYNCER_INTERVAL_S = 0.3
"""The second syncer's [sync] interval_s: it looks (and sweeps the quota) more often than the
service's (1 s), so that both processes evict."""
BALLAST = "ballast.bin"
SPLITTABLE = frozenset(
    {"jfk.flac", "picovoice_cheetah_test_en.wav", "ljspeech_LJ050-0131.wav", "sr_english.wav"}
)
"""Recordings with a pause of 0.5 s or more inside (webrtcvad, aggressiveness 2), close to
the endpointer's hang-over: one of them may end a turn at its pause and go on as the next
(the person goes on speaking while the device answers), so it may make two captures."""
STAMP_OFF_S = 120.0
"""A capture stamped this far from the real time of its first sight was kept under a stepped clock."""


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
    clock_steps: bool = False
    """Run the device's processes under libfaketime and step their wall clock (chaos_clock.py)."""
    clock_interval_s: tuple[float, float] = (1.5, 4.0)
    """Time between two steps (besides those shortly after a turn began)."""
    second_syncer: str | None = None
    """Another process syncing the same state dir all along: "daemon" (`heimdall-edge sync`),
    "once" (`sync --once` again and again), "mixed" (either, at random), or None."""
    quota_mb: float | None = None
    """[sync] quota_mb for every process (None: the default, far above what a run keeps)."""
    evict_unsynced: bool = False
    ballast_mb: float = 0.0
    """Megabytes of other data in the spool's folder (it counts towards the quota and is never
    evicted): with the smallest quota (10 MB) a short run reaches the quota sooner."""
    ballast_growth_kb_s: float = 0.0
    """The ballast grows this fast (in steps every 1-3 s) up to `ballast_max_mb`, then is cut
    back to `ballast_mb` (a log rotated): the spool goes over its quota between turns too,
    so every process's quota sweep has work, not only the turn keeping a capture."""
    ballast_max_mb: float = 0.0
    revision_kills: bool = False
    """Plan some SIGKILLs when a capture's newest revision is not in the store yet."""


@dataclass
class Batch:
    """One process of the run: a service batch, a second syncer's run, or the drain."""

    index: int
    inputs: list[str]
    kill_plan: str
    """"none", "startup +0.4s" or "after turn 2 +0.3s": when the SIGKILL was planned."""
    kind: str = "service"
    """"service", "sync daemon", "sync --once" or "drain"."""
    pid: int | None = None
    started_wall: float = 0.0
    ended_wall: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0
    """time.monotonic() of the driver."""
    seconds: float = 0.0
    returncode: int | None = None
    killed: bool = False
    hung: bool = False
    terminated: bool = False
    """Stopped with SIGTERM by the driver (a sync daemon): it must exit 0."""
    ready: bool = False
    kept: int = 0
    """Captures that reached the spool while this process ran."""
    logged: list[str] = field(default_factory=list)
    """Capture ids in order of their "capture <id>: ..." log lines (answered turns)."""
    synced_by_service: set[str] = field(default_factory=set)
    """Captures this process logged as synced (service or not: the name is the short form's)."""
    synced_at: dict[str, float] = field(default_factory=dict)
    clock_refused: dict[str, float] = field(default_factory=dict)
    """Captures the store refused for the device's clock (when first refused)."""
    backfilled: list[str] = field(default_factory=list)
    resumed_syncs: int = 0
    """Syncs that found some of their writes already done (an earlier attempt was cut off)."""
    not_kept: int = 0
    """Turns refused at the quota ("capture not kept"): nothing kept, the person told so."""
    over_quota: int = 0
    eviction_log: EvictionLog | None = None
    cut_deletions: list[str] = field(default_factory=list)
    """Deletions an earlier SIGKILL cut, finished by this process's spool recovery."""
    kill_state: dict[str, list] | None = None
    """What the SIGKILL cut between revisions (SpoolWatcher.state_at_kill)."""
    repairs: list[str] = field(default_factory=list)
    """The spool's "repaired: ..." lines at start-up (what an earlier kill left behind)."""
    alarms: list[str] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    stderr_tail: list[str] = field(default_factory=list)
    stdout: str = ""

    @property
    def finished(self) -> bool:
        return not self.killed and not self.hung

    @property
    def evictions(self) -> list[Eviction]:
        return self.eviction_log.evictions if self.eviction_log else []

    @property
    def label(self) -> str:
        if self.kind == "service":
            return f"service #{self.index}"
        return "drain" if self.kind == "drain" else f"sync #{self.index}"

    @property
    def between_revisions(self) -> bool:
        """Killed while a capture's newest revision was not in the store (revised or mid-turn)."""
        state = self.kill_state or {}
        return bool(state.get("revised_unsynced") or state.get("mid_turn"))


@dataclass
class ChaosReport:
    config: ChaosConfig
    batches: list[Batch] = field(default_factory=list)
    syncer_runs: list[Batch] = field(default_factory=list)
    drain_run: Batch | None = None
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
    synced_by_second: int = 0
    drain: dict[str, Any] | None = None
    s3_objects: int = 0
    ddb_items: int = 0
    acknowledged_seen: int = 0
    failures: list[str] = field(default_factory=list)
    # clock steps
    steps: list[Step] = field(default_factory=list)
    store_refused: collections.Counter[str] = field(default_factory=collections.Counter)
    stamped_off: int = 0
    """Captures whose time stamp (id, created_at) came from a stepped clock."""
    clock_refused: int = 0
    clock_refused_then_synced: int = 0
    """Captures the store refused for the clock and a device process synced later, while running."""
    # quota and eviction
    evicted: dict[str, Eviction] = field(default_factory=dict)
    events: list[EvictionEvent] = field(default_factory=list)
    over_evictions: list[str] = field(default_factory=list)
    ballast_grown: int = 0
    ballast_cuts: list[tuple[float, int]] = field(default_factory=list)
    """(time.monotonic(), bytes) of each time the ballast was cut back."""

    # -- figures -------------------------------------------------------------------------------

    @property
    def given(self) -> int:
        return sum(len(b.inputs) for b in self.batches)

    @property
    def kills(self) -> int:
        return sum(b.killed for b in self.batches)

    @property
    def steps_in_turn(self) -> int:
        return sum(bool(s.in_turn) for s in self.steps)

    def kills_between_revisions(self) -> dict[str, int]:
        """SIGKILLs (service and second syncer) by what they cut: see Batch.kill_state."""
        killed = [p for p in self.batches + self.syncer_runs if p.killed and p.kill_state]
        return {
            "between revisions": sum(p.between_revisions for p in killed),
            MID_TURN: sum(bool(p.kill_state and p.kill_state["mid_turn"]) for p in killed),
            "newest revision newer than the one in S3": sum(
                bool(p.kill_state and p.kill_state["behind_store"]) for p in killed
            ),
            "right after a backfill": sum(
                p.killed and p.kill_plan.startswith("after backfill") for p in self.batches
            ),
        }

    def evictions_by(self) -> collections.Counter[str]:
        out: collections.Counter[str] = collections.Counter()
        for e in self.evicted.values():
            kind = e.process.split(" #")[0]
            out[f"{kind} {e.tier}"] += 1
        return out

    def exits(self, processes: list[Batch] | None = None) -> collections.Counter[str]:
        out: collections.Counter[str] = collections.Counter()
        for b in self.batches if processes is None else processes:
            if b.returncode is None:
                out["none"] += 1
            elif b.returncode < 0:
                out[f"signal {signal.Signals(-b.returncode).name}"] += 1
            else:
                out[f"code {b.returncode}"] += 1
        return out

    def rows(self) -> list[tuple[str, str]]:
        config = self.config
        answered = sum(len(b.logged) for b in self.batches)
        errors: collections.Counter[str] = collections.Counter()
        for b in self.batches + self.syncer_runs:
            errors.update(b.errors)
        drained = (self.drain or {}).get("synced", "?")
        rows = [
            ("seed", str(config.seed)),
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
        ]
        if config.clock_steps:
            reasons = collections.Counter(s.reason for s in self.steps if s.reason != "end")
            offsets = collections.Counter(s.offset for s in self.steps if s.reason != "end")
            refused = f"{self.store_refused['s3']} / {self.store_refused['dynamodb']}"
            by_reason = f"{sum(reasons.values())} ({reasons['turn']} / {reasons['timer']})"
            rows += [
                ("clock steps (after a turn began / at random)", by_reason),
                ("  to", _fmt(offsets)),
                ("  landed during a turn (kept, not yet recorded)", str(self.steps_in_turn)),
                ("captures stamped by a stepped clock", str(self.stamped_off)),
                ("store refusals for the clock (S3 / DynamoDB)", refused),
                ("captures refused for the clock", str(self.clock_refused)),
                (
                    "  synced by a device process once the clock was back",
                    str(self.clock_refused_then_synced),
                ),
            ]
        if config.second_syncer:
            kinds = collections.Counter(p.kind for p in self.syncer_runs)
            stopped = (
                f"{sum(p.killed for p in self.syncer_runs)} / "
                f"{sum(p.terminated for p in self.syncer_runs)}"
            )
            rows += [
                ("second syncer runs", _fmt(kinds)),
                ("  SIGKILLed / stopped with SIGTERM", stopped),
                ("  exits", _fmt(self.exits(self.syncer_runs))),
                ("  captures synced by it", str(self.synced_by_second)),
            ]
        if config.quota_mb is not None:
            overshoots = [e.overshoot for e in self.events if e.overshoot is not None]
            grown = f" (+{self.ballast_grown / MiB:.2f} MB)" if self.ballast_grown else ""
            quota = (
                f"{config.quota_mb:g} MB, ballast {config.ballast_mb:g} MB{grown}, "
                f"evict_unsynced {'on' if config.evict_unsynced else 'off'}"
            )
            rows += [
                ("quota", quota),
                ("captures evicted", f"{len(self.evicted)} ({_fmt(self.evictions_by())})"),
                (
                    "eviction events / of two processes within 1 s",
                    f"{len(self.events)} / {concurrent_pairs(self.events)}",
                ),
                (
                    "  largest estimated overshoot (bytes; > 0 is over the need + 1 capture)",
                    str(max(overshoots)) if overshoots else "-",
                ),
                ("turns refused at the quota", str(sum(b.not_kept for b in self.batches))),
                ("over-evictions", str(len(self.over_evictions))),
            ]
        if config.revision_kills or config.second_syncer:
            rows += [
                (f"SIGKILLs: {name}", str(n)) for name, n in self.kills_between_revisions().items()
            ]
        rows += [
            ("service ERROR lines", _fmt(errors) if errors else "0"),
            ("failures", str(len(self.failures))),
        ]
        return rows

    def summary(self) -> str:
        width = max(len(name) for name, _ in self.rows())
        lines = ["chaos run:"] + [f"  {name:<{width}}  {value}" for name, value in self.rows()]
        lines.append("  batches:")
        for b in self.batches + self.syncer_runs:
            outcome = "hung" if b.hung else "killed" if b.killed else f"exit {b.returncode}"
            cut = ""
            if b.killed and b.kill_state:
                cut = "; cut: " + ", ".join(f"{k} {len(v)}" for k, v in b.kill_state.items() if v)
            lines.append(
                f"    {b.label:<12} {len(b.inputs)} inputs, {b.kept} kept, {len(b.logged)} "
                f"answered, {b.seconds:5.1f} s, {outcome:8} kill plan: {b.kill_plan}{cut}"
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

Plan = tuple[str, int, float]
Until = Callable[[Callable[[], bool]], Awaitable[None]]
Killer = Callable[[asyncio.subprocess.Process, Until], Awaitable[None]]


class Chaos:
    def __init__(self, config: ChaosConfig) -> None:
        if config.second_syncer not in (None, *SECOND_SYNCER_MODES):
            raise ValueError(f"second_syncer must be one of {SECOND_SYNCER_MODES} or None")
        self.config = config
        self.rng = random.Random(config.seed)
        self.state_dir = config.work_dir / "state"
        self.spool_dir = self.state_dir / "spool"
        self.report = ChaosReport(config)
        self.recordings = self._recordings()
        self.acknowledged: set[str] = set()
        self.env: dict[str, str] = {}
        """The drain's environment (the real clock)."""
        self.device_env: dict[str, str] = {}
        """The device's processes' (under libfaketime with clock_steps)."""
        self.watcher = SpoolWatcher(self.spool_dir)
        self.clock_file = config.work_dir / "faketime"
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
        config = self.config
        started = time.monotonic()
        config.work_dir.mkdir(parents=True, exist_ok=True)
        cloud = FakeCloud(
            transcript=lambda record: f"chaos turn {record.received_at:.3f}",
            reply=self._cloud_reply,
        )
        server = SkewCheckingMotoServer() if config.clock_steps else MotoServer()
        cloud_flapper: CloudFlapper | None = None
        store_flapper: StoreFlapper | None = None
        stepper: ClockStepper | None = None
        second: asyncio.Task[None] | None = None
        grower: asyncio.Task[None] | None = None
        stop_second = asyncio.Event()
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
            self.device_env = dict(self.env)
            cloud_flapper = CloudFlapper(
                cloud, random.Random(self.rng.random()), config.cloud_phase_s
            )
            store_flapper = StoreFlapper(
                server,
                random.Random(self.rng.random()),
                config.store_up_s,
                config.store_down_s,
            )
            if config.clock_steps:
                stepper = ClockStepper(
                    self.clock_file, random.Random(self.rng.random()), config.clock_interval_s
                )
                self.report.steps = stepper.steps  # the same list: the checks read it
                self.device_env |= faketime_env(self.clock_file)
                self.watcher.on_turn_started = lambda _cid: stepper.turn_started()
            second_rng = random.Random(self.rng.random()) if config.second_syncer else None
            self._ballast()
            if config.ballast_growth_kb_s > 0 and config.ballast_mb > 0:
                grower = asyncio.create_task(self._grow_ballast(random.Random(self.rng.random())))
            self.watcher.start()
            cloud_flapper.start()
            store_flapper.start()
            if stepper is not None:
                stepper.start()
            if second_rng is not None:
                second = asyncio.create_task(self._second_syncer(second_rng, stop_second))
            await self._batches(started)
            if grower is not None:
                grower.cancel()
            stop_second.set()
            if second is not None:
                await asyncio.wait_for(second, timeout=config.batch_timeout_s + 30)
            if stepper is not None:
                stepper.stop()  # back to the real time for the drain and the checks
            store_flapper.stop()
            cloud_flapper.stop()
            self._snapshot()
            await self._drain()
            self.watcher.stop()
            self.check(server)
        except Exception:  # noqa: BLE001
            # Reported with everything else (the caller prints the summary), not raised alone.
            self.report.failures.append("the driver failed:\n" + traceback.format_exc())
        finally:
            stop_second.set()
            for task in (second, grower):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if stepper is not None:
                stepper.stop()
            if isinstance(server, SkewCheckingMotoServer):
                self.report.store_refused = server.refused
            self.watcher.stop()
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

    def _ballast(self) -> None:
        """Other data in the spool's folder: counted in the quota, never evicted."""
        if self.config.ballast_mb <= 0:
            return
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        (self.spool_dir / BALLAST).write_bytes(b"\0" * int(self.config.ballast_mb * MiB))

    async def _grow_ballast(self, rng: random.Random) -> None:
        """Append to the ballast now and then; at ballast_max_mb, cut it back (a log rotated)."""
        config = self.config
        path = self.spool_dir / BALLAST
        floor, limit = int(config.ballast_mb * MiB), int(config.ballast_max_mb * MiB)
        while True:
            pause = rng.uniform(1.0, 3.0)
            await asyncio.sleep(pause)
            size = path.stat().st_size
            if size >= limit:
                os.truncate(path, floor)
                self.report.ballast_cuts.append((time.monotonic(), size - floor))
                continue
            grow = min(int(config.ballast_growth_kb_s * 1024 * pause), limit - size)
            with path.open("ab") as f:
                f.write(b"\0" * grow)
            self.report.ballast_grown += grow

    def _child_env(self, cloud: FakeCloud, server: MotoServer) -> dict[str, str]:
        drop = set(AWS_ENV_TO_UNSET) | {
            "OPENAI_API_KEY", "ELEVENLABS_API_KEY", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET",
            "WATCHDOG_USEC", "LD_PRELOAD",
        }  # fmt: skip
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in drop and not k.startswith(("HEIMDALL_", "FAKETIME"))
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
        if self.config.quota_mb is not None:
            env["HEIMDALL_SYNC__QUOTA_MB"] = f"{self.config.quota_mb:g}"
            env["HEIMDALL_SYNC__EVICT_UNSYNCED"] = "true" if self.config.evict_unsynced else "false"
        return env

    # -- batches -------------------------------------------------------------------------------

    async def _batches(self, started: float) -> None:
        """Batch after batch until `interactions` captures were kept (or the time is up)."""
        config = self.config
        kept = given = index = 0
        overtime = False
        while kept < config.interactions and given < 3 * config.interactions:
            if config.minutes is not None and time.monotonic() - started > config.minutes * 60:
                if overtime or not (config.revision_kills and self.watcher.cut_short_waiting()):
                    self._log(f"time is up after {kept} interactions")
                    break
                # A turn cut short by the last kill waits for a service's backfill: one more
                # batch, so the revision it adds (and a kill behind it) is part of the run.
                overtime = True
            size = min(self.rng.randint(*config.batch_size), config.interactions - kept)
            inputs = [str(p) for p in self.rng.choices(self.recordings, k=size)]
            plan = self._plan(size)
            batch = Batch(index, inputs, _plan_text(plan))
            self.report.batches.append(batch)
            before = len(self.acknowledged)
            self.watcher.batch = index
            await self._run_batch(batch, plan)
            await asyncio.to_thread(self.watcher.poll)  # what the process left, counted as its
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

    def _plan(self, size: int) -> Plan:
        config, rng = self.config, self.rng
        if config.revision_kills and len(self.report.batches) >= 2 and not self._cut_a_turn():
            # Until one kill has cut a turn (kept, outcome not recorded), every batch from the
            # third on aims at the first turn of its second half seen kept and not answered,
            # and kills at once: left to the draws, short runs often missed it, and aimed at
            # the last turn alone a fast turn (a healthy cloud) or one refused at the quota
            # missed it too. The first half still fills the spool towards its quota, which
            # both processes must reach.
            return ("kept", size // 2, 0.0)
        if config.revision_kills and self.watcher.cut_short_waiting() and rng.random() < 0.8:
            # Between revisions: right after the backfill recorded a capture cut short earlier
            # (its first revision synced, or about to be; the new one not yet).
            return ("backfill", 0, rng.uniform(0.0, 0.1))
        if rng.random() >= config.kill_probability:
            return ("none", 0, 0.0)
        if config.revision_kills and rng.random() < 0.6:
            # Mid-turn: the capture kept (a revision), its outcome not recorded yet.
            return ("kept", rng.randrange(size), rng.uniform(0.0, 0.15))
        if rng.random() < 0.15:
            return ("startup", 0, rng.uniform(0.0, 2.5))
        return ("turn", rng.randrange(size), rng.uniform(0.0, 0.4))

    def _cut_a_turn(self) -> bool:
        return self.report.kills_between_revisions()[MID_TURN] > 0

    async def _run_batch(self, batch: Batch, plan: Plan) -> None:
        args = [sys.executable, "-m", "heimdall_edge.cli", "run", "--simulate", "--fast"]
        for path in batch.inputs:
            args += ["--input", path]

        async def kill_when_planned(process: asyncio.subprocess.Process, until: Until) -> None:
            kind, turns, delay = plan
            if kind == "none":
                return
            if kind == "turn":
                await until(lambda: batch.ready and len(batch.logged) >= turns)
            elif kind == "kept":
                await until(
                    lambda: (
                        batch.ready
                        and len(batch.logged) >= turns
                        # a capture of a turn not answered yet (the watcher's view may lag
                        # behind a turn that has just been recorded)
                        and bool(set(self.watcher.leased_by(process.pid)) - set(batch.logged))
                    )
                )
            elif kind == "backfill":
                await until(lambda: bool(batch.backfilled))
            await asyncio.sleep(delay)
            await self._kill(process, batch)

        env = self.device_env
        if plan[0] == "kept":
            # Without a head start: with one, a turn on the microphone's clock records its
            # outcome within a few ms of the keep, too soon for the watcher to aim a kill.
            env = env | {"HEIMDALL_LISTENING__SPECULATE_AFTER_MS": "0"}
        await self._run_process(args, batch, kill_when_planned, env=env)

    async def _kill(self, process: asyncio.subprocess.Process, proc: Batch) -> None:
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
            proc.killed = True
            proc.kill_state = await asyncio.to_thread(self.watcher.state_at_kill, process.pid)

    async def _run_process(
        self,
        args: list[str],
        proc: Batch,
        killer: Killer | None,
        *,
        env: dict[str, str],
        timeout_s: float | None = None,
        stdout: bool = False,
    ) -> None:
        """Run one process to its end (or its planned kill), reading what it logs as it goes."""
        timeout_s = timeout_s or self.config.batch_timeout_s
        proc.started_wall = time.time()
        proc.started_at = t0 = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *args,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if stdout else asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 20,
        )
        proc.pid = process.pid
        changed = asyncio.Condition()
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
                self._scan(proc, text, time.monotonic())
                async with changed:
                    changed.notify_all()

        async def read_stdout() -> None:
            assert process.stdout is not None
            proc.stdout = (await process.stdout.read()).decode(errors="replace")

        async def watch_spool() -> None:
            while True:
                self._snapshot()
                await asyncio.sleep(0.1)

        async def until(predicate: Callable[[], bool]) -> None:
            """Until `predicate()` holds: looked at after every line and every 20 ms."""
            async with changed:
                while not predicate():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), timeout=0.02)

        readers = [asyncio.create_task(read_stderr())]
        if stdout:
            readers.append(asyncio.create_task(read_stdout()))
        helpers = [asyncio.create_task(watch_spool())]
        if killer is not None:
            helpers.append(asyncio.create_task(killer(process, until)))
        try:
            try:
                await asyncio.wait_for(process.wait(), timeout=timeout_s)
            except TimeoutError:
                proc.hung = True
            # the process is gone (or hung): let the readers take the last lines
            if process.returncode is None:
                process.kill()
            await asyncio.wait_for(process.wait(), timeout=30)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*readers), timeout=10)
        finally:
            for task in [*readers, *helpers]:
                task.cancel()
            await asyncio.gather(*readers, *helpers, return_exceptions=True)
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), timeout=30)
            proc.returncode = process.returncode
            # A planned kill that came after the process had already exited is no kill.
            proc.killed = proc.killed and proc.returncode == -signal.SIGKILL
            if not proc.killed:
                proc.kill_state = None
            proc.ended_wall = time.time()
            proc.ended_at = time.monotonic()
            proc.seconds = proc.ended_at - t0
            proc.stderr_tail = lines[-60:]
            name = proc.label.replace(" #", "-").replace(" ", "-")
            if proc.kind == "service":
                name = f"batch-{proc.index:03d}"
            elif proc.kind != "drain":
                name = f"sync-{proc.index:03d}"
            _write_log(self.config.work_dir / "logs" / f"{name}.log", lines)

    def _scan(self, proc: Batch, text: str, now: float) -> None:
        """What one line of a process's stderr tells."""
        if READY_LINE in text or SYNCING_LINE in text:
            proc.ready = True
        if match := CAPTURE_LINE.search(text):
            proc.logged.append(match.group(1))
        if match := SYNCED_LINE.search(text):
            proc.synced_by_service.add(match.group(1))
            proc.synced_at.setdefault(match.group(1), now)
            proc.resumed_syncs += "writes were already done" in text
        if (match := NOT_SYNCED_LINE.search(text)) and any(
            reason in match.group(2) for reason in CLOCK_REFUSALS
        ):
            proc.clock_refused.setdefault(match.group(1), now)
        if match := BACKFILLED_LINE.search(text):
            proc.backfilled.append(match.group(1))
        proc.not_kept += NOT_KEPT_LINE in text
        proc.over_quota += OVER_QUOTA_LINE in text
        if proc.eviction_log is None:
            proc.eviction_log = EvictionLog(proc.label)
        proc.eviction_log.scan(now, text)
        if match := CUT_DELETION_LINE.search(text) or EVICTING_LINE.search(text):
            proc.cut_deletions.append(match.group(1))
        if REPAIRED_LINE.search(text):
            proc.repairs.append(text)
        if text.startswith(("ERROR ", "CRITICAL ")):
            proc.errors[_error_kind(text)] += 1
        proc.alarms += [text for alarm in ALARMS if alarm in text]

    def _snapshot(self) -> None:
        """Remember every capture that reached the spool: none of them may ever go missing."""
        with contextlib.suppress(FileNotFoundError):
            self.acknowledged.update(os.listdir(self.spool_dir / "captures"))

    # -- the second syncer -----------------------------------------------------------------------

    async def _second_syncer(self, rng: random.Random, stop: asyncio.Event) -> None:
        """Another process syncing the same spool while the batches run, run after run."""
        mode = self.config.second_syncer
        for index in itertools.count():
            if stop.is_set():
                return
            daemon = rng.choice((True, False)) if mode == "mixed" else mode == "daemon"
            first = (
                index == 0 and mode != "once"
            )  # one daemon SIGKILLed mid-run, whatever the draws
            daemon = daemon or first
            args = [sys.executable, "-m", "heimdall_edge.cli", "sync"]
            if not daemon:
                args += ["--once", "--json"]
            lifetime = rng.uniform(2.0, 8.0)  # a daemon is stopped (SIGTERM) after this
            draw = rng.random()
            if first:
                plan: Plan = ("kill", 0, rng.uniform(0.5, 1.5))
            elif self.config.revision_kills and draw < 0.4:
                plan = ("revised", 0, rng.uniform(0.3, 1.5))
            elif draw < 0.6:
                plan = ("kill", 0, rng.uniform(0.2, lifetime if daemon else 2.5))
            else:
                plan = ("none", 0, 0.0)
            run = Batch(
                index, [], _plan_text(plan), kind="sync daemon" if daemon else "sync --once"
            )
            self.report.syncer_runs.append(run)

            async def killer(
                process: asyncio.subprocess.Process,
                until: Until,
                run: Batch = run,
                plan: Plan = plan,
                daemon: bool = daemon,
                lifetime: float = lifetime,
            ) -> None:
                kind, _turns, delay = plan
                t0 = time.monotonic()
                end = t0 + lifetime if daemon else float("inf")
                if kind == "revised":
                    # As soon as a capture's newest revision is newer than its record in S3
                    # (once the syncer is up and syncing: `delay` after its start).
                    await until(
                        lambda: (
                            stop.is_set()
                            or time.monotonic() > end
                            or (time.monotonic() - t0 > delay and bool(self.watcher.behind_store()))
                        )
                    )
                    if not stop.is_set() and time.monotonic() <= end:
                        await self._kill(process, run)
                        return
                elif kind == "kill":
                    await until(lambda: stop.is_set() or time.monotonic() - t0 > delay)
                    if not stop.is_set():
                        await self._kill(process, run)
                        return
                if daemon:
                    # SIGTERM once it is up (before that the signal's default action kills it).
                    await until(lambda: stop.is_set() or time.monotonic() > end)
                    await until(lambda: run.ready)
                    if process.returncode is None:
                        process.send_signal(signal.SIGTERM)
                        run.terminated = True

            env = self.device_env | {"HEIMDALL_SYNC__INTERVAL_S": str(SECOND_SYNCER_INTERVAL_S)}
            await self._run_process(args, run, killer, env=env)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=rng.uniform(0.2, 1.5))

    # -- the drain -------------------------------------------------------------------------------

    async def _drain(self) -> None:
        drain = Batch(0, [], "none", kind="drain")
        self.report.drain_run = drain
        await self._run_process(
            [sys.executable, "-m", "heimdall_edge.cli", "sync", "--once", "--json"],
            drain,
            None,
            env=self.env,
            timeout_s=self.config.drain_timeout_s,
            stdout=True,
        )
        code, err = drain.returncode, "\n".join(drain.stderr_tail)[-2000:]
        try:
            self.report.drain = json.loads(drain.stdout)
        except json.JSONDecodeError:
            self.report.failures.append(f"sync --once printed no JSON (exit {code}): {err}")
            return
        if code != 0:
            self.report.failures.append(
                f"sync --once exited {code} with the store up: {self.report.drain}; {err}"
            )
        if self.report.drain.get("waiting"):
            self.report.failures.append(
                f"{self.report.drain['waiting']} captures still leased after every service "
                "process ended: a dead process's lease must not hold a capture back"
            )

    # -- the checks ------------------------------------------------------------------------------

    def check(self, server: MotoServer) -> None:
        from heimdall_edge.spool.store import Spool

        report, fail, config = self.report, self.report.failures.append, self.config
        with Spool(self.spool_dir) as spool:
            recovered = spool.recovered
            records = {r.capture_id: r for r in spool.list()}
            problems = {cid: spool.verify(cid) for cid in records}
        on_disk = {cid: self._disk_revision(cid) for cid in records}
        quarantine = sorted(os.listdir(self.spool_dir / "quarantine"))
        with self.watcher.lock:
            seen = dict(self.watcher.seen)
        processes = report.batches + report.syncer_runs
        everyone = processes + ([report.drain_run] if report.drain_run else [])
        evictions = [e for p in everyone for e in p.evictions]
        evicted = {e.capture_id: e for e in evictions}
        # An eviction a SIGKILL cut after its deletion committed has no "evicted" line: the
        # next opening of the spool finished it, or the "evicting" line before it is the
        # only word. Its tier is what the watcher last saw.
        for p in everyone:
            for cid in p.cut_deletions:
                if cid not in evicted and cid not in records:
                    state = seen[cid].last_state if cid in seen else None
                    tier = "synced" if state and state[0] == "synced" else "unsynced"
                    evicted[cid] = Eviction(f"{p.label} (recovery)", p.started_at, tier, cid, 0)
                    evictions.append(evicted[cid])
        report.evicted = evicted
        self.acknowledged |= seen.keys()
        for b in report.batches:
            self.acknowledged.update(b.logged)
        report.captures = len(records)
        report.acknowledged_seen = len(self.acknowledged)
        report.statuses = collections.Counter(r.status for r in records.values())
        for r in records.values():
            report.engines.update(f"{k}:{v}" for k, v in r.engines.items())

        # The spool: consistent, nothing quarantined, every file as recorded, and each
        # capture.json at the revision the index has.
        if recovered.quarantined or quarantine:
            fail(f"spool quarantine is not empty: {recovered}, {quarantine}")
        for cid, found in problems.items():
            if found:
                fail(f"capture {cid} does not verify: {found}")
        for cid, revision in on_disk.items():
            if revision != records[cid].revision:
                fail(
                    f"capture {cid}: capture.json on disk is at revision {revision}, "
                    f"the index at {records[cid].revision}"
                )

        # No acknowledged capture lost; eviction only as allowed.
        lost = self.acknowledged - records.keys() - evicted.keys()
        if lost:
            fail(f"{len(lost)} captures reached the spool and then vanished: {sorted(lost)}")
        twice = [cid for cid, n in collections.Counter(e.capture_id for e in evictions).items()
                 if n > 1]  # fmt: skip
        if twice:
            fail(f"captures evicted twice: {twice}")
        if still := sorted(evicted.keys() & records.keys()):
            fail(f"captures logged as evicted are still in the spool: {still}")
        unsynced = [e for e in evictions if e.tier == "unsynced"]
        if unsynced and not config.evict_unsynced:
            fail(f"{len(unsynced)} unsynced captures evicted with evict_unsynced off: {unsynced}")
        if evictions and config.quota_mb is None:
            fail(f"{len(evictions)} captures evicted without a quota set")

        # The processes: no hang, no crash loop.
        for b in report.batches:
            if b.hung:
                fail(f"batch {b.index} hung (still running after {config.batch_timeout_s} s)")
            elif not b.killed and b.returncode != 0:
                fail(f"batch {b.index} exited {b.returncode} (not killed):\n" + _tail(b))
            elif not b.killed and not b.ready:
                fail(f"batch {b.index} never said it was ready:\n" + _tail(b))
            for alarm in b.alarms:
                fail(f"batch {b.index} logged: {alarm}")
        for p in report.syncer_runs:
            allowed = (0,) if p.kind == "sync daemon" else (0, 1)
            if p.hung:
                fail(f"{p.label} ({p.kind}) hung (still running after {config.batch_timeout_s} s)")
            elif not p.killed and p.returncode not in allowed:
                fail(f"{p.label} ({p.kind}) exited {p.returncode} (not killed):\n" + _tail(p))
            for alarm in p.alarms:
                fail(f"{p.label} ({p.kind}) logged: {alarm}")
        if report.drain_run is not None:
            for alarm in report.drain_run.alarms:
                fail(f"the drain logged: {alarm}")

        # Every turn accounted for, batch by batch (a capture belongs to the process during
        # whose lifetime it appeared: its own time stamp may come from a stepped clock).
        per_batch: dict[int, set[str]] = collections.defaultdict(set)
        for cid, s in seen.items():
            per_batch[s.batch].add(cid)
        attributed: set[str] = set()
        for b in report.batches:
            mine = per_batch.get(b.index, set()) | set(b.logged)
            if mine & attributed:
                fail(f"batch {b.index}: captures counted twice: {sorted(mine & attributed)}")
            attributed |= mine
            missing_logged = [c for c in b.logged if c not in records and c not in evicted]
            if missing_logged:
                fail(f"batch {b.index}: answered captures missing from the spool: {missing_logged}")
            if len(set(b.logged)) != len(b.logged):
                fail(f"batch {b.index}: a capture was answered twice: {b.logged}")
            unlogged = sorted(c for c in mine if c not in b.logged)
            if b.not_kept > b.over_quota:
                fail(f"batch {b.index}: {b.not_kept} turns refused, not for the quota")
            splittable = sum(Path(path).name in SPLITTABLE for path in b.inputs)
            if b.finished:
                turns = len(b.logged) + b.not_kept
                if not len(b.inputs) <= turns <= len(b.inputs) + splittable or unlogged:
                    fail(
                        f"batch {b.index} (not killed): {len(b.inputs)} recordings played "
                        f"({splittable} with a pause that may split them), {len(b.logged)} "
                        f"answered, {b.not_kept} refused at the quota, {len(mine)} kept "
                        f"({unlogged} unanswered)"
                    )
            else:
                # A kill may cut one turn short: that capture is kept, never answered.
                if len(unlogged) > 1:
                    fail(
                        f"batch {b.index} (killed): {len(unlogged)} unanswered captures {unlogged}"
                    )
                last = max((seen[c].seq for c in b.logged if c in seen), default=-1)
                for cid in unlogged:
                    if cid in seen and seen[cid].seq < last:
                        fail(f"batch {b.index}: unanswered capture {cid} is not the last one")
                report.not_reached += max(0, len(b.inputs) - len(mine) - b.not_kept)
            for cid in unlogged:
                r = records.get(cid)
                # Cut short: still "captured", or transcribed by a later process's backfill.
                if (
                    r is None
                    or r.status == "captured"
                    or (r.error == CUT_SHORT and r.transcript is not None)
                ):
                    report.interrupted.append(cid)
        strays = records.keys() - attributed
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
        report.synced_by_second = len(
            set().union(*(p.synced_by_service for p in report.syncer_runs))
            if report.syncer_runs
            else set()
        )
        unsynced_now = sorted(cid for cid, r in records.items() if r.sync_state != "synced")
        if unsynced_now:
            fail(f"{len(unsynced_now)} captures not synced after the drain: {unsynced_now[:10]}")
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
        twice_written = sorted(k for k, n in per_key.items() if n > 1)
        if twice_written:
            fail(f"{len(twice_written)} S3 keys written more than once: {twice_written[:5]}")
        orphans = sorted(
            k for k in per_key.keys() - wanted.keys() - superseded if _capture_of(k) not in evicted
        )
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
        if extra := sorted(set(ids) - records.keys() - evicted.keys()):
            fail(f"DynamoDB items for captures not in the spool: {extra}")
        if records.keys() - set(ids):
            fail(f"captures without a DynamoDB item: {sorted(records.keys() - set(ids))[:10]}")
        if {dev for dev, _cid in per_item} - {DEVICE}:
            fail(f"DynamoDB items of another device: {per_item}")
        item_of = {item["capture_id"]["S"]: item for item in items}
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

        # Evicted synced captures: in S3 and DynamoDB at the last revision they had here.
        last_revision: dict[str, int] = {cid: r.revision for cid, r in records.items()}
        for cid, e in evicted.items():
            if e.tier == "unsynced":
                continue  # lost by design (evict_unsynced on), or failed above
            item = item_of.get(cid)
            if item is None:
                fail(f"capture {cid} evicted as synced, but it has no DynamoDB item")
                continue
            revision = int(item.get("revision", {"N": "0"})["N"])
            last_revision[cid] = revision
            if cid in seen and seen[cid].max_revision > revision:
                fail(
                    f"capture {cid} evicted as synced at revision {seen[cid].max_revision}, but "
                    f"DynamoDB has revision {revision}: a revision never reached the store"
                )
            keys = {name: value["S"] for name, value in item.get("s3_keys", {"M": {}})["M"].items()}
            if not keys.get("capture.json", "").endswith(f"/capture.r{revision}.json"):
                fail(f"capture {cid} evicted: its index item's record is not revision {revision}")
            if gone := sorted(k for k in keys.values() if k not in per_key):
                fail(f"capture {cid} evicted: objects its index item names are not in S3: {gone}")

        # What the SIGKILLs cut between revisions reached the store at that revision or later.
        for p in processes:
            for name, entries in (p.kill_state or {}).items():
                for entry in entries:
                    cid, revision = entry[0], entry[1]
                    final = last_revision.get(cid)
                    if final is not None and final < revision:
                        fail(
                            f"{p.label}: capture {cid} was at revision {revision} at the kill "
                            f"({name}), and the store ends at revision {final}"
                        )

        self._check_clock(records, seen)
        self._check_evictions(evictions)

    def _check_clock(self, records: dict[str, Any], seen: dict[str, Any]) -> None:
        report = self.report
        if not self.config.clock_steps:
            return
        ends = {b.index: b.ended_at for b in report.batches}
        for step in report.steps:
            step.in_turn = [
                cid
                for cid, s in seen.items()
                if s.leased_by is not None
                and s.first_seen < step.at < min(s.recorded_at or 1e18, ends.get(s.batch, 1e18))
            ]
        report.stamped_off = sum(
            abs(r.created_at.timestamp() - seen[cid].first_seen_wall) > STAMP_OFF_S
            for cid, r in records.items()
            if cid in seen
        )
        refused: dict[str, float] = {}
        synced: dict[str, list[float]] = collections.defaultdict(list)
        for p in report.batches + report.syncer_runs:
            for cid, at in p.clock_refused.items():
                refused[cid] = min(at, refused.get(cid, at))
            for cid, at in p.synced_at.items():
                synced[cid].append(at)
        report.clock_refused = len(refused)
        report.clock_refused_then_synced = sum(
            any(at > refused_at for at in synced[cid]) for cid, refused_at in refused.items()
        )

    def _check_evictions(self, evictions: list[Eviction]) -> None:
        report = self.report
        if not evictions or self.config.quota_mb is None:
            return
        everyone = report.batches + report.syncer_runs
        everyone += [report.drain_run] if report.drain_run else []
        logs = [p.eviction_log for p in everyone if p.eviction_log is not None]
        exact = [event for log in logs for event in log.exact_events()]
        for event in exact:
            event.freed_by_others = cut_during(event, report.ballast_cuts)
        strays = [e for log in logs for e in log.strays()]
        estimated = group_events(strays)
        measure_events(estimated, self.watcher, int(self.config.quota_mb * MiB))
        report.events = sorted(exact + estimated, key=lambda e: e.start)
        report.over_evictions = over_evicted(report.events)
        report.failures += [f"over-eviction: {text}" for text in report.over_evictions]

    def _disk_revision(self, capture_id: str) -> int | None:
        try:
            data = json.loads(
                (self.spool_dir / "captures" / capture_id / "capture.json").read_text()
            )
        except (OSError, ValueError):
            return None
        return int(data.get("revision", 1))


def _capture_of(key: str) -> str | None:
    match = re.search(rf"/({ID})/", key)
    return match.group(1) if match else None


def _plan_text(plan: Plan) -> str:
    kind, turns, delay = plan
    if kind == "none":
        return "none"
    if kind == "startup":
        return f"startup +{delay:.2f}s"
    if kind == "kept":
        return f"kept after turn {turns} +{delay:.2f}s"
    if kind == "backfill":
        return f"after backfill +{delay:.2f}s"
    if kind == "revised":
        return f"revision behind S3 (after {delay:.2f}s)"
    if kind == "kill":
        return f"at +{delay:.2f}s"
    return f"after turn {turns} +{delay:.2f}s"


def _error_kind(line: str) -> str:
    """An ERROR line reduced to its logger and the start of its message (ids cut out)."""
    text = re.sub(r"\d{8}T\d{9}Z-[0-9a-f]{8}", "<id>", line)
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return text[:90]


def _write_log(path: Path, lines: list[str]) -> None:
    """A process's stderr, kept in the work dir for a person to read after a failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def _tail(batch: Batch) -> str:
    return "\n".join("      " + line for line in batch.stderr_tail[-25:])
