"""One request through the fake: record it, play its route's fault, check its key, answer."""

from __future__ import annotations

import logging
import time
from urllib.parse import parse_qsl, urlsplit

from heimdall_edge.testing.fakecloud.answers import Answers
from heimdall_edge.testing.fakecloud.wire import Recorded, Route, match_route, parse_body, redact

log = logging.getLogger(__name__)


class Handler(Answers):
    """Routes each POST to its answer, after the route's fault and the key check."""

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
        route, voice_id = match_route(path)
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
            headers=redact(headers),
            received_at=time.monotonic(),
            body=body,
            voice_id=voice_id,
        )
        parse_error = parse_body(record, headers.get("content-type", ""))
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


def _retry_after(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"
