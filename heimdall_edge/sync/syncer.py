"""Store and forward: every capture in the spool reaches S3 (and DynamoDB) exactly once.

The spool is the truth and the cloud a copy. A capture goes up in three steps, each
idempotent, and is marked synced in the spool only after all of them were confirmed:

1. its files are checked against the SHA-256 in its record (a damaged capture is
   quarantined, counted and logged; the rest carry on);
2. every file, and the record of this revision (capture.r<revision>.json), is put
   under a deterministic key with a conditional write (S3 `If-None-Match: *`): a
   retry after a crash finds the object already there and writes nothing;
3. then, with a table set, one index item is put, conditionally on the revision
   (newer replaces older, never the reverse); and the capture is marked synced
   only if it is still at the revision that went up (Spool.mark_synced).

A capture that changes later (a reply, an upgraded transcript) is a new revision,
pending again, and goes up again: new files and a new record, nothing overwritten.

So a crash (or a cut network) anywhere leaves the capture pending, and the next
attempt completes it without writing anything twice: each capture ends up once in
S3 and once in DynamoDB, whatever happened in between. A capture whose turn a live
process is still recording (its lease, see spool/lease.py) waits, so its transcript, reply
and reply.wav go with it; one whose process is gone goes at once, as it is. A capture whose key in S3 already
holds *different* bytes is marked sync_state "failed" (a person must look); nothing
else ever gives up.

`Syncer.run()` is the long-lived service task: it drains pending captures, backs
off (exponentially, with jitter) while the store fails, waits while the store is
out of reach or its breaker is open, and drains at once when the store can be
reached again or a new capture is kept (`notify()`). Reachability is the store's
own (its calls feed it, and run() probes the S3 endpoint's host while it is away),
never a speech service's: sync goes on while OpenAI or ElevenLabs is down. After
each pass the spool's keeper (spool/keeper.py) applies retention and the quota; the
syncer tells it which captures it is uploading, so none of them is evicted meanwhile.

boto3 blocks: every store call runs in a worker thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heimdall_edge.cloud.breaker import BreakerState, CircuitBreaker
from heimdall_edge.cloud.errors import RETRYABLE, CloudError, ErrorKind
from heimdall_edge.settings import SyncSettings
from heimdall_edge.spool import lease
from heimdall_edge.spool.keeper import SpoolKeeper
from heimdall_edge.spool.store import (
    RECORD_NAME,
    CaptureNotFoundError,
    CaptureRecord,
    Spool,
    SpoolError,
    iso_utc,
)
from heimdall_edge.sync.cloudstore import PutResult, index_item
from heimdall_edge.sync.iot_credentials import SERVICE as CREDENTIALS_SERVICE

if TYPE_CHECKING:
    from heimdall_edge.cloud.connectivity import Connectivity
    from heimdall_edge.sync.cloudstore import CaptureStore

log = logging.getLogger(__name__)

SERVICE = "s3"
SYNC_OFF = "sync off: no bucket set (HEIMDALL_S3_BUCKET); captures stay on the device"
HELD_POLL_S = 5.0
"""While a capture's turn is still being recorded (its lease held), look again this often."""
STALE_UPLOAD_S = 3600.0
"""Multipart uploads of this device older than this are crash debris, aborted at each pass."""
BACKOFF_BASE_S = 2.0
CLIENT_ERRORS_IN_A_ROW = 3
"""A CLIENT error may be one capture's (a poison pill): the pass skips it and goes on, unless
this many captures in a row fail so (a missing bucket fails them all)."""
BURST_S = 0.25
"""The bandwidth cap lets this many seconds' worth of bytes through at once."""

TOTALS = ("synced", "bytes", "failed", "quarantined")
"""Counters kept since the syncer started, shown by status() with the keeper's."""

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
WallClock = Callable[[], datetime]


class UploadHalted(Exception):
    """Raised inside a worker thread's read when the syncer is stopping: end the upload now."""


# --- bandwidth ----------------------------------------------------------------------------------


