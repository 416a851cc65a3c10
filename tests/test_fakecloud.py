"""The fake cloud speaks the wire protocols the official clients expect.

Every test drives the real `openai` and `elevenlabs` SDKs (SDK retries off, as the
appliance runs them) against `FakeCloud` over loopback HTTP, and pins down which
exception each SDK raises for each fault: the error classifier relies on these.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import httpx2
import numpy as np
import openai
import pytest
from elevenlabs.client import AsyncElevenLabs
from elevenlabs.core.api_error import ApiError

from heimdall_edge.testing.fakecloud.cloud import FakeCloud
from heimdall_edge.testing.fakecloud.wire import Fault, parse_multipart

REPLY = "It is a fine day. Is there anything else?"
NO_RETRY = {"max_retries": 0}
MESSAGES = [{"role": "user", "content": "what time is it"}]


@pytest.fixture
def cloud():
    with FakeCloud() as fake:
        yield fake


def openai_client(cloud: FakeCloud, *, api_key: str = "sk-test", **options) -> openai.AsyncOpenAI:
    options.setdefault("max_retries", 0)
    return openai.AsyncOpenAI(api_key=api_key, base_url=cloud.openai_base_url, **options)


@asynccontextmanager
async def elevenlabs_client(
    cloud: FakeCloud, *, api_key: str = "el-test", timeout: float = 10.0
) -> AsyncIterator[AsyncElevenLabs]:
    """The SDK client, on an httpx client we can close (AsyncElevenLabs has no aclose())."""
    async with httpx.AsyncClient(timeout=timeout) as http:
        yield AsyncElevenLabs(
            api_key=api_key, base_url=cloud.elevenlabs_base_url, timeout=timeout, httpx_client=http
        )


def wav_upload(seconds: float = 0.5, rate: int = 16000) -> bytes:
    """A WAV whose samples contain CRLFs and dashes, so a sloppy multipart parser would show."""
    rng = np.random.default_rng(7)
    samples = rng.integers(-32768, 32767, int(seconds * rate), dtype=np.int16).tobytes()
    samples = samples[:200] + b"\r\n--\r\n\r\n--" + samples[212:]
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples)
    return buffer.getvalue()


async def transcribe(client: openai.AsyncOpenAI, data: bytes, **options):
    return await client.audio.transcriptions.create(
        model="whisper-1", file=("audio.wav", data, "audio/wav"), language="en", **options
    )


async def chat_text(client: openai.AsyncOpenAI) -> str:
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    return completion.choices[0].message.content


async def stream_text(client: openai.AsyncOpenAI, pieces: list[str] | None = None) -> str:
    pieces = [] if pieces is None else pieces
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces)


async def tts_bytes(
    client: AsyncElevenLabs,
    text: str,
    *,
    stream: bool = True,
    output_format: str = "pcm_16000",
    received: list[bytes] | None = None,
    request_options: dict | None = NO_RETRY,
) -> bytes:
    received = [] if received is None else received
    call = client.text_to_speech.stream if stream else client.text_to_speech.convert
    async for data in call(
        voice_id="voice-1",
        text=text,
        model_id="eleven_flash_v2_5",
        output_format=output_format,
        request_options=request_options,
    ):
        received.append(data)
    return b"".join(received)


def chain(exc: BaseException | None) -> list[type]:
    """The exception types along __cause__, else __context__."""
    found = []
    while exc is not None:
        found.append(type(exc))
        exc = exc.__cause__ or exc.__context__
    return found


# ---- OpenAI: transcriptions ----------------------------------------------------------------------
async def test_transcription_records_the_exact_upload_and_fields(cloud: FakeCloud) -> None:
    upload = wav_upload()

    async def scenario():
        async with openai_client(cloud) as client:
            return await transcribe(client, upload)

    result = await asyncio.wait_for(scenario(), timeout=10)

    assert result.text == "what time is it"
    assert cloud.count("transcriptions") == 1
    record = cloud.last("transcriptions")
    assert record.method == "POST" and record.path == "/v1/audio/transcriptions"
    assert record.file_bytes == upload
    assert record.files["file"].filename == "audio.wav"
    assert record.files["file"].content_type == "audio/wav"
    assert record.form["model"] == "whisper-1"
    assert record.form["language"] == "en"
    assert record.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert record.auth_ok
    assert record.headers["authorization"] == "Bearer <redacted>"
    assert not any("sk-test" in value for value in record.headers.values())


async def test_transcription_text_format_and_settable_transcript(cloud: FakeCloud) -> None:
    cloud.transcript = "turn on the light"

    async def scenario():
        async with openai_client(cloud) as client:
            as_text = await transcribe(client, wav_upload(), response_format="text")
            verbose = await transcribe(client, wav_upload(1.0), response_format="verbose_json")
            return as_text, verbose

    as_text, verbose = await asyncio.wait_for(scenario(), timeout=10)

    assert as_text == "turn on the light\n"  # plain text, newline-terminated, as the real API
    assert verbose.text == "turn on the light"
    assert verbose.duration == pytest.approx(1.0)
    assert [r.form.get("response_format") for r in cloud.requests["transcriptions"]] == [
        "text",
        "verbose_json",
    ]


def test_multipart_parser_keeps_bytes_exact() -> None:
    payload = b"\x00\r\n--not-the-boundary\r\n\r\n\xff" * 3
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="include[]"\r\n\r\nlogprobs\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a b.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n" + payload + b"\r\n--XyZ--\r\n"
    )
    items, files = parse_multipart(body, 'multipart/form-data; boundary="XyZ"')
    assert items == [("model", "whisper-1"), ("include[]", "logprobs")]
    assert files["file"].data == payload
    assert files["file"].filename == "a b.wav"
    with pytest.raises(ValueError):
        parse_multipart(body[:-9], "multipart/form-data; boundary=XyZ")


# ---- OpenAI: chat completions --------------------------------------------------------------------
async def test_chat_plain_completion(cloud: FakeCloud) -> None:
    async def scenario():
        async with openai_client(cloud) as client:
            return await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=60
            )

    completion = await asyncio.wait_for(scenario(), timeout=10)

    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    assert completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert (
        completion.usage.total_tokens
        == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    request = cloud.last("chat").json
    assert request["messages"] == MESSAGES and request["max_tokens"] == 60
    assert not cloud.last("chat").streaming


async def test_chat_stream_deltas_join_to_the_reply(cloud: FakeCloud) -> None:
    cloud.reply = "Half past nine. Anything else?"

    async def scenario():
        async with openai_client(cloud) as client:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
            return [chunk async for chunk in stream]

    chunks = await asyncio.wait_for(scenario(), timeout=10)

    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Half past nine. Anything else?"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 1  # really in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert cloud.count("chat") == 1 and cloud.last("chat").streaming


async def test_chat_records_image_content_parts(cloud: FakeCloud) -> None:
    image = (
        "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff\xe0 not really a jpeg").decode()
    )
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is in front of me?"},
                {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
            ],
        },
    ]

    async def scenario():
        async with openai_client(cloud) as client:
            return await client.chat.completions.create(model="gpt-4o-mini", messages=messages)

    completion = await asyncio.wait_for(scenario(), timeout=10)

    assert completion.choices[0].message.content == REPLY
    recorded = cloud.last("chat").json["messages"]
    assert recorded == messages
    assert recorded[1]["content"][1]["image_url"]["url"] == image


# ---- ElevenLabs: text to speech ------------------------------------------------------------------
async def test_tts_stream_returns_pcm_of_the_expected_duration(cloud: FakeCloud) -> None:
    text = "It is half past nine."
    received: list[bytes] = []

    async def scenario():
        async with elevenlabs_client(cloud) as client:
            return await tts_bytes(client, text, received=received)

    pcm = await asyncio.wait_for(scenario(), timeout=10)

    seconds = len(text) / 15.0
    assert len(pcm) == cloud.tts_samples(text, 16000) * 2 == round(seconds * 16000) * 2
    assert len(received) > 1  # arrived in pieces
    samples = np.frombuffer(pcm, dtype="<i2")
    assert 0.05 * 32767 < np.abs(samples).max() < 0.3 * 32767  # a soft, audible tone
    record = cloud.last("tts")
    assert record.path == "/v1/text-to-speech/voice-1/stream" and record.voice_id == "voice-1"
    assert record.query == {"output_format": "pcm_16000"}
    assert record.json == {"text": text, "model_id": "eleven_flash_v2_5"}
    assert record.auth_ok and record.headers["xi-api-key"] == "<redacted>"
    assert cloud.count("tts") == 1


async def test_tts_stream_is_chunked_on_the_wire(cloud: FakeCloud) -> None:
    """Raw HTTP: Transfer-Encoding chunked, audio/pcm, ~100 ms per chunk, the real headers."""
    text = "Hello there."

    async def scenario():
        async with (
            httpx.AsyncClient(base_url=cloud.base_url) as http,
            http.stream(
                "POST",
                "/v1/text-to-speech/voice-1/stream",
                params={"output_format": "pcm_24000"},
                headers={"xi-api-key": "el-test"},
                json={"text": text, "model_id": "eleven_flash_v2_5"},
            ) as response,
        ):
            pieces = [piece async for piece in response.aiter_raw()]
            return response, pieces

    response, pieces = await asyncio.wait_for(scenario(), timeout=10)

    assert response.status_code == 200
    assert response.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.headers
    assert response.headers["content-type"] == "audio/pcm"
    assert response.headers["x-character-count"] == str(len(text))
    assert response.headers["request-id"]
    assert sum(map(len, pieces)) == cloud.tts_samples(text, 24000) * 2
    assert max(map(len, pieces)) <= 2400 * 2  # 100 ms at 24 kHz


async def test_tts_convert_pcm_and_mp3(cloud: FakeCloud) -> None:
    text = "what time is it"

    async def scenario():
        async with elevenlabs_client(cloud) as client:
            pcm = await tts_bytes(client, text, stream=False, output_format="pcm_24000")
            mp3 = await tts_bytes(client, text, stream=False, output_format="mp3_44100_128")
            return pcm, mp3

    pcm, mp3 = await asyncio.wait_for(scenario(), timeout=10)

    assert len(pcm) == round(len(text) / 15.0 * 24000) * 2
    assert mp3[:2] == b"\xff\xfb"  # MPEG-1 layer III frames
    assert [r.path for r in cloud.requests["tts"]] == ["/v1/text-to-speech/voice-1"] * 2


async def test_tts_duration_is_capped_and_follows_chars_per_second() -> None:
    with FakeCloud(chars_per_second=30.0) as cloud:
        cloud.max_tts_s = 2.0

        async def scenario():
            async with elevenlabs_client(cloud) as client:
                return await tts_bytes(client, "x" * 30), await tts_bytes(client, "long " * 100)

        short, capped = await asyncio.wait_for(scenario(), timeout=10)

    assert len(short) == 16000 * 2  # 30 characters at 30 characters per second
    assert len(capped) == 2 * 16000 * 2


# ---- faults: authentication ------------------------------------------------------------------------
async def test_openai_wrong_key_is_authentication_error(cloud: FakeCloud) -> None:
    async def scenario():
        async with openai_client(cloud, api_key="sk-wrong") as client:
            with pytest.raises(openai.AuthenticationError) as stt:
                await transcribe(client, wav_upload())
            with pytest.raises(openai.AuthenticationError) as chat:
                await stream_text(client)
            return stt.value, chat.value

    stt, chat = await asyncio.wait_for(scenario(), timeout=10)

    for error in (stt, chat):
        assert error.status_code == 401
        assert error.code == "invalid_api_key" and error.type == "invalid_request_error"
        assert error.body["param"] is None
        assert "sk-wrong" not in str(error.body)
    assert cloud.count("transcriptions") == cloud.count("chat") == 1
    assert not cloud.last("chat").auth_ok


async def test_openai_missing_key_body_shape(cloud: FakeCloud) -> None:
    async def scenario():
        async with httpx.AsyncClient(base_url=cloud.openai_base_url) as http:
            return await http.post("/chat/completions", json={"model": "m", "messages": MESSAGES})

    response = await asyncio.wait_for(scenario(), timeout=10)

    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"].startswith(
        "You didn't provide an API key"
    )


async def test_elevenlabs_wrong_key_is_api_error_401(cloud: FakeCloud) -> None:
    async def scenario():
        async with elevenlabs_client(cloud, api_key="el-wrong") as client:
            with pytest.raises(ApiError) as excinfo:
                await tts_bytes(client, "hello")
        return excinfo.value

    error = await asyncio.wait_for(scenario(), timeout=10)

    assert type(error) is ApiError and error.status_code == 401
    assert error.body == {"detail": {"status": "invalid_api_key", "message": "Invalid API key"}}
    assert cloud.count("tts") == 1


async def test_auth_fault_on_a_right_key(cloud: FakeCloud) -> None:
    cloud.fault("chat", Fault(status=401))
    cloud.fault("tts", Fault(status=401))

    async def scenario():
        async with openai_client(cloud) as client:
            with pytest.raises(openai.AuthenticationError):
                await chat_text(client)
        async with elevenlabs_client(cloud) as client:
            with pytest.raises(ApiError) as excinfo:
                await tts_bytes(client, "hello")
        return excinfo.value

    error = await asyncio.wait_for(scenario(), timeout=10)
    assert error.status_code == 401 and error.body["detail"]["status"] == "invalid_api_key"


# ---- faults: rate limits and server errors ---------------------------------------------------------
@pytest.mark.parametrize("call", ["transcription", "chat", "chat-stream"])
async def test_openai_429_is_rate_limit_error_with_retry_after(cloud: FakeCloud, call: str) -> None:
    route = "transcriptions" if call == "transcription" else "chat"
    cloud.fault(route, Fault(status=429, retry_after_s=2))

    async def scenario():
        async with openai_client(cloud) as client:
            with pytest.raises(openai.RateLimitError) as excinfo:
                if call == "transcription":
                    await transcribe(client, wav_upload())
                elif call == "chat":
                    await chat_text(client)
                else:
                    await stream_text(client)
            return excinfo.value

    error = await asyncio.wait_for(scenario(), timeout=10)

    assert error.status_code == 429
    assert error.response.headers["retry-after"] == "2"
    assert error.code == "rate_limit_exceeded"
    assert error.request_id and error.request_id.startswith("req_")
    assert cloud.count(route) == 1


async def test_elevenlabs_429_keeps_retry_after(cloud: FakeCloud) -> None:
    cloud.fault("tts", Fault(status=429, retry_after_s=0.5))

    async def scenario():
        async with elevenlabs_client(cloud) as client:
            with pytest.raises(ApiError) as excinfo:
                await tts_bytes(client, "hello")
        return excinfo.value

    error = await asyncio.wait_for(scenario(), timeout=10)

    assert error.status_code == 429
    assert error.headers["retry-after"] == "0.5"
    assert error.body["detail"]["status"] == "too_many_concurrent_requests"
    assert cloud.count("tts") == 1


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors(cloud: FakeCloud, status: int) -> None:
    for route in ("transcriptions", "chat", "tts"):
        cloud.fault(route, Fault(status=status))

    async def scenario():
        errors = []
        async with openai_client(cloud) as client:
            for call in (transcribe(client, wav_upload()), chat_text(client), stream_text(client)):
                with pytest.raises(openai.InternalServerError) as excinfo:
                    await call
                errors.append(excinfo.value)
        async with elevenlabs_client(cloud) as client:
            for stream in (True, False):
                with pytest.raises(ApiError) as excinfo:
                    await tts_bytes(client, "hello", stream=stream)
                errors.append(excinfo.value)
        return errors

    errors = await asyncio.wait_for(scenario(), timeout=10)

    assert [e.status_code for e in errors] == [status] * 5
    assert errors[0].type == "server_error"
    assert set(errors[-1].body["detail"]) == {"status", "message"}
    assert (cloud.count("transcriptions"), cloud.count("chat"), cloud.count("tts")) == (1, 2, 2)


async def test_elevenlabs_tts_never_retries_even_with_default_options(cloud: FakeCloud) -> None:
    """TTS convert and stream go through the SDK's stream(), which has no retry loop."""
    cloud.fault("tts", Fault(status=503, retry_after_s=0))

    async def scenario():
        async with elevenlabs_client(cloud) as client:
            for stream in (True, False):
                with pytest.raises(ApiError):
                    await tts_bytes(client, "hello", stream=stream, request_options=None)

    await asyncio.wait_for(scenario(), timeout=10)
    assert cloud.count("tts") == 2


