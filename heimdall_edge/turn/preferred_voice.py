"""The fixed phrases in the preferred voice: rendered by the cloud voice once it can be had.

The fixed phrases ("Sorry, I couldn't make that out...", "I'm offline, but I've saved
that.", ...) are rendered with Piper at start-up, so they can always be spoken. Once
ElevenLabs can be reached, each is rendered once more in its voice, into the voice
cache, where `Engines.speak` looks first whatever the service's state: so the voice
does not flip between turns because ElevenLabs went away for a while, and Piper
speaks them only until the cloud voice has been had.

It never delays a live turn: one phrase at a time, only while no turn is in progress
and the service is thought reachable, leaving most of its rate limit to the turns
(`RATE_SHARE`). It ends once every phrase is in the cache; after a restart it finds
them there and asks for nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from heimdall_edge.cloud.errors import CloudError, ErrorKind
from heimdall_edge.turn.routing import Engines

log = logging.getLogger(__name__)

POLL_S = 1.0
"""While a turn runs or the cloud voice is away, look again this often."""
RATE_SHARE = 0.25
"""The share of the text-to-speech rate limit (requests per minute) this may use."""
REFUSED = frozenset({ErrorKind.CLIENT, ErrorKind.MALFORMED})
"""The service answered about this phrase, not about itself: do not ask again this run."""


class PreferredVoice:
    """Runs once per service start, until every phrase is in the cloud voice (or refused)."""

    def __init__(
        self,
        engines: Engines,
        phrases: list[str],
        *,
        idle: Callable[[], bool],
        requests_per_minute: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`engines` has a cloud voice and a voice cache; `idle()`: no turn in progress."""
        assert engines.cloud_tts is not None and engines.cache is not None
        self._engines = engines
        self._policy = engines.cloud_tts.policy
        self._phrases = phrases
        self._idle = idle
        self._gap_s = 60.0 / (requests_per_minute * RATE_SHARE)
        self._sleep = sleep
        self.rendered = 0

    async def run(self, stop: asyncio.Event) -> None:
        try:
            missing = [p for p in self._phrases if not await self._engines.in_cloud_voice(p)]
        except Exception:  # a voice cache that cannot be read: Piper's voice it is
            log.exception("cannot tell which fixed phrases are in the cloud voice")
            return
        if missing:
            log.info("%d fixed phrases are not in the cloud voice yet", len(missing))
        while missing and not stop.is_set():
            while not (self._policy.available() and self._idle()) and not stop.is_set():
                await self._sleep(POLL_S)
            if stop.is_set():
                return
            if await self._render(missing[0]):
                missing.pop(0)
            if missing:
                await self._sleep(self._gap_s)
        if self.rendered:
            log.info("%d fixed phrases rendered in the cloud voice", self.rendered)

    async def _render(self, phrase: str) -> bool:
        """One phrase; True when it is done with (kept, or not to be asked for again)."""
        try:
            kept = await self._engines.render_in_cloud_voice(phrase)
        except CloudError as error:
            log.info("fixed phrase %r not in the cloud voice yet (%s)", phrase, error)
            return error.kind in REFUSED
        except Exception:  # the other phrases, and the service, carry on
            log.exception("fixed phrase %r could not be rendered in the cloud voice", phrase)
            return True
        if kept:
            self.rendered += 1
        else:  # speaking it later, with the service reachable, keeps it anyway
            log.info("fixed phrase %r not kept in the cloud voice this time", phrase)
        return True
