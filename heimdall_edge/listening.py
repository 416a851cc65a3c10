"""Endpointing: when an utterance starts and when it ends.

The microphone delivers 30 ms frames; webrtcvad says "speech" or "not speech"
for each one. The Endpointer turns that stream of yes/no into one utterance:
pre-roll before the trigger, a minimum amount of speech before anything counts,
a silence hang-over that ends the utterance, and hard limits. Time is counted
in frames, never read from a clock, so the same audio always gives the same cut
and the tests are exact. The Listener wires it to a Microphone and a Button.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from heimdall_edge.audio import FRAME_MS, SAMPLE_RATE, Audio
from heimdall_edge.devices.base import Button, ButtonEvent, Microphone, MicrophoneEnded
from heimdall_edge.settings import ListeningSettings

Trigger = Literal["button", "voice"]


class EndReason(enum.Enum):
    SILENCE = "silence"  # speech, then silence_ms of silence (the hang-over)
    RELEASED = "released"  # button released after speech was heard
    MAX_LENGTH = "max_length"  # max_ms of audio
    NO_SPEECH = "no_speech"  # nobody spoke within no_speech_timeout_ms of the trigger
    CANCELLED = "cancelled"  # long press before any speech
    MIC_ENDED = "mic_ended"  # a finite source ran out; what was heard is kept
    STOPPED = "stopped"  # Listener.finish(): the service is stopping; what was heard is kept


@dataclass(frozen=True)
class Utterance:
    audio: Audio
    """16 kHz mono PCM, pre-roll included."""
    trigger: Trigger
    reason: EndReason
    speech_ms: int
    """Speech frames heard (counted once the minimum speech was reached), in ms."""
    speech_end_ms: int | None
    """Offset in `audio` where the last speech ended (webrtcvad's own tail taken
    off once it fell silent); None without speech. Start of the end-of-speech ->
    first-reply-audio latency."""
    ended_at: float
    """time.monotonic() when the capture ended."""
    min_speech_ms: int
    """The threshold `has_speech` compares against (from ListeningSettings)."""

    @property
    def has_speech(self) -> bool:
        return self.speech_ms >= self.min_speech_ms


def _frames_at_least(ms: int) -> int:
    """Frames covering at least `ms`: waits (silence, timeouts) never end early."""
    return -(-ms // FRAME_MS)


# webrtcvad keeps saying "speech" for a few frames after speech stops (its own
# hang-over, kOverHangMax2 in vad_core.c): with 30 ms frames, 5 frames in modes
# 0-1 and 3 in modes 2-3. The Endpointer takes them off its own hang-over.
WEBRTC_TAIL_FRAMES = (5, 5, 3, 3)


def webrtc_vad(aggressiveness: int) -> Callable[[bytes], bool]:
    """webrtcvad's speech/non-speech decision for one 30 ms frame at 16 kHz."""
    import webrtcvad

    vad = webrtcvad.Vad(aggressiveness)
    return lambda frame: vad.is_speech(frame, SAMPLE_RATE)


