"""Soak: hundreds of whole turns in one process; memory and file descriptors must stay flat.

Builds the real appliance stack on simulated hardware, in this one process: the
real faster-whisper and Piper models, the official OpenAI and ElevenLabs clients
behind breakers, retries and hedging, the voice cache (small, so it evicts), the
spool under a quota (so it evicts), the syncer and the connectivity probe; a mock
GPIO button, a file microphone, a synthetic camera and a WAV speaker. After
`appliance.start()` it runs turns back to back: queue a real recording from
HEIMDALL_SPEECH_DIR into the microphone, tap the button, `await appliance.one_turn()`.

The cloud is the fake cloud on loopback, run in a child process so that its
recorded requests, threads and sockets are not counted here. Its faults change
every few turns, so every path runs again and again:

  healthy        the cloud answers every stage
  slow (race)    every answer 150 ms late, after the hedge delay (100 ms): both engines run,
                 the loser is cancelled or its stream closed
  hung (hedged)  the cloud never answers: the local engine wins, the call is cancelled
  server errors  503 / 429 + Retry-After / 500: retries, then open breakers
  broken         malformed transcription, chat and speech streams cut short
  auth refused   401: breakers open for auth_reset_s
  offline        connections refused: offline after two failures, probes until back

Disk stays bounded: the voice cache has a small max_mb (2 MB), and the spool a quota.
With `--store quota` (the default, and what the test uses) no bucket is set, so sync is
off, as on a device without one, and the 10 MB quota (the smallest allowed) with
evict_unsynced evicts the oldest capture at almost every turn: deterministic, no third
process, and the spool's eviction path soaks too. With `--store moto`, a moto S3 +
DynamoDB server (a child process as well: moto keeps every object in its own memory)
receives every capture and retention_days = 0 deletes each one here once synced, so
boto3, the capture store and the syncer's worker threads soak too (slower to start).
The syncer and the connectivity probe run beside the turns, as Appliance.serve runs them.

gpiozero's MockPin records every state a pin was ever in (for tests' asserts); a real
pin keeps nothing, so that history is cleared after each turn and not counted.

Every `--every` turns, after gc.collect(): RSS, open file descriptors (/proc/self/fd),
threads, asyncio tasks and gc-tracked objects. The warm-up is the first 20 % of the
turns, rounded up to whole cycles of the fault schedule (at least one), so every path
has run before the reference is taken. Growth = median of the samples over the last
cycle(s) against the median over the cycle(s) right after the warm-up; windows of whole
cycles see the same mix of faults, so the comparison is like for like.

Usage: HEIMDALL_MODELS_DIR=../shared/models python -m bench.soak --interactions 500
       [--every 5] [--store quota|moto] [--plot soak.png]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.latency import MODELS, SPEECH
from bench.soak_children import Child

PHASE_TURNS = 2
"""Turns per fault phase: the first opens breakers / goes offline, the second runs with them open."""
ALL_ROUTES = ("transcriptions", "chat", "tts")
PHASES: list[tuple[str, dict[str, Any]]] = [
    ("healthy", {}),
    ("slow (race)", {"faults": {r: {"latency_s": 0.15} for r in ALL_ROUTES}}),
    ("hung (hedged)", {"faults": {r: {"hang": True} for r in ALL_ROUTES}}),
    (
        "server errors",
        {
            "faults": {
                "transcriptions": {"status": 503},
                "chat": {"status": 429, "retry_after_s": 0.05},
                "tts": {"status": 500},
            }
        },
    ),
    (
        "broken",
        {
            "faults": {
                "transcriptions": {"malformed": True},
                "chat": {"truncate": True},
                "tts": {"truncate": True},
            }
        },
    ),
    ("auth refused", {"faults": {"transcriptions": {"status": 401}, "tts": {"status": 401}}}),
    ("offline", {"refuse": True}),
]
CYCLE_TURNS = PHASE_TURNS * len(PHASES)
HEDGE_MS = 100
LIMIT = 0.05  # growth after warm-up allowed by the soak test

SETTINGS_ENV = {
    "HEIMDALL_DEVICE_ID": "soak",
    "HEIMDALL_LISTENING__MODE": "button",
    "HEIMDALL_VOICE_CACHE__MAX_MB": "2",  # a few dozen replies: the LRU evicts all the time
    "HEIMDALL_SYNC__QUOTA_MB": "10",  # the minimum: about 20 captures, then eviction
    "HEIMDALL_SYNC__EVICT_UNSYNCED": "true",
    "HEIMDALL_RESILIENCE__STT_HEDGE_AFTER_MS": str(HEDGE_MS),
    "HEIMDALL_RESILIENCE__REPLY_HEDGE_AFTER_MS": str(HEDGE_MS),
    "HEIMDALL_RESILIENCE__TTS_HEDGE_AFTER_MS": str(HEDGE_MS),
    "HEIMDALL_RESILIENCE__STT_DEADLINE_S": "3",
    "HEIMDALL_RESILIENCE__REPLY_DEADLINE_S": "3",
    "HEIMDALL_RESILIENCE__TTS_DEADLINE_S": "3",
    "HEIMDALL_RESILIENCE__RESET_S": "1",  # breakers half-open again within a phase or two
    "HEIMDALL_RESILIENCE__AUTH_RESET_S": "2",
    "HEIMDALL_RESILIENCE__FAILURE_WINDOW_S": "10",
    "HEIMDALL_RESILIENCE__PROBE_INTERVAL_S": "0.2",
    "HEIMDALL_RESILIENCE__REQUESTS_PER_MINUTE": "10000",  # turns come faster than a person's
    "HF_HUB_OFFLINE": "1",
}
MOTO_ENV = {
    "HEIMDALL_SYNC__RETENTION_DAYS": "0",  # deleted here as soon as it is in S3
    "HEIMDALL_SYNC__EVICT_UNSYNCED": "false",
    "HEIMDALL_SYNC__INTERVAL_S": "5",
    "HEIMDALL_SYNC__RETRY_MAX_S": "2",
}


# ---- measuring ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    turn: int
    elapsed_s: float
    rss: int
    fds: int
    threads: int
    tasks: int
    objects: int


def take_sample(turn: int, started: float) -> Sample:
    gc.collect()
    return Sample(
        turn=turn,
        elapsed_s=time.monotonic() - started,
        rss=psutil.Process().memory_info().rss,
        fds=len(os.listdir("/proc/self/fd")),
        threads=threading.active_count(),
        tasks=len(asyncio.all_tasks()),
        objects=len(gc.get_objects()),
    )


@dataclass(frozen=True)
class Growth:
    metric: str
    start: float  # right after start(), before any turn
    warm: float  # median over the window right after the warm-up
    final: float  # median over the last window
    peak: float

    @property
    def percent(self) -> float:
        return (self.final / self.warm - 1) * 100 if self.warm else 0.0


@dataclass
class SoakResult:
    turns: int
    warmup_turns: int
    window_turns: int
    samples: list[Sample]
    seconds: float
    store: str
    engines: dict[str, collections.Counter[str]] = field(default_factory=dict)
    phases: collections.Counter[str] = field(default_factory=collections.Counter)
    phase_seconds: collections.Counter[str] = field(default_factory=collections.Counter)
    stage_ms: collections.Counter[str] = field(default_factory=collections.Counter)
    """Each stage's timings_ms, summed over the turns."""
    no_speech: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    log_counts: collections.Counter[str] = field(default_factory=collections.Counter)
    log_errors: list[str] = field(default_factory=list)
    sync: dict[str, Any] = field(default_factory=dict)
    spool_counts: dict[str, int] = field(default_factory=dict)
    cache_bytes: int = 0
    spool_bytes: int = 0
    index_bytes: dict[str, int] = field(default_factory=dict)
    """The SQLite files (database, -wal, -shm) of the spool and the voice cache, by name."""
    type_growth: list[tuple[str, int, int]] = field(default_factory=list)
    traced: list[tuple[int, int]] = field(default_factory=list)
    """With tracemalloc: (turn, bytes traced) at each sample."""
    traced_growth: list[str] = field(default_factory=list)
    """With tracemalloc: the source lines whose live allocations grew most after the warm-up."""
    """(type, count after warm-up, growth since) for the types of gc objects that grew most."""

    def window(self, first: int, last: int) -> list[Sample]:
        return [s for s in self.samples if first < s.turn <= last]

    def growth(self, metric: str) -> Growth:
        after_warmup = self.window(self.warmup_turns, self.warmup_turns + self.window_turns)
        at_end = self.window(self.turns - self.window_turns, self.turns)
        values = [getattr(s, metric) for s in self.samples]
        return Growth(
            metric,
            start=values[0],
            warm=statistics.median(getattr(s, metric) for s in after_warmup),
            final=statistics.median(getattr(s, metric) for s in at_end),
            peak=max(values),
        )