class TokenBucket:
    """A thread-safe bandwidth cap shared by every upload: `consume(n)` blocks until n bytes fit.

    Reservation style: a caller takes its bytes at once (the balance may go negative)
    and sleeps off the debt outside the lock, so concurrent uploads share the rate
    fairly and a read larger than the burst still goes through.
    """

    def __init__(
        self,
        bytes_per_s: float,
        *,
        burst_bytes: float | None = None,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if bytes_per_s <= 0:
            raise ValueError("bytes_per_s must be positive")
        self.rate = float(bytes_per_s)
        self.burst = float(burst_bytes if burst_bytes is not None else bytes_per_s * BURST_S)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._last = clock()

    def consume(self, n: int) -> float:
        """Take n bytes' worth; returns the seconds slept."""
        if n <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            debt = -self._tokens
        wait = debt / self.rate if debt > 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


# --- results ------------------------------------------------------------------------------------


class Outcome(enum.Enum):
    SYNCED = "synced"
    ALREADY_SYNCED = "already_synced"  # another process (the CLI, the service) got there first
    QUARANTINED = "quarantined"
    GONE = "gone"  # deleted (quota, another process) while we looked at it
    CHANGED = "changed"  # a new revision came while this one went up: still pending


@dataclass(frozen=True)
class CaptureResult:
    capture_id: str
    outcome: Outcome
    bytes: int = 0
    """Bytes uploaded now (objects written, not those already there)."""
    written: int = 0
    """Objects and index items written now."""
    already_there: int = 0
    """Objects and index items an earlier, interrupted attempt had already put."""
    keys: dict[str, str] | None = None


@dataclass
class SyncReport:
    """What one pass did; `error` is the first store error, in words safe to log and show."""

    synced: int = 0
    """Captures confirmed in S3 (and the index) and marked synced in this pass."""
    bytes: int = 0
    """Bytes uploaded (files written now, not those found already there)."""
    written: int = 0
    """Objects and index items written."""
    already_there: int = 0
    """Objects and index items an earlier, interrupted attempt had already stored."""
    failed: int = 0
    """Captures attempted that did not make it (they stay pending, unless marked failed)."""
    quarantined: int = 0
    """Captures whose files no longer match their SHA-256: moved to quarantine/, not sent."""
    evicted: int = 0
    """Captures evicted to keep the spool under its quota."""
    expired: int = 0
    """Synced captures deleted because they outlived retention_days."""
    waiting: int = 0
    """Pending captures left for later: their turn is still being recorded."""
    pending: int = 0
    """Pending captures still in the spool after the pass."""
    aborted_uploads: int = 0
    reached_store: bool = False
    """Whether the store answered at least once in this pass."""
    error: str | None = None
    error_kind: ErrorKind | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.failed == 0

    def summary(self) -> str:
        parts = [f"{self.synced} synced ({self.bytes} bytes uploaded)"]
        if self.already_there:
            parts.append(f"{self.already_there} already there")
        for name in ("failed", "quarantined", "evicted", "expired", "waiting", "pending"):
            if value := getattr(self, name):
                parts.append(f"{value} {name}")
        text = ", ".join(parts)
        return f"{text}; error: {self.error}" if self.error else text

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["error_kind"] = self.error_kind.value if self.error_kind else None
        return data


@dataclass(frozen=True)
class SyncProgress:
    """Passed to sync_once's `progress` after each file and each capture (in the event loop)."""

    captures_total: int
    captures_done: int
    bytes_total: int
    bytes_done: int
    capture_id: str | None = None


Progress = Callable[[SyncProgress], None]


# --- the syncer ---------------------------------------------------------------------------------


class Syncer:
    """Spool -> S3 -> DynamoDB, exactly once per capture; safe to run in several processes.

    `store=None` means sync is off (no bucket): nothing is uploaded, captures stay on
    the device, and the quota still applies. The breaker and `connectivity` are the
    store's own (one for S3 and DynamoDB together): every store call feeds both, and
    run() runs the connectivity's probe, so `sync` alone finds the store back too.
    """

    def __init__(
        self,
        spool: Spool,
        store: CaptureStore | None,
        settings: SyncSettings,
        device_id: str,
        *,
        connectivity: Connectivity | None = None,
        breaker: CircuitBreaker | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        wall_clock: WallClock = lambda: datetime.now(UTC),
        jitter: Callable[[], float] = random.random,
        stale_upload_s: float = STALE_UPLOAD_S,
        backoff_base_s: float = BACKOFF_BASE_S,
        bandwidth: TokenBucket | None = None,
        keeper: SpoolKeeper | None = None,
    ) -> None:
        """`keeper` is the process's retention and quota (shared with the turn); unset: one
        of the syncer's own."""
        self.spool = spool
        self.store = store
        self.settings = settings
        self.device_id = device_id
        self.connectivity = connectivity
        self.breaker = breaker or CircuitBreaker(SERVICE, clock=clock)
        self.stale_upload_s = stale_upload_s
        self.backoff_base_s = backoff_base_s
        self._clock = clock
        self._sleep = sleep
        self._now = wall_clock
        self._jitter = jitter
        if bandwidth is None and settings.bandwidth_kbps:
            bandwidth = TokenBucket(settings.bandwidth_kbps * 1000)
        self.bandwidth = bandwidth

        self.keeper = keeper or SpoolKeeper(spool, settings, wall_clock=wall_clock)
        self._lock = threading.Lock()  # counters, confirmed files
        self._confirmed: dict[str, dict[str, tuple[str, str]]] = {}
        """Per pending capture: files S3 confirmed (name -> key, sha256) in this process."""
        self._totals: collections.Counter[str] = collections.Counter()
        self._halt = threading.Event()
        self._pass_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._back_online: asyncio.Event | None = None
        self._state = "off" if store is None else "starting"
        self._last_success_at: datetime | None = None
        self._last_error: str | None = None
        self._last_error_at: datetime | None = None
        self._stale_cleanup_done = False
        self._warned_cleanup: str | None = None

    # -- one capture -----------------------------------------------------------------------------

    async def sync_capture(
        self, record: CaptureRecord, progress: Callable[[str, int], None] | None = None
    ) -> CaptureResult:
        """Upload one capture, index it, then mark it synced; raises CloudError if the store fails.

        Idempotent: whatever an earlier attempt did, this one completes it and writes
        nothing twice. A capture whose files do not match their checksums is
        quarantined (Outcome.QUARANTINED), never uploaded. `progress(name, bytes)`
        is called after each file.
        """
        store = self._require_store()
        with self.keeper.in_use(record.capture_id):
            result = await self._sync_claimed(store, record.capture_id, progress)
        with self._lock:  # done with it, one way or another: forget its confirmed files
            self._confirmed.pop(record.capture_id, None)
        return result

    async def _sync_claimed(
        self,
        store: CaptureStore,
        capture_id: str,
        progress: Callable[[str, int], None] | None,
    ) -> CaptureResult:
        try:
            current = await asyncio.to_thread(self.spool.get, capture_id)
            if current.sync_state == "synced":
                return CaptureResult(capture_id, Outcome.ALREADY_SYNCED)
            problems = await asyncio.to_thread(self.spool.verify, capture_id)
            if problems:
                await self._quarantine(capture_id, problems)
                return CaptureResult(capture_id, Outcome.QUARANTINED)
            folder = self.spool.path(capture_id)
        except CaptureNotFoundError:
            return CaptureResult(capture_id, Outcome.GONE)

        keys: dict[str, str] = {}
        sizes: dict[str, int] = {}
        sent = written = already = 0
        with self._lock:
            confirmed = self._confirmed.setdefault(capture_id, {})
        for name, info in sorted(current.files.items()):
            key = store.object_key(current, name)
            if confirmed.get(name) == (key, info["sha256"]):
                # Confirmed by an earlier attempt of this process (the index write
                # failed, say): no need to send it again to learn it is there.
                keys[name], sizes[name] = key, info["bytes"]
                already += 1
                if progress is not None:
                    progress(name, info["bytes"])
                continue
            try:
                put = await self._call(
                    self._put_file,
                    store,
                    key,
                    folder / name,
                    info["sha256"],
                    _metadata(current, name),
                )
            except (CloudError, OSError) as exc:
                # The store hashes what it reads and refuses (CLIENT) a copy that does
                # not match: the file changed under us after it was verified?
                if isinstance(exc, OSError) or exc.kind is ErrorKind.CLIENT:
                    outcome = await self._recheck(capture_id)
                    if outcome is not None:
                        return CaptureResult(capture_id, outcome)
                if isinstance(exc, OSError):
                    raise SpoolError(f"cannot read {name} of {capture_id}: {exc}") from exc
                raise
            keys[name], sizes[name] = key, info["bytes"]
            confirmed[name] = (key, info["sha256"])
            if put is PutResult.WRITTEN:
                written += 1
                sent += info["bytes"]
            else:
                already += 1
            if progress is not None:
                progress(name, info["bytes"])

        # The record of this revision, so the bucket alone describes the capture.
        manifest = store.manifest_key(current)
        put = await self._call(
            store.put_bytes, manifest, current.manifest(), metadata=_metadata(current, RECORD_NAME)
        )
        if put is PutResult.WRITTEN:
            written += 1
        else:
            already += 1
        keys[RECORD_NAME] = manifest

        synced_at = self._now()
        if self._has_index(store):
            item = index_item(current, keys, sizes, synced_at=synced_at)
            put = await self._call(store.put_index, item)
            if put is PutResult.WRITTEN:
                written += 1
            else:
                already += 1

        # Only now, with every object and the index item confirmed: mark it synced.
        extra = {
            **{k: v for k, v in current.extra.items() if k != "sync_error"},
            "s3_keys": keys,
            "s3_bucket": _config_value(store, "bucket"),
            "synced_at": iso_utc(synced_at),
        }
        try:
            marked = await asyncio.to_thread(
                self.spool.mark_synced, capture_id, current.revision, extra
            )
        except CaptureNotFoundError:
            log.info("capture %s reached the cloud but left the spool meanwhile", capture_id)
            return CaptureResult(capture_id, Outcome.GONE, sent, written, already, keys)
        if marked is None:
            log.info(
                "capture %s changed while revision %d went up: the new one goes next",
                capture_id,
                current.revision,
            )
            return CaptureResult(capture_id, Outcome.CHANGED, sent, written, already, keys)
        log.info(
            "synced capture %s: %d files, %d bytes uploaded%s",
            capture_id,
            len(keys),
            sent,
            f"; {already} of {written + already} writes were already done" if already else "",
        )
        return CaptureResult(capture_id, Outcome.SYNCED, sent, written, already, keys)

    # -- one pass --------------------------------------------------------------------------------

    async def sync_once(self, progress: Progress | None = None) -> SyncReport:
        """Upload every settled pending capture, oldest first; then retention and quota.

        A store error never raises: the report says what happened, `error` holds the
        first store error, and captures that could not go stay pending. Only a bug or a
        broken spool index raises (run() logs it and backs off).

        `progress(SyncProgress)` is called in the event loop after each file and each
        capture; for tqdm: ``bar.total = p.bytes_total; bar.update(p.bytes_done - bar.n)``.
        """
        if self._pass_lock is None:
            self._pass_lock = asyncio.Lock()
        async with self._pass_lock:
            report = SyncReport()
            self._halt.clear()
            self._clear_wakeups()
            self._state = "syncing" if self.store is not None else "off"
            try:
                if self.store is None:
                    report.error = SYNC_OFF
                else:
                    await self._upload_pending(self.store, report, progress)
            except asyncio.CancelledError:
                self._halt.set()  # let the worker threads' reads stop early
                raise
            finally:
                self._state = "idle" if self.store is not None else "off"
            await self._lifecycle(report)
            try:
                report.pending = (await asyncio.to_thread(self.spool.counts))["pending"]
            except SpoolError as exc:
                log.error("cannot count pending captures: %s", exc)
            self._note(report)
            return report

    async def _upload_pending(
        self, store: CaptureStore, report: SyncReport, progress: Progress | None
    ) -> None:
        ready, waiting = await asyncio.to_thread(self._pending_work)
        report.waiting = len(waiting)
        if not ready and self._stale_cleanup_done:
            return
        if self.breaker.state is BreakerState.OPEN:
            error = CloudError(SERVICE, ErrorKind.BREAKER_OPEN, "circuit breaker open; will retry")
            report.error, report.error_kind = str(error), error.kind
            return
        if not await self._abort_stale_uploads(store, report):
            return
        if not ready:
            return

        total = _Tally(len(ready), sum(_capture_bytes(r) for r in ready))
        queue = collections.deque(ready)
        stop = False
        client_errors = 0

        def file_done(capture_id: str) -> Callable[[str, int], None]:
            def done(_name: str, size: int) -> None:
                total.bytes_done += size
                _call_progress(progress, total.snapshot(capture_id))

            return done

        async def worker() -> None:
            nonlocal stop, client_errors
            while queue and not stop:
                record = queue.popleft()
                try:
                    result = await self.sync_capture(record, file_done(record.capture_id))
                except CloudError as error:
                    if report.error is None or report.error_kind is ErrorKind.BREAKER_OPEN:
                        report.error, report.error_kind = str(error), error.kind
                    if error.kind is ErrorKind.BREAKER_OPEN:  # not attempted: no failure
                        stop = True
                    else:
                        report.failed += 1
                        self._count("failed")
                        log.info("capture %s not synced: %s", record.capture_id, error)
                        if getattr(error, "code", None) == "PreconditionFailed":
                            await self._give_up(record.capture_id, error)  # this capture's own
                        elif error.kind in RETRYABLE | {ErrorKind.AUTH, ErrorKind.OFFLINE}:
                            stop = True  # the store is in trouble: leave the rest for later
                        else:
                            client_errors += 1
                            stop = stop or client_errors >= CLIENT_ERRORS_IN_A_ROW
                except SpoolError as error:  # a file unreadable just now, say: it waits
                    report.failed += 1
                    self._count("failed")
                    log.warning("capture %s not synced now: %s", record.capture_id, error)
                except Exception:
                    report.failed += 1
                    self._count("failed")
                    log.exception("capture %s not synced: unexpected error", record.capture_id)
                else:
                    client_errors = 0
                    self._tally(report, result)
                total.captures_done += 1
                _call_progress(progress, total.snapshot(record.capture_id))

        workers = min(self.settings.concurrency, len(ready))
        await asyncio.gather(*(worker() for _ in range(workers)))

    async def _abort_stale_uploads(self, store: CaptureStore, report: SyncReport) -> bool:
        """Abort multipart uploads a crash left behind; False when the store is unreachable
        or the device has no credentials for it (the IoT credentials provider refused).

        Outside the breaker's probe slot, and an AUTH or CLIENT answer is only a warning:
        a device policy may well allow PutObject but not listing uploads (a bucket
        lifecycle rule that aborts incomplete uploads does the same job).
        """
        try:
            aborted = await asyncio.to_thread(
                store.abort_stale_uploads, self.stale_upload_s, self.device_id
            )
        except CloudError as error:
            no_credentials = error.service == CREDENTIALS_SERVICE
            if error.kind in RETRYABLE or error.kind is ErrorKind.MALFORMED or no_credentials:
                self._record_failure(error)
                report.error, report.error_kind = str(error), error.kind
                log.info("sync pass skipped: %s", error)
                return False
            if error.kind is ErrorKind.AUTH and self._warned_cleanup != str(error):
                self._warned_cleanup = str(error)
                log.warning(
                    "cannot clean up interrupted multipart uploads (%s); uploads go on. "
                    "Allow s3:ListBucketMultipartUploads and s3:AbortMultipartUpload, or add a "
                    "lifecycle rule aborting incomplete uploads",
                    error,
                )
            else:  # a missing bucket, say: the uploads will report it
                log.info("cannot clean up interrupted multipart uploads: %s", error)
            return True
        self._record_success()
        self._stale_cleanup_done = True
        report.reached_store = True
        report.aborted_uploads = aborted
        if aborted:
            log.info("aborted %d interrupted multipart uploads", aborted)
        return True

    def _pending_work(self) -> tuple[list[CaptureRecord], list[CaptureRecord]]:
        """Pending captures oldest first: (ready to go, still being recorded by a live process).

        Never by the wall clock: a lease names the process recording the turn, and one
        whose process is gone (a crash, a power cut) is ready at once.
        """
        ready: list[CaptureRecord] = []
        waiting: list[CaptureRecord] = []
        for record in reversed(self.spool.list(sync_state="pending")):
            (waiting if lease.is_held(record.lease) else ready).append(record)
        return ready, waiting

    # -- local lifecycle -------------------------------------------------------------------------

    async def _lifecycle(self, report: SyncReport) -> None:
        try:
            report.expired, report.evicted = await asyncio.to_thread(self.keeper.sweep)
        except Exception:
            log.exception("retention or quota sweep failed; will try again next pass")

    # -- the service -----------------------------------------------------------------------------

    def notify(self) -> None:
        """A capture was kept (or finished recording): drain soon. Safe from any thread."""
        self._set_soon("_wake")

    async def run(self, stop: asyncio.Event) -> None:
        """The long-lived task: drain, back off on errors, wait for the network; never dies."""
        self._loop = asyncio.get_running_loop()
        self._wake = self._wake or asyncio.Event()
        self._back_online = self._back_online or asyncio.Event()
        if self.store is None:
            log.warning("%s", SYNC_OFF)
            await stop.wait()
            return
        unsubscribe = (
            self.connectivity.subscribe(self._on_connectivity) if self.connectivity else None
        )
        prober = (
            asyncio.create_task(
                self.connectivity.run(), name=f"connectivity-{self.connectivity.service}"
            )
            if self.connectivity is not None
            else None
        )
        failures = 0
        last_logged: str | None = None
        try:
            while not stop.is_set():
                if self.connectivity is not None and not self.connectivity.online:
                    self._state = "offline"
                    self._back_online.clear()  # offline now: an earlier "back online" is stale
                    # The probe finding the store back wakes us; after retry_max_s try anyway,
                    # in case the store answers although its host refuses a bare connect.
                    if await self._wait(stop, self.settings.retry_max_s, notify=False) != "timeout":
                        continue
                if self.breaker.state is BreakerState.OPEN:
                    self._state = "breaker open"
                    probe_in = self.breaker.snapshot()["probe_in_s"] or 0.0
                    await self._wait(stop, max(probe_in, 0.01), notify=False, online=False)
                    continue
                report = await self._pass_unless_stopped(stop)
                if report is None:
                    break
                if report.error_kind is ErrorKind.BREAKER_OPEN:
                    continue  # the gate above waits for the probe time
                # Some captures failed with an error of their own while others went: the
                # store works, so no backoff (they are tried again at the next pass).
                own_trouble = report.synced > 0 and report.error_kind in (
                    ErrorKind.CLIENT,
                    ErrorKind.MALFORMED,
                )
                if (report.error is None and report.failed == 0) or own_trouble:
                    if own_trouble:
                        log.warning(
                            "sync: %d captures failed (%s); the others were delivered",
                            report.failed,
                            report.error,
                        )
                    elif failures:
                        log.info("sync working again: %s", report.summary())
                    failures, last_logged = 0, None
                    delay = self.settings.interval_s
                    if report.waiting:
                        delay = min(delay, HELD_POLL_S)
                    self._state = "idle"
                    await self._wait(stop, delay, notify=True)
                    continue
                failures += 1
                delay = self._retry_delay(failures, report)
                message = report.error or "captures failed"
                if report.error_kind in (ErrorKind.AUTH, ErrorKind.CLIENT):
                    if message != last_logged:
                        log.error(
                            "sync cannot deliver captures: %s. Check the bucket/table names, "
                            "credentials and IAM policy; captures stay on the device, "
                            "retrying every %gs",
                            message,
                            delay,
                        )
                    else:
                        log.info("sync still failing: %s; retrying in %gs", message, delay)
                else:
                    log.log(
                        logging.WARNING if message != last_logged else logging.INFO,
                        "sync failed: %s; %d pending captures kept, retrying in %.1fs",
                        message,
                        report.pending,
                        delay,
                    )
                last_logged = message
                self._state = "backing off"
                await self._wait(stop, delay, notify=False)
        finally:
            self._halt.set()
            if prober is not None:
                prober.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await prober
            if unsubscribe is not None:
                with contextlib.suppress(ValueError):
                    unsubscribe()

    async def _pass_unless_stopped(self, stop: asyncio.Event) -> SyncReport | None:
        """One pass; None if `stop` came first (the pass is cancelled: all of it is idempotent,
        and with a bandwidth cap the uploads in worker threads stop at their next read)."""
        task = asyncio.ensure_future(self.sync_once())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopped
        if stop.is_set():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            return None
        try:
            return task.result()
        except Exception:
            log.exception("sync pass failed unexpectedly; backing off")
            return SyncReport(failed=1, error="unexpected error (see the log)")

    def _retry_delay(self, failures: int, report: SyncReport) -> float:
        """Exponential backoff with equal jitter, capped at retry_max_s; slow for AUTH/CLIENT."""
        cap = self.settings.retry_max_s
        if report.error_kind in (ErrorKind.AUTH, ErrorKind.CLIENT):
            return cap
        ceiling = min(cap, self.backoff_base_s * 2 ** min(failures - 1, 30))
        return ceiling / 2 + self._jitter() * ceiling / 2

    async def _wait(
        self, stop: asyncio.Event, timeout: float, *, notify: bool, online: bool = True
    ) -> str:
        """Wait for `timeout`, or stop, or (if asked) notify() / the network coming back."""
        assert self._wake is not None and self._back_online is not None
        waiters: dict[asyncio.Future[Any], str] = {
            asyncio.ensure_future(stop.wait()): "stop",
            asyncio.ensure_future(self._sleep(timeout)): "timeout",
        }
        if notify:
            waiters[asyncio.ensure_future(self._wake.wait())] = "notify"
        if online:
            waiters[asyncio.ensure_future(self._back_online.wait())] = "online"
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        for name in ("stop", "online", "notify", "timeout"):
            if any(waiters[w] == name for w in done):
                return name
        return "timeout"

    def _on_connectivity(self, online: bool) -> None:
        if online:
            log.info("the store can be reached again: syncing pending captures now")
            self._set_soon("_back_online")

    def _set_soon(self, name: str) -> None:
        event = getattr(self, name)
        loop = self._loop
        if event is None or loop is None:
            return  # run() is not running: the next sync_once finds the work anyway
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(event.set)

    def _clear_wakeups(self) -> None:
        for event in (self._wake, self._back_online):
            if event is not None:
                event.clear()

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For doctor and the STATUS line: counts, last success and error, breaker, evictions."""
        try:
            counts = self.spool.counts()
        except SpoolError as exc:
            counts = {}
            log.error("cannot count captures: %s", exc)
        with self._lock:
            totals = dict(self._totals)
        enabled = self.store is not None
        return {
            "enabled": enabled,
            "state": self._state,
            "message": SYNC_OFF if not enabled else self._summary(counts),
            "pending": counts.get("pending", 0),
            "synced": counts.get("synced", 0),
            "failed": counts.get("failed", 0),
            "last_success_at": iso_utc(self._last_success_at) if self._last_success_at else None,
            "last_error": self._last_error,
            "last_error_at": iso_utc(self._last_error_at) if self._last_error_at else None,
            "breaker": self.breaker.snapshot()["state"],
            "online": self.connectivity.online if self.connectivity is not None else None,
            "totals": {name: totals.get(name, 0) for name in TOTALS} | self.keeper.totals,
        }

    def _summary(self, counts: dict[str, int]) -> str:
        pending = counts.get("pending", 0)
        text = f"sync {self._state}: {pending} pending"
        if self._last_error and self._state in ("backing off", "breaker open"):
            text += f"; last error: {self._last_error}"
        return text

    # -- helpers ---------------------------------------------------------------------------------

    def _require_store(self) -> CaptureStore:
        if self.store is None:
            raise CloudError(SERVICE, ErrorKind.CLIENT, SYNC_OFF)
        return self.store

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One store call in a worker thread, through the breaker.

        A CloudError (StoreError) counts for the breaker and the store's connectivity; any
        other exception (an OSError reading the file) says nothing about the store and
        propagates.
        """
        probing = self.breaker.state is BreakerState.HALF_OPEN
        if not self.breaker.allow():
            raise CloudError(SERVICE, ErrorKind.BREAKER_OPEN, "circuit breaker open; will retry")
        settled = False
        try:
            result = await asyncio.to_thread(fn, *args, **kwargs)
        except CloudError as error:
            self._record_failure(error)
            settled = True
            raise
        else:
            self._record_success()
            settled = True
            return result
        finally:
            if probing and not settled:
                self.breaker.release_probe()

    def _record_success(self) -> None:
        self.breaker.record_success()
        if self.connectivity is not None:
            self.connectivity.record_success()

    def _record_failure(self, error: CloudError) -> None:
        """For the breaker, and for the store's connectivity unless it was the credentials
        provider (another host) that could not be reached."""
        self.breaker.record_failure(error.kind)
        if self.connectivity is not None and error.service != CREDENTIALS_SERVICE:
            self.connectivity.record_failure(error.kind)

    def _put_file(
        self,
        store: CaptureStore,
        key: str,
        path: Path,
        sha256_hex: str,
        metadata: dict[str, str],
    ) -> PutResult:
        """In a worker thread: one file to S3, its reads through the bandwidth cap if any."""
        bandwidth = self.bandwidth
        if bandwidth is None:
            return store.put_file(key, path, sha256_hex=sha256_hex, metadata=metadata)
        with open(path, "rb") as file:

            def read(n: int) -> bytes:
                if self._halt.is_set():
                    raise UploadHalted("the syncer is stopping")
                data = file.read(n)
                bandwidth.consume(len(data))
                return data

            return store.put_file(key, path, sha256_hex=sha256_hex, metadata=metadata, read=read)

    async def _quarantine(self, capture_id: str, problems: list[str]) -> None:
        reason = "; ".join(problems)
        log.error(
            "capture %s is damaged on the device (%s): quarantined, not uploaded",
            capture_id,
            reason,
        )
        try:
            await asyncio.to_thread(self.spool.quarantine, capture_id, f"at sync: {reason}")
        except CaptureNotFoundError:
            return
        self._count("quarantined")

    async def _give_up(self, capture_id: str, error: CloudError) -> None:
        """S3 holds different bytes at this capture's key: no retry fixes that, a person must.

        The capture is marked sync_state "failed" (it stays on the device, counted in
        status(), and is no longer retried); the reason goes to its extra["sync_error"].
        """
        log.error(
            "capture %s cannot be synced and is marked failed: %s. It stays on the device; "
            "set it back to pending once the object in S3 is dealt with",
            capture_id,
            error,
        )
        try:
            current = await asyncio.to_thread(self.spool.get, capture_id)
            await asyncio.to_thread(
                self.spool.update,
                capture_id,
                sync_state="failed",
                extra={**current.extra, "sync_error": str(error)},
            )
        except CaptureNotFoundError:
            pass
        except SpoolError as exc:
            log.error("cannot mark capture %s failed: %s", capture_id, exc)

    async def _recheck(self, capture_id: str) -> Outcome | None:
        """After a failed read or a refused upload: GONE, QUARANTINED, or None (intact)."""
        try:
            problems = await asyncio.to_thread(self.spool.verify, capture_id)
        except CaptureNotFoundError:
            return Outcome.GONE
        if problems:
            await self._quarantine(capture_id, problems)
            return Outcome.QUARANTINED
        return None

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._totals[name] += n

    def _tally(self, report: SyncReport, result: CaptureResult) -> None:
        report.bytes += result.bytes
        report.written += result.written
        report.already_there += result.already_there
        if result.outcome is Outcome.SYNCED:
            report.synced += 1
            report.reached_store = True
            self._count("synced")
            self._count("bytes", result.bytes)
        elif result.outcome is Outcome.CHANGED:
            report.reached_store = True
        elif result.outcome is Outcome.QUARANTINED:
            report.quarantined += 1

    def _note(self, report: SyncReport) -> None:
        now = self._now()
        if report.error is not None and report.error_kind is not None:
            self._last_error, self._last_error_at = report.error, now
        elif report.failed:
            self._last_error, self._last_error_at = "captures failed (see the log)", now
        if report.synced or (report.reached_store and report.ok):
            self._last_success_at = now

    @staticmethod
    def _has_index(store: CaptureStore) -> bool:
        return bool(_config_value(store, "table"))


# --- small helpers ------------------------------------------------------------------------------


@dataclass
class _Tally:
    captures_total: int
    bytes_total: int
    captures_done: int = 0
    bytes_done: int = 0

    def snapshot(self, capture_id: str | None) -> SyncProgress:
        return SyncProgress(
            self.captures_total, self.captures_done, self.bytes_total, self.bytes_done, capture_id
        )


def _call_progress(progress: Progress | None, snapshot: SyncProgress) -> None:
    if progress is None:
        return
    try:
        progress(snapshot)
    except Exception:
        log.exception("sync progress callback failed")


def _capture_bytes(record: CaptureRecord) -> int:
    return sum(info["bytes"] for info in record.files.values())


def _metadata(record: CaptureRecord, name: str) -> dict[str, str]:
    """S3 user metadata (ASCII only): enough to tell what an object is without the index."""
    return {
        "capture-id": record.capture_id,
        "device-id": record.device_id,
        "created-at": iso_utc(record.created_at),
        "trigger": record.trigger,
        "file": name,
    }


def _config_value(store: CaptureStore, name: str) -> Any:
    return getattr(getattr(store, "config", None), name, None)


__all__ = [
    "SYNC_OFF",
    "CaptureResult",
    "Outcome",
    "SyncProgress",
    "SyncReport",
    "Syncer",
    "TokenBucket",
    "UploadHalted",
]
