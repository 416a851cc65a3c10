"""A head start: answer what was said so far at the first pause, before the hang-over ends.

The capture ends only after `silence_ms` of silence, and until then the device sits
idle. At a pause of `speculate_after_ms` the audio so far is transcribed, the reply
started and its first sentence synthesized, through the same engines (cloud first,
hedged, local otherwise), so that when the hang-over ends the answer is ready or
nearly. If the person goes on talking, all of it is dropped: the task cancelled and
every stream it opened closed (a cancelled cloud call counts in the call stats, never
against a breaker), and the next pause starts again. What a speculation heard is the
capture up to the pause with nothing but silence after it, so its transcript is the
one the whole capture would give.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from heimdall_edge.audio import Audio
from heimdall_edge.engines.base import ReplyRequest, Transcript
from heimdall_edge.turn.routing import Answer, Engines

log = logging.getLogger(__name__)


@dataclass
class Head:
    """What a speculation made ready. The turn does whatever is missing itself: the reply
    when there was nothing to answer or it failed, the first sentence's speech likewise."""

    transcript: Transcript
    reply: Answer[str] | None = None
    speech: Answer[Audio] | None = None
    """The first sentence of `reply`, its first audio already here."""
    timings_ms: dict[str, float] = field(default_factory=dict)
    """The stages it ran ("transcribe", "reply"), timed as the turn times its own."""

    async def aclose(self) -> None:
        """Close the streams still open (a head dropped, or a turn cut short)."""
        for answer in (self.reply, self.speech):
            if answer is not None:
                await answer.aclose()


class Speculation:
    """The head start of one capture: started at each pause, dropped at each resumption.

    The Listener calls `paused`/`resumed` (it is a `Pauses`); the turn calls `take` once
    the capture has ended, and `aclose` when it is over, whatever happened.
    """

    def __init__(
        self,
        engines: Engines,
        request_for: Callable[[Transcript], Awaitable[ReplyRequest]],
        wants_reply: Callable[[Transcript], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`request_for(transcript)`: the reply request the turn would make;
        `wants_reply(transcript)`: whether the turn would ask for a reply at all."""
        self._clock = clock
        self._engines = engines
        self._request_for = request_for
        self._wants_reply = wants_reply
        self._task: asyncio.Task[Head] | None = None
        self._dropped: list[asyncio.Task[Head]] = []
        self.started = 0
        self.dropped = 0

    def paused(self, audio: Audio) -> None:
        self._drop()
        self.started += 1
        self._task = asyncio.create_task(self._head(audio), name="speculation")

    def resumed(self) -> None:
        if self._task is not None:
            self.dropped += 1
            log.debug("speech resumed: speculation %d dropped", self.started)
        self._drop()

    async def take(self) -> Head | None:
        """The head start for the capture that just ended, once it is ready; None if there
        is none (the person never paused, or went on after the last pause) or it failed.
        The caller owns what it gets (and closes it)."""
        task, self._task = self._task, None
        if task is None:
            return None
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            self._dropped.append(task)
            task.cancel()
            raise
        if task.cancelled():
            return None
        if (error := task.exception()) is not None:
            log.warning("speculation failed (%s): answering from the start", error)
            return None
        return task.result()

    async def aclose(self) -> None:
        """Drop what is still running and wait for every dropped task to let go of its streams."""
        self._drop()
        dropped, self._dropped = self._dropped, []
        for task in dropped:
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is None:
                await task.result().aclose()  # it had finished before it was dropped

    def _drop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._dropped.append(self._task)
            self._task = None

    async def _head(self, audio: Audio) -> Head:
        started = self._clock()
        head = Head(await self._engines.transcribe(audio))
        transcribed = self._clock()
        head.timings_ms["transcribe"] = (transcribed - started) * 1000
        if not self._wants_reply(head.transcript):
            return head
        try:
            head.reply = await self._engines.reply(await self._request_for(head.transcript))
        except Exception:  # the turn asks again, and says so if it fails again
            log.warning("speculation: the reply failed; the turn will ask again", exc_info=True)
            return head
        head.timings_ms["reply"] = (self._clock() - transcribed) * 1000
        try:
            head.speech = await self._engines.speak(head.reply.first)
        except asyncio.CancelledError:
            await head.aclose()
            raise
        except Exception:  # the turn synthesizes it again, and says so if it fails
            log.warning("speculation: speech failed; the turn will synthesize it", exc_info=True)
        return head
