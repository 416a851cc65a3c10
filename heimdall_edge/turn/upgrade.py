"""Transcribe again, with cloud Whisper, what the device transcribed while the cloud was away.

tiny.en on the device keeps a turn going offline, but its transcript is second-rate.
Once cloud Whisper can be reached again, each such capture is sent to it, one at a
time and only while no turn is in progress. The record keeps both: the cloud's as
`transcript` (engines["stt"]), the device's as `transcript_on_device`
(engines["stt_on_device"]). That is a new revision, so S3 and DynamoDB follow. Where
cloud Whisper hears no speech (it wrote only a stock phrase such as "Thank you.", see
engines.hallucinations), its transcript is "", the device's kept beside it.

It never delays a live turn: it starts only when the appliance is idle and the cloud
is thought reachable, sends one request at a time, and leaves most of the service's
rate limit to the turns (`RATE_SHARE`). It is best effort: a capture whose audio the
cloud refuses is left as it is until the next start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from heimdall_edge.audio import Audio, AudioError, read_audio
from heimdall_edge.cloud.errors import CloudError, ErrorKind
from heimdall_edge.engines.base import Transcript
from heimdall_edge.spool import lease
from heimdall_edge.spool.errors import CaptureNotFoundError, SpoolError
from heimdall_edge.spool.record import AUDIO_NAME, CaptureRecord
from heimdall_edge.spool.store import Spool

log = logging.getLogger(__name__)

ON_DEVICE = "stt_on_device"
POLL_S = 1.0
"""While a turn runs or the cloud is away, look again this often ("within seconds")."""
RATE_SHARE = 0.25
"""The share of the speech-to-text rate limit (requests per minute) upgrades may use."""
REFUSED = frozenset({ErrorKind.CLIENT, ErrorKind.MALFORMED})
"""The cloud answered about this audio, not about itself: do not ask again this run."""

Transcribe = Callable[[Audio], Awaitable[Transcript]]


def upgradable(spool: Spool, local_engine: str) -> list[CaptureRecord]:
    """Captures whose transcript came from `local_engine` and was never upgraded, oldest first.

    Not those where the device heard nothing: on near-silence cloud Whisper tends to
    invent text ("Thank you."), which would be no upgrade.
    """
    return [
        record
        for record in reversed(spool.list())
        if record.transcript
        and record.engines.get("stt") == local_engine
        and ON_DEVICE not in record.engines
        and AUDIO_NAME in record.files
        and not lease.is_held(record.lease)
    ]


class Upgrade:
    """Runs for the life of the service; `notify()` when a capture may have become upgradable."""

    def __init__(
        self,
        spool: Spool,
        transcribe_in_cloud: Transcribe,
        *,
        local_engine: str,
        cloud_available: Callable[[], bool],
        idle: Callable[[], bool],
        requests_per_minute: float,
        on_recorded: Callable[[], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`cloud_available()`: online and the breaker not open; `idle()`: no turn in
        progress; `on_recorded` wakes the syncer."""
        self._spool = spool
        self._transcribe = transcribe_in_cloud
        self._local_engine = local_engine
        self._available = cloud_available
        self._idle = idle
        self._gap_s = 60.0 / (requests_per_minute * RATE_SHARE)
        self._on_recorded = on_recorded
        self._sleep = sleep
        self._wake = asyncio.Event()
        self._wake.set()  # the first look is at start-up
        self._refused: set[str] = set()
        self.done = 0

    def notify(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._wait(lambda: self._wake.is_set() or stop.is_set())
            self._wake.clear()
            while not stop.is_set():
                await self._wait(lambda: (self._available() and self._idle()) or stop.is_set())
                if stop.is_set():
                    return
                waiting = await asyncio.to_thread(upgradable, self._spool, self._local_engine)
                waiting = [r for r in waiting if r.capture_id not in self._refused]
                if not waiting:
                    break
                if len(waiting) > 1 and self.done == 0:
                    log.info("%d captures transcribed offline: upgrading them", len(waiting))
                try:
                    await self._one(waiting[0])
                except Exception:  # the next capture, and the service, carry on
                    log.exception("capture %s: upgrade failed", waiting[0].capture_id)
                    self._refused.add(waiting[0].capture_id)
                await self._sleep(self._gap_s)

    async def _wait(self, ready: Callable[[], bool]) -> None:
        while not ready():
            await self._sleep(POLL_S)

    async def _one(self, record: CaptureRecord) -> None:
        try:
            audio = await asyncio.to_thread(
                read_audio, self._spool.path(record.capture_id) / AUDIO_NAME
            )
        except (OSError, SpoolError, AudioError) as exc:
            log.warning("capture %s: cannot upgrade, audio unreadable (%s)", record.capture_id, exc)
            self._refused.add(record.capture_id)
            return
        try:
            transcript = await self._transcribe(audio)
        except CloudError as error:
            if error.kind in REFUSED:
                self._refused.add(record.capture_id)
            log.info("capture %s: not upgraded yet (%s)", record.capture_id, error)
            return
        try:
            await asyncio.to_thread(
                self._spool.update,
                record.capture_id,
                transcript=transcript.text,
                transcript_on_device=record.transcript,
                engines={**record.engines, "stt": transcript.engine, ON_DEVICE: self._local_engine},
            )
        except CaptureNotFoundError:  # evicted meanwhile: it was synced, with its own transcript
            log.info(
                "capture %s left the spool before its upgrade was recorded; the store keeps "
                "the device's transcript",
                record.capture_id,
            )
            return
        self.done += 1
        log.info(
            "capture %s upgraded by %s: %r (on the device: %r)",
            record.capture_id,
            transcript.engine,
            transcript.text,
            record.transcript,
        )
        if self._on_recorded is not None:
            self._on_recorded()