async def test_openai_default_retries_are_visible_at_the_server(cloud: FakeCloud) -> None:
    """Why the appliance sets max_retries=0: the SDK's default sends 3 requests per call."""
    cloud.fault("chat", Fault(status=503, retry_after_s=0.01))

    async def scenario():
        async with openai.AsyncOpenAI(api_key="sk-test", base_url=cloud.openai_base_url) as client:
            with pytest.raises(openai.InternalServerError):
                await chat_text(client)

    await asyncio.wait_for(scenario(), timeout=10)
    assert cloud.count("chat") == 3


async def test_fault_times_and_latency(cloud: FakeCloud) -> None:
    cloud.fault("chat", Fault(status=500, times=1))

    async def scenario():
        async with openai_client(cloud) as client:
            with pytest.raises(openai.InternalServerError):
                await chat_text(client)
            assert await chat_text(client) == REPLY
            cloud.fault("chat", Fault(latency_s=0.2))
            started = time.monotonic()
            assert await chat_text(client) == REPLY
            slow = time.monotonic() - started
            cloud.fault("chat", None)
            started = time.monotonic()
            assert await chat_text(client) == REPLY
            return slow, time.monotonic() - started

    slow, fast = await asyncio.wait_for(scenario(), timeout=10)
    assert slow >= 0.2 and fast < 0.2
    assert cloud.count("chat") == 4


