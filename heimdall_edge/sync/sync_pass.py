"""One pass over the spool: every settled pending capture up, oldest first; then the quota.

A capture whose turn a live process is still recording (its lease, see spool/lease.py)
waits, so its transcript, reply and reply.wav go with it; one whose process is gone
goes at once, as it is. A capture whose key in S3 already holds *different* bytes is
marked sync_state "failed" (a person must look); nothing else ever gives up. After the
uploads the spool's keeper (spool/keeper.py) applies retention and the quota; the
uploads tell it which captures they hold, so none of them is evicted meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from heimdall_edge.cloud.breaker import BreakerState
from heimdall_edge.cloud.errors import RETRYABLE, CloudError, ErrorKind
from heimdall_edge.cloud.gate import BreakerGate
from heimdall_edge.settings import SyncSettings
from heimdall_edge.spool import lease
from heimdall_edge.spool.errors import CaptureNotFoundError, SpoolError
from heimdall_edge.spool.keeper import SpoolKeeper
from heimdall_edge.spool.record import CaptureRecord
from heimdall_edge.spool.store import Spool
from heimdall_edge.sync.iot_credentials import SERVICE as CREDENTIALS_SERVICE
from heimdall_edge.sync.results import (
    SYNC_OFF,
    CaptureResult,
    Outcome,
    Progress,
    SyncReport,
    SyncState,
    Tally,
    Totals,
    call_progress,
)
from heimdall_edge.sync.upload import CaptureUpload, FileDone

if TYPE_CHECKING:
    from heimdall_edge.sync.cloudstore import CaptureStore

log = logging.getLogger(__name__)

CLIENT_ERRORS_IN_A_ROW = 3
"""A CLIENT error may be one capture's (a poison pill): the pass skips it and goes on, unless
this many captures in a row fail so (a missing bucket fails them all)."""


class SyncPass:
    """Runs passes, one at a time per process; a store error never raises out of one."""

    def __init__(
        self,
        spool: Spool,
        upload: CaptureUpload | None,
        settings: SyncSettings,
        device_id: str,
        keeper: SpoolKeeper,
        totals: Totals,
        status: SyncState,
        *,
        halt: threading.Event,
        stale_upload_s: float,
        wall_clock: Callable[[], datetime],
        on_start: Callable[[], None],
    ) -> None:
        """`upload=None`: sync is off (no bucket), only retention and the quota run.
        `on_start` is called once a pass holds the lock (the service loop forgets the
        wake-ups it answers); `halt` is set when a pass is cancelled."""
        self.spool = spool
        self.upload = upload
        self.settings = settings
        self.device_id = device_id
        self.keeper = keeper
        self.totals = totals
        self.status = status
        self.stale_upload_s = stale_upload_s
        self._halt = halt
        self._now = wall_clock
        self._on_start = on_start
        self._lock: asyncio.Lock | None = None
        self._stale_cleanup_done = False
        self._warned_cleanup: str | None = None

    async def run(self, progress: Progress | None = None) -> SyncReport:
        """Upload every settled pending capture, oldest first; then retention and quota.

        A store error never raises: the report says what happened, `error` holds the
        first store error, and captures that could not go stay pending. Only a bug or a
        broken spool index raises (the service loop logs it and backs off).
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            report = SyncReport()
            self._halt.clear()
            self._on_start()
            syncing = self.upload is not None
            self.status.state = "syncing" if syncing else "off"
            try:
                if self.upload is None:
                    report.error = SYNC_OFF
                else:
                    await self._upload_pending(self.upload, report, progress)
            except asyncio.CancelledError:
                self._halt.set()  # let the worker threads' reads stop early
                raise
            finally:
                self.status.state = "idle" if syncing else "off"
            await self._lifecycle(report)
            try:
                report.pending = (await asyncio.to_thread(self.spool.counts))["pending"]
            except SpoolError as exc:
                log.error("cannot count pending captures: %s", exc)
            self.status.note(report, self._now())
            return report

    async def _upload_pending(
        self, upload: CaptureUpload, report: SyncReport, progress: Progress | None
    ) -> None:
        ready, waiting = await asyncio.to_thread(self._pending_work)
        report.waiting = len(waiting)
        if not ready and self._stale_cleanup_done:
            return
        if upload.gate.breaker.state is BreakerState.OPEN:
            error = upload.gate.refusal()
            report.error, report.error_kind = str(error), error.kind
            return
        if not await self._abort_stale_uploads(upload.store, upload.gate, report):
            return
        if not ready:
            return

        total = Tally(len(ready), sum(_capture_bytes(r) for r in ready))
        queue = collections.deque(ready)
        stop = False
        client_errors = 0

        def file_done(capture_id: str) -> FileDone:
            def done(_name: str, size: int) -> None:
                total.bytes_done += size
                call_progress(progress, total.snapshot(capture_id))

            return done

        async def worker() -> None:
            nonlocal stop, client_errors
            while queue and not stop:
                record = queue.popleft()
                try:
                    result = await upload.upload(record, file_done(record.capture_id))
                except CloudError as error:
                    if report.error is None or report.error_kind is ErrorKind.BREAKER_OPEN:
                        report.error, report.error_kind = str(error), error.kind
                    if error.kind is ErrorKind.BREAKER_OPEN:  # not attempted: no failure
                        stop = True
                    else:
                        report.failed += 1
                        self.totals.count("failed")
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
                    self.totals.count("failed")
                    log.warning("capture %s not synced now: %s", record.capture_id, error)
                except Exception:
                    report.failed += 1
                    self.totals.count("failed")
                    log.exception("capture %s not synced: unexpected error", record.capture_id)
                else:
                    client_errors = 0
                    self._tally(report, result)
                total.captures_done += 1
                call_progress(progress, total.snapshot(record.capture_id))

        workers = min(self.settings.concurrency, len(ready))
        await asyncio.gather(*(worker() for _ in range(workers)))

    async def _abort_stale_uploads(
        self, store: CaptureStore, gate: BreakerGate, report: SyncReport
    ) -> bool:
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
                gate.record_failure(error)
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
        gate.record_answer()
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

    async def _lifecycle(self, report: SyncReport) -> None:
        try:
            report.expired, report.evicted = await asyncio.to_thread(self.keeper.sweep)
        except Exception:
            log.exception("retention or quota sweep failed; will try again next pass")

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

    def _tally(self, report: SyncReport, result: CaptureResult) -> None:
        report.bytes += result.bytes
        report.written += result.written
        report.already_there += result.already_there
        if result.outcome is Outcome.SYNCED:
            report.synced += 1
            report.reached_store = True
            self.totals.count("synced")
            self.totals.count("bytes", result.bytes)
        elif result.outcome is Outcome.CHANGED:
            report.reached_store = True
        elif result.outcome is Outcome.QUARANTINED:
            report.quarantined += 1


def _capture_bytes(record: CaptureRecord) -> int:
    return sum(info["bytes"] for info in record.files.values())
