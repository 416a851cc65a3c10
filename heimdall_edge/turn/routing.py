"""Prefer the cloud, answer locally whenever it cannot: fallback, hedging and the voice cache.

Every stage (transcribe, reply, speak) is asked the same way: start the cloud
engine unless its service is out of reach or its breaker is open (then the
local engine starts at once, paying no timeout); if the cloud has not
answered within the stage's hedge delay, start the local engine too and keep
whichever answers first; if the cloud fails, answer locally in the same turn.
An "answer" is the first item of a stream (a transcript, the first sentence,
the first audio), so a hung cloud never costs more than the hedge delay plus
the local engine's time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from heimdall_edge.audio import Audio
from heimdall_edge.cloud.classify import classify
from heimdall_edge.cloud.connectivity import Connectivity
from heimdall_edge.cloud.errors import CloudError, ErrorKind
from heimdall_edge.cloud.policy import CallPolicy
from heimdall_edge.engines.base import (
    CloudReplyEngine,
    CloudSpeechToText,
    CloudTextToSpeech,
    ReplyEngine,
    ReplyRequest,
    SpeechToText,
    TextToSpeech,
    Transcript,
)
from heimdall_edge.streams import aclose, closing
from heimdall_edge.turn.voice_cache import VoiceCache, VoiceCacheError, clip_key

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Answer(Generic[T]):
    """The first item of an engine's output, the rest still streaming, and who produced it."""

    engine: str
    first: T
    rest: AsyncIterator[T] | None = None
    cached: bool = False
    source: AsyncIterator[T] | None = None
    """The engine's own stream under whatever `rest` wraps it in: closed with the answer even
    if the wrappers never started (a generator that never ran cannot close what it wraps)."""

    async def items(self) -> AsyncIterator[T]:
        """Every item, the first included; the rest of the stream is closed however this ends."""
        try:
            yield self.first
            if self.rest is not None:
                async for item in self.rest:
                    yield item
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        for stream in (self.rest, self.source):
            await aclose(stream)


async def first_of(engine: str, stream: AsyncIterator[T]) -> Answer[T]:
    """Wait for a stream's first item; an empty stream is a malformed answer."""
    iterator = aiter(stream)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        raise ValueError(f"{engine} returned nothing") from None
    return Answer(engine, first, iterator, source=iterator)


Start = Callable[[], Awaitable[Answer[T]]]


async def prefer_cloud(
    stage: str,
    cloud: Start[T] | None,
    local: Start[T],
    hedge_after_s: float,
    on_cloud_lost: Callable[[str], None] | None = None,
) -> Answer[T]:
    """The cloud's answer if it comes in time and good, else the local engine's.

    `on_cloud_lost(why)` is told when the local engine answered first while the cloud
    was still working: slowness that the cloud's breaker must count, or every later
    turn would pay the hedge delay again.
    """
    if cloud is None:
        return await local()
    cloud_task = asyncio.create_task(cloud(), name=f"{stage}-cloud")
    try:
        done, _ = await asyncio.wait({cloud_task}, timeout=hedge_after_s)
        if done:
            try:
                return cloud_task.result()
            except Exception as exc:  # noqa: BLE001 - any cloud failure means: answer locally
                _log_fallback(stage, exc)
                return await local()
        log.info(
            "%s: no cloud answer after %.0f ms: starting the local engine too",
            stage,
            hedge_after_s * 1000,
        )
        local_task = asyncio.create_task(local(), name=f"{stage}-local")
        return await _first_good(stage, cloud_task, local_task, on_cloud_lost)
    finally:
        cloud_task.cancel()


async def _first_good(
    stage: str,
    cloud_task: asyncio.Task[Answer[T]],
    local_task: asyncio.Task[Answer[T]],
    on_cloud_lost: Callable[[str], None] | None,
) -> Answer[T]:
    """Whichever engine answers well first; the other is cancelled or its stream closed."""
    pending: set[asyncio.Task[Answer[T]]] = {cloud_task, local_task}
    winner: asyncio.Task[Answer[T]] | None = None
    try:
        while pending and winner is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: t is not local_task):  # a tie goes to local
                if task.exception() is None:
                    winner = winner or task
                elif task is cloud_task:
                    _log_fallback(stage, task.exception())
                else:
                    log.error("%s: the local engine failed", stage, exc_info=task.exception())
        if winner is None:
            raise local_task.exception() or RuntimeError(f"{stage}: no engine answered")
        if winner is local_task and not cloud_task.done() and on_cloud_lost is not None:
            on_cloud_lost(f"{stage}: lost its hedge to the local engine")
        return winner.result()
    finally:
        for task in (cloud_task, local_task):
            if task is not winner:
                await _discard(task)


