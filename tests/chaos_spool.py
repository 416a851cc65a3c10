"""What the chaos driver sees of the spool while the processes run, and what eviction did.

`SpoolWatcher` is a thread of the driver that looks at the spool every few tens of
milliseconds without taking any of its locks: the capture folders (every capture that
reached the disk, acknowledged), the index read-only (each capture's revision, sync
state, lease and the revision of its record in S3) and the bytes under the spool, as
`Spool.disk_usage` counts them. From that it knows when a turn began and ended, when a
capture was revised and whether that revision reached the store, and what the spool
held after each eviction.

Eviction is read from the log lines of `SpoolKeeper._make_room`, per process:

    making room: U bytes used + N needed > Q quota: evicting
    evicted synced capture <id> (<n> bytes, created ...) to stay within ...
    made room: evicted K captures (F bytes) for N needed: U' bytes used now

so each eviction's need and result are exact (`EvictionEvent.overshoot`). For lines of
an older product without the first and last of these, the events are grouped from the
"evicted" lines and their usage estimated from the watcher's samples.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import sqlite3
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from heimdall_edge.spool import lease

CAPTURE_ID = r"\d{8}T\d{9}Z-[0-9a-f]{8}"
MAKING_ROOM_LINE = re.compile(
    r"making room: (\d+) bytes used \+ (\d+) needed > (\d+) quota: evicting"
)
MADE_ROOM_LINE = re.compile(
    r"made room: evicted (\d+) captures \((\d+) bytes\) for (\d+) needed: (\d+) bytes used now"
)
NO_ROOM_LINE = re.compile(r"spool over quota: .* and nothing .* can be evicted")
EXACT_SLACK = 64 * 1024
"""Noise in an exact event's figures: what the index's WAL and another process's writes may
change between the evictor's measurements."""
EVICTED_LINE = re.compile(
    rf"evicted (synced|UNSYNCED) capture ({CAPTURE_ID}) \((\d+) bytes, created [^)]*\) to stay within"
)
OVER_QUOTA_LINE = "spool over quota:"
CUT_DELETION_LINE = re.compile(rf"removed \S*/tmp/deleted-({CAPTURE_ID}): ")
"""Spool recovery finishing a deletion a SIGKILL cut (the row and the folder were gone from
captures/ already, so the capture was deleted; the eviction's log line never came)."""
MANIFEST_REVISION = re.compile(r"/capture\.r(\d+)\.json$")
WAV_HEADER = 44
NEED_MARGIN = 64 * 1024
"""What interaction._ensure_room asks for beyond the audio and the frames."""
WAL_LIMIT = 512 * 1024
"""durable.WAL_SIZE_LIMIT: a checkpoint may shrink the index's WAL by up to this much."""

INDEX_QUERY = """
SELECT capture_id, sync_state,
       json_extract(record, '$.revision'),
       json_extract(record, '$.status'),
       json_extract(record, '$.lease'),
       json_extract(record, '$.extra.s3_keys."capture.json"'),
       json_extract(record, '$.transcript') IS NULL,
       json_extract(record, '$.files')
FROM captures
"""


@dataclass
class Row:
    """A capture as the index said at one poll."""

    sync_state: str
    revision: int
    status: str
    lease: dict | None
    s3_revision: int
    """The revision of the record the last sync put in S3 (0: none yet)."""
    no_transcript: bool

    @property
    def lease_pid(self) -> int | None:
        return self.lease.get("pid") if self.lease else None

    @property
    def revised_unsynced(self) -> bool:
        """Revised (a second revision or later) and its newest revision not in the store yet."""
        return self.sync_state == "pending" and self.revision >= 2

    @property
    def behind_store(self) -> bool:
        """An older revision is in the store, the newest is not."""
        return self.sync_state == "pending" and 0 < self.s3_revision < self.revision


@dataclass
class Seen:
    capture_id: str
    batch: int
    """The service process (batch index) during whose lifetime it first appeared."""
    seq: int
    """Order of first sight."""
    first_seen: float
    first_seen_wall: float
    """The driver's real time.time() at first sight (the capture's own stamp may be stepped)."""
    leased_by: int | None = None
    recorded_at: float | None = None
    """When the watcher first saw its turn recorded (lease released)."""
    gone_at: float | None = None
    max_revision: int = 0
    synced_revisions: set[int] = field(default_factory=set)
    need: int | None = None
    """What keeping it asked the quota for (audio PCM + frames + 64 KiB), from its first revision."""
    last_state: tuple[str, int] | None = None
    """(sync state, revision) at the last poll that found it in the index."""


