"""Transcribe captures whose turn was cut short (a crash, a SIGKILL, a power cut).

Such a capture is on disk, acknowledged, with audio and no transcript: its
process died between keeping it and recording what became of the turn. After a
restart the service transcribes each one while it is idle, oldest first, so
what the person said reaches S3 and DynamoDB as text too (a new revision). It is
never answered: the person has long stopped waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from heimdall_edge.audio import Audio, AudioError, read_audio
from heimdall_edge.engines.base import Transcript
from heimdall_edge.spool import lease
from heimdall_edge.spool.errors import CaptureNotFoundError, SpoolError
from heimdall_edge.spool.record import AUDIO_NAME, CaptureRecord
from heimdall_edge.spool.store import Spool

log = logging.getLogger(__name__)

CUT_SHORT = "the turn was cut short (the service stopped): transcribed afterwards, never answered"
IDLE_POLL_S = 0.5
"""While a turn is in progress, look again this often."""

Transcribe = Callable[[Audio], Awaitable[Transcript]]


def cut_short(spool: Spool) -> list[CaptureRecord]:
    """Captures left without a transcript by a process that is gone, oldest first."""
    return [
        record
        for record in reversed(spool.list())
        if record.status == "captured"
        and record.transcript is None
        and AUDIO_NAME in record.files
        and not lease.is_held(record.lease)
    ]


class Backfill:
    """Runs once after start-up: every capture cut short, transcribed while nothing else runs."""

    def __init__(
        self,
        spool: Spool,
        transcribe: Transcribe,
        idle: Callable[[], bool],
        on_recorded: Callable[[], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`transcribe(audio)` is the engines' (cloud first, then on the device); `idle()` is
        False while a capture or its turn is in progress; `on_recorded` wakes the syncer."""
        self._spool = spool
        self._transcribe = transcribe
        self._idle = idle
        self._on_recorded = on_recorded
        self._sleep = sleep
        self.done = 0

    async def run(self, stop: asyncio.Event) -> None:
        waiting = await asyncio.to_thread(cut_short, self._spool)
        if waiting:
            log.info("%d captures were cut short by a stop: transcribing them", len(waiting))
        for record in waiting:
            while not self._idle() and not stop.is_set():
                await self._sleep(IDLE_POLL_S)
            if stop.is_set():
                return
            try:
                await self._one(record)
            except Exception:  # the next capture, and the service, carry on
                log.exception("capture %s cut short could not be transcribed", record.capture_id)

    async def _one(self, record: CaptureRecord) -> None:
        try:
            audio = await asyncio.to_thread(
                read_audio, self._spool.path(record.capture_id) / AUDIO_NAME
            )
        except (OSError, SpoolError, AudioError) as exc:
            log.warning(
                "capture %s cut short: its audio cannot be read (%s)", record.capture_id, exc
            )
            return
        transcript = await self._transcribe(audio)
        try:
            await asyncio.to_thread(
                self._spool.update,
                record.capture_id,
                transcript=transcript.text,
                engines={**record.engines, "stt": transcript.engine},
                status="failed",
                error=CUT_SHORT,
                lease=None,
            )
        except CaptureNotFoundError:  # evicted for the quota (by any process) meanwhile
            log.info("capture %s cut short was removed while it was transcribed", record.capture_id)
            return
        self.done += 1
        log.info("capture %s cut short, transcribed: %r", record.capture_id, transcript.text)
        if self._on_recorded is not None:
            self._on_recorded()
