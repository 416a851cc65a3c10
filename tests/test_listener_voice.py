"""The Listener's voice paths, frame by frame: wake word, follow-up window, listening while
speaking (barge-in, its own voice, the settle time).

Scripted frames carry their index and what is in them ('#' speech, '.' silence, 'W' the
last frame of a wake phrase), and scripted detectors read it back, so every assertion is an
exact frame count. The real models are exercised in test_wake_word.py.
"""

from __future__ import annotations

import asyncio

import pytest

from heimdall_edge.audio import FRAME_BYTES, SAMPLE_RATE, Audio, frames
from heimdall_edge.devices.base import ButtonEvent, MicrophoneEnded
from heimdall_edge.listen.endpointer import EndReason, Utterance
from heimdall_edge.listen.listener import Listener, frames_for
from heimdall_edge.listen.playback import ListeningSpeaker
from heimdall_edge.listen.wakeword import WakeModel
from heimdall_edge.settings import ListeningSettings

TIMEOUT = 10.0
SETTLE = frames_for(ListeningSettings().settle_ms)  # 14 frames
HANG_OVER = 24
NO_SPEECH = 167
FOLLOW_UP = frames_for(ListeningSettings().follow_up_s * 1000)  # 167 frames


def script(pattern: str, start: int = 0) -> list[bytes]:
    kinds = {"#": 1, ".": 0, "W": 2}
    return [
        bytes([kinds[c]]) + (start + i).to_bytes(4, "little") + bytes(FRAME_BYTES - 5)
        for i, c in enumerate(pattern)
    ]


def indices(utterance: Utterance) -> list[int]:
    return [int.from_bytes(f[1:5], "little") for f in frames(utterance.audio.pcm)]


class ScriptedWake:
    """Fires on frames marked 'W'; its twin (for the speaker's stream) does too."""

    model = WakeModel(name="scripted", phrase="Hey Scripted", cutoff=0.5, own_cutoff=0.5)

    def feed(self, frame: bytes) -> bool:
        return frame[0] == 2

    def twin(self, cutoff: float) -> ScriptedWake:
        return ScriptedWake()


class Mic:
    name = "scripted"

    def __init__(self, stream: list[bytes]) -> None:
        self.stream = stream
        self.delivered = 0
        self.flushes = 0

    async def read(self) -> bytes:
        await asyncio.sleep(0)
        if self.delivered == len(self.stream):
            raise MicrophoneEnded("scripted microphone: no more frames")
        self.delivered += 1
        return self.stream[self.delivered - 1]

    def flush(self) -> None:
        self.flushes += 1

    async def aclose(self) -> None:
        pass


class Button:
    """Presses scheduled at microphone frames (pending once the frame before was read)."""

    def __init__(self, mic: Mic, presses: list[int]) -> None:
        self._mic, self._presses = mic, sorted(presses)
        self.is_pressed = False

    def pending(self) -> ButtonEvent | None:
        if self._presses and self._presses[0] <= self._mic.delivered:
            self._presses.pop(0)
            return ButtonEvent.PRESSED
        return None

    async def next_event(self) -> ButtonEvent:
        raise AssertionError("polled, never awaited")

    def clear(self) -> None:
        pass

    def close(self) -> None:
        pass


