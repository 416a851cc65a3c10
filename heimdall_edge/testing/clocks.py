"""Time that moves only when a test says so, for anything that is given a clock."""

from __future__ import annotations

import asyncio


class FakeClock:
    """A monotonic clock that only moves when told, and a sleep that moves it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(float(seconds))
        self.now += seconds
        await asyncio.sleep(0)
