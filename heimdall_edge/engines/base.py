"""Protocols for speech-to-text, reply and text-to-speech engines, local and cloud.

Turn routing is typed on these, never on a vendor's class, so swapping a service
touches engines/ and app/builders.py only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

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


class VoiceIdentity(TypedDict):
    """What makes a text-to-speech engine's audio what it is: the voice cache's key, with the text."""

    engine: str
    voice: str
    model: str
    output_format: str
    settings: Mapping[str, object]
    """Whatever else shapes the sound (speed, stability, style...)."""


class Voiced(Protocol):
    """An engine whose clips may be cached: it says what shapes its sound, so nobody else has to know."""

    name: str

    def cache_identity(self) -> VoiceIdentity: ...


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


class TextToSpeech(Voiced, Protocol):
    async def load(self) -> None: ...

    def synthesize(self, text: str) -> AsyncIterator[Audio]:
        """Audio sentence by sentence, each yielded as soon as it is ready."""
        ...


# Cloud engines make one attempt per call within `timeout_s`: retries, deadlines and the
# breaker are their CallPolicy's (cloud/policy.py), so the SDKs run with retries off.


class CloudSpeechToText(Protocol):
    name: str

    async def transcribe(self, audio: Audio, timeout_s: float) -> Transcript: ...


class CloudReplyEngine(Protocol):
    name: str

    def reply(self, request: ReplyRequest, timeout_s: float) -> AsyncIterator[str]:
        """The answer sentence by sentence, as the stream delivers it."""
        ...


class CloudTextToSpeech(Voiced, Protocol):
    def synthesize(self, text: str, timeout_s: float) -> AsyncIterator[Audio]:
        """Audio in pieces, each yielded as soon as it arrives."""
        ...