class Endpointer:
    """A frame-by-frame state machine: idle (watching for voice) or capturing.

    Idle: `idle_feed` each frame; it keeps the pre-roll ring and returns True at
    voice onset. `start(trigger)` opens a capture, `feed` each frame until it
    returns an EndReason (or the caller decides one), then `finish` builds the
    Utterance and goes back to idle.

    Speech counts only once `min_speech_ms` of speech frames fall within a short
    window (min speech plus half again, e.g. 8 of the last 12 frames): a click
    or a knock of a frame or three never wakes the device or makes a capture
    count as speech, while the unvoiced gaps inside real words do not reset the
    count. Once speech is heard, any speech frame restarts the hang-over: a
    click after the last word costs latency, but a word is never cut short.

    Defaults (ListeningSettings) and why:
    - pre_roll_ms 300: webrtcvad notices speech a frame or two late and soft
      onsets ("h", "f") score as noise; 300 ms keeps the first syllable.
    - min_speech_ms 240: shorter than the shortest command word ("yes", "stop")
      but longer than a click, a tap on the case or webrtcvad's start-up blip.
    - silence_ms 700: Home Assistant's default; long enough for the pause
      between phrases of one sentence (the longest in the test recordings,
      JFK's, is about 0.6 s), short enough that the reply does not feel late.
      Counted from the real end of speech: webrtcvad's own tail is taken off.
    - max_ms 15000: Home Assistant's limit; a command is a sentence, and a
      stuck VAD (a fan, a TV) must not record forever.
    - no_speech_timeout_ms 5000: time to think after pressing the button.
    """

    def __init__(
        self,
        settings: ListeningSettings | None = None,
        is_speech: Callable[[bytes], bool] | None = None,
    ) -> None:
        settings = settings or ListeningSettings()
        if is_speech is None:
            is_speech = webrtc_vad(settings.vad_aggressiveness)
            self._tail = WEBRTC_TAIL_FRAMES[settings.vad_aggressiveness]
        else:
            self._tail = 0  # a given is_speech is taken at its word
        self._is_speech = is_speech
        self._min_speech_ms = settings.min_speech_ms
        self._pre_roll = _frames_at_least(settings.pre_roll_ms)
        self._min_speech = max(1, _frames_at_least(settings.min_speech_ms))
        self._silence = max(1, _frames_at_least(settings.silence_ms) - self._tail)
        self._max = settings.max_ms // FRAME_MS  # a limit: never longer than max_ms
        self._no_speech = _frames_at_least(settings.no_speech_timeout_ms)
        window = self._min_speech + self._min_speech // 2
        # Idle ring: the onset window plus pre-roll before its first speech frame.
        self._ring: deque[tuple[bytes, bool]] = deque(maxlen=self._pre_roll + window)
        self._window: deque[bool] = deque(maxlen=window)
        self.reset()

    def reset(self) -> None:
        """Back to idle with an empty pre-roll (the old one is stale)."""
        self._ring.clear()
        self._window.clear()
        self._capturing = False
        self._trigger: Trigger = "button"
        self._frames: list[bytes] = []
        self._started = 0  # frames of pre-roll before the trigger
        self._heard = False
        self._speech_frames = 0
        self._last_speech: int | None = None
        self._since_speech = 0

    @property
    def capturing(self) -> bool:
        return self._capturing

    @property
    def heard_speech(self) -> bool:
        """Whether the minimum speech has been reached in this capture."""
        return self._heard

    def idle_feed(self, frame: bytes) -> bool:
        """Keep `frame` in the pre-roll ring; True while speech is confirmed (voice onset)."""
        speech = self._is_speech(frame)
        self._ring.append((frame, speech))
        self._window.append(speech)
        return sum(self._window) >= self._min_speech

    def start(self, trigger: Trigger) -> None:
        """Open a capture with the pre-roll.

        "voice": the speech that made the onset is kept and already counts, and
        pre-roll is taken from before its first speech frame. "button": the
        pre-roll is the last pre_roll_ms before the press, and speech is counted
        afresh from the press, so talk before the press does not end the capture.
        """
        ring = list(self._ring)
        if trigger == "voice":
            onset = len(ring) - len(self._window)
            first = next((i for i in range(onset, len(ring)) if ring[i][1]), len(ring))
            kept = ring[max(0, first - self._pre_roll) :]
            speech_at = [i for i, (_, speech) in enumerate(kept) if speech]
            if speech_at:
                self._last_speech = speech_at[-1]
                self._since_speech = len(kept) - 1 - speech_at[-1]
        else:
            kept = ring[max(0, len(ring) - self._pre_roll) :]
            self._window.clear()
        self._capturing = True
        self._trigger = trigger
        self._frames = [frame for frame, _ in kept]
        self._started = len(kept)
        self._confirm()

    def feed(self, frame: bytes) -> EndReason | None:
        """Add one frame to the capture; the reason to stop now, or None."""
        speech = self._is_speech(frame)
        self._frames.append(frame)
        self._window.append(speech)
        if speech:
            self._last_speech = len(self._frames) - 1
            self._since_speech = 0
            if self._heard:
                self._speech_frames += 1
        else:
            self._since_speech += 1
        self._confirm()
        if self._heard and self._since_speech >= self._silence:
            return EndReason.SILENCE
        if len(self._frames) >= self._max:
            return EndReason.MAX_LENGTH
        if not self._heard and len(self._frames) - self._started >= self._no_speech:
            return EndReason.NO_SPEECH
        return None

    def finish(self, reason: EndReason, ended_at: float) -> Utterance:
        """The capture so far as an Utterance; back to idle."""
        last = self._last_speech if self._heard else None
        if last is not None and self._since_speech:
            last -= self._tail  # the VAD's own hang-over was not speech
        utterance = Utterance(
            audio=Audio(b"".join(self._frames), SAMPLE_RATE),
            trigger=self._trigger,
            reason=reason,
            speech_ms=self._speech_frames * FRAME_MS,
            speech_end_ms=None if last is None else (last + 1) * FRAME_MS,
            ended_at=ended_at,
            min_speech_ms=self._min_speech_ms,
        )
        self.reset()
        return utterance

    def _confirm(self) -> None:
        """Speech counts from the moment the window holds the minimum: its frames count too."""
        if not self._heard and sum(self._window) >= self._min_speech:
            self._heard = True
            self._speech_frames = sum(self._window)


