"""Talk to systemd: readiness, status, stopping and a health-gated watchdog.

The `sd_notify(3)` protocol, standard library only: newline-separated
``KEY=value`` assignments in one datagram on the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a path, or an abstract socket written with a leading
``@``). Outside systemd the variable is unset and every call is a no-op.
Sending never raises into the caller: a lost notification is logged at debug
and the appliance carries on.

The watchdog is not a blind timer. `HealthWatchdog` pings ``WATCHDOG=1`` only
when the service loop has called `HealthWatchdog.beat` since the previous
ping, or its pulse (the time the latest microphone frame was read) is younger
than one interval, so a wedged loop stops the pings and systemd restarts the
service (``WatchdogSec=`` with ``Restart=on-failure``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Self

from heimdall_edge.clock import Clock

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[object]]


def socket_address(value: str | None) -> str | None:
    """The address to send to, from a $NOTIFY_SOCKET value; None if unusable.

    ``@name`` is an abstract socket (Linux), sent to as ``\\0name``; anything
    else must be an absolute path, as sd_notify(3) requires.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:] if len(value) > 1 else None
    if value.startswith("/"):
        return value
    log.debug("NOTIFY_SOCKET=%r is neither an absolute path nor @abstract; not notifying", value)
    return None


def _clean(value: object) -> str:
    # One assignment per line: a newline inside a value would start a bogus one.
    text = "1" if value is True else "0" if value is False else str(value)
    return text.replace("\r", " ").replace("\n", " ")


class Notifier:
    """Sends sd_notify datagrams to systemd; a no-op when not run by systemd."""

    def __init__(self, address: str | None = None, *, environ: Mapping[str, str] | None = None):
        """`address`: a $NOTIFY_SOCKET-style value; unset: read $NOTIFY_SOCKET from `environ`."""
        if address is None:
            env = os.environ if environ is None else environ
            address = env.get("NOTIFY_SOCKET")
        self._address = socket_address(address)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """Whether a notification socket is known (we run under systemd with Type=notify)."""
        return self._address is not None

    def send(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines in one datagram, keys upper-cased, in the order given.

        Returns whether the datagram was sent; never raises.
        """
        if self._address is None or not fields:
            return False
        payload = "\n".join(f"{key.upper()}={_clean(value)}" for key, value in fields.items())
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never stall the event loop: PID 1 drains its socket promptly, and a
                # notification that cannot go now is better dropped than waited for.
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(payload.encode("utf-8"), self._address)
        except OSError as exc:
            log.debug("sd_notify %r to %r failed: %s", payload, self._address, exc)
            self.close()
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete (``READY=1``), optionally with a status line."""
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """Keep-alive ping (``WATCHDOG=1``); send it only when the service is really healthy."""
        return self.send(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (``STOPPING=1``), optionally with a status line."""
        if status is None:
            return self.send(STOPPING=1)
        return self.send(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start-up (or stop) time: ``EXTEND_TIMEOUT_USEC``, e.g. while models load."""
        return self.send(EXTEND_TIMEOUT_USEC=max(0, int(seconds * 1_000_000)))

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


STARTUP_STEP_S = 30.0
"""While start-up work runs, each EXTEND_TIMEOUT_USEC asks for this much more time."""


@contextlib.asynccontextmanager
async def extending_startup(
    notifier: Notifier, step_s: float = STARTUP_STEP_S
) -> AsyncIterator[None]:
    """Keep systemd's start timeout ahead of the work in the block (a spool recovering a
    large backlog, models loading on a slow SD card): EXTEND_TIMEOUT_USEC now and every
    third of `step_s`, so start-up that makes progress is never killed by TimeoutStartSec.

    The block's blocking work must run in threads, or the extensions cannot be sent.
    """

    async def extend() -> None:
        while True:
            notifier.extend_timeout(step_s)
            await asyncio.sleep(step_s / 3)

    task = asyncio.create_task(extend(), name="extend-startup")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between watchdog pings: half of ``$WATCHDOG_USEC``; None if no watchdog applies.

    When ``$WATCHDOG_PID`` is set it must be this process (`pid`, default
    `os.getpid()`), as sd_watchdog_enabled(3) checks, so a child that
    inherited the environment does not ping on the service's behalf.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    watchdog_pid = env.get("WATCHDOG_PID")
    if watchdog_pid:
        try:
            if int(watchdog_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2_000_000


class HealthWatchdog:
    """Pings ``WATCHDOG=1`` each interval, but only if the service proved itself healthy.

    The service loop calls `beat` whenever it really made progress (an
    interaction finished); progress too frequent to beat for (a microphone frame
    every 30 ms) is read from `pulse` instead, the clock time it last happened.
    `run` wakes every `interval` seconds and pings only if a beat happened since
    the previous ping or the pulse is younger than `interval`; otherwise it
    withholds the ping, logs it, and systemd restarts the service once
    ``WatchdogSec=`` passes without one.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval: float | None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        pulse: Callable[[], float | None] = lambda: None,
    ):
        if interval is not None and interval <= 0:
            raise ValueError(f"watchdog interval must be positive, got {interval!r}")
        self._notifier = notifier
        self.interval = interval
        self._clock = clock
        self._sleep = sleep
        self._pulse = pulse
        self._beaten = False
        self._withholding = False
        self.last_beat: float | None = None
        """Clock time of the latest beat; None before the first."""
        self.last_ping: float | None = None
        """Clock time of the latest ping sent; None before the first."""
        self.pings = 0
        """Pings sent so far."""

    @classmethod
    def from_env(
        cls,
        notifier: Notifier,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        pulse: Callable[[], float | None] = lambda: None,
    ) -> Self:
        """A watchdog paced by ``$WATCHDOG_USEC`` (inactive when systemd set no watchdog)."""
        return cls(notifier, watchdog_interval(environ), clock=clock, sleep=sleep, pulse=pulse)

    @property
    def active(self) -> bool:
        """Whether pings will be sent at all (a watchdog is configured and systemd listens)."""
        return self.interval is not None and self._notifier.enabled

    def beat(self) -> None:
        """The service made real progress since the last call: the next tick may ping."""
        self._beaten = True
        self.last_beat = self._clock()

    def tick(self) -> bool:
        """One check: ping if a beat happened since the last ping, or the pulse is younger
        than an interval. Returns whether it pinged."""
        now = self._clock()
        pulsed = self._pulse()
        if not (self._beaten or self._fresh(pulsed, now)):
            if not self._withholding:
                last = max((t for t in (self.last_beat, pulsed) if t is not None), default=None)
                since = "since start" if last is None else f"for {now - last:.1f} s"
                log.warning(
                    "service loop made no progress %s: withholding the watchdog ping", since
                )
                self._withholding = True
            return False
        if self._withholding:
            log.info("service loop made progress again: watchdog pings resume")
            self._withholding = False
        self._beaten = False
        self.last_ping = now
        self.pings += 1
        self._notifier.watchdog()
        return True

    def _fresh(self, pulsed: float | None, now: float) -> bool:
        """Whether the pulse came within the last interval (so, about, since the last tick)."""
        return pulsed is not None and self.interval is not None and now - pulsed < self.interval

    async def run(self) -> None:
        """Tick every `interval` until cancelled; returns at once if no watchdog is active."""
        if not self.active:
            log.debug("no systemd watchdog configured: health pings off")
            return
        assert self.interval is not None
        while True:
            await self._sleep(self.interval)
            self.tick()
