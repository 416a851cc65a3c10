"""Reproduction: quota eviction deletes a capture revised after the evictor listed it.

spool_keeper.SpoolKeeper._evict (under the cross-process evict lock that _make_room takes)
lists the spool once (`records = self.spool.list()`), then deletes the oldest "synced"
ones with `spool.delete(capture_id)`, which deletes whatever is there by then. Another process does not
take the evict lock to write: the service's backfill (a capture cut short gets its
transcript) or upgrade (cloud Whisper's transcript) revises a synced capture, which
puts it back to pending at a new revision. If that lands between the listing and the
deletion, the new revision is deleted before it was ever uploaded, with
evict_unsynced off, and the log says "evicted synced capture ...; it is in S3".

The race is made deterministic here by doing the other process's update right after
the listing (a second Spool on the same folder stands for the other process):

    .venv/bin/python tests/repro_eviction_race.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from heimdall_edge.settings import SyncSettings
from heimdall_edge.spool import Spool
from heimdall_edge.spool_keeper import SpoolKeeper


def main() -> None:
    root = Path(tempfile.mkdtemp()) / "spool"
    evictor = Spool(root)  # `heimdall-edge sync`: its quota sweep
    service = Spool(root)  # the service: backfill / upgrade recording a new revision
    six_mb = b"\0" * (6 * 2**20)
    old = evictor.create(device_id="pi", trigger="button", audio_wav=six_mb, frames=[])
    evictor.mark_synced(old.capture_id, old.revision, {"s3_keys": {}})  # revision 1 is in S3
    evictor.create(device_id="pi", trigger="button", audio_wav=six_mb, frames=[])  # > 10 MB

    listed = evictor.list

    def list_then_the_service_revises(*args: object, **kwargs: object) -> list:
        records = listed(*args, **kwargs)  # type: ignore[arg-type]
        if not args and not kwargs:  # _make_room's listing, under the evict lock
            service.update(old.capture_id, transcript="what the person said", status="failed")
        return records

    evictor.list = list_then_the_service_revises  # type: ignore[method-assign]
    keeper = SpoolKeeper(evictor, SyncSettings(quota_mb=10, evict_unsynced=False))
    keeper.sweep()  # what a sync pass does after uploading
    kept = {r.capture_id for r in listed()}
    print(
        f"capture {old.capture_id}: revision 2 (pending, never uploaded) "
        f"{'kept' if old.capture_id in kept else 'EVICTED with evict_unsynced off'}"
    )


if __name__ == "__main__":
    main()
