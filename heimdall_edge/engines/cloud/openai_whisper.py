"""Cloud speech-to-text: OpenAI's transcription endpoint, one attempt per call.

Retries, deadlines and breakers are the caller's (cloud.policy.CallPolicy): the
client is built with max_retries=0 so the SDK never retries behind our back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from heimdall_edge.audio import Audio
from heimdall_edge.engines.base import Transcript
from heimdall_edge.engines.hallucinations import screened

if TYPE_CHECKING:
    from openai import AsyncOpenAI


class OpenAIWhisperEngine:
    name = "openai"

    def __init__(self, client: AsyncOpenAI, *, model: str, language: str | None) -> None:
        self._client = client
        self._model = model
        self._language = language

    async def transcribe(self, audio: Audio, timeout_s: float) -> Transcript:
        """One request: the utterance as an in-memory WAV; a stock phrase made up from noise is "" (no speech)."""
        options = {"language": self._language} if self._language else {}
        result = await self._client.audio.transcriptions.create(
            model=self._model,
            file=("utterance.wav", audio.to_wav(), "audio/wav"),
            response_format="json",
            timeout=timeout_s,
            **options,
        )
        text = getattr(result, "text", None)
        if not isinstance(text, str):
            raise ValueError("transcription response has no text")  # noqa: TRY004 - malformed answer
        return Transcript(text=screened(text.strip(), self.name), engine=self.name)
