"""The simulated room: echo, lockstep, barge-in, the waiting person, interjections, noise.

Fast rooms are exact: the microphone is the clock, so every check counts
samples and frames. Device voices and the person are real recordings.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from heimdall_edge.audio import FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE, Audio, frames, read_audio
from heimdall_edge.devices.base import MicrophoneEnded, Playback
from heimdall_edge.devices.microphone import FileMicrophone
from heimdall_edge.devices.noise import LOOP_S, NOISE_KINDS, noise_source, speech_level
from heimdall_edge.devices.room import NO_SPEECH_RMS, SimulatedRoom, build_room
from heimdall_edge.devices.speaker import WavFileSpeaker

TIMEOUT = 30
DELAY = 320  # the default 20 ms echo delay, in samples
BEFORE = 5  # frames read before each playback starts
START = BEFORE * FRAME_SAMPLES


@pytest.fixture(scope="module")
def voice(speech_dir: Path) -> Audio:
    """The device's voice: a real 1.1 s recording at 16 kHz."""
    return read_audio(speech_dir / "ps_cards_001.wav")


@pytest.fixture(scope="module")
def long_voice(speech_dir: Path) -> Audio:
    """A 3 s real recording at 16 kHz."""
    return read_audio(speech_dir / "librivox_sense_sensibility_0880.wav")


def samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def db(ratio: float) -> float:
    return 20 * np.log10(ratio)


async def stream(*chunks: Audio) -> AsyncIterator[Audio]:
    for chunk in chunks:
        yield chunk


def cut(audio: Audio, *at_s: float) -> list[Audio]:
    """`audio` in chunks split at the given seconds."""
    edges = [0, *(int(s * audio.sample_rate) * 2 for s in at_s), len(audio.pcm)]
    return [Audio(audio.pcm[a:b], audio.sample_rate) for a, b in itertools.pairwise(edges)]


def quiet_room(**options: object) -> SimulatedRoom:
    """A fast room whose person says nothing (for 300 ms, then the microphone may end)."""
    speaker = options.pop("speaker", WavFileSpeaker(None))
    return SimulatedRoom(FileMicrophone([], tail_silence_ms=300), speaker, **options)


class Run:
    """A playback in a fast room, with a reader reading the microphone all along (as the service
    does): the frames heard, and the microphone's position when play() returned."""

    def __init__(self, room: SimulatedRoom) -> None:
        self.room = room
        self.heard: list[bytes] = []
        self.returned_at: list[int] = []
        self.ended = False

    async def read(self, n: int, on_frame: Callable[[int], object] = lambda n: None) -> None:
        for _ in range(n):
            self.heard.append(await self.room.microphone.read())
            on_frame(self.room.microphone.position)

    async def play(self, chunks: AsyncIterator[Audio], stop: asyncio.Event) -> Playback:
        playback = await self.room.speaker.play(chunks, stop)
        self.returned_at.append(self.room.microphone.position)
        return playback

    async def read_to_end(self, on_frame: Callable[[int], object] = lambda n: None) -> None:
        try:
            while True:
                self.heard.append(await self.room.microphone.read())
                on_frame(self.room.microphone.position)
        except MicrophoneEnded:
            self.ended = True

    async def playing(
        self,
        *chunks: Audio,
        stop: asyncio.Event | None = None,
        on_frame: Callable[[int], object] = lambda n: None,
        frames: int | None = None,
    ) -> Playback:
        """Read BEFORE frames, then play `chunks` while reading `frames` more, or to the end."""
        await self.read(BEFORE)
        play = asyncio.create_task(self.play(stream(*chunks), stop or asyncio.Event()))
        if frames is None:
            await self.read_to_end(on_frame)
        else:
            await self.read(frames, on_frame)
        return await play

    @property
    def pcm(self) -> np.ndarray:
        return samples(b"".join(self.heard))


# --- echo -----------------------------------------------------------------------------------


