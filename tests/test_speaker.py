"""Speakers: real PortAudio playback into ALSA's file plugin, barge-in, and the WAV speaker."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from heimdall_edge.audio import Audio, read_audio
from heimdall_edge.devices.base import DeviceError
from heimdall_edge.devices.speaker import (
    PyAudioOutput,
    PyAudioSpeaker,
    WavFileSpeaker,
    blocks,
    choose_output_format,
)
from heimdall_edge.settings import SpeakerSettings
from tests.shared import run_with_alsa_config

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 30


def tone(seconds: float, rate: int, freq: float = 440.0) -> Audio:
    t = np.arange(int(seconds * rate)) / rate
    return Audio((np.sin(2 * np.pi * freq * t) * 8000).astype("<i2").tobytes(), rate)


async def stream_of(*chunks: Audio, gap_s: float = 0.0) -> AsyncIterator[Audio]:
    for chunk in chunks:
        if gap_s:
            await asyncio.sleep(gap_s)
        yield chunk


# --- the real device: ALSA's file plugin writes what PortAudio plays ---------------------------

ASOUNDRC = """\
pcm.heimdalltestspeaker {{
    type file
    slave.pcm "null"
    file "{out}/played_%r.raw"
    format "raw"
}}
pcm.!default {{
    type file
    slave.pcm "null"
    file "{out}/default_%r.raw"
    format "raw"
}}
"""

CHILD = """\
import asyncio, json, sys
from heimdall_edge.audio import Audio
from heimdall_edge.devices.speaker import PyAudioSpeaker
from heimdall_edge.settings import SpeakerSettings

args = json.loads(sys.argv[1])


async def chunks(stop):
    for i, (path, rate) in enumerate(args["chunks"]):
        if i == args.get("stop_before", -1):
            stop.set()  # barge-in while the engine is still producing
        yield Audio(open(path, "rb").read(), rate)


async def main():
    speaker = PyAudioSpeaker(SpeakerSettings(device=args["device"]))
    stop = asyncio.Event()
    playback = await speaker.play(chunks(stop), stop)
    await speaker.aclose()
    print(json.dumps({"seconds": playback.seconds, "interrupted": playback.interrupted,
                      "first": playback.first_audio_at is not None}))


