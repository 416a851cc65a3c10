"""One turn, stage by stage: keep -> transcribe -> reply -> speak -> record.

The capture is on disk before anything else happens. Each later stage may fail
on its own; the person then hears a short message (or an earcon if even speech
fails) and the journal gets the detail. No speech in the capture (an empty
transcript: silence, noise, or only a phrase Whisper makes up from them) is
answered as a failed transcription is: the person hears "not understood" (the
recorded reply), and the transcript recorded is "". Every stage is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from heimdall_edge.audio import Audio, joined, wav_bytes
from heimdall_edge.capture import Capture
from heimdall_edge.clock import Clock
from heimdall_edge.devices.base import Indicator, IndicatorState, Playback, Speaker
from heimdall_edge.engines.base import Exchange, ReplyRequest, Transcript
from heimdall_edge.engines.local.offline_reply import OFFLINE_ACK
from heimdall_edge.listen.earcon import ERROR_EARCON
from heimdall_edge.spool.errors import SpoolError, SpoolFullError
from heimdall_edge.spool.store import Spool
from heimdall_edge.streams import closing, prefetch
from heimdall_edge.turn.routing import Answer, Engines
from heimdall_edge.turn.speculation import Head, Speculation

log = logging.getLogger(__name__)

T = TypeVar("T")

SAY_NOT_UNDERSTOOD = "Sorry, I couldn't make that out. I kept the recording."
SAY_NO_REPLY = "I kept that, but I can't answer right now."
SAY_STORAGE_FULL = "My storage is full, so I couldn't keep that."
FIXED_PHRASES = [SAY_NOT_UNDERSTOOD, SAY_NO_REPLY, SAY_STORAGE_FULL, OFFLINE_ACK]
"""Rendered into the voice cache at start-up, so they can always be spoken without the cloud,
and again in the cloud voice once it can be had (preferred_voice.py)."""


@dataclass
class TurnResult:
    capture_id: str | None
    transcript: str | None = None
    reply: str | None = None
    engines: dict[str, str] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    interrupted: bool = False
    speculative: bool = False
    """Answered from a head start taken at a pause in the speech (speculation.py)."""

    def to_json(self) -> dict[str, object]:
        """The `demo --json` contract; `error` appears only when a stage failed."""
        payload: dict[str, object] = {
            "capture_id": self.capture_id,
            "transcript": self.transcript,
            "reply": self.reply,
            "engines": self.engines,
            "timings_ms": {k: round(v, 1) for k, v in self.timings_ms.items()},
            "speculative": self.speculative,
        }
        if self.error:
            payload["error"] = self.error
        return payload


def answerable(transcript: Transcript) -> bool:
    """Whether there is anything to answer: Whisper heard words (its stock phrases on
    silence or noise are screened to "" by the engines, engines/hallucinations.py)."""
    return bool(transcript.text.strip())


class Stopwatch:
    """Per-stage timings in milliseconds, from an injected clock."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.timings_ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = self._clock()
        try:
            yield
        finally:
            self.timings_ms[name] = (self._clock() - started) * 1000


