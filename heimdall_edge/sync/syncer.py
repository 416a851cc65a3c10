"""The syncer: store and forward, so every capture in the spool reaches S3 (and DynamoDB) once.

The spool is the truth and the cloud a copy. Uploading one capture (upload.py) and a
pass over the spool (sync_pass.py) are the syncer's parts; here is the service.

`Syncer.run()` is the long-lived service task: it drains pending captures, backs
off (exponentially, with jitter) while the store fails, waits while the store is
out of reach or its breaker is open, and drains at once when the store can be
reached again or a new capture is kept (`notify()`). Reachability is the store's
own (its calls feed it, and run() probes the S3 endpoint's host while it is away),
never a speech service's: sync goes on while OpenAI or ElevenLabs is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from heimdall_edge.clock import Clock
from heimdall_edge.cloud.breaker import BreakerState, CircuitBreaker
from heimdall_edge.cloud.errors import CloudError, ErrorKind
from heimdall_edge.settings import SyncSettings
from heimdall_edge.spool.errors import SpoolError
from heimdall_edge.spool.keeper import SpoolKeeper
from heimdall_edge.spool.record import CaptureRecord, iso_utc
from heimdall_edge.spool.store import Spool
from heimdall_edge.sync.bandwidth import TokenBucket
from heimdall_edge.sync.gate import SERVICE, store_gate
from heimdall_edge.sync.results import (
    SYNC_OFF,
    CaptureResult,
    Progress,
    SyncReport,
    SyncState,
    Totals,
)
from heimdall_edge.sync.sync_pass import SyncPass
from heimdall_edge.sync.upload import CaptureUpload, FileDone

if TYPE_CHECKING:
    from heimdall_edge.cloud.connectivity import Connectivity
    from heimdall_edge.sync.cloudstore import CaptureStore

log = logging.getLogger(__name__)

HELD_POLL_S = 5.0
"""While a capture's turn is still being recorded (its lease held), look again this often."""
STALE_UPLOAD_S = 3600.0
"""Multipart uploads of this device older than this are crash debris, aborted at each pass."""
BACKOFF_BASE_S = 2.0

Sleep = Callable[[float], Awaitable[None]]
WallClock = Callable[[], datetime]


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
        self._sleep = sleep
        self._jitter = jitter
        if bandwidth is None and settings.bandwidth_kbps:
            bandwidth = TokenBucket(settings.bandwidth_kbps * 1000)
        self.bandwidth = bandwidth

        self.keeper = keeper or SpoolKeeper(spool, settings, wall_clock=wall_clock)
        self._totals = Totals()
        self._status = SyncState("off" if store is None else "starting")
        self._halt = threading.Event()
        """Set when the syncer stops: uploads in worker threads end at their next capped read."""
        self._upload = (
            None
            if store is None
            else CaptureUpload(
                spool,
                store,
                store_gate(self.breaker, connectivity),
                self.keeper,
                self._totals,
                halt=self._halt,
                bandwidth=bandwidth,
                wall_clock=wall_clock,
            )
        )
        self._pass = SyncPass(
            spool,
            self._upload,
            settings,
            device_id,
            self.keeper,
            self._totals,
            self._status,
            halt=self._halt,
            stale_upload_s=stale_upload_s,
            wall_clock=wall_clock,
            on_start=self._clear_wakeups,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._back_online: asyncio.Event | None = None

    async def sync_capture(
        self, record: CaptureRecord, progress: FileDone | None = None
    ) -> CaptureResult:
        """Upload one capture now (see CaptureUpload.upload); CloudError if sync is off."""
        if self._upload is None:
            raise CloudError(SERVICE, ErrorKind.CLIENT, SYNC_OFF)
        return await self._upload.upload(record, progress)

    async def sync_once(self, progress: Progress | None = None) -> SyncReport:
        """One pass (see SyncPass.run): never raises for a store error, the report says it.

        `progress(SyncProgress)` is called in the event loop after each file and each
        capture; for tqdm: ``bar.total = p.bytes_total; bar.update(p.bytes_done - bar.n)``.
        """
        return await self._pass.run(progress)

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
                    self._status.state = "offline"
                    self._back_online.clear()  # offline now: an earlier "back online" is stale
                    # The probe finding the store back wakes us; after retry_max_s try anyway,
                    # in case the store answers although its host refuses a bare connect.
                    if await self._wait(stop, self.settings.retry_max_s, notify=False) != "timeout":
                        continue
                if self.breaker.state is BreakerState.OPEN:
                    self._status.state = "breaker open"
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
                    self._status.state = "idle"
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
                self._status.state = "backing off"
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

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For doctor and the STATUS line: counts, last success and error, breaker, evictions."""
        try:
            counts = self.spool.counts()
        except SpoolError as exc:
            counts = {}
            log.error("cannot count captures: %s", exc)
        enabled = self.store is not None
        state = self._status
        return {
            "enabled": enabled,
            "state": state.state,
            "message": SYNC_OFF if not enabled else self._summary(counts),
            "pending": counts.get("pending", 0),
            "synced": counts.get("synced", 0),
            "failed": counts.get("failed", 0),
            "last_success_at": iso_utc(state.last_success_at) if state.last_success_at else None,
            "last_error": state.last_error,
            "last_error_at": iso_utc(state.last_error_at) if state.last_error_at else None,
            "breaker": self.breaker.snapshot()["state"],
            "online": self.connectivity.online if self.connectivity is not None else None,
            "totals": self._totals.snapshot() | self.keeper.totals,
        }

    def _summary(self, counts: dict[str, int]) -> str:
        pending = counts.get("pending", 0)
        state = self._status
        text = f"sync {state.state}: {pending} pending"
        if state.last_error and state.state in ("backing off", "breaker open"):
            text += f"; last error: {state.last_error}"
        return text
