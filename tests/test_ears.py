"""The ears through the real service: the Appliance on a simulated room, real models, real audio.

The person in the room is Piper's joe voice at several paces and pitches (a wake phrase
and a command), or the shared human recordings, or babble made of them. The room runs
on the microphone's clock (`--fast`), so the service plays and listens frame for frame
and nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from heimdall_edge.app import builders
from heimdall_edge.app.appliance import Appliance, Devices
from heimdall_edge.audio import read_audio, silence
from heimdall_edge.devices.base import IndicatorState
from heimdall_edge.engines.base import ReplyRequest
from heimdall_edge.engines.local.offline_reply import OfflineReplyEngine
from heimdall_edge.listen.earcon import FOLLOW_UP_EARCON, WAKE_EARCON
from heimdall_edge.listen.wakeword import WakeWordDetector
from heimdall_edge.settings import ListeningSettings, Settings, load_settings
from heimdall_edge.spool.record import CaptureRecord
from heimdall_edge.spool.store import Spool
from heimdall_edge.testing.text import words
from heimdall_edge.testing.voices import PiperSpeaker, babble, to_pcm
from heimdall_edge.turn.routing import Engines

TIMEOUT = 120


def heard_as(said: str, transcript: str | None) -> bool:
    """tiny.en heard `said` in the capture: at most one word in four wrong (it hears "turn on
    the light" as "turn on the white" in some captures: the model's error, not the cut's)."""
    import jiwer

    return jiwer.wer(said, words(transcript or "") or "-") <= 0.25


@pytest.fixture(scope="module")
def voice(models_dir: Path) -> PiperSpeaker:
    return PiperSpeaker(models_dir)


@functools.cache
def wake_phrase() -> str:
    """What the default wake word answers to ("Hey Jarvis", ...)."""
    return WakeWordDetector.from_settings(ListeningSettings()).model.phrase


def wake_and(voice: PiperSpeaker, command: str, *, pace=1.0, pitch=1.0, pause_ms=400) -> bytes:
    """The person wakes the device and says `command` (in one breath with pause_ms 0)."""
    if pause_ms == 0:
        return to_pcm(voice.say(f"{wake_phrase()}, {command}", pace=pace, pitch=pitch))
    wake = to_pcm(voice.say(f"{wake_phrase()}.", pace=pace, pitch=pitch))
    return wake + silence(pause_ms) + to_pcm(voice.say(command, pace=pace, pitch=pitch))


class Replies(OfflineReplyEngine):
    """The offline engine, answering from a script and keeping every request it got."""

    def __init__(self, *answers: str) -> None:
        super().__init__()
        self._answers = list(answers)
        self.requests: list[ReplyRequest] = []

    def answer(self, request: ReplyRequest) -> str:
        self.requests.append(request)
        return self._answers.pop(0) if self._answers else super().answer(request)


class Service:
    """The Appliance serving a simulated room until the person has said everything."""

    def __init__(
        self,
        settings: Settings,
        lines: list[bytes],
        engines: Engines,
        **room: object,
    ) -> None:
        self.settings = settings
        self.devices: Devices = builders.build_simulated_devices(
            settings,
            inputs=[silence(600) + line for line in lines],
            realtime=False,
            **room,  # type: ignore[arg-type]
        )
        self.engines = engines
        self.states: list[IndicatorState] = []
        self.played: list[bytes] = []
        """What each playback sent to the speaker (the wake sound, a reply, ...)."""
        self.chunks: list[int] = []
        """How many chunks (sentences, for Piper) each playback pulled."""
        self._watch_devices()

    def _watch_devices(self) -> None:
        show, play = self.devices.indicator.show, self.devices.speaker.play

        def showing(state: IndicatorState) -> None:
            self.states.append(state)
            show(state)

        async def playing(chunks: AsyncIterator, stop: asyncio.Event):
            async def kept():
                sound, count = b"", 0
                try:
                    async for chunk in chunks:
                        sound, count = sound + chunk.pcm, count + 1
                        yield chunk
                finally:
                    self.played.append(sound)
                    self.chunks.append(count)

            return await play(kept(), stop)

        self.devices.indicator.show = showing  # type: ignore[method-assign]
        self.devices.speaker.play = playing  # type: ignore[method-assign]

    async def run(self) -> list[CaptureRecord]:
        spool = builders.open_spool(self.settings)
        appliance = Appliance(self.settings, self.devices, self.engines, spool)
        try:
            await appliance.start()
            await asyncio.wait_for(appliance.serve(asyncio.Event()), TIMEOUT)
        finally:
            await self.devices.aclose()
        with Spool(self.settings.spool_dir) as kept:
            return sorted(kept.list(), key=lambda r: r.created_at)


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("HEIMDALL_LISTENING__MODE", "voice")
    monkeypatch.setenv("HEIMDALL_ENGINES__PRELOAD", "false")
    return load_settings()


def local(whisper, piper, reply: OfflineReplyEngine | None = None) -> Engines:
    return Engines(stt=whisper, reply=reply or OfflineReplyEngine(), tts=piper)


# --- waking -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pace", "pitch", "pause_ms"),
    [(1.0, 1.0, 0), (0.85, 1.1, 0), (1.3, 0.9, 0), (1.0, 1.0, 600), (1.2, 1.05, 1500)],
    ids=["one-breath", "fast-high", "slow-low", "pause", "long-pause"],
)
async def test_the_wake_word_and_a_command_are_answered_without_the_wake_phrase(
    settings: Settings, voice: PiperSpeaker, whisper, piper, pace, pitch, pause_ms
) -> None:
    command = "what time is it"
    line = wake_and(voice, command, pace=pace, pitch=pitch, pause_ms=pause_ms)
    [record] = await Service(settings, [line], local(whisper, piper)).run()
    assert record.trigger == "wake_word" and record.status == "complete"
    heard = words(record.transcript or "")
    assert heard == command, record.transcript
    assert not set(words(wake_phrase()).split()) & set(heard.split())
    assert record.reply and record.reply.startswith("It's ")