async def test_echo_lands_delay_samples_after_the_sound_at_its_gain(voice):
    run = Run(quiet_room(echo_db=-6))
    chunks = cut(voice, 0.33, 0.5)  # three chunks of uneven length: the echo is still seamless
    playback = await asyncio.wait_for(run.playing(*chunks), TIMEOUT)

    assert not playback.interrupted and playback.seconds == pytest.approx(voice.seconds)
    heard, want = run.pcm, np.rint(samples(voice.pcm) * 10 ** (-6 / 20))
    end = START + DELAY + len(want)
    assert not heard[: START + DELAY].any()
    assert np.array_equal(heard[START + DELAY : end], want)
    assert not heard[end:].any()
    # play() returned once the microphone had heard the whole echo, and not a frame later
    assert run.returned_at == [-(-end // FRAME_SAMPLES)]


async def test_echo_of_a_22khz_voice_is_resampled_on_time_at_its_level(speech_dir):
    full = read_audio(speech_dir / "ljspeech_LJ050-0131.wav", 22_050)
    voice = Audio(full.pcm[: 2 * 2 * 22_050], 22_050)  # its first 2 s
    run = Run(quiet_room(echo_db=-10))
    await asyncio.wait_for(run.playing(*cut(voice, 0.4, 1.1)), TIMEOUT)

    at_16k = soxr.resample(samples(voice.pcm), 22_050, SAMPLE_RATE, quality="HQ")
    heard = run.pcm
    echo = heard[START + DELAY : START + DELAY + len(at_16k)]
    assert not heard[: START + DELAY].any()
    assert np.abs(echo - at_16k * 10 ** (-10 / 20)).max() <= 1  # streamed = resampled in one go
    assert db(rms(echo) / rms(at_16k)) == pytest.approx(-10, abs=0.05)
    lags = range(-40, 41)
    best = max(
        lags, key=lambda lag: float(np.dot(heard[START + DELAY + lag :][:8000], at_16k[:8000]))
    )
    assert best == 0


async def test_the_speaker_keeps_in_step_with_the_microphone(long_voice):
    """The speaker is never more than a block ahead; the microphone never passes what is due."""
    run = Run(quiet_room(echo_db=0))
    chunk = 1600  # 100 ms
    asked: list[int] = []

    async def engine() -> AsyncIterator[Audio]:
        for at in range(0, len(long_voice.pcm), 2 * chunk):
            asked.append(run.room.microphone.position * FRAME_SAMPLES - START)
            yield Audio(long_voice.pcm[at : at + 2 * chunk], SAMPLE_RATE)

    await run.read(BEFORE)
    play = asyncio.create_task(run.play(engine(), asyncio.Event()))
    await asyncio.wait_for(run.read_to_end(), TIMEOUT)
    await play

    assert len(asked) == -(-len(long_voice.pcm) // (2 * chunk))
    for k, heard_at in enumerate(asked):
        assert 0 <= k * chunk - heard_at <= chunk, f"chunk {k} asked for at sample {heard_at}"
    want = samples(long_voice.pcm)
    assert np.array_equal(run.pcm[START + DELAY :][: len(want)], want)  # no gap anywhere
    frames_played = run.returned_at[0] - BEFORE
    assert frames_played == -(-(DELAY + len(want)) // FRAME_SAMPLES)


async def test_flush_keeps_the_echo_in_the_air(voice):
    run = Run(quiet_room(echo_db=0))

    def flush_once(position: int) -> None:
        if position == BEFORE + 10:
            run.room.microphone.flush()

    await asyncio.wait_for(run.playing(voice, on_frame=flush_once), TIMEOUT)
    want = samples(voice.pcm)
    assert np.array_equal(run.pcm[START + DELAY :][: len(want)], want)


# --- barge-in -------------------------------------------------------------------------------


async def test_a_stopped_playback_leaves_no_echo_of_the_blocks_it_never_played(
    tmp_path, long_voice
):
    wav = tmp_path / "spoken.wav"
    run = Run(quiet_room(echo_db=0, speaker=WavFileSpeaker(wav)))
    stop = asyncio.Event()

    def barge_in(position: int) -> None:
        if position == BEFORE + 20:  # 600 ms into the reply
            stop.set()

    playback = await asyncio.wait_for(
        run.playing(long_voice, stop=stop, on_frame=barge_in), TIMEOUT
    )

    assert playback.interrupted
    played, rate = soundfile.read(wav, dtype="int16")
    assert rate == SAMPLE_RATE and len(played) == round(playback.seconds * SAMPLE_RATE)
    assert 0.6 <= playback.seconds <= 0.6 + 0.1  # stopped within a block of the barge-in
    assert np.array_equal(played, np.frombuffer(long_voice.pcm, "<i2")[: len(played)])
    heard = run.pcm
    end = START + DELAY + len(played)
    assert np.array_equal(heard[START + DELAY : end], played)  # the echo is what was played
    assert not heard[end:].any()  # and nothing of the rest
    # Stopped, play() returns at once, as a real speaker does; the tail still reaches the mic.
    assert run.returned_at == [BEFORE + 20]  # the frame that stopped it was the last read


async def test_an_interjection_lands_after_ms_into_the_playback_even_if_it_is_stopped(
    clip, voice, long_voice
):
    words = read_audio(clip).pcm  # "what time is it"
    person = FileMicrophone([], tail_silence_ms=60_000)  # says nothing, does not end
    run = Run(SimulatedRoom(person, WavFileSpeaker(None)))  # no echo: only interjections
    run.room.interject(words, after_ms=500)
    run.room.interject(voice.pcm, after_ms=200)  # for the playback after
    stop = asyncio.Event()

    def barge_in(position: int) -> None:
        if position == BEFORE + 10:  # 300 ms: before the person even started
            stop.set()

    first = await asyncio.wait_for(
        run.playing(long_voice, stop=stop, on_frame=barge_in, frames=150), TIMEOUT
    )
    assert first.interrupted
    heard = run.pcm
    at = START + SAMPLE_RATE * 500 // 1000
    assert not heard[:at].any()
    assert np.array_equal(heard[at : at + len(words) // 2], samples(words))  # said in full
    assert not heard[at + len(words) // 2 :].any()

    second = Run(run.room)  # the next playback
    await asyncio.wait_for(second.playing(long_voice, frames=150), TIMEOUT)
    heard = second.pcm
    at = START + SAMPLE_RATE * 200 // 1000
    assert not heard[:at].any()
    assert np.array_equal(heard[at : at + len(voice.pcm) // 2], samples(voice.pcm))


async def test_an_interjection_waits_out_a_playback_that_ends_before_it(clip, voice, long_voice):
    """The earcon at the start of a capture is a playback too: the person still talks over
    the reply that follows it, after_ms into that one."""
    words = read_audio(clip).pcm
    person = FileMicrophone([], tail_silence_ms=60_000)
    run = Run(SimulatedRoom(person, WavFileSpeaker(None)))
    run.room.interject(words, after_ms=2000)  # the 1.1 s `voice` ends first
    await asyncio.wait_for(run.playing(voice, frames=120), TIMEOUT)
    assert not run.pcm.any()
    reply = Run(run.room)
    await asyncio.wait_for(reply.playing(long_voice, frames=150), TIMEOUT)
    at = START + SAMPLE_RATE * 2000 // 1000
    assert not reply.pcm[:at].any()
    assert np.array_equal(reply.pcm[at : at + len(words) // 2], samples(words))


async def test_the_microphone_does_not_end_before_an_interjection_is_heard(clip, voice):
    words = read_audio(clip).pcm
    run = Run(quiet_room())
    run.room.interject(words, after_ms=1000)
    stop = asyncio.Event()
    stop.set()  # stopped before it made a sound: the person still talks, 1 s later
    playback = await asyncio.wait_for(run.playing(voice, stop=stop), TIMEOUT)
    assert playback.interrupted and playback.seconds == 0
    at = START + SAMPLE_RATE
    assert run.ended and len(run.heard) == -(-(at + len(words) // 2) // FRAME_SAMPLES)
    assert np.array_equal(run.pcm[at:][: len(words) // 2], samples(words))


# --- the person -----------------------------------------------------------------------------


@pytest.mark.parametrize("starts", ["mid-line", "between lines"])
async def test_the_person_waits_while_the_device_speaks_then_goes_on(
    speech_dir, long_voice, starts
):
    first, second = speech_dir / "ps_cards_002.wav", speech_dir / "ps_cards_003.wav"
    line_one, line_two = frames(read_audio(first).pcm), frames(read_audio(second).pcm)
    gap = 10  # frames (300 ms)
    person = FileMicrophone([first, second], gap_ms=300, tail_silence_ms=300)
    room = SimulatedRoom(person, WavFileSpeaker(None))  # no echo: only the person is heard
    run = Run(room)
    start = 20 if starts == "mid-line" else len(line_one) + 3

    await run.read(start)
    play = asyncio.create_task(run.play(stream(long_voice), asyncio.Event()))
    await asyncio.wait_for(run.read_to_end(), TIMEOUT)
    await play
    (returned,) = run.returned_at

    assert returned - start >= long_voice.seconds * 1000 // 30  # the reply took its length
    heard = run.heard
    assert heard[: len(line_one)] == line_one  # the line already begun was said to the end
    resumed = returned + gap  # after the reply the person pauses, then says the next line
    assert not any(b"".join(heard[len(line_one) : resumed]))
    assert heard[resumed : resumed + len(line_two)] == line_two
    assert not any(b"".join(heard[resumed + len(line_two) :]))


async def test_the_microphone_ends_only_once_the_echo_is_heard(clip, long_voice):
    """The person's audio runs out mid-playback: the room goes on until the echo is heard,
    the speaker is never left waiting, and then the microphone ends."""
    person_pcm = read_audio(clip).pcm
    room = SimulatedRoom(
        FileMicrophone([clip], tail_silence_ms=60), WavFileSpeaker(None), echo_db=0
    )
    run = Run(room)
    await asyncio.wait_for(run.playing(long_voice), TIMEOUT)

    assert run.ended
    heard = run.pcm
    person = samples(person_pcm)
    heard[: len(person)] -= person
    echo = samples(long_voice.pcm)
    end = START + DELAY + len(echo)
    assert len(person) + 2 * FRAME_SAMPLES < end  # the person was done long before
    assert np.array_equal(heard[START + DELAY : end], echo)
    assert len(run.heard) == -(-end // FRAME_SAMPLES)  # ended right after the echo


async def test_closing_the_microphone_mid_playback_releases_the_speaker(long_voice):
    run = Run(quiet_room(echo_db=0))
    await run.read(BEFORE)
    play = asyncio.create_task(run.play(stream(long_voice), asyncio.Event()))
    await asyncio.wait_for(run.read(10), TIMEOUT)  # then the service stops reading
    await run.room.microphone.aclose()
    playback = await asyncio.wait_for(play, TIMEOUT)
    assert playback.seconds == pytest.approx(long_voice.seconds)

    # and a speaker started after the microphone ended does not wait for it either
    ended = Run(quiet_room(echo_db=0))
    await asyncio.wait_for(ended.read_to_end(), TIMEOUT)
    playback = await asyncio.wait_for(
        ended.room.speaker.play(stream(long_voice), asyncio.Event()), TIMEOUT
    )
    assert playback.seconds == pytest.approx(long_voice.seconds)


async def test_a_realtime_room_takes_real_time_and_echoes_as_it_plays(voice):
    person = FileMicrophone([], realtime=True)
    room = SimulatedRoom(person, WavFileSpeaker(None, realtime=True), echo_db=0)
    run = Run(room)
    reply = Audio(voice.pcm[: 2 * SAMPLE_RATE * 3 // 10], SAMPLE_RATE)  # 0.3 s

    async def scenario() -> tuple[Playback, float]:
        await run.read(BEFORE)
        started = time.monotonic()
        play = asyncio.create_task(run.play(stream(reply), asyncio.Event()))
        await run.read(20)  # 600 ms
        return await play, time.monotonic() - started

    playback, took = await asyncio.wait_for(scenario(), TIMEOUT)
    assert not playback.interrupted
    assert 0.55 <= took < 1.0  # the reader's 20 frames of 30 ms; the reply (0.3 s) within them
    assert BEFORE + 9 <= run.returned_at[0] <= BEFORE + 13  # play() took about 300 ms
    heard, want = run.pcm, samples(reply.pcm)
    first = int(np.flatnonzero(heard)[0])
    assert abs(first - (START + DELAY)) <= FRAME_SAMPLES
    assert db(rms(heard) * np.sqrt(len(heard)) / (rms(want) * np.sqrt(len(want)))) == (
        pytest.approx(0, abs=0.5)
    )  # all of it was heard, once


# --- noise ----------------------------------------------------------------------------------


def take(source, n: int) -> np.ndarray:
    return np.concatenate([source.frame() for _ in range(n)]).astype(np.float64)


def slope_db_per_octave(x: np.ndarray, low: float = 100, high: float = 4000) -> float:
    n = 8192
    segments = x[: len(x) // n * n].reshape(-1, n) * np.hanning(n)
    power = np.mean(np.abs(np.fft.rfft(segments, axis=1)) ** 2, axis=0)
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    band = (freqs >= low) & (freqs <= high)
    return float(np.polyfit(np.log2(freqs[band]), 10 * np.log10(power[band]), 1)[0])


LOOP_FRAMES = LOOP_S * SAMPLE_RATE // FRAME_SAMPLES


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_noise_has_unit_rms_loops_seamlessly_and_is_repeatable(kind):
    source = noise_source(kind, seed=3)
    loop = take(source, LOOP_FRAMES)
    again = take(source, LOOP_FRAMES)
    assert rms(loop) == pytest.approx(1.0, abs=1e-4)
    assert db(rms(loop[: 10 * SAMPLE_RATE])) == pytest.approx(0, abs=0.5)  # any 10 s, nearly
    assert np.array_equal(loop, again)  # it loops...
    seam = np.abs(np.diff(np.concatenate([loop[-2:], again[:2]])))
    assert seam.max() <= np.abs(np.diff(loop)).max()  # ...with no jump at the seam
    assert np.array_equal(take(noise_source(kind, seed=3), 10), loop[: 10 * FRAME_SAMPLES])
    assert not np.array_equal(take(noise_source(kind, seed=4), 10), loop[: 10 * FRAME_SAMPLES])


@pytest.mark.parametrize(("kind", "slope"), [("pink", -3.01), ("brown", -6.02)])
def test_pink_and_brown_noise_fall_3_and_6_db_per_octave(kind, slope):
    x = take(noise_source(kind), LOOP_FRAMES)
    assert slope_db_per_octave(x) == pytest.approx(slope, abs=0.3)
    low = np.fft.rfft(x)[: int(len(x) * 15 / SAMPLE_RATE)]  # below 15 Hz: nothing to drift on
    assert np.abs(low).max() < 1e-6 * np.abs(np.fft.rfft(x)).max()


def test_hum_is_50hz_and_its_harmonics_over_a_little_buzz():
    x = take(noise_source("hum"), LOOP_FRAMES)
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    lines = np.isin(np.rint(freqs * 1000).astype(np.int64), np.arange(50, 1001, 50) * 1000)
    assert power[lines].sum() / power.sum() > 0.99
    harmonics = power[lines]
    assert np.argmax(harmonics) == 0 and np.all(np.diff(harmonics) < 0)  # falling with k
    assert power[(freqs > 1100)].sum() > 0  # the buzz is broadband


def test_a_recording_as_noise_is_looped_at_unit_rms(clip):
    source = noise_source(str(clip))
    assert source.name == clip.name
    length = len(read_audio(clip).pcm) // 2 - SAMPLE_RATE // 2  # less the crossfaded seam
    loop = take(source, 3 * length // FRAME_SAMPLES + 1)
    assert rms(loop[:length]) == pytest.approx(1.0, abs=1e-4)
    assert np.array_equal(loop[:length], loop[length : 2 * length])


@pytest.mark.parametrize("kind", ["pinkk", "/no/such/noise.wav", ""])
def test_a_bad_noise_kind_says_what_there_is(kind):
    with pytest.raises(ValueError, match="pink, brown, hum or the path of an audio file") as exc:
        noise_source(kind)
    assert repr(kind) in str(exc.value)


def test_an_unreadable_or_silent_noise_file_says_so(tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(ValueError, match=r"junk\.wav cannot be decoded.*pink, brown, hum"):
        noise_source(str(junk))
    quiet = tmp_path / "quiet.wav"
    soundfile.write(quiet, np.zeros(SAMPLE_RATE, dtype=np.int16), SAMPLE_RATE)
    with pytest.raises(ValueError, match=r"quiet\.wav holds only silence.*pink, brown, hum"):
        noise_source(str(quiet))


def test_speech_level_ignores_the_silence_around_speech(clip):
    speech = read_audio(clip).pcm
    padded = bytes(3 * SAMPLE_RATE * 2) + speech + bytes(5 * SAMPLE_RATE * 2)
    assert speech_level(padded) == pytest.approx(speech_level(speech), rel=1e-3)
    assert speech_level(padded) > 1.5 * rms(samples(padded))
    assert speech_level(bytes(FRAME_BYTES * 4)) == 0.0 and speech_level(b"") == 0.0


@pytest.mark.parametrize("kind", NOISE_KINDS)
@pytest.mark.parametrize("snr_db", [5.0, 20.0])
async def test_noise_is_mixed_in_at_the_requested_snr(clip, kind, snr_db):
    speech = read_audio(clip).pcm
    person = FileMicrophone([clip], tail_silence_ms=LOOP_S * 1000)
    room = SimulatedRoom(person, WavFileSpeaker(None), noise=noise_source(kind), snr_db=snr_db)
    assert room.microphone.name == f"room:file:{clip.name},{kind} noise at {snr_db:g} dB SNR"
    run = Run(room)
    await asyncio.wait_for(run.read(LOOP_FRAMES), TIMEOUT)  # one whole loop of the noise
    noise = run.pcm
    noise[: len(speech) // 2] -= samples(speech)
    assert db(speech_level(speech) / rms(noise)) == pytest.approx(snr_db, abs=0.5)


async def test_with_no_speech_noise_is_set_against_minus_30_dbfs():
    person = FileMicrophone([], tail_silence_ms=LOOP_S * 1000)
    run = Run(SimulatedRoom(person, WavFileSpeaker(None), noise=noise_source("pink"), snr_db=10))
    await asyncio.wait_for(run.read(LOOP_FRAMES), TIMEOUT)
    assert NO_SPEECH_RMS == pytest.approx(1036, abs=1)
    assert db(NO_SPEECH_RMS / rms(run.pcm)) == pytest.approx(10, abs=0.5)


# --- building it ----------------------------------------------------------------------------


async def test_build_room_from_command_line_options(tmp_path, clip, voice):
    wav = tmp_path / "spoken.wav"
    room = build_room([clip], realtime=False, speaker_wav=wav, echo_db=-6, noise="brown", snr_db=12)
    assert room.microphone.name == f"room:file:{clip.name},echo -6 dB,brown noise at 12 dB SNR"
    run = Run(room)
    await asyncio.wait_for(run.playing(voice), TIMEOUT)
    assert soundfile.info(wav).duration == pytest.approx(voice.seconds)
    assert (
        build_room(
            [], realtime=True, speaker_wav=None, echo_db=None, noise=None, snr_db=15
        ).microphone.name
        == "room:file:silence"
    )
    with pytest.raises(ValueError, match="'loud'"):
        build_room([], realtime=False, speaker_wav=None, echo_db=None, noise="loud", snr_db=15)