# ---- faults: hang, refuse -----------------------------------------------------------------------------
async def test_hang_fires_the_client_timeouts(cloud: FakeCloud) -> None:
    for route in ("transcriptions", "chat", "tts"):
        cloud.fault(route, Fault(hang=True))

    async def scenario():
        errors = []
        async with openai_client(cloud, timeout=0.5) as client:
            for call in (transcribe(client, wav_upload()), chat_text(client), stream_text(client)):
                with pytest.raises(openai.APITimeoutError) as excinfo:
                    await call
                errors.append(excinfo.value)
        async with elevenlabs_client(cloud, timeout=0.5) as client:
            for stream in (True, False):
                with pytest.raises(httpx.ReadTimeout) as excinfo:
                    await tts_bytes(client, "hello", stream=stream)
                errors.append(excinfo.value)
        return errors

    started = time.monotonic()
    errors = await asyncio.wait_for(scenario(), timeout=20)

    assert time.monotonic() - started < 10  # five calls of 0.5 s, not the hang's
    for error in errors[:3]:
        assert isinstance(error, openai.APIConnectionError)  # APITimeoutError is a subclass
        assert isinstance(error.__cause__, httpx2.ReadTimeout)  # httpx2, not httpx
    assert (cloud.count("transcriptions"), cloud.count("chat"), cloud.count("tts")) == (1, 2, 2)


