"""A fake of the cloud services the appliance talks to, over real HTTP on 127.0.0.1.

One stdlib ``ThreadingHTTPServer`` (HTTP/1.1, keep-alive, chunked streams) in a
background thread speaks the wire protocols the official clients expect:

* OpenAI ``POST /v1/audio/transcriptions`` (multipart/form-data) and
  ``POST /v1/chat/completions`` (plain, or server-sent events with ``stream: true``),
  authenticated with ``Authorization: Bearer <key>``;
* ElevenLabs ``POST /v1/text-to-speech/{voice_id}`` and ``.../stream``, answering
  raw s16le mono PCM (``output_format=pcm_<rate>``) or silent MP3 frames,
  authenticated with ``xi-api-key: <key>``.

Every request is recorded (fields, uploaded bytes, JSON body, arrival time), and
faults can be injected per route: latency, an HTTP error status (with the real
services' error bodies and ``Retry-After``), a hang, a truncated body, a
malformed body, and refused connections on the same port.

Used by tests and benchmarks (``with FakeCloud() as cloud: ...``) and standalone
for trying the cloud path without keys::

    python -m heimdall_edge.testing.fakecloud --port 8787 --latency-ms 150

API keys are never logged. Recorded headers keep the auth headers' presence but
not their values (``Recorded.auth_ok`` says whether the key was right).
"""

from __future__ import annotations

import argparse
import hmac
import io
import json
import logging
import math
import re
import secrets
import select
import socket
import socketserver
import sys
import threading
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from email.utils import collapse_rfc2231_value
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Self, get_args
from urllib.parse import parse_qsl, urlsplit

import numpy as np

log = logging.getLogger(__name__)

Route = Literal["transcriptions", "chat", "tts"]
ROUTES: tuple[Route, ...] = get_args(Route)

PCM_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
MP3_BITRATES = (32, 64, 96, 128, 192)  # kbit/s, MPEG-1 layer III at 44.1 kHz
MALFORMED_JSON = (
    b'{"id": "chatcmpl-garbage", "choices": [{"index": 0, "message": <html>502 Bad Gateway'
)
MALFORMED_AUDIO = b"<html><head><title>Captive portal</title></head><body>Sign in</body></html>"
_REDACTED = "<redacted>"


@dataclass
class Fault:
    """What goes wrong on a route. Checked in this order: latency, hang, status, then
    (after authentication succeeds) truncate or malformed on an otherwise good answer."""

    latency_s: float = 0.0
    """Delay before answering (before the status line and headers)."""
    status: int | None = None
    """Answer with this HTTP error (401, 429, 500, 503...) and the service's error body."""
    retry_after_s: float | None = None
    """Send ``Retry-After`` (with ``status``): an integer when whole, else a decimal."""
    hang: bool = False
    """Read the request, never answer; the connection is dropped when the client gives
    up or the server stops (or refuses connections)."""
    truncate: bool = False
    """Streams: send part of the body, then drop the connection without the final
    chunk. Plain bodies: declare the full Content-Length, send half, drop."""
    malformed: bool = False
    """200 with a body that is not the documented shape (see the module tests)."""
    times: int | None = None
    """Apply to the next N requests on the route only (None: until cleared)."""


