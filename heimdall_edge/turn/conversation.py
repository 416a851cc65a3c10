"""The conversation so far, so a follow-up ("and tomorrow?") can be answered.

Bounded both ways: the last few turns, and only while they keep coming; after
a quiet spell the next turn starts a new conversation.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from heimdall_edge.engines.base import Exchange


class Conversation:
    def __init__(
        self, max_turns: int, max_idle_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._turns: deque[Exchange] = deque(maxlen=max_turns or None)
        self._max_turns = max_turns
        self._max_idle_s = max_idle_s
        self._clock = clock
        self._last_at: float | None = None

    def history(self) -> tuple[Exchange, ...]:
        """The earlier turns a reply may see now (none once the conversation went quiet)."""
        if self._last_at is not None and self._clock() - self._last_at > self._max_idle_s:
            self._turns.clear()
        return tuple(self._turns) if self._max_turns else ()

    def add(self, said: str | None, answered: str | None) -> None:
        """Keep a finished turn (one without a transcript or a reply adds nothing)."""
        self.history()  # a quiet spell ends the old conversation first
        if said and answered and self._max_turns:
            self._turns.append(Exchange(said, answered))
        self._last_at = self._clock()
