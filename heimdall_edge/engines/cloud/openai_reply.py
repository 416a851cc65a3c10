"""Cloud answers: OpenAI chat completions, streamed, with the latest camera frame attached."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from heimdall_edge.engines.base import ReplyRequest
from heimdall_edge.engines.sentences import sentences
from heimdall_edge.streams import closing

if TYPE_CHECKING:
    from openai import AsyncOpenAI

SYSTEM_PROMPT = (
    "You are Heimdall, a voice assistant on a small device in someone's home. "
    "Your answer is spoken aloud: reply in one or two short, plain sentences, "
    "no lists, no markdown, no emoji. If an image is attached, it is what the "
    "device's camera saw while the person spoke; use it only if it helps."
)


class OpenAIReplyEngine:
    name = "openai"

    def __init__(self, client: AsyncOpenAI, *, model: str, max_tokens: int) -> None:
        self._client = client
        self._model = model
        self._max_tokens = max_tokens

    def messages(self, request: ReplyRequest) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = [{"type": "text", "text": request.transcript}]
        if request.image_jpeg:
            encoded = base64.b64encode(request.image_jpeg).decode("ascii")
            content.append(
                {
                    "type": "image_url",
                    "image_url": {"url": f"data:image/jpeg;base64,{encoded}", "detail": "low"},
                }
            )
        earlier: list[dict[str, Any]] = []
        for exchange in request.history:
            earlier.append({"role": "user", "content": exchange.said})
            earlier.append({"role": "assistant", "content": exchange.answered})
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            *earlier,
            {"role": "user", "content": content},
        ]

    async def reply(self, request: ReplyRequest, timeout_s: float) -> AsyncIterator[str]:
        """The answer sentence by sentence, as the stream delivers it."""
        stream = await self._client.chat.completions.create(
            model=self._model,
            messages=self.messages(request),  # type: ignore[arg-type]
            max_tokens=self._max_tokens,
            stream=True,
            timeout=timeout_s,
        )
        async with stream, closing(sentences(_deltas(stream))) as answer:
            async for sentence in answer:
                yield sentence


async def _deltas(stream: Any) -> AsyncIterator[str]:
    finished = False
    async with closing(stream) as chunks:
        async for chunk in chunks:
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    yield choice.delta.content
                finished = finished or choice.finish_reason is not None
    if not finished:
        # The connection ended without a finish_reason: the answer is cut short.
        raise ValueError("chat stream ended before the answer was finished")
