"""The Listener: reads the microphone, waits for a trigger, records one utterance.

Every frame goes through the front end (noise suppression and gain, when on)
and the earcon canceller first; the wake word, the speech judge and the
capture all hear the same cleaned audio.

Triggers: a button press (mode "button" or "both"), and in mode "voice" or
"both" the wake word, or, with no wake word set, plain speech onset. After a
reply that asked something, a follow-up window lets speech alone start the
next capture. While the device speaks the Listener keeps reading, but only the
wake word counts there (barge-in), never the device's own voice, and nothing
it hears is kept; after playback it listens on for `settle_ms` (output latency
and the room's tail) before anything can wake it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from heimdall_edge.audio import FRAME_MS, Audio
from heimdall_edge.capture import Trigger
from heimdall_edge.devices.base import Button, ButtonEvent, Microphone, MicrophoneEnded, Speaker
from heimdall_edge.listen.earcon import FOLLOW_UP_EARCON, WAKE_EARCON, Earcon
from heimdall_edge.listen.earcon_canceller import EarconCanceller
from heimdall_edge.listen.endpointer import Endpointer, EndReason, Utterance
from heimdall_edge.listen.frontend import NoiseAndGain
from heimdall_edge.listen.own_voice import OwnVoiceGuard
from heimdall_edge.listen.vad import SpeechJudge
from heimdall_edge.listen.wakeword import WakeWord, WakeWordDetector, WakeWordError
from heimdall_edge.settings import ListeningSettings
from heimdall_edge.streams import closing

log = logging.getLogger(__name__)


class Pauses(Protocol):
    """Told of the pauses inside a capture: where a speculative answer starts and is dropped."""

    def paused(self, audio: Audio) -> None:
        """The person stopped speaking; `audio` is the capture so far."""

    def resumed(self) -> None:
        """They went on: whatever started at the pause no longer answers them."""


def frames_for(ms: float) -> int:
    """Frames covering at least `ms`."""
    return -(-int(ms) // FRAME_MS)


class Listener:
    """Waits for a trigger, then records one utterance from the microphone.

    Push-to-talk rules for a button capture: it starts at the press; a release
    ends it only once speech has been heard, so both "tap, then speak" (the
    endpointer ends it) and "hold while talking" (the release ends it) work; a
    long press (HELD) before any speech cancels it. Button events are polled
    between frames with `pending()`, never awaited, because a frame is due
    every 30 ms. Queued presses from while the device was busy are the
    caller's to drop (button.clear()) before calling `next_utterance`.
    """

    def __init__(
        self,
        mic: Microphone,
        button: Button | None = None,
        settings: ListeningSettings | None = None,
        *,
        is_speech: SpeechJudge | Callable[[bytes], bool] | None = None,
        wake: WakeWord | None = None,
        front_end: NoiseAndGain | None = None,
        speaker: Speaker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`wake`: the wake-word detector (None: speech onset is the voice trigger);
        `speaker`: where earcons play (None: silent)."""
        settings = settings or ListeningSettings()
        if settings.mode == "button" and button is None:
            raise ValueError('listening mode "button" needs a button; use mode "voice" without one')
        self.mode = settings.mode
        self.settings = settings
        self._mic = mic
        # Without a button, "both" is simply voice.
        self._button = button if settings.mode != "voice" else None
        self._endpointer = Endpointer(settings, is_speech)
        self._wake = wake if settings.mode != "button" else None
        self._guard = (
            OwnVoiceGuard(self._wake, frames_for(settings.settle_ms)) if self._wake else None
        )
        self._front_end = front_end
        self._canceller = EarconCanceller()
        self._speaker = speaker if settings.wake_sound else None
        self._earcon: asyncio.Task[object] | None = None
        self._clock = clock
        self._stopping = False
        self._barged_in = False
        self._settle_until: int | None = None
        self.frames_read = 0
        """Microphone frames read so far: the Listener's clock."""
        self.last_frame_at: float | None = None
        """`clock` time the latest frame arrived: the service's pulse for the watchdog."""
        self.reading = False
        """A read is waiting on the microphone (for long, if the device is away)."""

    @property
    def wake_word(self) -> WakeWord | None:
        return self._wake

    @property
    def barged_in(self) -> bool:
        """The wake word was heard while the device spoke: the next capture starts at once."""
        return self._barged_in

    async def next_utterance(
        self,
        on_start: Callable[[], None] | None = None,
        *,
        follow_up_s: float = 0.0,
        pauses: Pauses | None = None,
    ) -> Utterance | None:
        """Wait for a trigger and record until an EndReason.

        With `follow_up_s`, speech alone starts the capture for that long (after
        the follow-up earcon); None if nobody spoke in time. `on_start` is called
        as the capture starts (light the LED, start the camera). `pauses` hears
        each pause in the speech (with the audio so far) and each resumption.
        Raises MicrophoneEnded if a finite source runs out before a trigger.
        """
        endpointer = self._endpointer
        trigger = await self._wait_for_trigger(frames_for(follow_up_s * 1000))
        if self._stopping:
            await self._earcon_played()
            return self._finish(EndReason.STOPPED)
        if trigger is None:
            await self._earcon_played()
            return None
        endpointer.start(trigger)
        if trigger in ("button", "wake_word"):
            self._sound(WAKE_EARCON)
        if on_start is not None:
            on_start()
        paused = False
        try:
            while not self._stopping:
                try:
                    frame = await self._read()
                except MicrophoneEnded:
                    return self._finish(EndReason.MIC_ENDED)
                if self._wake is not None:  # its stream stays whole; a wake word now is speech
                    self._wake.feed(frame)
                reason = endpointer.feed(frame) or self._button_reason()
                if reason is not None:
                    return self._finish(reason)
                if pauses is not None and endpointer.paused != paused:
                    paused = endpointer.paused
                    if paused:
                        pauses.paused(endpointer.audio())
                    else:
                        pauses.resumed()
            return self._finish(EndReason.STOPPED)
        finally:
            await self._earcon_played()

    async def _wait_for_trigger(self, follow_up_frames: int) -> Trigger | None:
        """Read frames until something starts a capture; None when a follow-up window closes
        or the service is stopping."""
        endpointer = self._endpointer
        endpointer.reset()
        if self._barged_in:
            self._barged_in = False
            return "wake_word"
        if follow_up_frames:
            self._sound(FOLLOW_UP_EARCON)
        onset_wakes = follow_up_frames > 0 or (self.mode != "button" and self._wake is None)
        waited = 0
        while not self._stopping:
            frame = await self._read()
            waited += 1
            heard_wake = self._wake is not None and self._wake.feed(frame)
            if onset_wakes:
                onset = endpointer.idle_feed(frame)
            else:
                endpointer.remember(frame)
                onset = False
            if self._pressed():
                return "button"
            if heard_wake:
                log.info("wake word %r heard", self._wake.model.phrase)  # type: ignore[union-attr]
                return "wake_word"
            if onset:
                return "follow_up" if follow_up_frames else "voice"
            if follow_up_frames and waited >= follow_up_frames:
                return None
        return None

    def playback_starting(self) -> None:
        """The device is about to play: call before `while_speaking` (and before the playback can end)."""
        self._mic.flush()  # frames from before playback (thinking time) are stale
        self._settle_until = None
        if self._guard is not None:
            self._guard.playback_started(self.frames_read)

    async def while_speaking(self, stop: asyncio.Event) -> None:
        """Listen while the device plays, and for settle_ms after `playback_ended()`.

        Only the wake word counts, and only a person's: a detection where the
        device's own output said it is ignored. On a real one, `stop` is set
        (playback ends, if it has not) and the next capture starts at once. Nothing heard
        here is kept: the pre-roll starts empty afterwards. When the service
        is stopping, the settle time is skipped.
        """
        try:
            while self._settle_until is None or (
                not self._stopping and self.frames_read < self._settle_until
            ):
                frame = await self._read()
                if self._guard is not None:
                    self._guard.heard(self.frames_read)
                if self._wake is None or not self._wake.feed(frame):
                    continue
                if self._guard is not None and self._guard.covers(self.frames_read):
                    log.info("wake word in the device's own voice: ignored")
                    continue
                log.info("wake word %r heard while speaking: stopping", self._wake.model.phrase)
                self._barged_in = True
                stop.set()
                return
        except MicrophoneEnded:
            return
        finally:
            self._endpointer.reset()

    def playback_ended(self) -> None:
        """The last audio has left the speaker: settle_ms from this frame on, then listen again."""
        self._settle_until = self.frames_read + frames_for(self.settings.settle_ms)

    async def own_voice(self, chunks: AsyncIterator[Audio]) -> AsyncIterator[Audio]:
        """`chunks` on their way to the speaker, shown to the own-voice guard first."""
        async with closing(chunks) as playing:
            async for chunk in playing:
                if self._guard is not None:
                    self._guard.played(chunk, self.frames_read)
                yield chunk

    def finish(self) -> None:
        """End the capture at the next frame, keeping what was heard (the service is stopping).

        While idle, `next_utterance` returns an empty utterance without speech.
        A call before `next_utterance` starts counts too, so a stop is never lost.
        """
        self._stopping = True

    async def _read(self) -> bytes:
        self.reading = True
        try:
            frame = await self._mic.read()
        finally:
            self.reading = False
        self.last_frame_at = self._clock()
        self.frames_read += 1
        if self._front_end is not None:
            frame = self._front_end.process(frame)
        return self._canceller.process(frame)

    def _sound(self, earcon: Earcon) -> None:
        """Play an earcon without blocking the reads; the canceller keeps it out of what is heard.

        One at a time: a wake word inside the follow-up window does not chime twice.
        """
        if self._speaker is None or self._earcon is not None:
            return
        self._canceller.arm(
            earcon.frequencies, frames_for(earcon.audio.seconds * 1000 + self.settings.settle_ms)
        )
        self._earcon = asyncio.create_task(
            self._speaker.play(_one(earcon.audio), asyncio.Event()), name="earcon"
        )

    async def _earcon_played(self) -> None:
        """Let the earcon finish before anything else plays, reading the microphone meanwhile.

        (A simulated room's speaker advances with the microphone's frames.)
        """
        earcon, self._earcon = self._earcon, None
        if earcon is None:
            return
        try:
            while not earcon.done():
                reading = asyncio.ensure_future(self._read())
                await asyncio.wait({reading, earcon}, return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    reading.cancel()
                    with contextlib.suppress(asyncio.CancelledError, MicrophoneEnded):
                        await reading
                elif isinstance(reading.exception(), MicrophoneEnded):
                    break
        finally:
            if not earcon.done():
                earcon.cancel()
            (outcome,) = await asyncio.gather(earcon, return_exceptions=True)
            if isinstance(outcome, Exception):
                log.warning("earcon could not play: %s", outcome)

    def _finish(self, reason: EndReason) -> Utterance:
        self._stopping = False
        self._canceller.disarm()
        return self._endpointer.finish(reason, self._clock())

    def _pressed(self) -> bool:
        """Drain queued events: was the button pressed? (Idle ignores releases and holds.)"""
        if self._button is None:
            return False
        pressed = False
        while (event := self._button.pending()) is not None:
            pressed = pressed or event is ButtonEvent.PRESSED
        return pressed

    def _button_reason(self) -> EndReason | None:
        """Push-to-talk: release ends a capture once speech was heard; a long press before it cancels.

        The same rules hold in a voice capture (where speech is already heard),
        so pressing and releasing while talking is an "I'm done" gesture.
        """
        if self._button is None:
            return None
        while (event := self._button.pending()) is not None:
            if event is ButtonEvent.RELEASED and self._endpointer.heard_speech:
                return EndReason.RELEASED
            if event is ButtonEvent.HELD and not self._endpointer.heard_speech:
                return EndReason.CANCELLED
        return None


async def _one(audio: Audio) -> AsyncIterator[Audio]:
    yield audio


def build_listener(
    mic: Microphone,
    button: Button | None,
    settings: ListeningSettings,
    speaker: Speaker | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Listener:
    """The Listener `settings` ask for, with its wake word, speech judge and front end.

    A wake-word runtime that cannot load here is logged once, and the device
    falls back to the button (to speech onset when it has none): it still listens.
    """
    wake = None
    if settings.mode != "button" and settings.wake_word:
        try:
            wake = WakeWordDetector.from_settings(settings)
        except WakeWordError as exc:
            fallback = "button" if button is not None else "voice"
            log.error(
                "%s; listening falls back to %s",
                exc,
                "the button" if button is not None else "waking on any speech",
            )
            settings = settings.model_copy(update={"mode": fallback, "wake_word": ""})
    return Listener(
        mic,
        button,
        settings,
        wake=wake,
        front_end=NoiseAndGain.from_settings(settings),
        speaker=speaker,
        clock=clock,
    )
