"""Upload one capture: every file, its record, its index item; then mark it synced.

A capture goes up in three steps, each idempotent, and is marked synced in the spool
only after all of them were confirmed:

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
S3 and once in DynamoDB, whatever happened in between.

boto3 blocks: every store call runs in a worker thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heimdall_edge.cloud.errors import CloudError, ErrorKind
from heimdall_edge.cloud.gate import BreakerGate
from heimdall_edge.spool.errors import CaptureNotFoundError, SpoolError
from heimdall_edge.spool.keeper import SpoolKeeper
from heimdall_edge.spool.record import RECORD_NAME, CaptureRecord, iso_utc
from heimdall_edge.spool.store import Spool
from heimdall_edge.sync.bandwidth import TokenBucket, UploadHalted
from heimdall_edge.sync.cloudstore import PutResult
from heimdall_edge.sync.index_item import index_item
from heimdall_edge.sync.results import CaptureResult, Outcome, Totals

if TYPE_CHECKING:
    from heimdall_edge.sync.cloudstore import CaptureStore

log = logging.getLogger(__name__)

FileDone = Callable[[str, int], None]
"""Told each file's name and size once it is in the store."""


@dataclass
class CaptureUpload:
    """Puts captures into one store, exactly once each, however often it is asked."""

    spool: Spool
    store: CaptureStore
    gate: BreakerGate
    keeper: SpoolKeeper
    totals: Totals
    _: KW_ONLY
    halt: threading.Event
    """Once set, ends the uploads in worker threads at their next capped read."""
    bandwidth: TokenBucket | None
    wall_clock: Callable[[], datetime]
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _confirmed: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict, init=False)
    """Per pending capture: files S3 confirmed (name -> key, sha256) in this process."""

    async def upload(
        self, record: CaptureRecord, progress: FileDone | None = None
    ) -> CaptureResult:
        """Upload one capture, index it, then mark it synced; raises CloudError if the store fails.

        Idempotent: whatever an earlier attempt did, this one completes it and writes
        nothing twice. A capture whose files do not match their checksums is
        quarantined (Outcome.QUARANTINED), never uploaded. `progress(name, bytes)`
        is called after each file.
        """
        with self.keeper.in_use(record.capture_id):
            result = await self._upload_claimed(record.capture_id, progress)
        with self._lock:  # done with it, one way or another: forget its confirmed files
            self._confirmed.pop(record.capture_id, None)
        return result

    async def _upload_claimed(self, capture_id: str, progress: FileDone | None) -> CaptureResult:
        store = self.store
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
                put = await self.gate.call_in_thread(
                    self._put_file,
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
        put = await self.gate.call_in_thread(
            store.put_bytes, manifest, current.manifest(), metadata=_metadata(current, RECORD_NAME)
        )
        if put is PutResult.WRITTEN:
            written += 1
        else:
            already += 1
        keys[RECORD_NAME] = manifest

        synced_at = self.wall_clock()
        if _has_index(store):
            item = index_item(current, keys, sizes, synced_at=synced_at)
            put = await self.gate.call_in_thread(store.put_index, item)
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

    def _put_file(
        self,
        key: str,
        path: Path,
        sha256_hex: str,
        metadata: dict[str, str],
    ) -> PutResult:
        """In a worker thread: one file to S3, its reads through the bandwidth cap if any."""
        store = self.store
        bandwidth = self.bandwidth
        if bandwidth is None:
            return store.put_file(key, path, sha256_hex=sha256_hex, metadata=metadata)
        with open(path, "rb") as file:

            def read(n: int) -> bytes:
                if self.halt.is_set():
                    raise UploadHalted("the syncer is stopping")
                data = file.read(n)
                bandwidth.consume(len(data))
                return data

            return store.put_file(key, path, sha256_hex=sha256_hex, metadata=metadata, read=read)

    async def _quarantine(self, capture_id: str, problems: list[str]) -> None:
        """A capture whose files no longer match their checksums: set aside, never sent."""
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
        self.totals.count("quarantined")

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


def _has_index(store: CaptureStore) -> bool:
    """Whether captures are indexed too (a DynamoDB table is set)."""
    return bool(_config_value(store, "table"))


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