def warmup_and_window(turns: int) -> tuple[int, int]:
    """Warm-up: 20 % of the turns in whole fault cycles (at least one); window: whole cycles too."""
    warmup = max(1, -(-int(turns * 0.2) // CYCLE_TURNS)) * CYCLE_TURNS
    after = turns - warmup
    window = max(1, (after // 8) // CYCLE_TURNS) * CYCLE_TURNS
    if after < 2 * window:
        raise ValueError(
            f"{turns} turns are too few: the soak needs the warm-up ({warmup} turns) "
            f"and then at least two windows of {window} turns"
        )
    return warmup, window


class _Tally(logging.Handler):
    """Counts the appliance's log records by level and keeps the last few errors (bounded)."""

    def __init__(self, echo: bool) -> None:
        super().__init__(logging.DEBUG)
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: collections.deque[str] = collections.deque(maxlen=20)
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] += 1
        if record.levelno >= logging.ERROR:
            line = f"{record.name}: {record.getMessage()}"
            if record.exc_info and record.exc_info[1] is not None:
                line += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
            self.errors.append(line)
        if self.echo:
            print(f"  log {record.levelname}: {record.getMessage()}", file=sys.stderr)


@contextlib.contextmanager
def _environ(values: dict[str, str], unset: tuple[str, ...] = ()) -> Iterator[None]:
    saved = dict(os.environ)
    for name in unset:
        os.environ.pop(name, None)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _quiet_appliance_log(echo: bool) -> Iterator[_Tally]:
    """The appliance's records go to a counter, not to whatever else is listening (pytest
    keeps every record it captures, with tracebacks and their frames: that would leak here)."""
    logger = logging.getLogger("heimdall_edge")
    tally = _Tally(echo)
    saved = (logger.propagate, logger.level)
    logger.addHandler(tally)
    logger.propagate = False
    logger.setLevel(logging.INFO if echo else logging.WARNING)
    try:
        yield tally
    finally:
        logger.removeHandler(tally)
        logger.propagate, logger.level = saved


def recordings(speech_dir: Path, max_seconds: float | None = None) -> list[Path]:
    """The shared recordings listed in transcripts.tsv (at most `max_seconds` long, if given)."""
    import soundfile

    lines = (speech_dir / "transcripts.tsv").read_text().splitlines()
    paths = [speech_dir / line.split("\t", 1)[0] for line in lines if line.strip()]
    if max_seconds is not None:
        paths = [p for p in paths if soundfile.info(str(p)).duration <= max_seconds]
    if not paths:
        raise ValueError(f"no recordings in {speech_dir} (at most {max_seconds} s long)")
    return paths


# ---- the soak -----------------------------------------------------------------------------------
async def soak(
    turns: int,
    state_dir: Path,
    *,
    speech_dir: Path = SPEECH,
    models_dir: Path = MODELS,
    max_clip_s: float | None = None,
    every: int = 1,
    store: str = "quota",
    progress: bool = False,
    verbose: bool = False,
    diagnose: bool = False,
    trace: bool = False,
) -> SoakResult:
    """Run `turns` turns on one appliance and sample every `every` turns; see the module doc.

    `max_clip_s`: only the recordings at most this long (shorter turns, for CI).
    `diagnose`: list the types of gc objects that grew after the warm-up; `trace`: run
    under tracemalloc (several times slower) and list the source lines whose live
    allocations grew, to tell a Python-level leak from allocator fragmentation.
    """
    warmup, window = warmup_and_window(turns)
    clips = recordings(speech_dir, max_clip_s)
    config = state_dir.parent / "soak-config.toml"  # empty: defaults and the environment only
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("")
    cloud = Child("fakecloud")
    moto = Child("moto") if store == "moto" else None
    env = {
        **SETTINGS_ENV,
        **cloud.env,
        "HEIMDALL_STATE_DIR": str(state_dir),
        "HEIMDALL_MODELS_DIR": str(models_dir),
    }
    # Only our settings: none of this shell's HEIMDALL_*, credentials or systemd sockets.
    unset = tuple(name for name in os.environ if name.startswith("HEIMDALL_")) + (
        "CREDENTIALS_DIRECTORY",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
    )
    if moto is not None:
        from heimdall_edge.testing.moto import AWS_ENV_TO_UNSET

        env.update(MOTO_ENV)
        env.update(moto.env)
        unset += AWS_ENV_TO_UNSET
    try:
        with _environ(env, unset), _quiet_appliance_log(verbose) as tally:
            plan = _Plan(
                turns, warmup, window, clips, config, every, store, progress, diagnose, trace
            )
            return await _soak(plan, cloud, tally)
    finally:
        cloud.close()
        if moto is not None:
            moto.close()


@dataclass(frozen=True)
class _Plan:
    turns: int
    warmup: int
    window: int
    clips: list[Path]
    config: Path
    every: int
    store: str
    progress: bool
    diagnose: bool
    trace: bool


async def _soak(plan: _Plan, cloud: Child, tally: _Tally) -> SoakResult:
    import tracemalloc

    from gpiozero.pins.mock import MockFactory

    from heimdall_edge.app import builders
    from heimdall_edge.app.appliance import Appliance
    from heimdall_edge.settings import load_settings
    from heimdall_edge.spool.durable import folder_bytes

    turns, warmup, every, clips = plan.turns, plan.warmup, plan.every, plan.clips
    settings = load_settings(plan.config)
    pins = MockFactory()
    engines = builders.build_engines(settings)
    devices = builders.build_simulated_devices(settings, realtime=False, pin_factory=pins)
    spool = builders.open_spool(settings)
    syncer = builders.build_syncer(settings, spool)
    appliance = Appliance(settings, devices, engines, spool, syncer=syncer)
    button = pins.pin(settings.button.pin)
    result = SoakResult(turns, warmup, plan.window, [], 0.0, plan.store)
    stop = asyncio.Event()
    types_at_warmup: collections.Counter[str] = collections.Counter()
    traced_at_warmup: tracemalloc.Snapshot | None = None
    if plan.trace:
        tracemalloc.start(8)
    started = time.monotonic()
    background: list[asyncio.Task[None]] = []
    try:
        await appliance.start()
        # What the service runs beside its turns (Appliance.serve): the probes and the syncer.
        background += [
            asyncio.create_task(connectivity.run(), name=f"connectivity-{service}")
            for service, connectivity in engines.connectivities.items()
        ]
        background.append(asyncio.create_task(syncer.run(stop), name="syncer"))
        result.samples.append(take_sample(0, started))
        for turn in range(1, turns + 1):
            phase, command = PHASES[((turn - 1) // PHASE_TURNS) % len(PHASES)]
            if (turn - 1) % PHASE_TURNS == 0:
                cloud.send(command)
            result.phases[phase] += 1
            devices.microphone.person.queue(clips[(turn - 1) % len(clips)])
            button.drive_low()  # a tap, then the recording is "said"
            button.drive_high()
            turn_started = time.monotonic()
            outcome = await asyncio.wait_for(appliance.one_turn(), timeout=120)
            result.phase_seconds[phase] += time.monotonic() - turn_started
            for pin in pins.pins.values():
                # gpiozero's MockPin keeps every state it was ever in (for tests' asserts),
                # a real pin nothing: drop that history so the simulation is not counted.
                pin.clear_states()
            if outcome is None:
                result.no_speech += 1
            else:
                result.stage_ms.update(outcome.timings_ms)
                for stage, engine in outcome.engines.items():
                    result.engines.setdefault(stage, collections.Counter())[engine] += 1
                if outcome.error:
                    result.errors[outcome.error.split(":", 1)[0]] += 1
            if plan.diagnose and turn == warmup:
                types_at_warmup = _type_counts()
            if plan.trace and turn == warmup:
                gc.collect()
                traced_at_warmup = tracemalloc.take_snapshot()
            if turn % every == 0 or turn == turns:
                result.samples.append(take_sample(turn, started))
                if plan.trace:
                    result.traced.append((turn, tracemalloc.get_traced_memory()[0]))
                if plan.progress and (turn % 50 == 0 or turn == turns):
                    last = result.samples[-1]
                    print(
                        f"  turn {turn}/{turns}: RSS {last.rss / 2**20:.1f} MiB, "
                        f"{last.fds} fds, {last.elapsed_s:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
        if traced_at_warmup is not None:
            gc.collect()
            diff = tracemalloc.take_snapshot().compare_to(traced_at_warmup, "lineno")
            result.traced_growth = [str(stat) for stat in diff[:12]]
        if plan.diagnose:
            grown = _type_counts()
            grown.subtract(types_at_warmup)
            result.type_growth = [
                (name, types_at_warmup[name], n) for name, n in grown.most_common(15) if n > 0
            ]
    finally:
        if plan.trace:
            tracemalloc.stop()
        stop.set()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        result.seconds = time.monotonic() - started
        result.sync = syncer.status()
        result.spool_counts = spool.counts()
        if engines.cache is not None:
            result.cache_bytes = folder_bytes(settings.state_dir / "voice-cache")
        result.spool_bytes = folder_bytes(settings.spool_dir)
        result.index_bytes = {
            str(path.relative_to(settings.state_dir)): path.stat().st_size
            for path in sorted(settings.state_dir.rglob("*.sqlite3*"))
        }
        await devices.aclose()
        if engines.cache is not None:
            engines.cache.close()
        spool.close()
        result.log_counts = tally.counts
        result.log_errors = list(tally.errors)
    return result


def _type_counts() -> collections.Counter[str]:
    gc.collect()
    return collections.Counter(
        f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=int, default=500, help="turns to run (default 500)")
    parser.add_argument("--every", type=int, default=5, help="sample every N turns (default 5)")
    parser.add_argument(
        "--store",
        choices=["quota", "moto"],
        default="quota",
        help="quota: no bucket, the spool quota evicts (default); moto: sync to moto's S3/DynamoDB",
    )
    parser.add_argument("--plot", type=Path, help="write a PNG of RSS and fds per turn here")
    parser.add_argument("-v", "--verbose", action="store_true", help="echo the appliance's log")
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="also list the types of gc objects that grew most after the warm-up",
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="run under tracemalloc (slow) and list the source lines whose allocations grew",
    )
    args = parser.parse_args()
    try:
        warmup_and_window(args.interactions)
    except ValueError as exc:
        parser.error(str(exc))

    from bench.latency import machine
    from bench.soak_report import plot, report

    with tempfile.TemporaryDirectory(prefix="heimdall-soak-") as tmp:
        result = asyncio.run(
            soak(
                args.interactions,
                Path(tmp) / "state",
                every=args.every,
                store=args.store,
                progress=True,
                verbose=args.verbose,
                diagnose=args.diagnose,
                trace=args.tracemalloc,
            )
        )
    print(f"machine: {machine()}")
    print(report(result))
    if args.plot:
        plot(result, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