@dataclass(frozen=True)
class UploadedFile:
    """One file part of a multipart/form-data request."""

    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class Recorded:
    """One request as the server received it."""

    route: Route
    method: str
    path: str
    """The path without the query string, e.g. ``/v1/text-to-speech/abc/stream``."""
    query: dict[str, str]
    headers: dict[str, str]
    """Lower-case names; ``authorization`` and ``xi-api-key`` values are redacted."""
    received_at: float
    """``time.monotonic()`` when the request body had been read."""
    body: bytes = b""
    json: Any = None
    """The decoded JSON body (chat, tts), or None."""
    form: dict[str, str] = field(default_factory=dict)
    """Multipart text fields (the last value of a repeated name)."""
    form_items: list[tuple[str, str]] = field(default_factory=list)
    """Multipart text fields in order, repeated names kept (``include[]``...)."""
    files: dict[str, UploadedFile] = field(default_factory=dict)
    auth_ok: bool = False
    voice_id: str | None = None

    @property
    def file_bytes(self) -> bytes | None:
        """The bytes of the ``file`` part (transcriptions), or None."""
        part = self.files.get("file")
        return part.data if part is not None else None

    @property
    def streaming(self) -> bool:
        """Whether the client asked for a stream (``stream: true`` or ``/stream``)."""
        if self.route == "tts":
            return self.path.endswith("/stream")
        if isinstance(self.json, dict):
            return bool(self.json.get("stream"))
        return self.form.get("stream", "").lower() == "true"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # hanging handlers must never hold up shutdown
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], cloud: FakeCloud) -> None:
        self.cloud = cloud
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() calls socket.getfqdn(), a DNS look-up: skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port

    def handle_error(self, request: Any, client_address: Any) -> None:
        # called from socketserver's except clause: the error is the one being handled
        log.debug("fakecloud: connection from %s ended: %r", client_address, sys.exc_info()[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fakecloud/1.0"
    server: _Server

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

    # ---- verbs ----------------------------------------------------------------
    def do_POST(self) -> None:
        try:
            self._post()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError) as exc:
            log.debug("fakecloud: client went away: %s", exc)
            self.close_connection = True
        except OSError as exc:  # socket shut down by stop() / refuse_connections()
            log.debug("fakecloud: connection closed: %s", exc)
            self.close_connection = True

    def do_GET(self) -> None:
        self._discard_body()
        self._not_found(urlsplit(self.path).path)

    do_PUT = do_DELETE = do_PATCH = do_GET

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

    def _post(self) -> None:
        cloud = self.server.cloud
        url = urlsplit(self.path)
        path = url.path
        try:
            body = self._read_body()
        except ValueError:
            self.close_connection = True
            self._send_json(
                400, {"error": {"message": "Bad request body", "type": "invalid_request_error"}}
            )
            return
        route, voice_id = _match_route(path)
        if route is None:
            with cloud._lock:
                cloud.unrouted.append((self.command, path))
            self._not_found(path)
            return

        headers = {name.lower(): value for name, value in self.headers.items()}
        record = Recorded(
            route=route,
            method=self.command,
            path=path,
            query=dict(parse_qsl(url.query, keep_blank_values=True)),
            headers=_redact(headers),
            received_at=time.monotonic(),
            body=body,
            voice_id=voice_id,
        )
        parse_error = _parse_body(record, headers.get("content-type", ""))
        record.auth_ok = cloud._authorized(route, headers)
        cloud._record(record)
        fault = cloud._take_fault(route)

        if fault is not None:
            if fault.latency_s > 0 and cloud._stopping.wait(fault.latency_s):
                self._drop()
                return
            if fault.hang:
                self._hang()
                return
            if fault.status is not None:
                self._send_error(route, fault.status, fault.retry_after_s)
                return
        if not record.auth_ok:
            self._send_unauthorized(route, headers)
            return
        truncate = bool(fault and fault.truncate)
        malformed = bool(fault and fault.malformed)
        if route == "chat":
            self._chat(record, parse_error, truncate=truncate, malformed=malformed)
        elif route == "transcriptions":
            self._transcription(record, parse_error, truncate=truncate, malformed=malformed)
        else:
            self._tts(record, parse_error, truncate=truncate, malformed=malformed)

    # ---- OpenAI: chat completions -------------------------------------------------
    def _chat(
        self, record: Recorded, parse_error: str | None, *, truncate: bool, malformed: bool
    ) -> None:
        cloud = self.server.cloud
        request = record.json
        if parse_error or not isinstance(request, dict):
            self._openai_error(400, "We could not parse the JSON body of your request.", None)
            return
        if not request.get("model"):
            self._openai_error(400, "you must provide a model parameter", None)
            return
        if not isinstance(request.get("messages"), list) or not request["messages"]:
            self._openai_error(
                400,
                "Missing required parameter: 'messages'.",
                "messages",
                "missing_required_parameter",
            )
            return
        model = str(request["model"])
        reply = cloud._reply_for(request)
        pieces = _pieces(reply)
        completion_id = "chatcmpl-" + secrets.token_urlsafe(18).replace("-", "x").replace("_", "y")
        created = int(time.time())
        fingerprint = "fp_fakecloud"
        usage = {
            "prompt_tokens": _count_prompt_tokens(request["messages"]),
            "completion_tokens": len(pieces),
            "total_tokens": _count_prompt_tokens(request["messages"]) + len(pieces),
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        headers = self._openai_headers()

        if not request.get("stream"):
            if malformed:
                self._send(200, MALFORMED_JSON, "application/json", headers)
                return
            completion = {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": reply,
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
                "service_tier": "default",
                "system_fingerprint": fingerprint,
            }
            self._send_json(200, completion, headers, truncate=truncate)
            return

        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": fingerprint,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ],
            }
            if include_usage:
                data["usage"] = None
            return _sse(data)

        events = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
        events += [chunk({"content": piece}, None) for piece in pieces]
        events.append(chunk({}, "stop"))
        if include_usage:
            events.append(
                _sse(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "service_tier": "default",
                        "system_fingerprint": fingerprint,
                        "choices": [],
                        "usage": usage,
                    }
                )
            )
        events.append(b"data: [DONE]\n\n")
        if malformed:
            events = [
                b'data: {"id": "chatcmpl-garbage", "choices": [<html>\n\n',
                b"data: [DONE]\n\n",
            ]
        self._begin_chunked(200, "text/event-stream; charset=utf-8", headers)
        # truncated: the role chunk and about half the content, then the connection drops
        self._stream(events, cloud.chat_chunk_interval_s, truncate, keep=max(2, len(events) // 2))

    # ---- OpenAI: transcriptions --------------------------------------------------
    def _transcription(
        self, record: Recorded, parse_error: str | None, *, truncate: bool, malformed: bool
    ) -> None:
        cloud = self.server.cloud
        if parse_error:
            self._openai_error(400, parse_error, None)
            return
        if record.file_bytes is None:
            self._openai_error(
                400, "1 validation error for Request\nbody -> file\n  field required", None
            )
            return
        if not record.form.get("model"):
            self._openai_error(
                400, "1 validation error for Request\nbody -> model\n  field required", None
            )
            return
        response_format = record.form.get("response_format", "json")
        if response_format not in ("json", "text", "srt", "verbose_json", "vtt"):
            self._openai_error(
                400,
                f"Invalid file format. Supported response formats: json, text, srt, verbose_json, vtt "
                f"(got {response_format!r}).",
                "response_format",
            )
            return
        text = cloud._transcript_for(record)
        duration = _wav_seconds(record.file_bytes)
        headers = self._openai_headers()
        if malformed:
            self._send(200, MALFORMED_JSON, "application/json", headers)
            return
        usage = {"type": "duration", "seconds": math.ceil(duration)}
        if response_format == "json":
            self._send_json(200, {"text": text, "usage": usage}, headers, truncate=truncate)
        elif response_format == "verbose_json":
            payload = {
                "task": "transcribe",
                "language": _language_name(record.form.get("language")),
                "duration": round(duration, 2),
                "text": text,
                "segments": [
                    {
                        "id": 0,
                        "seek": 0,
                        "start": 0.0,
                        "end": round(duration, 2),
                        "text": " " + text,
                        "tokens": [],
                        "temperature": 0.0,
                        "avg_logprob": -0.2,
                        "compression_ratio": 1.0,
                        "no_speech_prob": 0.01,
                    }
                ],
                "usage": usage,
            }
            self._send_json(200, payload, headers, truncate=truncate)
        elif response_format == "text":
            self._send(
                200, (text + "\n").encode(), "text/plain; charset=utf-8", headers, truncate=truncate
            )
        else:
            end = _timestamp(duration, "," if response_format == "srt" else ".")
            start = _timestamp(0.0, "," if response_format == "srt" else ".")
            if response_format == "srt":
                doc = f"1\n{start} --> {end}\n{text}\n\n"
            else:
                doc = f"WEBVTT\n\n{start} --> {end}\n{text}\n\n"
            self._send(200, doc.encode(), "text/plain; charset=utf-8", headers, truncate=truncate)

    # ---- ElevenLabs: text to speech ----------------------------------------------
    def _tts(
        self, record: Recorded, parse_error: str | None, *, truncate: bool, malformed: bool
    ) -> None:
        cloud = self.server.cloud
        request = record.json
        if parse_error or not isinstance(request, dict):
            self._send_json(
                422,
                {
                    "detail": [
                        {
                            "type": "json_invalid",
                            "loc": ["body"],
                            "msg": "JSON decode error",
                            "input": {},
                        }
                    ]
                },
            )
            return
        text = request.get("text")
        if not isinstance(text, str):
            self._send_json(
                422,
                {
                    "detail": [
                        {
                            "type": "missing",
                            "loc": ["body", "text"],
                            "msg": "Field required",
                            "input": request,
                        }
                    ]
                },
            )
            return
        output_format = record.query.get("output_format") or "mp3_44100_128"
        audio_format = _audio_format(output_format)
        if audio_format is None:
            self._send_json(
                422,
                {
                    "detail": [
                        {
                            "type": "enum",
                            "loc": ["query", "output_format"],
                            "msg": f"Input should be a supported output format, got {output_format!r}",
                            "input": output_format,
                        }
                    ]
                },
            )
            return
        kind, rate, bitrate = audio_format
        if kind == "pcm":
            audio = cloud.synthesize(text, rate)
            content_type = "audio/pcm"
            piece = max(2, rate * cloud.tts_chunk_ms // 1000 * 2)
        else:
            audio = _silent_mp3(cloud.tts_duration_s(text), bitrate)
            content_type = "audio/mpeg"
            piece = _mp3_frame_bytes(bitrate) * max(
                1, round(cloud.tts_chunk_ms / 1000 * 44100 / 1152)
            )
        request_id = secrets.token_hex(10)
        headers = {"request-id": request_id, "x-character-count": str(len(text))}
        if malformed:
            content_type, audio = "text/html; charset=utf-8", MALFORMED_AUDIO + b"\n"
            if len(audio) % 2 == 0:
                audio += b" "  # an odd length: not whole s16le samples either
        if not record.path.endswith("/stream"):
            headers["history-item-id"] = secrets.token_hex(10)
            self._send(200, audio, content_type, headers, truncate=truncate)
            return
        pieces = [audio[i : i + piece] for i in range(0, len(audio), piece)] or []
        self._begin_chunked(200, content_type, headers)
        self._stream(pieces, cloud.tts_chunk_interval_s, truncate, keep=max(1, len(pieces) // 2))

    def _stream(self, pieces: list[bytes], interval_s: float, truncate: bool, keep: int) -> None:
        """Send chunked pieces, paced; truncated: only the first `keep`, then drop the connection."""
        for data in pieces[:keep] if truncate else pieces:
            self._write_chunk(data)
            self._pace(interval_s)
        if truncate:
            self._drop()
        else:
            self._end_chunked()

    # ---- errors -----------------------------------------------------------------
    def _openai_headers(self) -> dict[str, str]:
        return {
            "x-request-id": "req_" + secrets.token_hex(16),
            "openai-version": "2020-10-01",
            "openai-processing-ms": "12",
            "openai-organization": "org-fakecloud",
        }

    def _openai_error(
        self,
        status: int,
        message: str,
        param: str | None,
        code: str | None = None,
        *,
        error_type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
        self._send_json(status, body, {**self._openai_headers(), **(headers or {})})

    def _send_unauthorized(self, route: Route, headers: dict[str, str]) -> None:
        if route == "tts":
            if headers.get("xi-api-key") is None and headers.get("authorization") is None:
                detail = {
                    "status": "needs_authorization",
                    "message": "Neither authorization header nor xi-api-key received, please provide one.",
                }
            else:
                detail = {"status": "invalid_api_key", "message": "Invalid API key"}
            self._send_json(401, {"detail": detail})
            return
        if (
            not headers.get("authorization", "").startswith("Bearer ")
            or not headers["authorization"][7:].strip()
        ):
            self._openai_error(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank "
                "username) if you're accessing the API from your browser and are prompted for a username and "
                "password. You can obtain an API key from https://platform.openai.com/account/api-keys.",
                None,
            )
            return
        # The real message quotes a masked key; this fake never echoes any part of it.
        self._openai_error(
            401,
            "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
            None,
            "invalid_api_key",
        )

    def _send_error(self, route: Route, status: int, retry_after_s: float | None) -> None:
        extra: dict[str, str] = {}
        if retry_after_s is not None:
            extra["retry-after"] = _retry_after(retry_after_s)
        if route == "tts":
            if status == 401:
                self._send_json(
                    401,
                    {"detail": {"status": "invalid_api_key", "message": "Invalid API key"}},
                    extra,
                )
                return
            status_name, message = _ELEVENLABS_ERRORS.get(
                status, ("error", f"The request failed with status {status}.")
            )
            self._send_json(status, {"detail": {"status": status_name, "message": message}}, extra)
            return
        if status == 401:
            self._openai_error(
                401,
                "Incorrect API key provided. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                None,
                "invalid_api_key",
                headers=extra,
            )
            return
        if status == 429:
            model = "whisper-1" if route == "transcriptions" else "gpt-4o-mini"
            wait = f"{retry_after_s:g}s" if retry_after_s is not None else "20s"
            extra.update(
                {
                    "x-ratelimit-limit-requests": "500",
                    "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": wait,
                }
            )
            self._openai_error(
                429,
                f"Rate limit reached for {model} in organization org-fakecloud on requests per min (RPM): "
                f"Limit 500, Used 500, Requested 1. Please try again in {wait}. Visit "
                "https://platform.openai.com/account/rate-limits to learn more.",
                None,
                "rate_limit_exceeded",
                error_type="requests",
                headers=extra,
            )
            return
        error_type, code, message = _OPENAI_ERRORS.get(
            status,
            (
                "server_error" if status >= 500 else "invalid_request_error",
                None,
                f"The request failed with status {status}.",
            ),
        )
        self._openai_error(status, message, None, code, error_type=error_type, headers=extra)

    def _not_found(self, path: str) -> None:
        if path.startswith(("/v1/audio", "/v1/chat", "/v1/models")):
            self._openai_error(404, f"Invalid URL ({self.command} {path})", None)
        else:
            self._send_json(404, {"detail": "Not Found"})

    # ---- low-level writing --------------------------------------------------------
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


_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Bad request."),
    403: (
        "request_forbidden",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model does not exist or you do not have access to it.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
    504: ("server_error", None, "Gateway timeout."),
}

_ELEVENLABS_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request", "The request is invalid."),
    403: ("forbidden", "You do not have access to this resource."),
    404: ("voice_not_found", "A voice with the voice_id was not found."),
    429: (
        "too_many_concurrent_requests",
        (
            "Too many concurrent requests. Your current subscription is associated with a maximum "
            "of 2 concurrent requests."
        ),
    ),
    500: ("internal_server_error", "An internal server error occurred. Please try again."),
    502: ("bad_gateway", "Bad gateway."),
    503: ("service_unavailable", "The service is temporarily unavailable. Please try again."),
    504: ("gateway_timeout", "Gateway timeout."),
}


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
        self._server: _Server | None = None
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
        server = _Server((self._host, self._port), self)
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


# ---- helpers ------------------------------------------------------------------------------------
_TTS_PATH = re.compile(r"^/v1/text-to-speech/([^/]+)(/stream)?/?$")


def _match_route(path: str) -> tuple[Route | None, str | None]:
    if path.rstrip("/") == "/v1/audio/transcriptions":
        return "transcriptions", None
    if path.rstrip("/") == "/v1/chat/completions":
        return "chat", None
    match = _TTS_PATH.match(path)
    if match:
        return "tts", match.group(1)
    return None, None


def _redact(headers: dict[str, str]) -> dict[str, str]:
    redacted = dict(headers)
    if "authorization" in redacted:
        scheme = redacted["authorization"].split(" ", 1)[0]
        redacted["authorization"] = (
            f"{scheme} {_REDACTED}" if " " in redacted["authorization"] else _REDACTED
        )
    if "xi-api-key" in redacted:
        redacted["xi-api-key"] = _REDACTED
    return redacted


def _parse_body(record: Recorded, content_type: str) -> str | None:
    """Fill record.json or record.form/files; return a parse problem, or None."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        try:
            items, files = parse_multipart(record.body, content_type)
        except ValueError as exc:
            return f"Could not parse multipart form: {exc}"
        record.form_items = items
        record.form = dict(items)
        record.files = files
        return None
    if not record.body:
        return "The request has no body."
    try:
        record.json = json.loads(record.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"We could not parse the JSON body of your request: {exc}"
    return None


def parse_multipart(
    body: bytes, content_type: str
) -> tuple[list[tuple[str, str]], dict[str, UploadedFile]]:
    """Split a multipart/form-data body (RFC 7578) exactly, bytes untouched.

    Returns the text fields in order and the file parts by field name.
    """
    header = Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ValueError("no boundary in Content-Type")
    delimiter = b"--" + boundary.encode("latin-1")
    # A body starts with the first delimiter; every later one follows a CRLF.
    if not body.startswith(delimiter):
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise ValueError("no opening boundary")
        body = body[start + 2 :]
    items: list[tuple[str, str]] = []
    files: dict[str, UploadedFile] = {}
    chunks = body.split(b"\r\n" + delimiter)
    # chunks[0] is "--boundary<CRLF>headers..."; the others start after a delimiter
    chunks[0] = chunks[0][len(delimiter) :]
    closed = False
    for chunk in chunks:
        if chunk.startswith(b"--"):
            closed = True
            break
        if not chunk.startswith(b"\r\n"):
            # transport padding after the delimiter is allowed, then CRLF
            chunk = chunk.lstrip(b" \t")
            if not chunk.startswith(b"\r\n"):
                raise ValueError("malformed part delimiter")
        chunk = chunk[2:]
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("part without a blank line after its headers")
        part = Message()
        for line in head.decode("utf-8", "replace").split("\r\n"):
            if ":" in line:
                name, value = line.split(":", 1)
                part[name.strip()] = value.strip()
        name = _disposition_param(part, "name")
        if name is None:
            raise ValueError("part without a name")
        filename = _disposition_param(part, "filename")
        if filename is not None:
            files[name] = UploadedFile(filename, part.get("Content-Type"), content)
        else:
            items.append((name, content.decode("utf-8", "replace")))
    if not closed:
        raise ValueError("no closing boundary")
    return items, files


def _disposition_param(part: Message, name: str) -> str | None:
    value = part.get_param(name, header="content-disposition")
    if value is None:
        return None
    return collapse_rfc2231_value(value)  # type: ignore[arg-type]


def _pieces(text: str) -> list[str]:
    """Split text the way a tokenizer streams it: words with their leading space."""
    return re.findall(r"\s*\S+", text) or ([text] if text else [])


def _count_prompt_tokens(messages: list[Any]) -> int:
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += max(1, len(content) // 4)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    total += max(1, len(str(part.get("text", ""))) // 4)
                else:
                    total += 85  # a low-detail image
        total += 4
    return total


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _wav_seconds(data: bytes) -> float:
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            return wav.getnframes() / wav.getframerate()
    except (wave.Error, EOFError, ZeroDivisionError):
        return 0.0


def _language_name(code: str | None) -> str:
    return {"en": "english", "de": "german", "fr": "french", "es": "spanish"}.get(
        code or "en", code or "english"
    )


def _timestamp(seconds: float, separator: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{separator}{ms % 1000:03d}"


def _retry_after(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _audio_format(output_format: str) -> tuple[str, int, int] | None:
    match = re.fullmatch(r"pcm_(\d+)", output_format)
    if match and int(match.group(1)) in PCM_RATES:
        return "pcm", int(match.group(1)), 0
    match = re.fullmatch(r"mp3_44100_(\d+)", output_format)
    if match and int(match.group(1)) in MP3_BITRATES:
        return "mp3", 44100, int(match.group(1))
    return None


_MP3_BITRATE_INDEX = {
    32: 1,
    40: 2,
    48: 3,
    56: 4,
    64: 5,
    80: 6,
    96: 7,
    112: 8,
    128: 9,
    160: 10,
    192: 11,
}


def _mp3_frame_bytes(bitrate_kbps: int) -> int:
    return 144 * bitrate_kbps * 1000 // 44100


def _silent_mp3(seconds: float, bitrate_kbps: int) -> bytes:
    """Silent MPEG-1 layer III frames at 44.1 kHz mono (all-zero side info decodes to silence)."""
    header = bytes([0xFF, 0xFB, (_MP3_BITRATE_INDEX[bitrate_kbps] << 4) | 0x00, 0xC4])
    frame = header + bytes(_mp3_frame_bytes(bitrate_kbps) - len(header))
    frames = max(1, math.ceil(seconds * 44100 / 1152)) if seconds > 0 else 0
    return frame * frames


# ---- standalone ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m heimdall_edge.testing.fakecloud",
        description="Serve fake OpenAI (Whisper, chat) and ElevenLabs (TTS) APIs on 127.0.0.1.",
    )
    parser.add_argument(
        "--port", type=int, default=8787, help="port to listen on (0: any free port)"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="delay before every answer, in ms"
    )
    parser.add_argument(
        "--transcript", default="what time is it", help="what every transcription returns"
    )
    parser.add_argument(
        "--reply",
        default="It is a fine day. Is there anything else?",
        help="what every chat answer says",
    )
    parser.add_argument(
        "--chars-per-second", type=float, default=15.0, help="speaking rate of the fake voice"
    )
    parser.add_argument("--openai-key", default="sk-test", help="the key the fake OpenAI accepts")
    parser.add_argument(
        "--elevenlabs-key", default="el-test", help="the key the fake ElevenLabs accepts"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if args.latency_ms < 0:
        parser.error(f"--latency-ms must be >= 0, got {args.latency_ms}")
    if args.chars_per_second <= 0:
        parser.error(f"--chars-per-second must be > 0, got {args.chars_per_second}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")

    cloud = FakeCloud(
        openai_key=args.openai_key,
        elevenlabs_key=args.elevenlabs_key,
        transcript=args.transcript,
        reply=args.reply,
        chars_per_second=args.chars_per_second,
        port=args.port,
    )
    try:
        cloud.start()
    except OSError as exc:
        parser.exit(1, f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}\n")
    if args.latency_ms:
        for route in ROUTES:
            cloud.fault(route, Fault(latency_s=args.latency_ms / 1000))
    # These are the fake's own keys (not secrets): the lines are for the user to paste.
    print("# fake cloud is running; in another shell:", flush=True)
    for name, value in cloud.env().items():
        print(f"export {name}={value}", flush=True)
    print("# Ctrl-C to stop", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        cloud.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