def test_stop_is_not_held_up_by_a_hanging_request() -> None:
    cloud = FakeCloud().start()
    cloud.fault("chat", Fault(hang=True))
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(
                httpx.post(
                    cloud.openai_base_url + "/chat/completions",
                    timeout=30.0,
                    headers={"Authorization": "Bearer sk-test"},
                    json={},
                )
            )
        except httpx.HTTPError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert cloud.wait_for("chat", 1, timeout=5)
    started = time.monotonic()
    cloud.stop()
    thread.join(timeout=5)
    assert time.monotonic() - started < 1.0
    assert not thread.is_alive()
    assert isinstance(outcome[0], httpx.RemoteProtocolError)  # server dropped the connection


async def test_refused_connections_then_accepted_on_the_same_port(cloud: FakeCloud) -> None:
    port = cloud.port

    async def scenario():
        async with openai_client(cloud) as client, elevenlabs_client(cloud) as tts:
            assert await chat_text(client) == REPLY  # leaves a pooled keep-alive connection
            assert len(await tts_bytes(tts, "hi")) > 0
            cloud.refuse_connections()
            with pytest.raises(openai.APIConnectionError) as chat_error:
                await chat_text(client)
            with pytest.raises(openai.APIConnectionError) as stt_error:
                await transcribe(client, wav_upload())
            with pytest.raises(httpx.ConnectError) as tts_error:
                await tts_bytes(tts, "hi")
            cloud.accept_connections()
            assert await chat_text(client) == REPLY
            assert len(await tts_bytes(tts, "hi")) > 0
            return chat_error.value, stt_error.value, tts_error.value

    chat_error, stt_error, tts_error = await asyncio.wait_for(scenario(), timeout=10)

    for error in (chat_error, stt_error):
        assert type(error) is openai.APIConnectionError
        assert isinstance(error.__cause__, httpx2.ConnectError)
    assert type(tts_error) is httpx.ConnectError  # raw httpx: the ElevenLabs SDK wraps nothing
    for error in (chat_error, tts_error):
        assert ConnectionRefusedError in chain(error)
    assert cloud.port == port
    assert (cloud.count("chat"), cloud.count("transcriptions"), cloud.count("tts")) == (2, 0, 2)