@dataclass
class Eviction:
    process: str
    """"service #3", "sync #5" or "drain"."""
    at: float
    tier: str
    capture_id: str
    freed: int


@dataclass
class EvictionEvent:
    """One `_make_room` call that evicted (exact, from its lines) or one process's evictions in
    a row (grouped from the "evicted" lines alone, figures estimated from samples)."""

    process: str
    evictions: list[Eviction]
    usage_before: int | None = None
    usage_after: int | None = None
    need: int = 0
    quota: int = 0
    exact: bool = False
    """From the "making room" / "made room" lines (else estimated from the watcher's samples)."""
    closed: bool = False
    """A "made room" line ended it (False: it did not fit, or a SIGKILL cut it)."""
    logged_freed: int | None = None
    opened_at: float | None = None
    closed_at: float | None = None
    """When the driver read its "making room" and "made room" lines (exact events)."""
    freed_by_others: int = 0
    """Bytes the driver itself removed from the spool's folder while it ran (the ballast cut
    back): they show in usage_after, but no eviction freed them."""

    @property
    def start(self) -> float:
        return self.evictions[0].at

    @property
    def end(self) -> float:
        return self.evictions[-1].at

    @property
    def freed(self) -> int:
        return sum(e.freed for e in self.evictions)

    @property
    def overshoot(self) -> int | None:
        """Bytes freed beyond the need and the last capture evicted (<= 0 is right).

        A right eviction stops as soon as what is used plus what is needed fits, so just
        before its last deletion it did not fit: used + need + last freed > quota. For an
        estimated event the sample after it can only add (a capture kept or a reply added
        since) or shrink by a WAL checkpoint (up to WAL_LIMIT): allowed for in `over_evicted`.
        """
        if self.usage_after is None or not self.evictions or (self.exact and not self.closed):
            return None
        usage_after = self.usage_after + self.freed_by_others
        return self.quota - usage_after - self.need - self.evictions[-1].freed


class EvictionLog:
    """A process's eviction lines, read one by one: exact events, and stray evictions."""

    def __init__(self, process: str) -> None:
        self.process = process
        self.events: list[EvictionEvent] = []
        self.evictions: list[Eviction] = []
        self._open: EvictionEvent | None = None

    def scan(self, at: float, line: str) -> None:
        if match := MAKING_ROOM_LINE.search(line):
            used, need, quota = map(int, match.groups())
            self._open = EvictionEvent(
                self.process, [], usage_before=used, need=need, quota=quota, exact=True,
                opened_at=at,
            )  # fmt: skip
            self.events.append(self._open)
        elif eviction := parse_eviction(self.process, at, line):
            self.evictions.append(eviction)
            if self._open is not None:
                self._open.evictions.append(eviction)
        elif (match := MADE_ROOM_LINE.search(line)) and self._open is not None:
            _count, freed, _need, used = map(int, match.groups())
            self._open.usage_after, self._open.logged_freed = used, freed
            self._open.closed, self._open.closed_at = True, at
            self._open = None
        elif NO_ROOM_LINE.search(line) and self._open is not None:
            self._open = None

    def exact_events(self) -> list[EvictionEvent]:
        return [e for e in self.events if e.evictions]

    def strays(self) -> list[Eviction]:
        """Evictions outside any "making room" event (an older product's lines)."""
        inside = {id(e) for event in self.events for e in event.evictions}
        return [e for e in self.evictions if id(e) not in inside]


def parse_eviction(process: str, at: float, line: str) -> Eviction | None:
    match = EVICTED_LINE.search(line)
    if match is None:
        return None
    tier = "synced" if match.group(1) == "synced" else "unsynced"
    return Eviction(process, at, tier, match.group(2), int(match.group(3)))


def group_events(evictions: list[Eviction], gap_s: float = 0.3) -> list[EvictionEvent]:
    """Consecutive lines of one process, close together and not interleaved with another's."""
    events: list[EvictionEvent] = []
    for eviction in sorted(evictions, key=lambda e: e.at):
        last = events[-1] if events else None
        if last is not None and last.process == eviction.process and eviction.at - last.end < gap_s:
            last.evictions.append(eviction)
        else:
            events.append(EvictionEvent(eviction.process, [eviction]))
    return events