class Listener:
    """Waits for a trigger, then records one utterance from the microphone.

    Triggers: a button press (mode "button" or "both") or voice onset (mode
    "voice" or "both"). Push-to-talk rules for a button capture: it starts at
    the press; a release ends it only once speech has been heard, so both
    "tap, then speak" (the endpointer ends it) and "hold while talking" (the
    release ends it) work; a long press (HELD) before any speech cancels it.
    Button events are polled between frames with `pending()`, never awaited,
    because a frame is due every 30 ms. Queued presses and buffered audio from
    while the device was busy are the caller's to drop (button.clear(),
    mic.flush()) before calling `next_utterance`.
    """

    def __init__(
        self,
        mic: Microphone,
        button: Button | None = None,
        settings: ListeningSettings | None = None,
        *,
        is_speech: Callable[[bytes], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        settings = settings or ListeningSettings()
        if settings.mode == "button" and button is None:
            raise ValueError('listening mode "button" needs a button; use mode "voice" without one')
        self.mode = settings.mode
        self._mic = mic
        # Without a button, "both" is simply voice.
        self._button = button if settings.mode != "voice" else None
        self._endpointer = Endpointer(settings, is_speech)
        self._clock = clock
        self._stopping = False

    async def next_utterance(self, on_start: Callable[[], None] | None = None) -> Utterance:
        """Wait for a trigger and record until an EndReason.

        `on_start` is called as the capture starts (light the LED, start the
        camera while the person speaks). Raises MicrophoneEnded if a finite
        source runs out before a trigger.
        """
        endpointer = self._endpointer
        endpointer.reset()
        while not endpointer.capturing:
            if self._stopping:
                return self._finish(EndReason.STOPPED)
            frame = await self._mic.read()
            onset = endpointer.idle_feed(frame)
            if self._pressed():
                endpointer.start("button")
            elif onset and self.mode != "button":
                endpointer.start("voice")
        if on_start is not None:
            on_start()
        while not self._stopping:
            try:
                frame = await self._mic.read()
            except MicrophoneEnded:
                return self._finish(EndReason.MIC_ENDED)
            reason = endpointer.feed(frame) or self._button_reason()
            if reason is not None:
                return self._finish(reason)
        return self._finish(EndReason.STOPPED)

    def finish(self) -> None:
        """End the capture at the next frame, keeping what was heard (the service is stopping).

        While idle, `next_utterance` returns an empty utterance without speech.
        A call before `next_utterance` starts counts too, so a stop is never lost.
        """
        self._stopping = True

    def _finish(self, reason: EndReason) -> Utterance:
        self._stopping = False
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
