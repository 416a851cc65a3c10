"""HTTP/1.1 by hand where the fake needs it: bodies read, chunked streams, pacing, drops, hangs."""

from __future__ import annotations

import json
import logging
import select
import socket
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from heimdall_edge.testing.fakecloud.cloud import Server

log = logging.getLogger(__name__)


class HttpPlumbing(BaseHTTPRequestHandler):
    """A request handler's connection and wire: what every answer, good or broken, is made of."""

    protocol_version = "HTTP/1.1"
    server_version = "fakecloud/1.0"
    server: Server

    # ---- connection lifecycle -------------------------------------------------
    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle's algorithm and
        # the client's delayed ACK add ~40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.cloud._track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.cloud._untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        # The request line carries no secret (keys travel in headers only).
        log.debug("fakecloud %s: " + format, self.address_string(), *args)

    # ---- request ----------------------------------------------------------------
    def _discard_body(self) -> None:
        try:
            self._read_body()
        except ValueError:
            self.close_connection = True

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(3)
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        size = int(length)
        if size < 0:
            raise ValueError("negative Content-Length")
        return self.rfile.read(size)

    # ---- writing --------------------------------------------------------
    def _send_json(
        self,
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
        *,
        truncate: bool = False,
    ) -> None:
        self._send(
            status, json.dumps(payload).encode(), "application/json", headers, truncate=truncate
        )

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        *,
        truncate: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if truncate:
            self.wfile.write(body[: len(body) // 2])
            self._drop()
            return
        self.wfile.write(body)

    def _begin_chunked(self, status: int, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _write_chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def _end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _pace(self, seconds: float) -> None:
        if seconds > 0:
            self.server.cloud._stopping.wait(seconds)

    def _drop(self) -> None:
        """End the connection at once (FIN), as a crashed or cut-off server would."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _hang(self) -> None:
        """Say nothing until the client gives up, the socket is shut down, or the server stops."""
        cloud = self.server.cloud
        self.close_connection = True
        while not cloud._stopping.wait(0.02):
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                    break  # the client closed its end
            except (OSError, ValueError):
                break
        self._drop()
