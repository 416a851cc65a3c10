"""Answers that need no network: the time, the date, the device's status, "I saved that".

Anything else gets a brief acknowledgement: the capture is kept, and a cloud
reply engine (when there is one) can do better.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from datetime import datetime

from heimdall_edge.engines.base import ReplyRequest

Now = Callable[[], datetime]

OFFLINE_ACK = "I'm offline, but I've saved that."

_TIME = re.compile(r"\b(what(?:'s| is)? the time|what time|time is it|tell me the time)\b")
_DATE = re.compile(r"\b(date|what day|which day|day is it|day today)\b")
_STATUS = re.compile(r"\b(status|how are you|are you (?:ok|okay|online|working)|you there)\b")
_SAVE = re.compile(r"\b(remember|note|save|record|remind)\b")


def _local_now() -> datetime:
    return datetime.now().astimezone()


def spoken_time(moment: datetime) -> str:
    hour = moment.hour % 12 or 12
    suffix = "AM" if moment.hour < 12 else "PM"
    return f"It's {hour}:{moment.minute:02d} {suffix}."


def spoken_date(moment: datetime) -> str:
    return f"Today is {moment:%A}, {moment:%B} {moment.day}, {moment.year}."


class OfflineReplyEngine:
    name = "offline"

    def __init__(self, now: Now = _local_now) -> None:
        self._now = now

    async def reply(self, request: ReplyRequest) -> AsyncIterator[str]:
        yield self.answer(request)

    def answer(self, request: ReplyRequest) -> str:
        said = request.transcript.lower().strip()
        if not said:
            return "Sorry, I didn't catch that. I kept the recording."
        if _TIME.search(said):
            return spoken_time(self._now())
        if _DATE.search(said):
            return spoken_date(self._now())
        if _STATUS.search(said):
            pending = request.status.get("pending_captures", "0")
            return f"I'm working. {pending} captures are waiting to sync."
        if _SAVE.search(said):
            return "I saved that."
        if request.status.get("online") == "false":
            return OFFLINE_ACK
        return "Got it. I saved that."
