"""Protocols for speech-to-text, reply and text-to-speech engines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from heimdall_edge.audio import Audio


class EngineError(RuntimeError):
    """An engine that cannot load or run; the message says what to fix."""


@dataclass(frozen=True)
class Transcript:
    text: str
    engine: str


@dataclass(frozen=True)
class Exchange:
    """One earlier turn of the conversation."""

    said: str
    answered: str


@dataclass(frozen=True)
class ReplyRequest:
    transcript: str
    image_jpeg: bytes | None = None
    status: dict[str, str] = field(default_factory=dict)
    history: tuple[Exchange, ...] = ()
    """Earlier turns of this conversation, oldest first (the cloud reply sees them; the offline one need not)."""


class SpeechToText(Protocol):
    name: str

    async def load(self) -> None:
        """Load the model once; later calls do nothing."""
        ...

    async def transcribe(self, audio: Audio) -> Transcript: ...


class ReplyEngine(Protocol):
    name: str

    def reply(self, request: ReplyRequest) -> AsyncIterator[str]:
        """The answer, a sentence (or a few) at a time."""
        ...


class TextToSpeech(Protocol):
    name: str

    async def load(self) -> None: ...

    def synthesize(self, text: str) -> AsyncIterator[Audio]:
        """Audio sentence by sentence, each yielded as soon as it is ready."""
        ...

    def cache_identity(self) -> dict[str, Any]:
        """engine, voice, model, output_format and settings: what makes its audio what it is."""
        ...
