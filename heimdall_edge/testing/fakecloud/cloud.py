"""The fake cloud itself: a threaded HTTP server on 127.0.0.1 with its faults and its records."""

from __future__ import annotations

import hmac
import logging
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any, Self

import numpy as np

from heimdall_edge.testing.fakecloud.handler import Handler
from heimdall_edge.testing.fakecloud.wire import ROUTES, Fault, Recorded, Route

log = logging.getLogger(__name__)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # hanging handlers must never hold up shutdown
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], cloud: FakeCloud) -> None:
        self.cloud = cloud
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() calls socket.getfqdn(), a DNS look-up: skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port

    def handle_error(self, request: Any, client_address: Any) -> None:
        # called from socketserver's except clause: the error is the one being handled
        log.debug("fakecloud: connection from %s ended: %r", client_address, sys.exc_info()[1])


class FakeCloud:
    """OpenAI + ElevenLabs over real HTTP on 127.0.0.1, with recorded requests and faults.

    ``transcript`` and ``reply`` may be strings or callables: ``transcript(record)``
    and ``reply(request_json)`` returning the text.
    """

    def __init__(
        self,
        *,
        openai_key: str = "sk-test",
        elevenlabs_key: str = "el-test",
        transcript: str | Callable[[Recorded], str] = "what time is it",
        reply: str | Callable[[dict[str, Any]], str] = "It is a fine day. Is there anything else?",
        chars_per_second: float = 15.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if chars_per_second <= 0:
            raise ValueError(f"chars_per_second must be > 0, got {chars_per_second}")
        self._openai_key = openai_key
        self._elevenlabs_key = elevenlabs_key
        self.transcript = transcript
        self.reply = reply
        self.chars_per_second = chars_per_second
        self.max_tts_s = 30.0
        """Synthesized speech never lasts longer than this."""
        self.tts_chunk_ms = 100
        """Audio per HTTP chunk on ``/stream``."""
        self.tts_chunk_interval_s = 0.0
        """Pause between stream chunks (0: as fast as the socket takes them)."""
        self.chat_chunk_interval_s = 0.0
        """Pause between server-sent events of a streamed chat completion."""
        self.requests: dict[Route, list[Recorded]] = {route: [] for route in ROUTES}
        self.unrouted: list[tuple[str, str]] = []
        """(method, path) of requests to paths this fake does not serve."""
        self._host = host
        self._port = port
        self._faults: dict[Route, Fault] = {}
        self._fault_uses: dict[Route, int] = {}
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._started = False

    # ---- lifecycle --------------------------------------------------------------
    def start(self) -> Self:
        if self._started:
            return self
        self._stopping.clear()
        self._open()
        self._started = True
        log.info("fakecloud listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._stopping.set()
        self._close_listener()
        self._close_connections()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def refuse_connections(self) -> None:
        """Close the listening socket (connects get ECONNREFUSED) and drop open connections."""
        self._close_listener()
        self._close_connections()

    def accept_connections(self) -> None:
        """Listen again, on the same port."""
        if self._started and self._server is None:
            self._open()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("FakeCloud is not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    @property
    def elevenlabs_base_url(self) -> str:
        return self.base_url

    def env(self) -> dict[str, str]:
        """Environment for the appliance to use this fake (contains the fake keys)."""
        return {
            "HEIMDALL_OPENAI_BASE_URL": self.openai_base_url,
            "HEIMDALL_ELEVENLABS_BASE_URL": self.elevenlabs_base_url,
            "OPENAI_API_KEY": self._openai_key,
            "ELEVENLABS_API_KEY": self._elevenlabs_key,
        }

    # ---- faults and records ----------------------------------------------------------
    def fault(self, route: Route, fault: Fault | None) -> None:
        """Set (or with None, clear) the fault on a route."""
        if route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}; got {route!r}")
        with self._lock:
            if fault is None:
                self._faults.pop(route, None)
            else:
                if fault.times is not None and fault.times < 1:
                    raise ValueError(f"Fault.times must be None or >= 1, got {fault.times}")
                self._faults[route] = fault
                self._fault_uses[route] = 0

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def count(self, route: Route) -> int:
        with self._lock:
            return len(self.requests[route])

    def last(self, route: Route) -> Recorded:
        with self._lock:
            if not self.requests[route]:
                raise LookupError(f"no {route} request received")
            return self.requests[route][-1]

    def reset(self) -> None:
        """Forget recorded requests and clear faults."""
        with self._lock:
            for route in ROUTES:
                self.requests[route].clear()
            self.unrouted.clear()
            self._faults.clear()

    def wait_for(self, route: Route, count: int = 1, timeout: float = 5.0) -> bool:
        """Block until `count` requests reached the route (True) or `timeout` passed (False)."""
        deadline = time.monotonic() + timeout
        while self.count(route) < count:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    # ---- the synthetic voice ------------------------------------------------------------
    def tts_duration_s(self, text: str) -> float:
        return min(len(text) / self.chars_per_second, self.max_tts_s)

    def tts_samples(self, text: str, sample_rate: int) -> int:
        """How many samples the fake answers for `text` at `sample_rate`."""
        return round(self.tts_duration_s(text) * sample_rate)

    def synthesize(self, text: str, sample_rate: int) -> bytes:
        """A soft, syllable-shaped 220 Hz tone, s16le mono; its length follows the text."""
        n = self.tts_samples(text, sample_rate)
        t = np.arange(n, dtype=np.float64) / sample_rate
        syllables = 0.55 + 0.45 * np.abs(np.sin(np.pi * 4.0 * t))
        samples = 0.2 * syllables * np.sin(2 * np.pi * 220.0 * t)
        fade = min(n // 2, int(0.01 * sample_rate))
        if fade:
            ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, fade))
            samples[:fade] *= ramp
            samples[n - fade :] *= ramp[::-1]
        return (samples * 32767.0).astype("<i2").tobytes()

    # ---- used by the handler ----------------------------------------------------------------
    def _authorized(self, route: Route, headers: dict[str, str]) -> bool:
        if route == "tts":
            given = headers.get("xi-api-key", "")
            return hmac.compare_digest(given.encode(), self._elevenlabs_key.encode())
        given = headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self._openai_key}".encode())

    def _record(self, record: Recorded) -> None:
        with self._lock:
            self.requests[record.route].append(record)

    def _take_fault(self, route: Route) -> Fault | None:
        with self._lock:
            fault = self._faults.get(route)
            if fault is None:
                return None
            if fault.times is not None:
                used = self._fault_uses.get(route, 0) + 1
                self._fault_uses[route] = used
                if used >= fault.times:
                    del self._faults[route]
            return fault

    def _transcript_for(self, record: Recorded) -> str:
        return self.transcript(record) if callable(self.transcript) else self.transcript

    def _reply_for(self, request: dict[str, Any]) -> str:
        return self.reply(request) if callable(self.reply) else self.reply

    def _open(self) -> None:
        server = Server((self._host, self._port), self)
        self._port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="fakecloud",
            daemon=True,
        )
        self._server, self._thread = server, thread
        thread.start()

    def _close_listener(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def _track(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def _untrack(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _close_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
