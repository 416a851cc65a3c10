"""Can one cloud service be reached? One per service, fed by its calls and a cheap probe of its host.

OpenAI, ElevenLabs and the capture store each have their own: one being down
never marks the others down (ElevenLabs keeps speaking while OpenAI is out of
reach, and sync goes on while both are). Fail over fast: once two calls in a row
could not reach the service, its calls are skipped (CloudError OFFLINE) instead
of paying a timeout each, and `run()` probes its host with a TCP connect until it
answers again. While online nothing is probed: real calls are evidence enough
and cost nothing extra.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from heimdall_edge.cloud.errors import ErrorKind

log = logging.getLogger(__name__)

NETWORK_FAILURES = frozenset({ErrorKind.CONNECTION, ErrorKind.TIMEOUT})
"""The only kinds that say something about the network; an HTTP error says nothing."""

Probe = Callable[[], Awaitable[bool]]


class Connectivity:
    """One service's online/offline state with change notification, for its policies or the syncer."""

    def __init__(
        self,
        probe: Probe,
        *,
        service: str,
        offline_after: int = 2,
        probe_interval_s: float = 15.0,
        max_probe_interval_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if offline_after < 1:
            raise ValueError("offline_after must be at least 1")
        self.service = service
        self.offline_after = offline_after
        self.probe_interval_s = probe_interval_s
        self.max_probe_interval_s = max(max_probe_interval_s, probe_interval_s)
        self._probe = probe
        self._clock = clock
        self._sleep = sleep
        self._online = True  # optimistic: the first calls will tell
        self._consecutive = 0
        self._since = clock()
        self._subscribers: list[Callable[[bool], None]] = []
        self._changed = asyncio.Event()  # replaced at every change; waiters hold the old one
        self._is_online = asyncio.Event()
        self._is_online.set()

    @property
    def online(self) -> bool:
        return self._online

    def record_success(self) -> None:
        """A call reached the service: the way there works."""
        self._consecutive = 0
        if not self._online:
            self._set(True, "a call succeeded")

    def record_failure(self, kind: ErrorKind) -> None:
        """Count consecutive CONNECTION/TIMEOUT failures; other kinds are neutral."""
        if kind not in NETWORK_FAILURES:
            return
        self._consecutive += 1
        if self._online and self._consecutive >= self.offline_after:
            self._set(False, f"{self._consecutive} calls in a row failed ({kind.value})")

    def subscribe(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        """Call `callback(online)` at every change; returns the unsubscribe function."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    async def wait_online(self) -> None:
        """Return at once if online, else when the service can be reached again."""
        await self._is_online.wait()

    async def wait_changed(self) -> bool:
        """Wait for the next change; returns the new state."""
        await self._changed.wait()
        return self._online

    async def run(self) -> None:
        """Long-lived task: while offline, probe (backing off up to a cap) until it succeeds."""
        while True:
            while self._online:
                await self.wait_changed()
            interval = self.probe_interval_s
            while not self._online:
                await self._sleep(interval)
                if self._online:  # a call got through meanwhile
                    break
                if await self._probe_once():
                    self._consecutive = 0
                    self._set(True, "the probe connected")
                else:
                    interval = min(interval * 2, self.max_probe_interval_s)

    def snapshot(self) -> dict[str, Any]:
        """For `doctor` and the status line."""
        return {
            "online": self._online,
            "consecutive_failures": self._consecutive,
            "for_s": round(self._clock() - self._since, 3),
        }

    async def _probe_once(self) -> bool:
        try:
            return bool(await self._probe())
        except Exception as exc:  # noqa: BLE001 - a broken probe must not end the task
            log.warning("%s: connectivity probe failed: %s", self.service, type(exc).__name__)
            return False

    def _set(self, online: bool, why: str) -> None:
        self._online = online
        self._since = self._clock()
        if online:
            log.info("%s: back online (%s); using it again", self.service, why)
            self._is_online.set()
        else:
            log.warning(
                "%s: offline: %s; not calling it, probing every %gs",
                self.service,
                why,
                self.probe_interval_s,
            )
            self._is_online.clear()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for callback in list(self._subscribers):
            try:
                callback(online)
            except Exception:
                log.exception("connectivity subscriber failed")


def _host_port(url_or_host: str, port: int | None) -> tuple[str, int]:
    """Host and port of a base URL ("https://api.openai.com/v1") or a bare host."""
    parts = urlsplit(url_or_host if "://" in url_or_host else f"//{url_or_host}")
    if not parts.hostname:
        raise ValueError(f"no host in {url_or_host!r}")
    default = {"http": 80, "ws": 80}.get(parts.scheme, 443)
    return parts.hostname, port or parts.port or default


def tcp_probe(url_or_host: str, port: int | None = None, timeout_s: float = 2.0) -> Probe:
    """A probe that opens (and closes) a TCP connection: DNS and a route, no request, no key."""
    host, port = _host_port(url_or_host, port)

    async def probe() -> bool:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can lose a cancellation that
        # arrives as the connection completes, and the probe task then outlives its service.
        try:
            async with asyncio.timeout(timeout_s):
                _, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as exc:
            log.debug("probe %s:%d failed: %s", host, port, type(exc).__name__)
            return False
        writer.close()
        try:
            async with asyncio.timeout(timeout_s):
                await writer.wait_closed()
        except (OSError, TimeoutError):
            pass  # connected is all we wanted to know
        return True

    return probe
