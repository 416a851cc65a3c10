"""The endpointer and the listener: exact frame counts, real recordings, push-to-talk.

Time is counted in frames, so nothing here sleeps. Scripted frames carry their
own index and a speech flag, so a test can say exactly which frames an
utterance holds.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from heimdall_edge.audio import (
    FRAME_BYTES,
    FRAME_MS,
    SAMPLE_RATE,
    frames,
    noise,
    read_audio,
    silence,
)
from heimdall_edge.capture import Trigger
from heimdall_edge.devices.base import ButtonEvent, MicrophoneEnded
from heimdall_edge.listen.endpointer import Endpointer, EndReason, Utterance
from heimdall_edge.listen.listener import Listener
from heimdall_edge.settings import ListeningSettings

SETTINGS = ListeningSettings()
PRE_ROLL = 10  # 300 ms
MIN_SPEECH = 8  # 240 ms
HANG_OVER = 24  # ceil(700 / 30): at least 700 ms
MAX_FRAMES = 500  # 15 s
NO_SPEECH = 167  # ceil(5000 / 30)
TIMEOUT = 5.0


# --- scripted frames -------------------------------------------------------


def script(pattern: str) -> list[bytes]:
    """One frame per character: '#' speech, '.' silence; each frame carries its index."""
    return [
        bytes([c == "#"]) + i.to_bytes(4, "little") + bytes(FRAME_BYTES - 5)
        for i, c in enumerate(pattern)
    ]


def scripted_speech(frame: bytes) -> bool:
    return frame[0] == 1


def indices(utterance: Utterance) -> list[int]:
    return [int.from_bytes(f[1:5], "little") for f in frames(utterance.audio.pcm)]


def run(
    endpointer: Endpointer, stream: list[bytes], trigger: Trigger, press_at: int = 0
) -> tuple[Utterance, int]:
    """Feed `stream` idle until the trigger (voice onset, or the press before frame
    `press_at`), then capture until an EndReason. Returns the utterance and the
    number of frames consumed."""
    position = 0
    if trigger == "button" and press_at == 0:
        endpointer.start("button")
    while not endpointer.capturing:
        assert position < len(stream), "the trigger never came"
        onset = endpointer.idle_feed(stream[position])
        position += 1
        if (trigger == "voice" and onset) or (trigger == "button" and position == press_at):
            endpointer.start(trigger)
    reason = None
    while reason is None and position < len(stream):
        reason = endpointer.feed(stream[position])
        position += 1
    return endpointer.finish(reason or EndReason.MIC_ENDED, ended_at=0.0), position


def scripted(settings: ListeningSettings = SETTINGS) -> Endpointer:
    return Endpointer(settings, is_speech=scripted_speech)


# --- Endpointer, exact frame counts ---------------------------------------


def test_hang_over_ends_exactly_silence_ms_after_the_last_speech_frame() -> None:
    utterance, used = run(scripted(), script("." * 20 + "#" * 20 + "." * 60), "button", press_at=20)
    assert utterance.reason is EndReason.SILENCE
    assert indices(utterance) == list(range(10, 40 + HANG_OVER))
    assert used == 40 + HANG_OVER
    assert utterance.speech_ms == 20 * FRAME_MS
    assert utterance.speech_end_ms == 30 * FRAME_MS  # 10 frames of pre-roll, then 20 of speech
    assert utterance.audio.seconds * 1000 - utterance.speech_end_ms == HANG_OVER * FRAME_MS
    assert utterance.has_speech and utterance.trigger == "button"
    assert utterance.audio.sample_rate == SAMPLE_RATE


def test_a_pause_one_frame_shorter_than_the_hang_over_does_not_end_the_utterance() -> None:
    pattern = "#" * 10 + "." * (HANG_OVER - 1) + "#" * 10 + "." * 40
    utterance, used = run(scripted(), script(pattern), "button")
    assert utterance.reason is EndReason.SILENCE
    assert used == 10 + HANG_OVER - 1 + 10 + HANG_OVER
    assert utterance.speech_ms == 20 * FRAME_MS


def test_max_length_counts_the_pre_roll() -> None:
    utterance, used = run(scripted(), script("." * 20 + "#" * 600), "button", press_at=20)
    assert utterance.reason is EndReason.MAX_LENGTH
    assert len(indices(utterance)) == MAX_FRAMES
    assert utterance.audio.seconds == 15.0
    assert used == 20 + MAX_FRAMES - PRE_ROLL


def test_no_speech_timeout_after_a_button_press() -> None:
    utterance, used = run(scripted(), script("." * 300), "button")
    assert utterance.reason is EndReason.NO_SPEECH
    assert used == NO_SPEECH
    assert not utterance.has_speech
    assert utterance.speech_ms == 0 and utterance.speech_end_ms is None


def test_a_90_ms_click_is_not_speech() -> None:
    stream = script("." * 20 + "###" + "." * 300)
    endpointer = scripted()
    assert not any(endpointer.idle_feed(frame) for frame in stream)  # no voice wake
    utterance, _ = run(scripted(), stream, "button")  # nor does it count in a capture
    assert utterance.reason is EndReason.NO_SPEECH
    assert utterance.speech_ms == 0


def test_voice_onset_needs_min_speech_within_the_window() -> None:
    onsets = [scripted().idle_feed(f) for f in script("#" * (MIN_SPEECH - 1))]
    assert not any(onsets)
    endpointer = scripted()
    onsets = [endpointer.idle_feed(f) for f in script("#" * MIN_SPEECH)]
    assert onsets == [False] * (MIN_SPEECH - 1) + [True]
    # Unvoiced gaps inside a word do not reset the count: 8 speech frames in 12.
    endpointer = scripted()
    onsets = [endpointer.idle_feed(f) for f in script("##.##.##.##")]
    assert onsets.index(True) == 10
    # Spread thinner than that, it is not speech.
    endpointer = scripted()
    assert not any(endpointer.idle_feed(f) for f in script("#.#." * 20))


def test_voice_pre_roll_starts_pre_roll_ms_before_the_first_speech_frame() -> None:
    utterance, _ = run(scripted(), script("." * 50 + "#" * 30 + "." * 40), "voice")
    assert utterance.trigger == "voice" and utterance.reason is EndReason.SILENCE
    assert indices(utterance)[0] == 50 - PRE_ROLL
    assert indices(utterance)[-1] == 79 + HANG_OVER
    assert utterance.speech_ms == 30 * FRAME_MS  # the onset's own frames count


def test_voice_pre_roll_reaches_back_past_a_gappy_onset() -> None:
    utterance, _ = run(scripted(), script("." * 50 + "##.##.##.##" + "#" * 20 + "." * 40), "voice")
    assert indices(utterance)[0] == 50 - PRE_ROLL


def test_button_pre_roll_is_the_last_pre_roll_ms_before_the_press() -> None:
    utterance, _ = run(scripted(), script("." * 50 + "#" * 20 + "." * 40), "button", press_at=50)
    assert indices(utterance)[:PRE_ROLL] == list(range(40, 50))
    utterance, _ = run(scripted(), script("." * 4 + "#" * 20 + "." * 40), "button", press_at=4)
    assert indices(utterance)[:4] == [0, 1, 2, 3]  # only what there was


def test_speech_before_the_press_does_not_count() -> None:
    utterance, used = run(scripted(), script("#" * 30 + "." * 300), "button", press_at=30)
    assert indices(utterance)[0] == 20  # the pre-roll holds speech ...
    assert utterance.reason is EndReason.NO_SPEECH  # ... but the count starts at the press
    assert used == 30 + NO_SPEECH


def test_finish_returns_to_idle_with_an_empty_pre_roll() -> None:
    endpointer = scripted()
    stream = script("." * 20 + "#" * 20 + "." * 40 + "." * 3 + "#" * 20 + "." * 30)
    first, used = run(endpointer, stream, "voice")
    assert not endpointer.capturing and not endpointer.heard_speech
    second, _ = run(endpointer, stream[used:], "button", press_at=3)
    assert indices(second)[:3] == [used, used + 1, used + 2]
    assert set(indices(first)).isdisjoint(indices(second))


def test_zero_length_settings_still_work() -> None:
    settings = ListeningSettings(pre_roll_ms=0, min_speech_ms=0, silence_ms=0)
    utterance, _ = run(scripted(settings), script("..#." + "." * 10), "voice")
    assert indices(utterance) == [2, 3]
    assert utterance.reason is EndReason.SILENCE


# --- real recordings -------------------------------------------------------

PAD_MS = 1500
ROOM_DBFS = -60.0
PRESS_AT = 1000 // FRAME_MS  # in the leading pad, before any speech
REPO = Path(__file__).resolve().parents[1]


def recording_names() -> list[str]:
    """transcripts.tsv, read at collection so that each recording is its own test.

    Without it, one placeholder test runs and the speech_dir fixture fails it,
    saying where it looked: a missing corpus is a failure, never a skip."""
    tsv = (
        Path(os.environ.get("HEIMDALL_SPEECH_DIR") or REPO.parent / "shared" / "speech")
        / "transcripts.tsv"
    )
    if not tsv.is_file():
        return ["<transcripts.tsv missing>"]
    return [line.split("\t", 1)[0] for line in tsv.read_text().splitlines() if line.strip()]


@functools.cache
def in_a_room(path: Path) -> bytes:
    """The recording with 1.5 s of silence before and after, over a -60 dBFS noise floor.

    The noise runs under the recording too, as a room's would: several
    recordings are digitally silent between words, and a floor that appears
    only in the padding is a step that webrtcvad hears as seconds of speech."""
    padded = np.frombuffer(silence(PAD_MS) + read_audio(path).pcm + silence(PAD_MS), np.int16)
    room = np.frombuffer(noise(len(padded) * 1000 // SAMPLE_RATE + 1, ROOM_DBFS, seed=7), np.int16)
    return (
        np.clip(padded.astype(np.int32) + room[: len(padded)], -32768, 32767)
        .astype(np.int16)
        .tobytes()
    )


def _word_windows(path: Path) -> np.ndarray:
    """Indices of the 10 ms windows that belong to words, by energy alone (no VAD).

    Levels are in dB below the loudest window. A word needs at least 30 ms above
    max(-40 dB, the recording's noise + 10 dB), the noise being the 10th-percentile
    level (a 10 ms mouth click or rumble is not a word): the recording's own noise
    is above -40 dB in about half of these files.
    """
    level = _levels(path)
    loud = level > max(-40.0, float(np.percentile(level, 10)) + 10)
    run3 = np.convolve(loud, np.ones(3), mode="valid") == 3
    return np.flatnonzero(np.convolve(run3, np.ones(3), mode="full") > 0)


@functools.cache
def _levels(path: Path) -> np.ndarray:
    samples = np.frombuffer(read_audio(path).pcm, np.int16).astype(np.float64)
    window = SAMPLE_RATE // 100
    power = (samples[: len(samples) // window * window].reshape(-1, window) ** 2).mean(
        axis=1
    ) + 1e-9
    return 10 * np.log10(power / power.max())


@functools.cache
def speech_bounds(path: Path) -> tuple[int, int, int]:
    """Where the words are: (first word start, last word end, last sound end) in ms.

    The last sound is the usual rule: the last 10 ms window above -40 dB.
    """
    words = _word_windows(path)
    sound = np.flatnonzero(_levels(path) > -40.0)
    return int(words[0]) * 10, int(words[-1] + 1) * 10, int(sound[-1] + 1) * 10


@functools.cache
def longest_pause(path: Path) -> tuple[int, int]:
    """The longest silence between words: (start, end) in ms."""
    words = _word_windows(path)
    if len(words) < 2:
        return 0, 0
    at = int(np.argmax(np.diff(words)))
    return int(words[at] + 1) * 10, int(words[at + 1]) * 10


def test_the_corpus_is_complete(speech_dir: Path, transcripts: dict[str, str]) -> None:
    assert len(transcripts) == 33
    assert sorted(recording_names()) == sorted(transcripts)
    for name in transcripts:
        assert (speech_dir / name).is_file(), name


JUDGE_LAG_MS = {"webrtc": 2 * FRAME_MS, "silero": 200}
"""How long after the last sound each judge may still call it speech: webrtcvad's own tail is
taken off and leaves a frame or two; Silero's probability falls within a chunk or a few
(up to 160 ms after the -40 dB point on these recordings)."""


@pytest.mark.parametrize("vad", ["silero", "webrtc"])
@pytest.mark.parametrize("trigger", ["voice", "button"])
@pytest.mark.parametrize("name", recording_names())
def test_real_recording_keeps_every_word_and_stops_within_the_hang_over(
    speech_dir: Path, transcripts: dict[str, str], name: str, trigger: Trigger, vad: str
) -> None:
    """Every word kept, the cut within the hang-over of the last sound.

    A pause between words longer than silence_ms may end the capture early (one
    recording, JFK's, holds a 1.2 s oratorical pause): then the cut must fall
    inside that pause, a hang-over after its start.
    """
    assert name in transcripts
    path = speech_dir / name
    settings = SETTINGS.model_copy(update={"vad": vad})
    utterance, used = run(Endpointer(settings), frames(in_a_room(path)), trigger, press_at=PRESS_AT)
    end = used * FRAME_MS - PAD_MS  # in the recording's own time
    start = end - round(utterance.audio.seconds * 1000)
    words_start, words_end, sound_end = speech_bounds(path)
    pause_start, pause_end = longest_pause(path)
    where = f"{name}: cut [{start}, {end}] ms, words [{words_start}, {words_end}], last sound {sound_end}"
    lag = JUDGE_LAG_MS[vad]

    assert utterance.reason is EndReason.SILENCE, where
    assert utterance.has_speech, where
    assert start <= words_start, "clipped the first word: " + where
    if pause_end - pause_start > SETTINGS.silence_ms and end < words_end:
        assert pause_start + SETTINGS.silence_ms <= end <= pause_end, (
            "cut outside the pause: " + where
        )
        return
    assert end >= words_end, "clipped the last word: " + where
    assert end <= sound_end + SETTINGS.silence_ms + lag, "ran past the hang-over: " + where
    assert utterance.speech_end_ms is not None
    assert start + utterance.speech_end_ms <= sound_end + lag, where
    assert round(utterance.audio.seconds * 1000) - utterance.speech_end_ms == HANG_OVER * FRAME_MS


# --- Listener with fake devices -------------------------------------------


class FakeMic:
    """Frames from a list, then MicrophoneEnded, like a file source."""

    name = "fake"

    def __init__(self, stream: list[bytes]) -> None:
        self._stream = stream
        self.delivered = 0

    async def read(self) -> bytes:
        await asyncio.sleep(0)  # a real read awaits the device: let other tasks run
        if self.delivered == len(self._stream):
            raise MicrophoneEnded("fake microphone: no more frames")
        self.delivered += 1
        return self._stream[self.delivered - 1]

    def flush(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class FakeButton:
    """Events that happen while the microphone records a given frame.

    An event at frame k becomes pending once frame k-1 has been read, so a press
    at k puts frames k-10..k-1 in the pre-roll and k first in the capture."""

    def __init__(self, mic: FakeMic, events: list[tuple[int, ButtonEvent]]) -> None:
        self._mic = mic
        self._events = sorted(events, key=lambda e: e[0])
        self.is_pressed = False

    def pending(self) -> ButtonEvent | None:
        if not self._events or self._events[0][0] > self._mic.delivered:
            return None
        event = self._events.pop(0)[1]
        self.is_pressed = event is not ButtonEvent.RELEASED
        return event

    async def next_event(self) -> ButtonEvent:
        raise AssertionError("the Listener must poll the button between frames, never wait on it")

    def clear(self) -> None:
        self._events = [e for e in self._events if e[0] > self._mic.delivered]

    def close(self) -> None:
        pass


def listener(
    pattern: str,
    mode: str,
    events: list[tuple[int, ButtonEvent]] | None = None,
    is_speech: Callable[[bytes], bool] | None = scripted_speech,
) -> tuple[Listener, FakeMic]:
    mic = FakeMic(script(pattern))
    button = FakeButton(mic, events) if events is not None else None
    settings = ListeningSettings(mode=mode)  # type: ignore[arg-type]
    return Listener(mic, button, settings, is_speech=is_speech, clock=lambda: 42.0), mic


async def next_utterance(listen: Listener) -> Utterance:
    return await asyncio.wait_for(listen.next_utterance(), timeout=TIMEOUT)


PRESSED, RELEASED, HELD = ButtonEvent.PRESSED, ButtonEvent.RELEASED, ButtonEvent.HELD


async def test_voice_wakes_in_voice_mode() -> None:
    listen, _ = listener("." * 50 + "#" * 30 + "." * 60, "voice")
    utterance = await next_utterance(listen)
    assert utterance.trigger == "voice" and utterance.reason is EndReason.SILENCE
    assert indices(utterance) == list(range(40, 80 + HANG_OVER))
    assert utterance.ended_at == 42.0


async def test_button_mode_ignores_speech_before_the_press() -> None:
    pattern = "." * 10 + "#" * 30 + "." * 40 + "." * 10 + "#" * 20 + "." * 40
    listen, _ = listener(pattern, "button", [(80, PRESSED), (83, RELEASED)])
    utterance = await next_utterance(listen)
    assert utterance.trigger == "button" and utterance.reason is EndReason.SILENCE
    assert indices(utterance) == list(range(70, 110 + HANG_OVER))  # none of frames 10..39


async def test_button_mode_does_not_wake_on_voice() -> None:
    listen, mic = listener("." * 10 + "#" * 60 + "." * 40, "button", [])
    with pytest.raises(MicrophoneEnded):
        await next_utterance(listen)
    assert mic.delivered == 110


async def test_tap_then_speak_ends_at_the_end_of_speech() -> None:
    listen, _ = listener("." * 60 + "#" * 30 + "." * 60, "both", [(20, PRESSED), (24, RELEASED)])
    utterance = await next_utterance(listen)
    assert utterance.trigger == "button"
    assert utterance.reason is EndReason.SILENCE  # the early release did not end it
    assert indices(utterance) == list(range(10, 90 + HANG_OVER))


async def test_hold_while_talking_ends_at_the_release() -> None:
    # Held past long_press_s while talking: HELD comes after speech and does not cancel.
    events = [(20, PRESSED), (120, HELD), (150, RELEASED)]
    listen, _ = listener("." * 25 + "#" * 200, "button", events)
    utterance = await next_utterance(listen)
    assert utterance.reason is EndReason.RELEASED
    assert indices(utterance) == list(range(10, 150))
    assert utterance.has_speech


async def test_long_press_before_speech_cancels() -> None:
    listen, _ = listener("." * 300, "button", [(20, PRESSED), (120, HELD)])
    utterance = await next_utterance(listen)
    assert utterance.reason is EndReason.CANCELLED
    assert indices(utterance)[-1] == 119
    assert not utterance.has_speech


async def test_press_and_nothing_said_times_out() -> None:
    listen, _ = listener("." * 300, "button", [(20, PRESSED)])
    utterance = await next_utterance(listen)
    assert utterance.reason is EndReason.NO_SPEECH
    assert indices(utterance)[-1] == 20 + NO_SPEECH - 1


async def test_mode_both_takes_voice_then_a_press() -> None:
    pattern = "." * 20 + "#" * 20 + "." * 40 + "." * 10 + "#" * 20 + "." * 40
    listen, _ = listener(pattern, "both", [(80, PRESSED)])
    first = await next_utterance(listen)
    second = await next_utterance(listen)
    assert (first.trigger, second.trigger) == ("voice", "button")
    assert indices(first) == list(range(10, 40 + HANG_OVER))
    assert indices(second) == list(range(70, 110 + HANG_OVER))


async def test_mic_ending_during_a_capture_keeps_what_was_heard() -> None:
    listen, _ = listener("." * 20 + "#" * 30, "voice")
    utterance = await next_utterance(listen)
    assert utterance.reason is EndReason.MIC_ENDED
    assert indices(utterance) == list(range(10, 50))
    assert utterance.has_speech and utterance.speech_end_ms == 40 * FRAME_MS


async def test_mic_ending_while_idle_propagates() -> None:
    listen, _ = listener("." * 30, "both", [])
    with pytest.raises(MicrophoneEnded):
        await next_utterance(listen)


async def test_on_start_is_called_once_as_the_capture_starts() -> None:
    listen, mic = listener("." * 50 + "#" * 30 + "." * 60, "voice")
    started_at: list[int] = []
    await asyncio.wait_for(
        listen.next_utterance(on_start=lambda: started_at.append(mic.delivered)), timeout=TIMEOUT
    )
    assert started_at == [58]  # right after the onset frame (57)


async def test_finish_during_a_capture_keeps_what_was_heard() -> None:
    listen, _ = listener("." * 50 + "#" * 30 + "." * 60, "voice")
    utterance = await asyncio.wait_for(listen.next_utterance(on_start=listen.finish), TIMEOUT)
    assert utterance.reason is EndReason.STOPPED
    assert indices(utterance) == list(range(40, 58))  # pre-roll and the onset
    assert utterance.has_speech
    # The stop was used up: the next call listens normally.
    assert (await next_utterance(listen)).reason is EndReason.SILENCE


async def test_finish_while_idle_returns_an_empty_utterance() -> None:
    listen, mic = listener("." * 100, "both", [])
    listen.finish()  # before next_utterance even started: not lost
    utterance = await next_utterance(listen)
    assert utterance.reason is EndReason.STOPPED
    assert not utterance.has_speech and utterance.audio.pcm == b""
    assert mic.delivered == 0


def test_button_mode_needs_a_button() -> None:
    with pytest.raises(ValueError, match="needs a button"):
        Listener(FakeMic([]), None, ListeningSettings(mode="button"))


async def test_listener_with_webrtcvad_on_a_real_recording(speech_dir: Path) -> None:
    mic = FakeMic(frames(in_a_room(speech_dir / "v2j_what_time_is_it.wav")))
    listen = Listener(mic, None, ListeningSettings(mode="voice"))
    utterance = await asyncio.wait_for(listen.next_utterance(), timeout=TIMEOUT)
    assert utterance.trigger == "voice" and utterance.reason is EndReason.SILENCE
    assert utterance.has_speech
    assert 2.0 < utterance.audio.seconds < 4.0


def test_the_frame_counts_above_are_the_settings_defaults() -> None:
    assert (SETTINGS.pre_roll_ms, SETTINGS.min_speech_ms) == (PRE_ROLL * 30, MIN_SPEECH * 30)
    assert (SETTINGS.silence_ms, SETTINGS.max_ms) == (700, MAX_FRAMES * 30)
    assert SETTINGS.no_speech_timeout_ms == 5000 and SETTINGS.vad_aggressiveness == 2
