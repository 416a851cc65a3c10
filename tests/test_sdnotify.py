"""sd_notify against real AF_UNIX datagram sockets: a path in tmp_path and an abstract one."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from heimdall_edge.app.sdnotify import (
    HealthWatchdog,
    Notifier,
    extending_startup,
    socket_address,
    watchdog_interval,
)
from heimdall_edge.testing.clocks import FakeClock

TIMEOUT = 5.0


class Receiver:
    """A bound datagram socket playing systemd's side of NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket, notify_socket: str):
        self.sock = sock
        self.notify_socket = notify_socket

    def recv(self, timeout: float = 2.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096)

    def pending(self) -> list[bytes]:
        """Every datagram already queued, without waiting."""
        self.sock.setblocking(False)
        found = []
        while True:
            try:
                found.append(self.sock.recv(4096))
            except BlockingIOError:
                return found


@pytest.fixture
def receiver(tmp_path) -> Iterator[Receiver]:
    path = tmp_path / "notify"
    assert len(str(path)) < 100, "AF_UNIX path too long for this test layout"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield Receiver(sock, str(path))


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"heimdall-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield Receiver(sock, "@" + name)


def test_ready_status_watchdog_stopping_exact_bytes(receiver):
    with Notifier(environ={"NOTIFY_SOCKET": receiver.notify_socket}) as notifier:
        assert notifier.enabled
        assert notifier.ready()
        assert receiver.recv() == b"READY=1"
        assert notifier.ready("listening")
        assert receiver.recv() == b"READY=1\nSTATUS=listening"
        assert notifier.status("transcribing (local)")
        assert receiver.recv() == b"STATUS=transcribing (local)"
        assert notifier.watchdog()
        assert receiver.recv() == b"WATCHDOG=1"
        assert notifier.stopping()
        assert receiver.recv() == b"STOPPING=1"
        assert notifier.stopping("shutting down")
        assert receiver.recv() == b"STOPPING=1\nSTATUS=shutting down"
    assert receiver.pending() == []


def test_send_fields_order_case_and_newlines(receiver):
    with Notifier(receiver.notify_socket) as notifier:
        assert notifier.send(status="line one\nline two", errno=5, ready=True)
        assert receiver.recv() == b"STATUS=line one line two\nERRNO=5\nREADY=1"
        assert notifier.extend_timeout(12.5)
        assert receiver.recv() == b"EXTEND_TIMEOUT_USEC=12500000"
        assert notifier.status("Zoë ✓")
        assert receiver.recv() == "STATUS=Zoë ✓".encode()


def test_abstract_socket(abstract_receiver):
    with Notifier(environ={"NOTIFY_SOCKET": abstract_receiver.notify_socket}) as notifier:
        assert notifier.ready("up")
        assert abstract_receiver.recv() == b"READY=1\nSTATUS=up"
        assert notifier.watchdog()
        assert abstract_receiver.recv() == b"WATCHDOG=1"


def test_reads_notify_socket_from_process_environment(receiver, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.notify_socket)
    with Notifier() as notifier:
        assert notifier.ready()
    assert receiver.recv() == b"READY=1"


def test_no_op_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert Notifier(environ={}).send(READY=1) is False
    assert Notifier(environ={"NOTIFY_SOCKET": ""}).enabled is False


def test_send_failure_never_raises(tmp_path, caplog):
    missing = tmp_path / "nobody-listens"
    notifier = Notifier(str(missing))
    assert notifier.enabled
    with caplog.at_level("DEBUG", logger="heimdall_edge.app.sdnotify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    assert "failed" in caplog.text


def test_recovers_when_the_socket_appears_later(tmp_path):
    path = tmp_path / "late"
    notifier = Notifier(str(path))
    assert notifier.status("early") is False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert notifier.status("late")
        sock.settimeout(2)
        assert sock.recv(4096) == b"STATUS=late"
    notifier.close()


def test_socket_address_forms():
    assert socket_address(None) is None
    assert socket_address("") is None
    assert socket_address("@") is None
    assert socket_address("@sd/notify") == "\0sd/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("relative/notify") is None
    assert Notifier(environ={"NOTIFY_SOCKET": "relative"}).enabled is False


def test_watchdog_interval():
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "-5"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid=4242) is None
    assert (
        watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, pid=4242) == 15.0
    )
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}) is None