# ---- faults: truncated and malformed bodies -------------------------------------------------------------
async def test_truncated_chat_stream_gives_a_prefix_then_connection_error(cloud: FakeCloud) -> None:
    cloud.fault("chat", Fault(truncate=True))
    pieces: list[str] = []

    async def scenario():
        async with openai_client(cloud) as client:
            with pytest.raises(openai.APIConnectionError) as excinfo:
                await stream_text(client, pieces)
            return excinfo.value

    error = await asyncio.wait_for(scenario(), timeout=10)

    assert type(error) is openai.APIConnectionError
    assert isinstance(error.__cause__, httpx2.RemoteProtocolError)
    assert pieces and REPLY.startswith("".join(pieces)) and "".join(pieces) != REPLY
    assert cloud.count("chat") == 1


async def test_truncated_plain_openai_bodies_are_connection_errors(cloud: FakeCloud) -> None:
    cloud.fault("chat", Fault(truncate=True))
    cloud.fault("transcriptions", Fault(truncate=True))

    async def scenario():
        errors = []
        async with openai_client(cloud) as client:
            for call in (chat_text(client), transcribe(client, wav_upload())):
                with pytest.raises(openai.APIConnectionError) as excinfo:
                    await call
                errors.append(excinfo.value)
        return errors

    errors = await asyncio.wait_for(scenario(), timeout=10)

    for error in errors:
        assert type(error) is openai.APIConnectionError
        assert isinstance(error.__cause__, httpx2.RemoteProtocolError)
    assert cloud.count("chat") == cloud.count("transcriptions") == 1


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "convert"])
async def test_truncated_tts_raises_remote_protocol_error_after_some_audio(
    cloud: FakeCloud, stream: bool
) -> None:
    text = "It is a fine day. Is there anything else?"
    cloud.fault("tts", Fault(truncate=True))
    received: list[bytes] = []

    async def scenario():
        async with elevenlabs_client(cloud) as client:
            with pytest.raises(httpx.RemoteProtocolError) as excinfo:
                await tts_bytes(client, text, stream=stream, received=received)
        return excinfo.value

    await asyncio.wait_for(scenario(), timeout=10)

    assert 0 < sum(map(len, received)) < cloud.tts_samples(text, 16000) * 2
    assert cloud.count("tts") == 1


