"""What stays on the device: retention, the quota, and which captures are in use.

The spool's own policy, whoever asks: a turn asks for room before it keeps a capture
(`make_room`), the syncer sweeps after each pass (`sweep`) and marks the captures it is
uploading (`in_use`), which nothing evicts meanwhile. Synced captures go first, oldest
first; unsynced ones only with `evict_unsynced`, each logged as lost.

One evictor at a time across processes (`Spool.evicting`, a file lock), and each
measures the spool again once it holds the lock: the service and `heimdall-edge sync`
at once never evict more than was needed.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

from heimdall_edge.settings import SyncSettings
from heimdall_edge.spool.errors import CaptureChangedError, CaptureNotFoundError
from heimdall_edge.spool.record import CaptureRecord, iso_utc
from heimdall_edge.spool.store import Spool

log = logging.getLogger(__name__)

MiB = 1024 * 1024
TOTALS = ("expired", "evicted_synced", "evicted_unsynced")
"""Counters kept since start-up (the syncer's status shows them)."""


class SpoolKeeper:
    """Retention and quota for one spool; thread-safe. One per process, shared by the turn
    and the syncer (so the captures being uploaded are known to both)."""

    def __init__(
        self,
        spool: Spool,
        settings: SyncSettings,
        *,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.spool = spool
        self.settings = settings
        self._now = wall_clock
        self._lock = threading.Lock()
        self._in_use: set[str] = set()
        self._totals: collections.Counter[str] = collections.Counter()

    @property
    def totals(self) -> dict[str, int]:
        with self._lock:
            return {name: self._totals.get(name, 0) for name in TOTALS}

    @contextlib.contextmanager
    def in_use(self, capture_id: str) -> Iterator[None]:
        """Keep retention and eviction off a capture meanwhile (it is being uploaded)."""
        with self._lock:
            self._in_use.add(capture_id)
        try:
            yield
        finally:
            with self._lock:
                self._in_use.discard(capture_id)

    def make_room(self, needed_bytes: int) -> bool:
        """Room for a new capture of `needed_bytes` within the quota; False: refuse it.

        Evicts synced captures oldest first; then, only with evict_unsynced, the oldest
        unsynced ones (each a capture lost for good, logged as such).
        """
        fits, _evicted = self._make_room(needed_bytes)
        return fits

    def sweep(self) -> tuple[int, int]:
        """Retention, then the quota: (captures expired, captures evicted)."""
        expired = self.expire()
        _fits, evicted = self._make_room(0)
        return expired, evicted

    def expire(self) -> int:
        """Delete synced captures older than retention_days (0: every synced one); the count."""
        days = self.settings.retention_days
        cutoff = self._now() - timedelta(days=days)
        deleted = 0
        for record in reversed(self.spool.list(sync_state="synced")):
            if days and record.created_at > cutoff:
                break  # oldest first: the rest are younger
            if self._is_in_use(record.capture_id):
                continue
            try:  # only as listed: a revision recorded since then is not in S3
                self.spool.delete(record.capture_id, unchanged=record)
            except (CaptureNotFoundError, CaptureChangedError):
                continue
            deleted += 1
            self._count("expired")
            log.info(
                "deleted synced capture %s from the device: retention is %g days (it is in S3)",
                record.capture_id,
                days,
            )
        return deleted

    # --- the quota ------------------------------------------------------------------------------

    def _make_room(self, needed_bytes: int) -> tuple[bool, int]:
        quota = int(self.settings.quota_mb * MiB)
        with self.spool.evicting():
            usage = self.spool.disk_usage()
            # A disk filled by something else counts too: the spool may use what it uses plus
            # what is free, so a full disk evicts synced captures before a capture is refused.
            disk_free = shutil.disk_usage(self.spool.root).free
            # Where the disk, not the quota, is the limit, a capture is never refused here:
            # the spool tries to write it and says itself when the disk is full.
            disk_limited = usage + disk_free < quota
            if disk_limited:
                quota = usage + disk_free
                log.debug("the disk has %d bytes free: the spool's room ends there", disk_free)
            if usage + needed_bytes <= quota:
                return True, 0
            limit = (
                "the disk's free space"
                if disk_limited
                else f"the {self.settings.quota_mb:g} MB spool quota"
            )
            fits, evicted = self._evict(usage, needed_bytes, quota, limit)
            return fits or disk_limited, evicted

    def _tiers(self) -> list[tuple[str, Callable[[CaptureRecord], bool]]]:
        tiers: list[tuple[str, Callable[[CaptureRecord], bool]]] = [
            ("synced", lambda r: r.sync_state == "synced")
        ]
        if self.settings.evict_unsynced:
            tiers.append(("unsynced", lambda r: r.sync_state != "synced"))
        return tiers

    def _evict(self, usage: int, needed_bytes: int, quota: int, limit: str) -> tuple[bool, int]:
        """Evict, tier by tier and oldest first, until `needed_bytes` fits under `quota`."""
        tiers = self._tiers()
        records = self.spool.list()
        evictable = sum(
            self.spool.folder_bytes(r.capture_id)
            for r in records
            if any(wanted(r) for _tier, wanted in tiers) and not self._is_in_use(r.capture_id)
        )
        if usage - evictable + needed_bytes > quota:
            log.warning(
                "spool over quota: %d bytes used + %d needed > %g MB, and evicting every "
                "capture allowed (%s) would not make room: nothing evicted",
                usage, needed_bytes, self.settings.quota_mb,
                "synced or not" if self.settings.evict_unsynced else "synced only",
            )  # fmt: skip
            return False, 0

        def fits() -> bool:
            # The running total is an estimate: deleting rows grows the index's WAL, so
            # before stopping, measure again and go on evicting if it still does not fit.
            nonlocal usage
            if usage + needed_bytes > quota:
                return False
            usage = self.spool.disk_usage()
            return usage + needed_bytes <= quota

        log.info(
            "making room: %d bytes used + %d needed > %d quota: evicting",
            usage,
            needed_bytes,
            quota,
        )
        evicted = freed_total = 0
        for tier, wanted in tiers:
            for record in reversed(records):
                if fits():
                    self._log_made_room(evicted, freed_total, needed_bytes, usage)
                    return True, evicted
                if not wanted(record) or self._is_in_use(record.capture_id):
                    continue
                # Said first: a power cut or a SIGKILL between the deletion and the line
                # after it must not leave a capture gone without a word in the journal.
                log.info(
                    "evicting %s capture %s (revision %d) to stay within %s",
                    tier, record.capture_id, record.revision, limit,
                )  # fmt: skip
                try:  # only as listed: a revision recorded since then is not in S3
                    freed = self.spool.delete(record.capture_id, unchanged=record)
                except (CaptureNotFoundError, CaptureChangedError):
                    continue
                usage -= freed
                freed_total += freed
                evicted += 1
                self._count(f"evicted_{tier}")
                self._log_eviction(tier, record, freed, limit)
        if fits():
            self._log_made_room(evicted, freed_total, needed_bytes, usage)
            return True, evicted
        log.warning(
            "spool over quota: %d bytes used + %d needed > %g MB, and nothing %s can be evicted",
            usage,
            needed_bytes,
            self.settings.quota_mb,
            "more" if self.settings.evict_unsynced else "synced (evict_unsynced is off)",
        )
        return False, evicted

    @staticmethod
    def _log_made_room(evicted: int, freed: int, needed_bytes: int, usage: int) -> None:
        log.info(
            "made room: evicted %d captures (%d bytes) for %d needed: %d bytes used now",
            evicted, freed, needed_bytes, usage,
        )  # fmt: skip

    @staticmethod
    def _log_eviction(tier: str, record: CaptureRecord, freed: int, limit: str) -> None:
        if tier == "synced":
            log.warning(
                "evicted synced capture %s (%d bytes, created %s) to stay within %s; it is in S3",
                record.capture_id, freed, iso_utc(record.created_at), limit,
            )  # fmt: skip
        else:
            log.warning(
                "evicted UNSYNCED capture %s (%d bytes, created %s) to stay within %s "
                "(evict_unsynced is on): it never reached the cloud and is lost",
                record.capture_id, freed, iso_utc(record.created_at), limit,
            )  # fmt: skip

    def _is_in_use(self, capture_id: str) -> bool:
        with self._lock:
            return capture_id in self._in_use

    def _count(self, name: str) -> None:
        with self._lock:
            self._totals[name] += 1
