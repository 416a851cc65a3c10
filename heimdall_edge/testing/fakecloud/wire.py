"""What travels to the fake cloud: its routes, the faults it plays, the requests it records."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import Any, Literal, get_args

Route = Literal["transcriptions", "chat", "tts"]
ROUTES: tuple[Route, ...] = get_args(Route)
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


_TTS_PATH = re.compile(r"^/v1/text-to-speech/([^/]+)(/stream)?/?$")


def match_route(path: str) -> tuple[Route | None, str | None]:
    if path.rstrip("/") == "/v1/audio/transcriptions":
        return "transcriptions", None
    if path.rstrip("/") == "/v1/chat/completions":
        return "chat", None
    match = _TTS_PATH.match(path)
    if match:
        return "tts", match.group(1)
    return None, None


def redact(headers: dict[str, str]) -> dict[str, str]:
    redacted = dict(headers)
    if "authorization" in redacted:
        scheme = redacted["authorization"].split(" ", 1)[0]
        redacted["authorization"] = (
            f"{scheme} {_REDACTED}" if " " in redacted["authorization"] else _REDACTED
        )
    if "xi-api-key" in redacted:
        redacted["xi-api-key"] = _REDACTED
    return redacted


def parse_body(record: Recorded, content_type: str) -> str | None:
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
