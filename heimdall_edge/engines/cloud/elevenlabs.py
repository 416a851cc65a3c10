"""Cloud text-to-speech: ElevenLabs, streaming raw PCM that is played as it arrives."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from heimdall_edge.audio import SAMPLE_WIDTH, Audio
from heimdall_edge.engines.base import VoiceIdentity
from heimdall_edge.streams import closing

if TYPE_CHECKING:
    from elevenlabs.client import AsyncElevenLabs

CHUNK_MS = 100  # hand audio to the speaker in pieces this size, however the network slices it


class ElevenLabsEngine:
    name = "elevenlabs"

    def __init__(
        self, client: AsyncElevenLabs, *, voice_id: str, model: str, output_format: str
    ) -> None:
        self._client = client
        self.voice = voice_id
        self.model = model
        self.output_format = output_format
        self.sample_rate = int(output_format.removeprefix("pcm_"))

    def cache_identity(self) -> VoiceIdentity:
        return VoiceIdentity(
            engine=self.name,
            voice=self.voice,
            model=self.model,
            output_format=self.output_format,
            settings={},
        )

    async def synthesize(self, text: str, timeout_s: float) -> AsyncIterator[Audio]:
        """One streamed request; yields whole samples in ~100 ms pieces."""
        piece = self.sample_rate * CHUNK_MS // 1000 * SAMPLE_WIDTH
        buffer = b""
        checked = False
        stream = self._client.text_to_speech.stream(
            self.voice,
            text=text,
            model_id=self.model,
            output_format=self.output_format,  # type: ignore[arg-type]
            request_options={"max_retries": 0, "timeout_in_seconds": math.ceil(timeout_s)},
        )
        async with closing(stream) as arriving:
            async for data in arriving:
                buffer += data
                if not checked and buffer:
                    # The SDK passes any 200 body through; an HTML or JSON page is not PCM.
                    if buffer.lstrip()[:1] in (b"<", b"{"):
                        raise ValueError("text-to-speech stream is not PCM audio")
                    checked = True
                while len(buffer) >= piece:
                    yield Audio(buffer[:piece], self.sample_rate)
                    buffer = buffer[piece:]
        usable = len(buffer) - len(buffer) % SAMPLE_WIDTH
        if usable:
            yield Audio(buffer[:usable], self.sample_rate)
