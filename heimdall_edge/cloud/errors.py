"""Why a cloud call failed, in words every caller shares: speech, replies, sync, credentials.

One error class for every cloud service, with a kind that decides what happens next
(retry, open the breaker, give up, skip). It imports nothing of ours, so
classification, the breaker, connectivity and the stores all build on it without
a circle.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """Why a cloud call failed, in the terms that decide what to do next."""

    AUTH = "auth"  # 401/403: a bad key does not fix itself
    RATE_LIMIT = "rate_limit"  # 429
    SERVER = "server"  # 5xx
    TIMEOUT = "timeout"
    CONNECTION = "connection"  # refused, DNS, reset
    MALFORMED = "malformed"  # answered, but unparseable / wrong shape / truncated stream
    CLIENT = "client"  # other 4xx: our bug, not an outage
    SLOW = "slow"  # answered too late: lost its hedge, overran its deadline, far off its normal
    BREAKER_OPEN = "breaker_open"  # skipped: the service's breaker is open
    OFFLINE = "offline"  # skipped: the device knows it is offline


RETRYABLE = frozenset(
    {ErrorKind.RATE_LIMIT, ErrorKind.SERVER, ErrorKind.TIMEOUT, ErrorKind.CONNECTION}
)
"""Kinds where the same request may well succeed a moment later."""

BREAKER_FAILURES = frozenset(RETRYABLE | {ErrorKind.MALFORMED, ErrorKind.AUTH, ErrorKind.SLOW})
"""Kinds that say the service is unhealthy (CLIENT is our bug; the skips are not calls).
SLOW is among them: a service that answers after the person was already answered locally
is as useless to the next turn as one that does not answer, and the breaker is what
lets the next turns skip it instead of paying the hedge delay every time."""


class CloudError(Exception):
    """A cloud call that failed or was skipped; its text is safe to log."""

    def __init__(
        self,
        service: str,
        kind: ErrorKind,
        message: str = "",
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.service = service
        self.kind = kind
        self.status = status
        self.retry_after_s = retry_after_s
        self.message = message[:120]
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.service}: {self.kind.value}"
        if self.status is not None:
            text += f" (HTTP {self.status})"
        return f"{text}: {self.message}" if self.message else text

    def __repr__(self) -> str:
        return f"CloudError({str(self)!r})"