async def test_malformed_openai_bodies_raise_json_decode_error(cloud: FakeCloud) -> None:
    """Not an openai.OpenAIError: the SDK lets json.JSONDecodeError (a ValueError) escape."""
    cloud.fault("chat", Fault(malformed=True))
    cloud.fault("transcriptions", Fault(malformed=True))

    async def scenario():
        errors = []
        async with openai_client(cloud) as client:
            for call in (transcribe(client, wav_upload()), chat_text(client), stream_text(client)):
                with pytest.raises(json.JSONDecodeError) as excinfo:
                    await call
                errors.append(excinfo.value)
        return errors

    errors = await asyncio.wait_for(scenario(), timeout=10)

    assert all(not isinstance(error, openai.OpenAIError) for error in errors)
    assert (cloud.count("transcriptions"), cloud.count("chat")) == (1, 2)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "convert"])
async def test_malformed_tts_is_not_detected_by_the_sdk(cloud: FakeCloud, stream: bool) -> None:
    """The SDK yields whatever bytes a 200 carries: here an HTML page of odd length."""
    cloud.fault("tts", Fault(malformed=True))

    async def scenario():
        async with elevenlabs_client(cloud) as client:
            return await tts_bytes(client, "It is a fine day.", stream=stream)

    data = await asyncio.wait_for(scenario(), timeout=10)

    assert data.startswith(b"<html>")
    assert len(data) % 2 == 1  # not whole s16le samples: the caller's check
    assert cloud.count("tts") == 1