def test_tick_pings_only_after_a_beat(receiver, caplog):
    clock = FakeClock(start=100.0)
    with Notifier(receiver.notify_socket) as notifier:
        dog = HealthWatchdog(notifier, 15.0, clock=clock)
        assert dog.active

        clock.now += 15
        assert dog.tick() is False  # no beat yet: nothing sent
        assert receiver.pending() == []
        assert "no progress since start" in caplog.text

        dog.beat()
        assert dog.last_beat == 115.0
        clock.now += 15
        assert dog.tick() is True
        assert receiver.recv() == b"WATCHDOG=1"
        assert dog.last_ping == 130.0 and dog.pings == 1

        # A beat counts once: the next tick without a new beat withholds.
        clock.now += 15
        assert dog.tick() is False
        assert receiver.pending() == []
        assert "no progress for 30.0 s" in caplog.text

        dog.beat()
        dog.beat()
        clock.now += 15
        assert dog.tick() is True
        assert receiver.recv() == b"WATCHDOG=1"
        assert receiver.pending() == []
        assert dog.pings == 2


def test_inactive_without_watchdog_or_socket(receiver):
    assert HealthWatchdog(Notifier(environ={}), 15.0).active is False
    assert HealthWatchdog(Notifier(receiver.notify_socket), None).active is False
    env = {"NOTIFY_SOCKET": receiver.notify_socket, "WATCHDOG_USEC": "30000000"}
    dog = HealthWatchdog.from_env(Notifier(environ=env), environ=env)
    assert dog.active and dog.interval == 15.0
    with pytest.raises(ValueError):
        HealthWatchdog(Notifier(environ={}), 0)


async def test_run_returns_at_once_when_inactive():
    dog = HealthWatchdog(Notifier(environ={}), 0.01)
    await asyncio.wait_for(dog.run(), timeout=TIMEOUT)


async def test_run_without_beats_sends_nothing(receiver):
    with Notifier(receiver.notify_socket) as notifier:
        dog = HealthWatchdog(notifier, 0.01)
        task = asyncio.create_task(dog.run())
        try:
            await asyncio.wait_for(asyncio.sleep(0.15), timeout=TIMEOUT)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=TIMEOUT)
        assert receiver.pending() == []
        assert dog.pings == 0


class SteppedSleep:
    """An injected sleep that returns only when the test calls `step`: one tick per step."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self._gate: asyncio.Future[None] | None = None
        self._asleep = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self._gate = asyncio.get_running_loop().create_future()
        self._asleep.set()
        await self._gate

    async def step(self) -> None:
        await self._asleep.wait()  # the watchdog is sleeping
        self._asleep.clear()
        assert self._gate is not None
        self._gate.set_result(None)
        await self._asleep.wait()  # it ticked and sleeps again


async def test_run_pings_after_each_beat_and_stops_when_the_loop_wedges(receiver):
    sleep = SteppedSleep()
    with Notifier(receiver.notify_socket) as notifier:
        dog = HealthWatchdog(notifier, 15.0, clock=FakeClock(start=100.0), sleep=sleep)
        task = asyncio.create_task(dog.run())

        async def scenario() -> None:
            dog.beat()  # a healthy loop
            await sleep.step()
            assert receiver.recv() == b"WATCHDOG=1"
            dog.beat()
            await sleep.step()
            assert receiver.recv() == b"WATCHDOG=1"
            # The loop wedges: no more beats, no more pings however many ticks pass.
            for _ in range(3):
                await sleep.step()
            assert receiver.pending() == []
            assert dog.pings == 2
            dog.beat()  # it recovers
            await sleep.step()
            assert receiver.recv() == b"WATCHDOG=1"
            assert set(sleep.calls) == {15.0}

        try:
            await asyncio.wait_for(scenario(), timeout=TIMEOUT)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=TIMEOUT)


async def test_long_start_up_keeps_extending_the_start_timeout_until_it_ends(receiver):
    with Notifier(receiver.notify_socket) as notifier:
        async with extending_startup(notifier, step_s=0.3):
            await asyncio.sleep(0.25)  # start-up work: a recovery, models loading
        sent = receiver.pending()
        assert len(sent) >= 3  # at once, then every 0.1 s
        assert set(sent) == {b"EXTEND_TIMEOUT_USEC=300000"}
        await asyncio.sleep(0.25)
        assert receiver.pending() == []  # stopped with the block


def test_a_fresh_pulse_counts_as_progress(receiver):
    """The listener's latest frame time stands in for a beat per frame; an old one does not."""
    clock = FakeClock(start=100.0)
    frame_at: list[float | None] = [None]
    with Notifier(receiver.notify_socket) as notifier:
        dog = HealthWatchdog(notifier, 15.0, clock=clock, pulse=lambda: frame_at[0])
        clock.now += 15
        assert dog.tick() is False  # no frame yet
        frame_at[0] = clock.now - 0.03
        assert dog.tick() is True
        assert receiver.recv() == b"WATCHDOG=1"
        clock.now += 15  # the frame is now an interval old: the loop stopped reading
        assert dog.tick() is False
        assert receiver.pending() == []