class Interaction:
    """Runs turns; owns nothing long-lived, so the appliance can build it once."""

    def __init__(
        self,
        *,
        device_id: str,
        spool: Spool,
        engines: Engines,
        speaker: Speaker,
        indicator: Indicator,
        make_room: Callable[[int], bool] | None = None,
        on_kept: Callable[[], None] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        """`make_room(bytes)` frees spool space (False: none can be freed); `on_kept` wakes the syncer."""
        self._device_id = device_id
        self._make_room = make_room
        self._on_kept = on_kept
        self._spool = spool
        self._engines = engines
        self._speaker = speaker
        self._indicator = indicator
        self._clock = clock

    async def run(
        self,
        capture: Capture,
        stop: asyncio.Event,
        history: tuple[Exchange, ...] = (),
        speculation: Speculation | None = None,
    ) -> TurnResult:
        """One turn on `capture`; `history` is the conversation so far, for the reply. With `speculation`,
        what it made ready at the last pause is used and the rest done here; it is closed
        when the turn ends, whatever happened."""
        watch = Stopwatch(self._clock)
        watch.timings_ms["listen"] = capture.audio.seconds * 1000
        self._indicator.show(IndicatorState.THINKING)
        with watch.stage("keep"):
            try:
                await self._ensure_room(capture)
                record = await asyncio.to_thread(
                    self._spool.create,
                    device_id=self._device_id,
                    trigger=capture.trigger,
                    audio_wav=capture.wav,
                    frames=capture.frames,
                    leased=True,
                )
            except SpoolFullError as exc:
                log.error("capture not kept: %s", exc)
                if speculation is not None:
                    await speculation.aclose()
                await self._say(SAY_STORAGE_FULL, stop)
                return TurnResult(None, error=str(exc), timings_ms=watch.timings_ms)
        result = TurnResult(record.capture_id, timings_ms=watch.timings_ms)
        head: Head | None = None
        try:
            if speculation is not None:
                with watch.stage("speculation"):  # what is left of it after the hang-over
                    head = await speculation.take()
                if head is not None:
                    result.speculative = True
                    watch.timings_ms.update(head.timings_ms)
            await self._understand_and_answer(result, capture, stop, watch, history, head)
        finally:
            if head is not None:
                await head.aclose()
            if speculation is not None:
                await speculation.aclose()
            with watch.stage("record"):
                await self._record(result)
            if self._on_kept is not None:
                self._on_kept()  # the turn is recorded: the capture is ready to sync
            self._indicator.show(IndicatorState.ERROR if result.error else IndicatorState.IDLE)
        return result

    async def _ensure_room(self, capture: Capture) -> None:
        """Make space under the spool quota first; refusing the capture is the last resort."""
        needed = len(capture.audio.pcm) + sum(len(frame) for frame in capture.frames) + 64 * 1024
        if self._make_room is not None and not await asyncio.to_thread(self._make_room, needed):
            raise SpoolFullError(
                "the spool is at its quota and nothing can be evicted: raise sync.quota_mb, let sync catch up, or allow sync.evict_unsynced"
            )

    async def request_for(
        self, transcript: Transcript, frames: Sequence[bytes], history: tuple[Exchange, ...]
    ) -> ReplyRequest:
        """What the reply engines are asked: the words, the latest frame, the device's state."""
        pending = await asyncio.to_thread(self._pending_count)
        online = self._engines.online
        return ReplyRequest(
            transcript=transcript.text,
            image_jpeg=frames[-1] if frames else None,
            status={
                "pending_captures": str(pending),
                "online": str(all(online.values())).lower(),
                **{f"online_{service}": str(up).lower() for service, up in online.items()},
            },
            history=history,
        )

    async def _understand_and_answer(
        self,
        result: TurnResult,
        capture: Capture,
        stop: asyncio.Event,
        watch: Stopwatch,
        history: tuple[Exchange, ...],
        head: Head | None,
    ) -> None:
        if head is not None:
            transcript: Transcript | None = head.transcript
        else:
            with watch.stage("transcribe"):
                try:
                    transcript = await self._engines.transcribe(capture.audio)
                except Exception as exc:
                    log.exception("speech-to-text failed for capture %s", result.capture_id)
                    result.error = f"transcribe: {exc}"
                    transcript = None
        if transcript is not None:
            result.transcript = transcript.text
            result.engines["stt"] = transcript.engine
        if transcript is None or not answerable(transcript):  # nothing to answer: say so
            if transcript is not None:
                log.info("capture %s: no speech heard (%s)", result.capture_id, transcript.engine)
            spoken = await self._speak(result, _one(SAY_NOT_UNDERSTOOD), capture, stop, watch)
            result.reply = " ".join(spoken)
            return
        answer = head.reply if head is not None else None
        if answer is None:
            with watch.stage("reply"):
                try:
                    answer = await self._engines.reply(
                        await self.request_for(transcript, capture.frames, history)
                    )
                except Exception as exc:
                    log.exception("reply failed for capture %s", result.capture_id)
                    result.error = f"reply: {exc}"
        if answer is not None:
            result.engines["reply"] = answer.engine
        sentences = answer.items() if answer is not None else _one(SAY_NO_REPLY)
        first_speech = head.speech if head is not None else None
        spoken = await self._speak(result, sentences, capture, stop, watch, first_speech)
        result.reply = " ".join(spoken)

    async def _speak(
        self,
        result: TurnResult,
        sentences: AsyncIterator[str],
        capture: Capture,
        stop: asyncio.Event,
        watch: Stopwatch,
        first_speech: Answer[Audio] | None = None,
    ) -> list[str]:
        """Speak sentences as they come, keep what was played as reply.wav, time the first audio.

        `first_speech`: the first sentence already synthesized (by a speculation).
        Returns the sentences that were spoken (or were about to be, when a press cut it short).
        """
        played: list[Audio] = []
        spoken: list[str] = []

        async def audio() -> AsyncIterator[Audio]:
            ready = first_speech
            async with closing(sentences) as coming:
                async for sentence in coming:
                    spoken.append(sentence)
                    speech, ready = ready or await self._engines.speak(sentence), None
                    result.engines.setdefault("tts", speech.engine)
                    async with closing(speech.items()) as chunks:
                        async for chunk in chunks:
                            yield chunk

        self._indicator.show(IndicatorState.SPEAKING)
        with watch.stage("speak"):
            try:
                playback = await self._speaker.play(_tee(prefetch(audio()), played), stop)
            except Exception as exc:
                log.exception("text-to-speech failed for capture %s", result.capture_id)
                result.error = result.error or f"speak: {exc}"
                playback = await self._speaker.play(_one(ERROR_EARCON.audio), stop)
        result.interrupted = playback.interrupted
        if playback.first_audio_at is not None:
            watch.timings_ms["end_to_first_audio"] = (
                playback.first_audio_at - capture.utterance.ended_at
            ) * 1000
        if played and result.capture_id:
            try:
                await asyncio.to_thread(
                    self._spool.add_file, result.capture_id, "reply.wav", _join(played)
                )
            except SpoolError as exc:  # e.g. a full disk: the capture is kept, the reply was heard
                log.error("reply.wav not kept with capture %s: %s", result.capture_id, exc)
                result.error = result.error or f"keep reply: {exc}"
        return spoken

    async def _say(self, text: str, stop: asyncio.Event) -> Playback:
        """A message outside any capture (e.g. storage full): speech, else an earcon."""
        try:
            speech = await self._engines.speak(text)
            return await self._speaker.play(speech.items(), stop)
        except Exception:
            log.exception("could not speak %r", text)
            return await self._speaker.play(_one(ERROR_EARCON.audio), stop)

    async def _record(self, result: TurnResult) -> None:
        if result.capture_id is None:
            return
        try:
            await asyncio.to_thread(
                self._spool.update,
                result.capture_id,
                transcript=result.transcript,
                reply=result.reply,
                engines=result.engines,
                timings_ms=result.timings_ms,
                status="failed" if result.error else "complete",
                error=result.error,
                speculative=result.speculative,
                lease=None,
            )
        except Exception:
            # The audio is already safe; losing the metadata update must not kill the loop.
            log.exception("could not record the outcome of capture %s", result.capture_id)
            with contextlib.suppress(Exception):  # let it sync as it is, as after a crash
                await asyncio.to_thread(self._spool.update, result.capture_id, lease=None)

    def _pending_count(self) -> int:
        return self._spool.counts().get("pending", 0)


async def _tee(chunks: AsyncIterator[Audio], sink: list[Audio]) -> AsyncIterator[Audio]:
    async with closing(chunks) as arriving:
        async for chunk in arriving:
            sink.append(chunk)
            yield chunk


async def _one(item: T) -> AsyncIterator[T]:
    yield item


def _join(chunks: list[Audio]) -> bytes:
    """One WAV at the first chunk's rate (an earcon may come at another rate)."""
    rate = chunks[0].sample_rate
    return wav_bytes(joined(chunks, rate), rate)