# ---- odds and ends ----------------------------------------------------------------------------------
async def test_unknown_paths_and_bad_requests(cloud: FakeCloud) -> None:
    async def scenario():
        async with httpx.AsyncClient(base_url=cloud.base_url) as http:
            missing = await http.post("/v1/embeddings", json={})
            no_messages = await http.post(
                "/v1/chat/completions",
                headers={"Authorization": "Bearer sk-test"},
                json={"model": "m"},
            )
            bad_format = await http.post(
                "/v1/text-to-speech/v/stream",
                params={"output_format": "opus_48000_32"},
                headers={"xi-api-key": "el-test"},
                json={"text": "hi"},
            )
            return missing, no_messages, bad_format

    missing, no_messages, bad_format = await asyncio.wait_for(scenario(), timeout=10)

    assert missing.status_code == 404
    assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"
    assert bad_format.status_code == 422
    assert cloud.unrouted == [("POST", "/v1/embeddings")]
    assert cloud.count("chat") == 1 and cloud.count("tts") == 1


async def test_api_keys_never_reach_the_log(
    cloud: FakeCloud, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="heimdall_edge.testing.fakecloud")

    async def scenario():
        async with openai_client(cloud) as client:
            await chat_text(client)
        async with openai_client(cloud, api_key="sk-secret-wrong") as client:
            with pytest.raises(openai.AuthenticationError):
                await chat_text(client)
        async with elevenlabs_client(cloud) as client:
            await tts_bytes(client, "hi")

    await asyncio.wait_for(scenario(), timeout=10)
    assert "fakecloud" in caplog.text  # the requests were logged ...
    for key in ("sk-test", "sk-secret-wrong", "el-test"):
        assert key not in caplog.text  # ... without their keys


def test_standalone_prints_the_environment_and_serves() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "heimdall_edge.testing.fakecloud",
            "--port",
            "0",
            "--latency-ms",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        env: dict[str, str] = {}
        deadline = time.monotonic() + 20
        while len(env) < 4 and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            if line.startswith("export "):
                name, value = line[len("export ") :].strip().split("=", 1)
                env[name] = value
        assert set(env) == {
            "HEIMDALL_OPENAI_BASE_URL",
            "HEIMDALL_ELEVENLABS_BASE_URL",
            "OPENAI_API_KEY",
            "ELEVENLABS_API_KEY",
        }
        response = httpx.post(
            env["HEIMDALL_OPENAI_BASE_URL"] + "/chat/completions",
            headers={"Authorization": f"Bearer {env['OPENAI_API_KEY']}"},
            json={"model": "m", "messages": MESSAGES},
            timeout=10,
        )
        assert response.json()["choices"][0]["message"]["content"] == REPLY
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, stderr
    assert "sk-test" not in stderr
