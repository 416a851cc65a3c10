"""Connectivity: offline after consecutive network failures, probing back, notifications, TCP probe."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from heimdall_edge.app import builders
from heimdall_edge.cloud.connectivity import Connectivity, _host_port, tcp_probe
from heimdall_edge.cloud.errors import ErrorKind
from heimdall_edge.settings import load_settings
from heimdall_edge.testing.clocks import FakeClock

TIMEOUT = 5.0  # every async test is bounded


class ScriptedProbe:
    """Answers False until told otherwise; counts its calls."""

    def __init__(self, *answers: bool) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def __call__(self) -> bool:
        self.calls += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def make(probe: ScriptedProbe | None = None, **kwargs: float) -> tuple[Connectivity, FakeClock]:
    clock = FakeClock()
    connectivity = Connectivity(
        probe or ScriptedProbe(True), service="openai", clock=clock, sleep=clock.sleep, **kwargs
    )  # type: ignore[arg-type]
    return connectivity, clock


async def poll_until(condition: object, *, turns: int = 200) -> None:
    """Let other tasks run until condition() holds (no wall-clock sleeping)."""
    for _ in range(turns):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def test_starts_online() -> None:
    connectivity, _ = make()
    assert connectivity.online is True
    assert connectivity.snapshot() == {"online": True, "consecutive_failures": 0, "for_s": 0.0}


def test_offline_after_consecutive_network_failures(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="heimdall_edge.cloud.connectivity")
    connectivity, _ = make(offline_after=2)
    seen: list[bool] = []
    connectivity.subscribe(seen.append)
    connectivity.record_failure(ErrorKind.CONNECTION)
    assert connectivity.online and seen == []
    connectivity.record_failure(ErrorKind.TIMEOUT)
    assert connectivity.online is False and seen == [False]
    connectivity.record_failure(ErrorKind.CONNECTION)  # already offline: no second notice
    assert seen == [False]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "offline: 2 calls in a row failed" in warnings[0].getMessage()


def test_other_kinds_say_nothing_about_the_network() -> None:
    connectivity, _ = make(offline_after=2)
    for kind in (
        ErrorKind.SERVER,
        ErrorKind.AUTH,
        ErrorKind.RATE_LIMIT,
        ErrorKind.MALFORMED,
        ErrorKind.CLIENT,
        ErrorKind.SERVER,
    ):
        connectivity.record_failure(kind)
    assert connectivity.online
    connectivity.record_failure(ErrorKind.CONNECTION)
    connectivity.record_failure(ErrorKind.SERVER)  # neutral: does not break the streak either
    connectivity.record_failure(ErrorKind.CONNECTION)
    assert not connectivity.online


def test_success_resets_the_streak_and_brings_it_back() -> None:
    connectivity, _ = make(offline_after=2)
    seen: list[bool] = []
    unsubscribe = connectivity.subscribe(seen.append)
    connectivity.record_failure(ErrorKind.CONNECTION)
    connectivity.record_success()
    connectivity.record_failure(ErrorKind.CONNECTION)
    assert connectivity.online
    connectivity.record_failure(ErrorKind.CONNECTION)
    connectivity.record_success()
    assert connectivity.online and seen == [False, True]
    unsubscribe()
    connectivity.record_failure(ErrorKind.CONNECTION)
    connectivity.record_failure(ErrorKind.CONNECTION)
    assert seen == [False, True]


def test_a_failing_subscriber_does_not_stop_the_others() -> None:
    connectivity, _ = make(offline_after=1)
    seen: list[bool] = []

    def broken(online: bool) -> None:
        raise RuntimeError("bug")

    connectivity.subscribe(broken)
    connectivity.subscribe(seen.append)
    connectivity.record_failure(ErrorKind.CONNECTION)
    assert seen == [False]


async def test_run_does_not_probe_while_online() -> None:
    probe = ScriptedProbe(True)
    connectivity, clock = make(probe)

    async def scenario() -> None:
        task = asyncio.create_task(connectivity.run())
        for _ in range(20):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    await asyncio.wait_for(scenario(), TIMEOUT)
    assert probe.calls == 0 and clock.sleeps == []


async def test_probe_brings_it_back_with_backoff_and_notifies() -> None:
    probe = ScriptedProbe(False, False, False, True)
    connectivity, clock = make(
        probe, offline_after=1, probe_interval_s=1.0, max_probe_interval_s=3.0
    )
    seen: list[bool] = []
    connectivity.subscribe(seen.append)

    async def scenario() -> None:
        task = asyncio.create_task(connectivity.run())
        await asyncio.sleep(0)
        connectivity.record_failure(ErrorKind.CONNECTION)
        waiter = asyncio.create_task(connectivity.wait_online())
        changed = asyncio.create_task(connectivity.wait_changed())
        await asyncio.sleep(0)
        assert not waiter.done()
        await waiter
        assert await changed is True
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    await asyncio.wait_for(scenario(), TIMEOUT)
    assert probe.calls == 4
    assert clock.sleeps == [1.0, 2.0, 3.0, 3.0]  # doubling, capped
    assert connectivity.online and seen == [False, True]
    assert connectivity.snapshot()["consecutive_failures"] == 0


async def test_run_goes_round_again_after_a_second_outage() -> None:
    probe = ScriptedProbe(True)
    connectivity, clock = make(probe, offline_after=1, probe_interval_s=5.0)

    async def scenario() -> None:
        task = asyncio.create_task(connectivity.run())
        for _ in range(2):
            connectivity.record_failure(ErrorKind.TIMEOUT)
            await asyncio.wait_for(connectivity.wait_online(), TIMEOUT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    await asyncio.wait_for(scenario(), TIMEOUT)
    assert probe.calls == 2 and clock.sleeps == [5.0, 5.0]


async def test_run_stops_probing_when_a_call_gets_through() -> None:
    probe = ScriptedProbe(False)
    connectivity, _ = make(probe, offline_after=1, probe_interval_s=1.0)

    async def scenario() -> None:
        task = asyncio.create_task(connectivity.run())
        connectivity.record_failure(ErrorKind.CONNECTION)
        await poll_until(lambda: probe.calls >= 2)
        connectivity.record_success()
        calls = probe.calls
        for _ in range(20):
            await asyncio.sleep(0)
        assert probe.calls <= calls + 1  # at most the probe already under way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    await asyncio.wait_for(scenario(), TIMEOUT)
    assert connectivity.online


async def test_a_probe_that_raises_counts_as_offline() -> None:
    answers = iter([RuntimeError("bug"), True])

    async def probe() -> bool:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    clock = FakeClock()
    connectivity = Connectivity(
        probe,
        service="openai",
        offline_after=1,
        probe_interval_s=1.0,
        clock=clock,
        sleep=clock.sleep,
    )

    async def scenario() -> None:
        task = asyncio.create_task(connectivity.run())
        connectivity.record_failure(ErrorKind.CONNECTION)
        await connectivity.wait_online()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    await asyncio.wait_for(scenario(), TIMEOUT)
    assert clock.sleeps == [1.0, 2.0]


async def test_wait_online_returns_at_once_when_online() -> None:
    connectivity, _ = make()
    await asyncio.wait_for(connectivity.wait_online(), TIMEOUT)


# --- tcp_probe ------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def listening_port() -> AsyncIterator[int]:
    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # bound, never listened, now closed: connect is refused


async def test_tcp_probe_connects_to_a_listening_socket(listening_port: int) -> None:
    assert await asyncio.wait_for(tcp_probe("127.0.0.1", listening_port)(), TIMEOUT) is True
    url = f"http://127.0.0.1:{listening_port}/v1"
    assert await asyncio.wait_for(tcp_probe(url, timeout_s=1.0)(), TIMEOUT) is True


async def test_tcp_probe_refused_on_a_closed_port() -> None:
    probe = tcp_probe(f"https://127.0.0.1:{closed_port()}")
    assert await asyncio.wait_for(probe(), TIMEOUT) is False


async def test_tcp_probe_unresolvable_host() -> None:
    probe = tcp_probe("https://heimdall-edge.invalid", timeout_s=1.0)
    assert await asyncio.wait_for(probe(), TIMEOUT) is False


@pytest.mark.parametrize(
    ("target", "port", "expected"),
    [
        ("https://api.openai.com/v1", None, ("api.openai.com", 443)),
        ("http://localhost:8080/x", None, ("localhost", 8080)),
        ("http://example.com", None, ("example.com", 80)),
        ("api.elevenlabs.io", None, ("api.elevenlabs.io", 443)),
        ("api.elevenlabs.io", 8443, ("api.elevenlabs.io", 8443)),
        ("s3.eu-west-1.amazonaws.com:443", None, ("s3.eu-west-1.amazonaws.com", 443)),
    ],
)
def test_host_port(target: str, port: int | None, expected: tuple[str, int]) -> None:
    assert _host_port(target, port) == expected


def test_host_port_rejects_no_host() -> None:
    with pytest.raises(ValueError, match="no host"):
        _host_port("https://", None)


# --- one per service, each probing its own host ---------------------------------------------------


class CountingListener:
    """A real listening socket on loopback that counts the connections it accepts."""

    def __init__(self) -> None:
        self.accepted = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            writer.close()

        self._server = await asyncio.start_server(accept, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def test_each_service_probes_its_own_host_and_is_down_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listeners = {name: CountingListener() for name in ("openai", "elevenlabs", "store")}
    ports = {name: await listener.start() for name, listener in listeners.items()}
    for name, value in {
        "OPENAI_API_KEY": "sk-test",
        "ELEVENLABS_API_KEY": "el-test",
        "HEIMDALL_OPENAI_BASE_URL": f"http://127.0.0.1:{ports['openai']}/v1",
        "HEIMDALL_ELEVENLABS_BASE_URL": f"http://127.0.0.1:{ports['elevenlabs']}",
        "HEIMDALL_S3_BUCKET": "captures",
        "HEIMDALL_S3_ENDPOINT_URL": f"http://127.0.0.1:{ports['store']}",
        "HEIMDALL_SYNC__REGION": "eu-west-1",
        "HEIMDALL_RESILIENCE__PROBE_INTERVAL_S": "0.05",
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    engines = builders.build_engines(settings, voice_cache=False)
    with builders.open_spool(settings) as spool:
        store = builders.build_syncer(settings, spool).connectivity
    assert store is not None
    services = {**engines.connectivities, "store": store}
    assert engines.cloud_stt is not None and engines.cloud_reply is not None
    assert engines.cloud_stt.policy.connectivity is engines.cloud_reply.policy.connectivity

    async def scenario() -> None:
        for name, connectivity in services.items():
            before = {n: listener.accepted for n, listener in listeners.items()}
            probes = [asyncio.create_task(c.run()) for c in services.values()]
            connectivity.record_failure(ErrorKind.CONNECTION)
            connectivity.record_failure(ErrorKind.CONNECTION)
            others = {other: c.online for other, c in services.items() if other != name}
            assert not connectivity.online and all(others.values()), (name, others)
            assert engines.online == {s: s != name for s in ("openai", "elevenlabs")}
            await connectivity.wait_online()  # its own probe found its own host
            for probe in probes:
                probe.cancel()
            await asyncio.gather(*probes, return_exceptions=True)
            # One connection, to its own host; none to the others (their probes are idle).
            after = {n: listener.accepted - before[n] for n, listener in listeners.items()}
            assert after == {n: int(n == name) for n in listeners}, name

    try:
        await asyncio.wait_for(scenario(), TIMEOUT)
    finally:
        for listener in listeners.values():
            await listener.stop()


def test_the_store_is_probed_at_its_regional_endpoint_without_an_endpoint_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from heimdall_edge.sync.cloudstore import CaptureStore
    from heimdall_edge.sync.store_config import StoreConfig

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    store = CaptureStore(StoreConfig(bucket="b", prefix="", table=None, region="eu-west-1"))
    assert _host_port(store.endpoint_url, None) == ("s3.eu-west-1.amazonaws.com", 443)
    local = StoreConfig(
        bucket="b", prefix="", table=None, region="eu-west-1", s3_endpoint_url="http://minio:9000"
    )
    assert _host_port(CaptureStore(local).endpoint_url, None) == ("minio", 9000)