asyncio.run(main())
"""


def play_in_child(
    tmp_path: Path, chunks: list[Audio], device: str | None, stop_before: int = -1
) -> dict:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    listed = []
    for i, chunk in enumerate(chunks):
        path = tmp_path / f"chunk{i}.raw"
        path.write_bytes(chunk.pcm)
        listed.append((str(path), chunk.sample_rate))
    args = {"device": device, "chunks": listed, "stop_before": stop_before}
    return run_with_alsa_config(tmp_path, ASOUNDRC.format(out=out), CHILD, args)


def test_real_pyaudio_playback_writes_exactly_what_was_played(tmp_path, clip):
    speech = read_audio(clip)  # 16 kHz
    pcm = speech.pcm
    # Streamed in uneven chunks, then a chunk at Piper's 22050 Hz: the stream is reopened.
    cuts = [0, 3_000, 40_002, len(pcm) - 4_000, len(pcm)]
    assert all(a < b for a, b in itertools.pairwise(cuts))
    chunks = [Audio(pcm[a:b], 16_000) for a, b in itertools.pairwise(cuts)]
    chime = tone(0.3, 22_050)
    result = play_in_child(tmp_path, [*chunks, chime], device="heimdalltest")

    played_16k = (tmp_path / "out" / "played_16000.raw").read_bytes()
    played_22k = (tmp_path / "out" / "played_22050.raw").read_bytes()
    assert played_16k == pcm[: cuts[-1]]  # byte for byte, nothing lost between blocks or chunks
    assert played_22k == chime.pcm
    assert result["interrupted"] is False and result["first"] is True
    assert result["seconds"] == pytest.approx(cuts[-1] / 32_000 + 0.3, abs=1e-3)


def test_real_pyaudio_playback_stops_at_barge_in(tmp_path):
    first, second = tone(0.5, 16_000), tone(0.5, 16_000, freq=880)
    result = play_in_child(tmp_path, [first, second], device=None, stop_before=1)

    assert result["interrupted"] is True
    assert result["seconds"] == pytest.approx(0.5)
    played = (tmp_path / "out" / "default_16000.raw").read_bytes()
    assert played == first.pcm  # nothing of the second chunk reached the card


# --- a card that refuses the voice's rate and mono (fake PortAudio) ------------------------------


class PickyCard:
    """Just enough of pyaudio.PyAudio: plays 48 kHz stereo only, records what it is given."""

    def __init__(self) -> None:
        self.opened: dict = {}
        self.data = bytearray()

    def is_format_supported(self, rate, output_device=None, output_channels=None, **_):
        if rate == 48_000 and output_channels == 2:
            return True
        raise ValueError("Invalid sample rate")

    def open(self, **kwargs):
        self.opened = kwargs
        card = self

        class Stream:
            def write(self, data, exception_on_underflow=False):
                card.data += data

            def stop_stream(self):
                pass

            def close(self):
                pass

        return Stream()


class MuteCard(PickyCard):
    def is_format_supported(self, *args, **kwargs):
        raise ValueError("Invalid sample rate")


def test_voice_is_resampled_and_upmixed_for_a_picky_card():
    card = PickyCard()
    assert choose_output_format(card, 3, "i2s amp", 22_050) == (48_000, 2)
    with pytest.raises(DeviceError, match="speaker.device"):
        choose_output_format(MuteCard(), 3, "mute", 22_050)

    output = PyAudioOutput(card, 3, "i2s amp", 22_050)
    assert card.opened["rate"] == 48_000 and card.opened["channels"] == 2
    voice = tone(1.0, 22_050)
    for block in blocks(voice):
        output.write(block.pcm)
    output.drain()
    stereo = np.frombuffer(bytes(card.data), dtype="<i2").reshape(-1, 2)
    assert np.array_equal(stereo[:, 0], stereo[:, 1])  # the same voice on both sides
    assert len(stereo) == pytest.approx(48_000, abs=48)  # one second at the card's rate
    want = np.frombuffer(tone(1.0, 48_000).pcm, dtype="<i2").astype(float)
    got = stereo[:, 0].astype(float)
    m = min(len(got), len(want)) - 2000
    corr = np.dot(got[1000:m], want[1000:m]) / (
        np.linalg.norm(got[1000:m]) * np.linalg.norm(want[1000:m])
    )
    assert corr > 0.99


# --- PyAudioSpeaker's loop with a fake, real-time-paced output --------------------------------


class PacedOutput:
    """Blocks for as long as the audio lasts, like a card with a full buffer."""

    def __init__(self, rate: int, log: list[str]) -> None:
        self.rate, self.log = rate, log
        self.written = bytearray()
        log.append(f"open {rate}")

    def write(self, pcm: bytes) -> None:
        time.sleep(len(pcm) / 2 / self.rate)
        self.written += pcm

    def drain(self) -> None:
        self.log.append(f"drain {self.rate}")

    def close(self) -> None:
        self.log.append(f"close {self.rate}")


async def test_barge_in_stops_pyaudio_playback_within_a_block():
    log: list[str] = []
    outputs: list[PacedOutput] = []

    def open_stream(rate: int) -> PacedOutput:
        outputs.append(PacedOutput(rate, log))
        return outputs[-1]

    speaker = PyAudioSpeaker(SpeakerSettings(), open_stream=open_stream)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.3, stop.set)
    started = time.monotonic()
    playback = await asyncio.wait_for(speaker.play(stream_of(tone(3.0, 16_000)), stop), timeout=5)
    took = time.monotonic() - started

    assert playback.interrupted
    assert 0.3 <= took < 0.3 + 0.05 + 0.1  # one 50 ms block at most, plus scheduling slack
    assert playback.seconds == pytest.approx(len(outputs[0].written) / 32_000)
    assert log == ["open 16000", "close 16000"]  # dropped at once, not drained
    await speaker.aclose()


async def test_pyaudio_speaker_reopens_on_rate_change_and_drains_at_the_end():
    log: list[str] = []
    speaker = PyAudioSpeaker(SpeakerSettings(), open_stream=lambda rate: PacedOutput(rate, log))
    chunks = stream_of(tone(0.1, 16_000), tone(0.1, 16_000), tone(0.1, 22_050), tone(0.1, 22_050))
    playback = await asyncio.wait_for(speaker.play(chunks, asyncio.Event()), timeout=5)
    assert not playback.interrupted and playback.seconds == pytest.approx(0.4, abs=1e-3)
    assert log == ["open 16000", "drain 16000", "close 16000", "open 22050", "drain 22050"]
    log.clear()
    await asyncio.wait_for(speaker.play(stream_of(tone(0.1, 22_050)), asyncio.Event()), timeout=5)
    assert log == ["drain 22050"]  # same rate: the open stream is reused
    await speaker.aclose()
    assert log[-1] == "close 22050"


async def test_a_failing_card_is_a_device_error_and_is_reopened_next_time():
    class Broken(PacedOutput):
        def write(self, pcm: bytes) -> None:
            raise OSError(-9999, "Unanticipated host error")

    log: list[str] = []
    kinds = [Broken, PacedOutput]
    speaker = PyAudioSpeaker(SpeakerSettings(), open_stream=lambda rate: kinds.pop(0)(rate, log))
    with pytest.raises(DeviceError, match="aplay -l"):
        await asyncio.wait_for(
            speaker.play(stream_of(tone(0.1, 16_000)), asyncio.Event()), timeout=5
        )
    playback = await asyncio.wait_for(
        speaker.play(stream_of(tone(0.1, 16_000)), asyncio.Event()), timeout=5
    )
    assert playback.seconds == pytest.approx(0.1)
    await speaker.aclose()


# --- the simulated speaker --------------------------------------------------------------------


async def test_wav_speaker_appends_plays_to_one_wav_at_the_first_rate(tmp_path):
    path = tmp_path / "spoken.wav"
    speaker = WavFileSpeaker(path, realtime=False)
    first = await asyncio.wait_for(
        speaker.play(stream_of(tone(0.5, 22_050), tone(0.25, 22_050)), asyncio.Event()), timeout=5
    )
    assert first.seconds == pytest.approx(0.75, abs=1e-3) and not first.interrupted
    second = await asyncio.wait_for(
        speaker.play(stream_of(tone(0.5, 16_000)), asyncio.Event()), timeout=5
    )
    assert second.seconds == pytest.approx(0.5)

    info = soundfile.info(path)
    assert info.samplerate == 22_050 and info.channels == 1
    assert info.duration == pytest.approx(1.25, abs=0.01)  # the 16 kHz chunk was resampled
    samples, _ = soundfile.read(path, dtype="int16")
    assert np.array_equal(samples[: int(0.5 * 22_050)], np.frombuffer(tone(0.5, 22_050).pcm, "<i2"))
    assert speaker.plays == 2 and speaker.seconds_played == pytest.approx(1.25, abs=1e-3)


async def test_wav_speaker_without_a_path_only_counts():
    speaker = WavFileSpeaker(None)
    playback = await asyncio.wait_for(
        speaker.play(stream_of(tone(1.0, 16_000)), asyncio.Event()), timeout=5
    )
    assert playback.seconds == pytest.approx(1.0) and speaker.seconds_played == pytest.approx(1.0)


async def test_realtime_wav_speaker_takes_real_time_and_barge_in_stops_it_early(tmp_path):
    path = tmp_path / "spoken.wav"
    speaker = WavFileSpeaker(path, realtime=True)

    started = time.monotonic()
    playback = await asyncio.wait_for(
        speaker.play(stream_of(tone(0.3, 16_000)), asyncio.Event()), timeout=5
    )
    assert 0.28 <= time.monotonic() - started < 0.6  # paced like a real speaker
    assert playback.first_audio_at is not None and playback.first_audio_at - started < 0.05

    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.25, stop.set)
    started = time.monotonic()
    playback = await asyncio.wait_for(speaker.play(stream_of(tone(3.0, 16_000)), stop), timeout=5)
    took = time.monotonic() - started
    assert playback.interrupted
    assert 0.25 <= took < 0.4  # stopped within a block, not after 3 s
    assert 0.2 <= playback.seconds <= 0.35
    assert soundfile.info(path).duration == pytest.approx(0.3 + playback.seconds, abs=0.01)


async def test_barge_in_while_the_engine_is_still_thinking():
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.1, stop.set)
    started = time.monotonic()
    slow = stream_of(tone(0.05, 16_000), tone(0.05, 16_000), gap_s=5.0)  # a stalled cloud engine
    playback = await asyncio.wait_for(WavFileSpeaker(None).play(slow, stop), timeout=5)
    assert playback.interrupted and playback.seconds == 0.0
    assert time.monotonic() - started < 0.5


def test_blocks_cut_on_whole_samples():
    chunk = Audio(bytes(2 * 22_050 + 1), 22_050)  # a stray odd byte is dropped
    cut = list(blocks(chunk, 50))
    assert sum(len(b.pcm) for b in cut) == 2 * 22_050
    assert {len(b.pcm) for b in cut[:-1]} == {2 * 1102}
