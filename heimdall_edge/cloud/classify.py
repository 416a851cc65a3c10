"""From whatever an SDK, httpx or the socket raised to a CloudError with a safe message.

Log lines carry the service, the error kind, the HTTP status and a short message we
write ourselves: never request headers, never an SDK exception's text (it may echo a
key or a response body). Only libraries already imported are looked at, so
classifying costs no imports of heavy SDKs.
"""

from __future__ import annotations

import email.utils
import errno
import math
import re
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from heimdall_edge.cloud.errors import RETRYABLE, CloudError, ErrorKind

_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN})
_SAFE_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _loaded(module: str) -> Any:
    """A module if it is already imported: an exception from a library we never imported
    cannot be one of its classes, so classify() costs no imports of heavy SDKs."""
    return sys.modules.get(module)


def parse_retry_after(
    headers: Mapping[str, str] | None, *, now: Callable[[], float] = time.time
) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI), `Retry-After` seconds or HTTP-date."""
    if not headers:
        return None
    lower = {str(key).lower(): str(value) for key, value in headers.items()}
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = lower.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            continue
        if not math.isnan(seconds):
            return max(0.0, seconds)
    value = lower.get("retry-after")
    if value is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        return None
    return max(0.0, when.timestamp() - now())


def _kind_for_status(status: int) -> ErrorKind:
    if status in (401, 403):
        return ErrorKind.AUTH
    if status == 429:
        return ErrorKind.RATE_LIMIT
    if status == 408:  # the server gave up waiting for us: as retryable as our own timeout
        return ErrorKind.TIMEOUT
    if status >= 500:
        return ErrorKind.SERVER
    if status >= 400:
        return ErrorKind.CLIENT
    return ErrorKind.MALFORMED  # an "error" with a 2xx/3xx status: the answer did not parse


def _error_code(body: object) -> str | None:
    """OpenAI's machine-readable error code (e.g. insufficient_quota), if it looks like one."""
    if isinstance(body, Mapping):
        inner = body.get("error")
        code = inner.get("code") if isinstance(inner, Mapping) else body.get("code")
        if isinstance(code, str) and _SAFE_CODE.fullmatch(code):
            return code
    return None


def _from_status(
    service: str, exc: BaseException, status: int, headers: Mapping[str, str] | None, body: object
) -> CloudError:
    kind = _kind_for_status(status)
    code = getattr(exc, "code", None) or _error_code(body)
    message = type(exc).__name__
    if isinstance(code, str) and _SAFE_CODE.fullmatch(code):
        message += f" [{code}]"
        if code == "insufficient_quota":
            # A 429 that no wait will fix: the account is out of credit. Treat it like a
            # bad key: no retries, and the breaker stays open for the long auth reset.
            kind = ErrorKind.AUTH
    retry_after = parse_retry_after(headers) if kind in RETRYABLE else None
    return CloudError(service, kind, message, status=status, retry_after_s=retry_after)


def _transport_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(timeouts, connection failures) from httpx (ElevenLabs) and httpx2 (OpenAI) if loaded."""
    # asyncio.TimeoutError is the builtin since 3.11; refused and reset are ConnectionErrors.
    timeouts: list[type[BaseException]] = [TimeoutError]
    connection: list[type[BaseException]] = [ConnectionError, socket.gaierror]
    for name in ("httpx", "httpx2"):
        module = _loaded(name)
        if module is not None:
            timeouts.append(module.TimeoutException)
            connection.append(module.TransportError)
    openai = _loaded("openai")
    if openai is not None:
        timeouts.append(openai.APITimeoutError)  # subclass of APIConnectionError: test it first
        connection.append(openai.APIConnectionError)
    return tuple(timeouts), tuple(connection)


def classify(exc: BaseException, service: str, *, mid_stream: bool = False) -> CloudError:
    """Map an SDK, httpx or builtin exception to a CloudError with a safe message.

    `mid_stream=True` says the response had started arriving and part of it was
    already used (played, shown): a transport error then means a truncated stream
    and is MALFORMED, which is not retried, since a retry would repeat what was
    already used. Before any byte arrived, the same error (httpx's
    RemoteProtocolError "server disconnected", ReadError "connection reset") is
    the network failing, CONNECTION, and retrying it is safe.
    """
    if isinstance(exc, CloudError):
        return exc
    name = type(exc).__name__

    openai = _loaded("openai")
    if openai is not None and isinstance(exc, openai.APIResponseValidationError):
        return CloudError(service, ErrorKind.MALFORMED, name, status=exc.status_code)
    if openai is not None and isinstance(exc, openai.APIStatusError):
        return _from_status(service, exc, exc.status_code, exc.response.headers, exc.body)
    api_error = _loaded("elevenlabs.core.api_error")
    if api_error is not None and isinstance(exc, api_error.ApiError):
        if exc.status_code is None:
            return CloudError(service, ErrorKind.MALFORMED, name)
        return _from_status(service, exc, exc.status_code, exc.headers, exc.body)
    for module in (_loaded("httpx"), _loaded("httpx2")):
        if module is not None and isinstance(exc, module.HTTPStatusError):
            response = exc.response
            return _from_status(service, exc, response.status_code, response.headers, None)
        if module is not None and isinstance(
            exc, (module.UnsupportedProtocol, module.LocalProtocolError)
        ):
            return CloudError(service, ErrorKind.CLIENT, name)  # a bad URL or request: ours

    timeouts, connection = _transport_errors()
    unreachable = isinstance(exc, OSError) and exc.errno in _UNREACHABLE
    if isinstance(exc, timeouts + connection) or unreachable:
        if mid_stream:
            return CloudError(service, ErrorKind.MALFORMED, f"stream cut short ({name})")
        kind = ErrorKind.TIMEOUT if isinstance(exc, timeouts) else ErrorKind.CONNECTION
        return CloudError(service, kind, name)

    malformed: tuple[type[BaseException], ...] = (ValueError, KeyError, IndexError)
    # ValueError covers json.JSONDecodeError and pydantic's ValidationError.
    parse_error = _loaded("elevenlabs.core.parse_error")
    if parse_error is not None:
        malformed += (parse_error.ParsingError,)
    if openai is not None:
        malformed += (openai.LengthFinishReasonError, openai.ContentFilterFinishReasonError)
    for module in (_loaded("httpx"), _loaded("httpx2")):
        if module is not None:
            malformed += (module.DecodingError,)
    if isinstance(exc, malformed):
        return CloudError(service, ErrorKind.MALFORMED, name)
    # Anything else is a bug on our side; it must not look like an outage.
    return CloudError(service, ErrorKind.CLIENT, f"unexpected {name}")
