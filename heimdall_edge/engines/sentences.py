"""Cut streamed text into sentences, so speech can start before the whole answer has arrived."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from heimdall_edge.streams import closing

_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


async def sentences(pieces: AsyncIterator[str]) -> AsyncIterator[str]:
    """Whole sentences from text arriving in arbitrary pieces; the remainder comes last."""
    buffer = ""
    async with closing(pieces) as arriving:
        async for piece in arriving:
            buffer += piece
            while match := _END.search(buffer):
                sentence, buffer = buffer[: match.end()].strip(), buffer[match.end() :]
                if sentence:
                    yield sentence
    if buffer.strip():
        yield buffer.strip()