async def test_talk_without_the_wake_word_never_wakes_it(
    settings: Settings, speech_dir: Path, transcripts: dict[str, str], whisper, piper
) -> None:
    """Two minutes of real people (the 33 recordings) and a minute of babble made of them."""
    recordings = [read_audio(speech_dir / name).pcm for name in transcripts]
    voices = [np.frombuffer(pcm, "<i2").astype(np.float32) / 32768 for pcm in recordings]
    crowd = to_pcm(0.1 * babble(voices, talkers=4, seconds=60, seed=11))
    service = Service(settings, [*recordings, crowd], local(whisper, piper))
    assert await service.run() == []
    assert IndicatorState.LISTENING not in service.states


async def test_plain_speech_onset_stays_an_option(
    settings: Settings, speech_dir: Path, whisper, piper
) -> None:
    settings = settings.model_copy(
        update={"listening": settings.listening.model_copy(update={"wake_word": ""})}
    )
    line = read_audio(speech_dir / "ps_goforward.wav").pcm
    [record] = await Service(settings, [line], local(whisper, piper)).run()
    assert record.trigger == "voice" and "go forward" in (record.transcript or "").lower()


# --- its own voice ----------------------------------------------------------------------------

LONG_REPLY = "Here is a long answer that goes on for a while. " * 4


@pytest.mark.parametrize("wake_word", ["", "default"])
async def test_with_its_echo_at_minus_6_db_it_never_captures_its_own_voice(
    settings: Settings, voice: PiperSpeaker, whisper, piper, wake_word: str
) -> None:
    """Even with the plain onset trigger, where any speech would wake it, its own long reply
    coming back from the room is never a capture; the person's next line is."""
    if wake_word == "":
        settings = settings.model_copy(
            update={"listening": settings.listening.model_copy(update={"wake_word": ""})}
        )
        lines = [to_pcm(voice.say("what time is it")), to_pcm(voice.say("what day is it"))]
    else:
        lines = [wake_and(voice, "what time is it"), wake_and(voice, "what day is it")]
    replies = Replies(LONG_REPLY, LONG_REPLY)
    service = Service(settings, lines, local(whisper, piper, replies), echo_db=-6.0)
    records = await service.run()
    assert [words(r.transcript or "") for r in records] == ["what time is it", "what day is it"]


class LateSentences:
    """Piper, but every sentence after the first comes `late_s` after the one before (a slow
    device): the speaker runs dry in between, and the microphone hears the gap."""

    def __init__(self, piper, late_s: float) -> None:
        self._piper, self._late_s = piper, late_s

    def __getattr__(self, name: str):
        return getattr(self._piper, name)

    async def synthesize(self, text: str) -> AsyncIterator:
        first = True
        async for chunk in self._piper.synthesize(text):
            if not first:
                await asyncio.sleep(self._late_s)
            first = False
            yield chunk


