"""The speaker as the appliance uses it: the Listener keeps listening while it plays."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from heimdall_edge.audio import Audio
from heimdall_edge.devices.base import Playback, Speaker
from heimdall_edge.listen.listener import Listener


class ListeningSpeaker:
    """Every playback runs with `Listener.while_speaking` beside it.

    So the wake word can stop it (barge-in by voice), the device's own voice is
    recognised as such, and play() returns only once the settle time after the
    last audio has passed: the next capture can never start on its echo.
    """

    def __init__(self, speaker: Speaker, listener: Listener) -> None:
        self._speaker = speaker
        self._listener = listener

    async def play(self, chunks: AsyncIterator[Audio], stop: asyncio.Event) -> Playback:
        self._listener.playback_starting()
        listening = asyncio.create_task(
            self._listener.while_speaking(stop), name="listen-while-speaking"
        )
        try:
            return await self._speaker.play(self._listener.own_voice(chunks), stop)
        finally:
            self._listener.playback_ended()
            try:
                await listening
            except asyncio.CancelledError:
                listening.cancel()
                raise

    async def aclose(self) -> None:
        await self._speaker.aclose()
