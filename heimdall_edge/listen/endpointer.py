"""Endpointing: when an utterance starts and when it ends.

The microphone delivers 30 ms frames; a speech judge (vad.py) says "speech" or
"not speech" for each one. The Endpointer turns that stream of yes/no into one
utterance: pre-roll before the trigger, a minimum amount of speech before
anything counts, a silence hang-over that ends the utterance, and hard limits.
Time is counted in frames, never read from a clock, so the same audio always
gives the same cut and the tests are exact. The Listener wires it to a
Microphone, a Button and the wake word.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from heimdall_edge.audio import FRAME_MS, SAMPLE_RATE, Audio
from heimdall_edge.capture import Trigger
from heimdall_edge.listen.vad import ScriptedJudge, SpeechJudge, make_judge
from heimdall_edge.settings import ListeningSettings


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
    """Offset in `audio` where the last speech ended (the judge's own tail taken
    off once it fell silent); None without speech. Start of the end-of-speech ->
    first-reply-audio latency."""
    ended_at: float
    """time.monotonic() when the capture ended."""
    min_speech_ms: int
    """The threshold `has_speech` compares against (from ListeningSettings)."""

    @property
    def has_speech(self) -> bool:
        return self.speech_ms >= self.min_speech_ms


ONSET_LOOKBACK_MS = 1200
"""How far back before a confirmed onset the capture may reach, to where the judge began hearing it."""


def _frames_at_least(ms: int) -> int:
    """Frames covering at least `ms`: waits (silence, timeouts) never end early."""
    return -(-ms // FRAME_MS)


class Endpointer:
    """A frame-by-frame state machine: idle (watching for voice) or capturing.

    Idle: `idle_feed` each frame when speech onset can trigger (it keeps the
    pre-roll ring and returns True at voice onset), or `remember` it when only
    a press or the wake word can (no judging, so Silero stays asleep).
    `start(trigger)` opens a capture, `feed` each frame until it returns an
    EndReason (or the caller decides one), then `finish` builds the Utterance
    and goes back to idle.

    Speech counts only once `min_speech_ms` of speech frames fall within a short
    window (min speech plus half again, e.g. 8 of the last 12 frames): a click
    or a knock of a frame or three never wakes the device or makes a capture
    count as speech, while the unvoiced gaps inside real words do not reset the
    count. Once speech is heard, any speech frame restarts the hang-over: a
    click after the last word costs latency, but a word is never cut short.

    Defaults (ListeningSettings) and why:
    - pre_roll_ms 300: a VAD notices speech a frame or two late and soft
      onsets ("h", "f") score as noise; 300 ms keeps the first syllable.
    - min_speech_ms 240: shorter than the shortest command word ("yes", "stop")
      but longer than a click, a tap on the case or webrtcvad's start-up blip.
    - silence_ms 700: Home Assistant's default; long enough for the pause
      between phrases of one sentence (the longest in the test recordings,
      JFK's, is about 0.6 s), short enough that the reply does not feel late.
      Counted from the real end of speech: the judge's own tail is taken off.
    - max_ms 15000: Home Assistant's limit; a command is a sentence, and a
      stuck VAD (a fan, a TV) must not record forever.
    - no_speech_timeout_ms 5000: time to think after pressing the button or
      saying the wake word.
    """

    def __init__(
        self,
        settings: ListeningSettings | None = None,
        is_speech: SpeechJudge | Callable[[bytes], bool] | None = None,
    ) -> None:
        """`is_speech`: a SpeechJudge, or a plain function taken at its word; unset: `listening.vad`'s."""
        settings = settings or ListeningSettings()
        if is_speech is None:
            is_speech = make_judge(settings)
        elif not hasattr(is_speech, "reset"):
            is_speech = ScriptedJudge(is_speech)
        self.judge: SpeechJudge = is_speech  # type: ignore[assignment]
        self._tail = self.judge.tail_frames
        self._min_speech_ms = settings.min_speech_ms
        self._pre_roll = _frames_at_least(settings.pre_roll_ms)
        self._min_speech = max(1, _frames_at_least(settings.min_speech_ms))
        self._silence = max(1, _frames_at_least(settings.silence_ms) - self._tail)
        self._pause = (
            max(1, _frames_at_least(settings.speculate_after_ms) - self._tail)
            if 0 < settings.speculate_after_ms < settings.silence_ms
            else None
        )
        self._max = settings.max_ms // FRAME_MS  # a limit: never longer than max_ms
        self._no_speech = _frames_at_least(settings.no_speech_timeout_ms)
        window = self._min_speech + self._min_speech // 2
        # Idle ring: the onset window, and pre-roll before where the judge began hearing it.
        self._ring: deque[tuple[bytes, bool, bool]] = deque(
            maxlen=self._pre_roll + window + _frames_at_least(ONSET_LOOKBACK_MS)
        )
        self._window: deque[bool] = deque(maxlen=window)
        self.reset()

    def reset(self) -> None:
        """Back to idle with an empty pre-roll (the old one is stale)."""
        self._ring.clear()
        self._window.clear()
        self.judge.reset()
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

    @property
    def frames_captured(self) -> int:
        """Frames in the capture so far, pre-roll included."""
        return len(self._frames)

    @property
    def paused(self) -> bool:
        """Speech was heard and has stopped for `speculate_after_ms` (counted like the
        hang-over, the judge's own tail taken off): time to start answering speculatively."""
        return self._pause is not None and self._heard and self._since_speech >= self._pause

    def audio(self) -> Audio:
        """The capture so far, pre-roll included: what a speculation hears."""
        return Audio(b"".join(self._frames), SAMPLE_RATE)

    def idle_feed(self, frame: bytes) -> bool:
        """Keep `frame` in the pre-roll ring; True while speech is confirmed (voice onset)."""
        speech = self.judge(frame)
        self._ring.append((frame, speech, self.judge.hearing))
        self._window.append(speech)
        return sum(self._window) >= self._min_speech

    def remember(self, frame: bytes) -> None:
        """Keep `frame` in the pre-roll ring without judging it (only a press or the wake word can start a capture)."""
        self._ring.append((frame, False, False))
        self._window.clear()

    def start(self, trigger: Trigger) -> None:
        """Open a capture.

        "voice" and "follow_up" (speech onset): the speech that made the onset
        is kept and already counts, and pre-roll is taken from before its first
        speech frame, or from before where the judge began hearing the sound that
        turned out to be speech. "button": the pre-roll is the last pre_roll_ms before the
        press. "wake_word": no pre-roll, since what came before is the wake
        phrase itself and must not reach the transcript. After a press or the
        wake word speech is counted afresh, so what came before does not end
        the capture.
        """
        ring = list(self._ring)
        if trigger in ("voice", "follow_up"):
            onset = len(ring) - len(self._window)
            first = next((i for i in range(onset, len(ring)) if ring[i][1]), len(ring))
            while first > 0 and ring[first - 1][2]:
                first -= 1
            kept = ring[max(0, first - self._pre_roll) :]
            speech_at = [i for i, (_, speech, _) in enumerate(kept) if speech]
            if speech_at:
                self._last_speech = speech_at[-1]
                self._since_speech = len(kept) - 1 - speech_at[-1]
        else:
            kept = [] if trigger == "wake_word" else ring[max(0, len(ring) - self._pre_roll) :]
            self._window.clear()
            self.judge.reset([frame for frame, _, _ in ring])  # context: the audio just before
        self._capturing = True
        self._trigger = trigger
        self._frames = [frame for frame, _, _ in kept]
        self._started = len(kept)
        self._confirm()

    def feed(self, frame: bytes) -> EndReason | None:
        """Add one frame to the capture; the reason to stop now, or None."""
        speech = self.judge(frame)
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
            last -= min(self._tail, self._since_speech)  # the VAD's own hang-over was not speech
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