@pytest.mark.parametrize("late_s", [0.0, 2.5], ids=["on-time", "second-sentence-late"])
async def test_a_reply_that_says_the_wake_word_does_not_stop_itself(
    settings: Settings, voice: PiperSpeaker, whisper, piper, late_s: float
) -> None:
    """Said twice, a sentence apart: late, the microphone's refractory period has run out
    before the second, so the guard's twin must hear the gap as the microphone did."""
    own = f"You can wake me by saying {wake_phrase()}. {wake_phrase()} is my name."
    replies = Replies(own)
    service = Service(
        settings,
        [wake_and(voice, "what is your name")],
        local(whisper, LateSentences(piper, late_s), replies),
        echo_db=-3.0,
    )
    [record] = await service.run()
    assert record.reply == own  # all of it was said
    assert len(service.played) == 2  # the wake sound, then the whole reply


async def test_the_wake_sound_is_played_and_never_captured(
    settings: Settings, voice: PiperSpeaker, whisper, piper
) -> None:
    """In one breath, with the wake sound at full level in the room while the command goes on."""
    service = Service(
        settings, [wake_and(voice, "turn on the kitchen light", pause_ms=0)],
        local(whisper, piper), echo_db=0.0,
    )  # fmt: skip
    [record] = await service.run()
    assert service.played[0] == WAKE_EARCON.audio.pcm
    assert words(record.transcript or "") == "turn on the kitchen light"


# --- barge-in and follow-up -------------------------------------------------------------------


async def test_the_wake_word_while_it_speaks_stops_it_and_starts_a_capture(
    settings: Settings, voice: PiperSpeaker, whisper, piper
) -> None:
    """Someone else (a higher voice) says the wake word 2.5 s into a long reply.

    There is no echo canceller: the person must be louder than the device's echo at the
    microphone, here by 12 dB (docs/LISTENING.md has how much it takes)."""
    replies = Replies(LONG_REPLY)
    service = Service(
        settings,
        [wake_and(voice, "tell me a story")],
        local(whisper, piper, replies),
        echo_db=-12.0,
    )
    service.devices.speaker.interject(wake_and(voice, "what time is it", pitch=1.1), after_ms=2500)
    first, second = await service.run()
    assert heard_as("tell me a story", first.transcript)
    assert service.chunks[1] < 4  # of its four sentences: cut short, not played out
    assert first.reply and first.reply != LONG_REPLY.strip()
    assert second.trigger == "wake_word"
    assert heard_as("what time is it", second.transcript)


async def test_after_a_question_it_listens_for_the_answer_without_the_wake_word(
    settings: Settings, voice: PiperSpeaker, whisper, piper
) -> None:
    replies = Replies("Which room do you mean?", "The kitchen light is on.")
    lines = [wake_and(voice, "turn on the light"), to_pcm(voice.say("the kitchen"))]
    service = Service(settings, lines, local(whisper, piper, replies))
    first, second = await service.run()
    assert first.trigger == "wake_word"
    assert second.trigger == "follow_up" and heard_as("the kitchen", second.transcript)
    assert second.reply == "The kitchen light is on."
    # The second reply saw the first turn; the LED and the earcon said "go on".
    [earlier] = replies.requests[1].history
    assert heard_as("turn on the light", earlier.said)
    assert earlier.answered == "Which room do you mean?"
    follow_up = service.states.index(IndicatorState.FOLLOW_UP)
    assert service.states[follow_up + 1] is IndicatorState.LISTENING
    assert FOLLOW_UP_EARCON.audio.pcm in service.played


async def test_the_follow_up_window_closes_and_then_only_the_wake_word_wakes_it(
    settings: Settings, voice: PiperSpeaker, whisper, piper
) -> None:
    settings = settings.model_copy(
        update={"listening": settings.listening.model_copy(update={"follow_up_s": 1.0})}
    )
    replies = Replies("Which room do you mean?")
    # The person answers 1.5 s after the reply (FileMicrophone's gap): too late for 1 s.
    lines = [wake_and(voice, "turn on the light"), to_pcm(voice.say("the kitchen"))]
    service = Service(settings, lines, local(whisper, piper, replies))
    [record] = await service.run()
    assert heard_as("turn on the light", record.transcript)
    follow_up = service.states.index(IndicatorState.FOLLOW_UP)
    assert service.states[follow_up + 1] is IndicatorState.IDLE
    assert IndicatorState.LISTENING not in service.states[follow_up:]


async def test_no_follow_up_after_a_statement(
    settings: Settings, voice: PiperSpeaker, whisper, piper
) -> None:
    lines = [wake_and(voice, "what time is it"), to_pcm(voice.say("and the date"))]
    service = Service(settings, lines, local(whisper, piper))
    [record] = await service.run()
    assert IndicatorState.FOLLOW_UP not in service.states
    assert words(record.transcript or "") == "what time is it"