async def _discard(task: asyncio.Task[Answer[T]]) -> None:
    """Stop a losing engine: cancel it, or close the stream it already started."""
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    elif not task.cancelled() and task.exception() is None:
        await task.result().aclose()


def _log_fallback(stage: str, exc: BaseException | None) -> None:
    if isinstance(exc, CloudError):
        log.info("%s: cloud %s: answering with the local engine", stage, exc)
    else:
        log.warning("%s: cloud engine failed: answering with the local engine", stage, exc_info=exc)


@dataclass(frozen=True)
class Cloud(Generic[T]):
    """A cloud engine and the call policy (breaker, rate limit, retries, deadline) it runs under."""

    engine: T
    policy: CallPolicy


class Engines:
    """The three stages as the interaction sees them, each preferring the cloud and answering locally."""

    def __init__(
        self,
        *,
        stt: SpeechToText,
        reply: ReplyEngine,
        tts: TextToSpeech,
        cloud_stt: Cloud[CloudSpeechToText] | None = None,
        cloud_reply: Cloud[CloudReplyEngine] | None = None,
        cloud_tts: Cloud[CloudTextToSpeech] | None = None,
        hedge_after_s: dict[str, float] | None = None,
        cache: VoiceCache | None = None,
    ) -> None:
        self.stt, self.reply_engine, self.tts = stt, reply, tts
        self.cloud_stt, self.cloud_reply, self.cloud_tts = cloud_stt, cloud_reply, cloud_tts
        self._hedge = hedge_after_s or {}
        self.cache = cache

    @property
    def connectivities(self) -> dict[str, Connectivity]:
        """Each cloud service's own reachability, by service (OpenAI's two stages share one)."""
        return {p.service: p.connectivity for p in self.policies if p.connectivity is not None}

    @property
    def online(self) -> dict[str, bool]:
        """Whether each cloud service is thought reachable, by service; {} with no cloud."""
        return {service: c.online for service, c in self.connectivities.items()}

    @property
    def policies(self) -> list[CallPolicy]:
        return [
            c.policy for c in (self.cloud_stt, self.cloud_reply, self.cloud_tts) if c is not None
        ]

    def call_stats(self) -> dict[str, dict[str, int]]:
        """Cloud calls per service since start-up: made, answered, failed, slow, cancelled (a
        lost hedge or a dropped speculation), skipped (breaker open or offline)."""
        totals: dict[str, collections.Counter[str]] = {}
        for policy in self.policies:
            totals.setdefault(policy.service, collections.Counter()).update(policy.stats)
        return {service: dict(counts) for service, counts in totals.items()}

    async def load(self) -> None:
        await asyncio.gather(self.stt.load(), self.tts.load())

    def _prefer(
        self,
        stage: str,
        hedge_key: str,
        cloud: Cloud[Any] | None,
        from_cloud: Start[T],
        from_local: Start[T],
    ) -> Awaitable[Answer[T]]:
        """`prefer_cloud` for one stage, its lost hedges counted against the cloud's breaker."""
        return prefer_cloud(
            stage,
            from_cloud if cloud else None,
            from_local,
            self._hedge.get(hedge_key, 1.0),
            cloud.policy.record_slow if cloud else None,
        )

    async def transcribe(self, audio: Audio) -> Transcript:
        cloud = self.cloud_stt

        async def from_cloud() -> Answer[Transcript]:
            assert cloud is not None
            transcript = await cloud.policy.call(
                lambda timeout: cloud.engine.transcribe(audio, timeout)
            )
            return Answer(transcript.engine, transcript)

        async def from_local() -> Answer[Transcript]:
            transcript = await self.stt.transcribe(audio)
            return Answer(transcript.engine, transcript)

        answer = await self._prefer("transcribe", "stt", cloud, from_cloud, from_local)
        return answer.first

    async def transcribe_in_cloud(self, audio: Audio) -> Transcript:
        """Cloud Whisper alone, under its policy (breaker, rate limit, deadline): to upgrade
        what the device transcribed while the cloud was away. A CloudError if it cannot."""
        cloud = self.cloud_stt
        if cloud is None:
            raise CloudError("openai", ErrorKind.CLIENT, "no cloud speech-to-text configured")
        return await cloud.policy.call(lambda timeout: cloud.engine.transcribe(audio, timeout))

    async def reply(self, request: ReplyRequest) -> Answer[str]:
        """The answer, sentence by sentence; the first sentence is here when this returns."""
        cloud = self.cloud_reply

        async def from_cloud() -> Answer[str]:
            assert cloud is not None
            answer = await cloud.policy.call(
                lambda timeout: first_of(cloud.engine.name, cloud.engine.reply(request, timeout))
            )
            answer.rest = _survive("reply", answer.rest, cloud.policy)
            return answer

        async def from_local() -> Answer[str]:
            return await first_of(self.reply_engine.name, self.reply_engine.reply(request))

        return await self._prefer("reply", "reply", cloud, from_cloud, from_local)

    async def speak(self, text: str) -> Answer[Audio]:
        """Audio for `text`: from the voice cache when it has it, else synthesized (and then cached).

        A clip in the cloud voice is played whenever the cache has it, whatever the service's
        state: the voice changes only when it must (a sentence it never spoke, while it is away).
        """
        cloud = self.cloud_tts
        if cloud is not None:
            hit = await self._cached(cloud.engine.name, clip_key(cloud.engine, text))
            if hit is not None:
                return hit

        async def from_cloud() -> Answer[Audio]:
            return await self._synthesize_in_cloud(text)

        async def from_local() -> Answer[Audio]:
            if self.cache is None:
                return await first_of(self.tts.name, self.tts.synthesize(text))
            key = clip_key(self.tts, text)
            if (hit := await self._cached(self.tts.name, key)) is not None:
                return hit
            answer = await first_of(self.tts.name, self.tts.synthesize(text))
            answer.rest = self._keep(key, answer.first, answer.rest)
            return answer

        return await self._prefer("speak", "tts", cloud, from_cloud, from_local)

    async def prerender(self, phrases: list[str]) -> int:
        """Render fixed phrases locally into the cache at start-up, so they never need the cloud
        (until the cloud voice has them: see preferred_voice.py)."""
        if self.cache is None:
            return 0
        rendered = 0
        for phrase in phrases:
            key = clip_key(self.tts, phrase)
            if await asyncio.to_thread(self.cache.__contains__, key):
                continue
            chunks = [chunk async for chunk in self.tts.synthesize(phrase)]
            rendered += await self._put(key, _joined(chunks))
        return rendered

    async def in_cloud_voice(self, text: str) -> bool:
        """Whether the voice cache holds `text` in the cloud voice (never with no cloud voice or cache)."""
        if self.cloud_tts is None or self.cache is None:
            return False
        key = clip_key(self.cloud_tts.engine, text)
        return await asyncio.to_thread(self.cache.__contains__, key)

    async def render_in_cloud_voice(self, text: str) -> bool:
        """Synthesize `text` in the cloud voice into the voice cache, under the service's policy.

        True once the clip is kept; False if the stream broke off (counted, logged) or the
        cache would not take it; a CloudError if the service could not be asked.
        """
        answer = await self._synthesize_in_cloud(text)
        async for _chunk in answer.items():
            pass
        return await self.in_cloud_voice(text)

    async def _synthesize_in_cloud(self, text: str) -> Answer[Audio]:
        """The cloud voice's audio under its policy, kept in the cache once it is whole."""
        cloud = self.cloud_tts
        assert cloud is not None
        answer = await cloud.policy.call(
            lambda timeout: first_of(cloud.engine.name, cloud.engine.synthesize(text, timeout))
        )
        answer.rest = _survive(
            "speak",
            self._keep(clip_key(cloud.engine, text), answer.first, answer.rest),
            cloud.policy,
        )
        return answer

    async def _cached(self, engine: str, key: str) -> Answer[Audio] | None:
        if self.cache is None:
            return None
        audio = await asyncio.to_thread(self.cache.get, key)
        return Answer(engine, audio, cached=True) if audio is not None else None

    async def _keep(
        self, key: str, first: Audio, rest: AsyncIterator[Audio] | None
    ) -> AsyncIterator[Audio]:
        """Pass the rest of the audio through, and cache the whole clip once it is complete."""
        chunks = [first]
        if rest is not None:
            async with closing(rest) as arriving:
                async for chunk in arriving:
                    chunks.append(chunk)
                    yield chunk
        if self.cache is not None:
            await self._put(key, _joined(chunks))

    async def _put(self, key: str, audio: Audio) -> bool:
        """Keep a clip; a cache that cannot take it (a full disk, say) costs time later, not speech."""
        assert self.cache is not None
        try:
            await asyncio.to_thread(self.cache.put, key, audio)
        except VoiceCacheError as exc:
            log.warning("voice cache: clip not kept: %s", exc)
            return False
        return True


async def _survive(
    stage: str, rest: AsyncIterator[T] | None, policy: CallPolicy
) -> AsyncIterator[T]:
    """A cloud stream that breaks after its first item ends there: counted against the breaker, logged."""
    if rest is None:
        return
    try:
        async with closing(rest) as arriving:
            async for item in arriving:
                yield item
    except Exception as exc:  # noqa: BLE001 - classified, counted and logged; the turn goes on
        error = classify(exc, policy.service, mid_stream=True)
        policy.record_failure(error)
        log.warning("%s: cloud stream broke off (%s): keeping what arrived", stage, error)


def _joined(chunks: list[Audio]) -> Audio:
    return Audio(b"".join(chunk.pcm for chunk in chunks), chunks[0].sample_rate)