class PacedSpeaker:
    """Plays a chunk per microphone frame it waits for: playback takes frames, as in a room."""

    def __init__(self, mic: Mic) -> None:
        self._mic = mic
        self.started_at: int | None = None
        self.frames_played = 0

    async def play(self, chunks, stop: asyncio.Event):
        from heimdall_edge.devices.base import Playback

        playback = Playback()
        self.started_at = self._mic.delivered
        async for chunk in chunks:
            for _ in range(len(chunk.pcm) // FRAME_BYTES):
                if stop.is_set():
                    playback.interrupted = True
                    return playback
                target = self.started_at + self.frames_played + 1
                while self._mic.delivered < target and self._mic.delivered < len(self._mic.stream):
                    await asyncio.sleep(0)
                self.frames_played += 1
                playback.seconds += 0.03
        return playback

    async def aclose(self) -> None:
        pass


def scripted_listener(
    pattern: str,
    *,
    mode: str = "voice",
    wake: bool = True,
    presses: list[int] | None = None,
    **settings: object,
) -> tuple[Listener, Mic]:
    mic = Mic(script(pattern))
    button = Button(mic, presses) if presses is not None else None
    listening = ListeningSettings(mode=mode, wake_sound=False, **settings)  # type: ignore[arg-type]
    listener = Listener(
        mic,
        button,
        listening,
        is_speech=lambda frame: frame[0] >= 1,
        wake=ScriptedWake() if wake else None,
        clock=lambda: 7.0,
    )
    return listener, mic


async def within(coro):
    return await asyncio.wait_for(coro, TIMEOUT)


# --- the wake word ----------------------------------------------------------------------------


async def test_the_capture_starts_right_after_the_wake_phrase() -> None:
    listener, _ = scripted_listener("." * 20 + "#####W" + "#" * 30 + "." * 40)
    utterance = await within(listener.next_utterance())
    assert utterance.trigger == "wake_word" and utterance.reason is EndReason.SILENCE
    assert indices(utterance) == list(range(26, 56 + HANG_OVER))  # nothing of the phrase


async def test_a_pause_after_the_wake_word_is_waited_out_up_to_the_no_speech_timeout() -> None:
    pause = NO_SPEECH - 20
    listener, _ = scripted_listener("W" + "." * pause + "#" * 20 + "." * 40)
    utterance = await within(listener.next_utterance())
    assert utterance.reason is EndReason.SILENCE and utterance.has_speech
    assert indices(utterance)[0] == 1 and indices(utterance)[-1] == pause + 20 + HANG_OVER

    listener, _ = scripted_listener("W" + "." * 300)
    utterance = await within(listener.next_utterance())
    assert utterance.reason is EndReason.NO_SPEECH and not utterance.has_speech
    assert len(indices(utterance)) == NO_SPEECH


async def test_with_a_wake_word_speech_alone_never_starts_a_capture() -> None:
    listener, mic = scripted_listener("." * 10 + "#" * 200 + "." * 40)
    with pytest.raises(MicrophoneEnded):
        await within(listener.next_utterance())
    assert mic.delivered == 250


async def test_without_a_wake_word_speech_onset_is_the_trigger() -> None:
    listener, _ = scripted_listener("." * 20 + "#" * 30 + "." * 40, wake=False)
    utterance = await within(listener.next_utterance())
    assert utterance.trigger == "voice"


async def test_button_mode_ignores_the_wake_word() -> None:
    listener, mic = scripted_listener("W" + "#" * 30 + "." * 40, mode="button", presses=[])
    assert listener.wake_word is None
    with pytest.raises(MicrophoneEnded):
        await within(listener.next_utterance())
    assert mic.delivered == 71


async def test_mode_both_takes_the_wake_word_and_the_button() -> None:
    pattern = "W" + "#" * 20 + "." * 30 + "." * 10 + "#" * 20 + "." * 30
    listener, _ = scripted_listener(pattern, mode="both", presses=[75])
    first = await within(listener.next_utterance())
    second = await within(listener.next_utterance())
    assert (first.trigger, second.trigger) == ("wake_word", "button")
    assert indices(second)[:10] == list(range(65, 75))  # a press keeps its pre-roll


# --- the follow-up window ---------------------------------------------------------------------


async def test_in_the_follow_up_window_speech_alone_starts_the_capture() -> None:
    listener, _ = scripted_listener("." * 40 + "#" * 30 + "." * 40)
    utterance = await within(listener.next_utterance(follow_up_s=5.0))
    assert utterance is not None and utterance.trigger == "follow_up"
    assert indices(utterance) == list(range(30, 70 + HANG_OVER))  # with its pre-roll


async def test_the_follow_up_window_closes_after_exactly_follow_up_s() -> None:
    listener, mic = scripted_listener("." * (FOLLOW_UP + 100))
    assert await within(listener.next_utterance(follow_up_s=5.0)) is None
    assert mic.delivered == FOLLOW_UP
    # Closed: speech alone no longer wakes it, the wake word does.
    listener, mic = scripted_listener("." * FOLLOW_UP + "#" * 30 + "W" + "#" * 20 + "." * 40)
    assert await within(listener.next_utterance(follow_up_s=5.0)) is None
    utterance = await within(listener.next_utterance())
    assert utterance.trigger == "wake_word" and indices(utterance)[0] == FOLLOW_UP + 31


async def test_the_wake_word_also_works_inside_the_follow_up_window() -> None:
    listener, _ = scripted_listener("..W" + "#" * 20 + "." * 40)
    utterance = await within(listener.next_utterance(follow_up_s=5.0))
    assert utterance is not None and utterance.trigger == "wake_word"
    assert indices(utterance)[0] == 3


# --- while the device speaks ------------------------------------------------------------------


def played(pattern: str) -> Audio:
    """What the device says, as frames the scripted twin can read ('W': it says the wake word)."""
    return Audio(b"".join(script(pattern, start=10_000)), SAMPLE_RATE)


async def speak(listener: Listener, mic: Mic, reply: Audio) -> tuple[bool, PacedSpeaker]:
    """Play `reply` through a ListeningSpeaker; True if it was stopped."""
    speaker = PacedSpeaker(mic)

    async def chunks():
        yield reply

    stop = asyncio.Event()
    await within(ListeningSpeaker(speaker, listener).play(chunks(), stop))
    return stop.is_set(), speaker


async def test_the_wake_word_while_speaking_stops_playback_and_starts_the_capture() -> None:
    pattern = "." * 30 + "###W" + "#" * 20 + "." * 60
    listener, mic = scripted_listener(pattern)
    stopped, speaker = await speak(listener, mic, played("." * 100))
    assert stopped and listener.barged_in
    assert mic.delivered == 34  # the read that heard it was the last
    assert speaker.frames_played < 40
    utterance = await within(listener.next_utterance())
    assert utterance.trigger == "wake_word" and not listener.barged_in
    assert indices(utterance)[0] == 34  # straight after the phrase, none of the playback


async def test_its_own_voice_saying_the_wake_word_is_ignored() -> None:
    # The mic hears the reply's wake word at the frame the reply says it (and a frame late).
    listener, mic = scripted_listener("." * 40 + "W" + "." * 80)
    stopped, _ = await speak(listener, mic, played("." * 40 + "W" + "." * 20))
    assert not stopped and not listener.barged_in
    # A person saying it later, after the margin around the reply's own, is heard.
    listener, mic = scripted_listener("." * 40 + "W" + "." * 40 + "W" + "#" * 20 + "." * 40)
    stopped, _ = await speak(listener, mic, played("." * 40 + "W" + "." * 60))
    assert stopped and mic.delivered == 82


async def test_after_playback_it_listens_on_for_the_settle_time_and_keeps_none_of_it() -> None:
    reply = 50
    pattern = "." * reply + "#" * SETTLE + "." * 10 + "." * 40
    listener, mic = scripted_listener(
        pattern, wake=False, presses=[reply + SETTLE + 3], mode="both"
    )
    await speak(listener, mic, played("#" * reply))
    assert mic.delivered == reply + SETTLE  # the echo's tail was read, and dropped
    assert mic.flushes == 1  # what was queued before playback (thinking time) is stale
    utterance = await within(listener.next_utterance())
    assert utterance.trigger == "button"
    assert indices(utterance)[0] >= reply + SETTLE  # no pre-roll from the playback or its tail


async def test_the_plain_onset_trigger_never_hears_its_own_voice() -> None:
    reply = 60
    # The device's voice and its tail are speech to any VAD; then silence, then a person.
    pattern = "#" * (reply + SETTLE) + "." * 30 + "#" * 20 + "." * 40
    listener, mic = scripted_listener(pattern, wake=False)
    await speak(listener, mic, played("#" * reply))
    utterance = await within(listener.next_utterance())
    assert utterance.trigger == "voice"
    assert indices(utterance)[0] >= reply + SETTLE  # the person, not the reply


async def test_when_the_service_stops_the_settle_time_is_skipped() -> None:
    listener, mic = scripted_listener("." * 500)
    listener.finish()
    stopped, _ = await speak(listener, mic, played("." * 20))
    assert not stopped and mic.delivered == 21  # the read already waiting completes; no settle