class SpoolWatcher:
    """Polls the spool from the driver's side; every method is safe from any thread."""

    def __init__(self, spool_dir: Path, interval_s: float = 0.04) -> None:
        self.spool_dir = spool_dir
        self.interval_s = interval_s
        self.lock = threading.RLock()
        self.seen: dict[str, Seen] = {}
        self.rows: dict[str, Row] = {}
        self.samples: list[tuple[float, int]] = []
        """(time.monotonic(), bytes under the spool), as Spool.disk_usage counts them."""
        self.batch = -1
        self.failed_polls = 0
        self.on_turn_started: Callable[[str], None] | None = None
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-spool", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a bad poll is retried; the checks read the spool
                self.failed_polls += 1

    # -- one look ----------------------------------------------------------------------------

    def poll(self) -> None:
        now, wall = time.monotonic(), time.time()
        try:
            folders = set(os.listdir(self.spool_dir / "captures"))
        except FileNotFoundError:
            folders = set()
        rows = self._index_rows()
        usage = self._usage()
        started: list[str] = []
        with self.lock:
            for cid in sorted(folders - self.seen.keys()):
                self.seen[cid] = Seen(cid, self.batch, next(self._seq), now, wall)
            for cid, seen in self.seen.items():
                if cid not in folders and seen.gone_at is None:
                    seen.gone_at = now
            if rows is not None:
                for cid, (row, files) in rows.items():
                    seen = self.seen.get(cid)
                    if seen is None:
                        continue  # the folder went between the listing and the query
                    if seen.need is None and files is not None and row.revision == 1:
                        seen.need = _need(files)
                    if seen.leased_by is None and row.lease_pid is not None:
                        seen.leased_by = row.lease_pid
                        started.append(cid)
                    if seen.leased_by is not None and row.lease_pid is None:
                        seen.recorded_at = seen.recorded_at or now
                    seen.max_revision = max(seen.max_revision, row.revision)
                    seen.last_state = (row.sync_state, row.revision)
                    if row.sync_state == "synced":
                        seen.synced_revisions.add(row.revision)
                self.rows = {cid: row for cid, (row, _files) in rows.items()}
            if usage is not None:
                self.samples.append((now, usage))
        if self.on_turn_started is not None:
            for cid in started:
                self.on_turn_started(cid)

    def _index_rows(self) -> dict[str, tuple[Row, dict | None]] | None:
        path = self.spool_dir / "index.sqlite3"
        if not path.exists():
            return None
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.5)
        except sqlite3.Error:
            return None
        try:
            result = {}
            for cid, state, revision, status, held, manifest, no_text, files in db.execute(
                INDEX_QUERY
            ):
                match = MANIFEST_REVISION.search(manifest or "")
                row = Row(
                    state,
                    int(revision or 1),
                    status,
                    json.loads(held) if held else None,
                    int(match.group(1)) if match else 0,
                    bool(no_text),
                )
                result[cid] = (row, json.loads(files) if files else None)
            return result
        except sqlite3.Error:
            return None
        finally:
            db.close()

    def _usage(self) -> int | None:
        total = 0
        for folder, _dirs, names in os.walk(self.spool_dir):
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(folder, name)).st_size
        return total

    # -- questions ---------------------------------------------------------------------------

    def leased_by(self, pid: int) -> list[str]:
        """Captures whose turn process `pid` is recording now (kept, outcome not recorded)."""
        with self.lock:
            return [cid for cid, row in self.rows.items() if row.lease_pid == pid]

    def behind_store(self) -> list[tuple[str, int, int]]:
        """(capture, newest revision, revision in S3) of captures revised since their sync."""
        with self.lock:
            return [(c, r.revision, r.s3_revision) for c, r in self.rows.items() if r.behind_store]

    def revised_unsynced(self) -> list[tuple[str, int]]:
        with self.lock:
            return [(c, r.revision) for c, r in self.rows.items() if r.revised_unsynced]

    def cut_short_waiting(self) -> list[str]:
        """Captures a dead process left untranscribed: the next service's backfill takes them."""
        with self.lock:
            return [
                cid
                for cid, row in self.rows.items()
                if row.status == "captured" and row.no_transcript and not lease.is_held(row.lease)
            ]

    def state_at_kill(self, pid: int) -> dict[str, list]:
        """What a SIGKILL of `pid` cut between revisions (the watcher polls once more first)."""
        self.poll()
        with self.lock:
            return {
                "mid_turn": [(c, r.revision) for c, r in self.rows.items() if r.lease_pid == pid],
                "revised_unsynced": [
                    (c, r.revision) for c, r in self.rows.items() if r.revised_unsynced
                ],
                "behind_store": [
                    (c, r.revision, r.s3_revision) for c, r in self.rows.items() if r.behind_store
                ],
            }

    def usage_between(self, start: float, end: float) -> tuple[int | None, int | None]:
        """(last sample before `start`, first sample at or after `end`)."""
        with self.lock:
            times = [t for t, _u in self.samples]
            i = bisect_left(times, start)
            before = self.samples[i - 1][1] if i > 0 else None
            j = bisect_left(times, end)
            after = self.samples[j][1] if j < len(self.samples) else None
        return before, after


