"""Small async-iterator tools for audio streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


async def aclose(stream: object) -> None:
    """Close an async iterator if it can be closed (async generators can; plain iterators not)."""
    closer = getattr(stream, "aclose", None)
    if closer is not None:
        await closer()


@contextlib.asynccontextmanager
async def closing(source: AsyncIterable[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Iterate `source` and close it on the way out, however the loop ends.

    A stream left half-read (an early stop, an error raised by the reader or by the
    stream itself) is otherwise finalized by the garbage collector, later and on
    whatever thread it runs, with its HTTP response still open until then.
    """
    iterator = aiter(source)
    try:
        yield iterator
    finally:
        await aclose(iterator)


async def prefetch(source: AsyncIterator[T], depth: int = 8) -> AsyncIterator[T]:
    """Run `source` ahead of its consumer, so sentence two is synthesized while sentence one plays.

    An error in the source is raised to the consumer; leaving early cancels the source.
    """
    queue: asyncio.Queue[object] = asyncio.Queue(depth)

    iterator = aiter(source)

    async def pump() -> None:
        try:
            async for item in iterator:
                await queue.put(item)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put(exc)
        else:
            await queue.put(_END)

    task = asyncio.create_task(pump())
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item  # type: ignore[misc]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await aclose(iterator)
