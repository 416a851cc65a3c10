"""The fake's answers in each service's own shapes: chat, transcriptions, text to speech."""

from __future__ import annotations

import io
import json
import math
import re
import secrets
import time
import wave
from typing import Any

from heimdall_edge.testing.fakecloud.plumbing import HttpPlumbing
from heimdall_edge.testing.fakecloud.wire import Recorded

PCM_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
MP3_BITRATES = (32, 64, 96, 128, 192)  # kbit/s, MPEG-1 layer III at 44.1 kHz
MALFORMED_JSON = (
    b'{"id": "chatcmpl-garbage", "choices": [{"index": 0, "message": <html>502 Bad Gateway'
)
MALFORMED_AUDIO = b"<html><head><title>Captive portal</title></head><body>Sign in</body></html>"


class Answers(HttpPlumbing):
    """OpenAI's and ElevenLabs' answers to a request that passed the faults and the keys."""

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