def _need(files: dict) -> int:
    """interaction._ensure_room's ask: the PCM (audio.wav less its header), frames, 64 KiB."""
    audio = files.get("audio.wav", {}).get("bytes", WAV_HEADER)
    frames = sum(info["bytes"] for name, info in files.items() if name.startswith("frame-"))
    return audio - WAV_HEADER + frames + NEED_MARGIN


def measure_events(
    events: list[EvictionEvent], watcher: SpoolWatcher, quota: int, settle_s: float = 0.02
) -> None:
    """Fill in each event's usage before and after (from the samples) and its need.

    The need of a service's event is what the capture it kept next asked for (a quota
    sweep after a sync pass asks for nothing); a sample is only taken as "after" if no
    other process's eviction began before it.
    """
    with watcher.lock:
        captures = sorted(watcher.seen.values(), key=lambda s: s.first_seen)
    for i, event in enumerate(events):
        event.quota = quota
        nxt = events[i + 1].start if i + 1 < len(events) else float("inf")
        before, after = watcher.usage_between(
            event.start - watcher.interval_s, event.end + settle_s
        )
        with watcher.lock:
            times = [t for t, _u in watcher.samples]
            j = bisect_left(times, event.end + settle_s)
            taken = times[j] if j < len(times) else None
        event.usage_before = before
        event.usage_after = after if taken is not None and taken < nxt else None
        if event.process.startswith("service"):
            kept = [
                s
                for s in captures
                if event.start - 0.1 <= s.first_seen <= event.end + 0.5 and s.need is not None
            ]
            event.need = max((s.need or 0) for s in kept) if kept else 0


READ_LAG_S = 0.2
"""How much later than a process wrote a line the driver may read it."""


def cut_during(event: EvictionEvent, cuts: list[tuple[float, int]]) -> int:
    """Bytes cut from the ballast between an exact event's two measurements of the spool.

    The times are when the driver read the lines, a little after they were written, so a
    cut up to READ_LAG_S before the first line counts too: at worst an event is let off
    by one cut it did not see.
    """
    if event.opened_at is None or event.closed_at is None:
        return 0
    return sum(n for at, n in cuts if event.opened_at - READ_LAG_S <= at <= event.closed_at)


def over_evicted(events: list[EvictionEvent]) -> list[str]:
    """Events that freed more than their need plus one capture (beyond the figures' noise)."""
    found = []
    for event in events:
        over = event.overshoot
        slack = EXACT_SLACK if event.exact else WAL_LIMIT + NEED_MARGIN
        if over is not None and over > slack:
            found.append(
                f"{event.process} evicted {len(event.evictions)} captures ({event.freed} bytes) "
                f"for a need of {event.need} bytes ({event.usage_before} used before, quota "
                f"{event.quota}): {event.usage_after} bytes used after, {over} bytes more than "
                "needed plus its last capture"
            )
        if event.exact and event.closed and event.logged_freed != event.freed:
            found.append(
                f"{event.process}: made room freeing {event.logged_freed} bytes, but its "
                f"evicted lines add up to {event.freed}"
            )
    return found


def concurrent_pairs(events: list[EvictionEvent], within_s: float = 1.0) -> int:
    """Events of two different processes within `within_s` of each other."""
    return sum(
        1
        for a, b in itertools.pairwise(sorted(events, key=lambda e: e.start))
        if a.process != b.process and b.start - a.end < within_s
    )
