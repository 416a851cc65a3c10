"""Microphones: a real PortAudio device (ALSA's file plugin), the resampling path, outages, files.

PortAudio reads ALSA's configuration when it starts, so every real-device test
runs PyAudio in a child process whose HOME holds an .asoundrc that turns a raw
file into a capture device. The file plugin is not paced in real time and
repeats stale bytes past the end, so the child reads exactly the file's
length from the device and then plays a quiet, paced device.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from heimdall_edge.audio import FRAME_BYTES, read_audio
from heimdall_edge.devices.base import DeviceError, MicrophoneEnded
from heimdall_edge.devices.microphone import (
    FileMicrophone,
    FrameConverter,
    PyAudioMicrophone,
    choose_input_format,
    find_device,
)
from heimdall_edge.settings import MicrophoneSettings
from tests.shared import run_with_alsa_config

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 30


# --- the real device through ALSA's file plugin ------------------------------------------------

ASOUNDRC = """\
pcm.heimdalltestmic {{
    type file
    slave.pcm "null"
    file "/dev/null"
    infile "{infile}"
    format "raw"
    hint {{ show on description "Heimdall test microphone" }}
}}
pcm.!default {{
    type file
    slave.pcm "null"
    file "/dev/null"
    infile "{infile}"
    format "raw"
}}
"""

CHILD = """\
import asyncio, json, sys, time
from heimdall_edge.devices.base import DeviceError
from heimdall_edge.devices.microphone import PyAudioInput, PyAudioMicrophone
from heimdall_edge.settings import MicrophoneSettings

args = json.loads(sys.argv[1])
settings = MicrophoneSettings(**args["settings"])


class UpToFileEnd:
    # The real PortAudio stream for as many samples as the file holds; past
    # that ALSA's file plugin repeats stale bytes, so act as a quiet card.
    def __init__(self):
        self.inner = PyAudioInput(settings)
        self.name, self.rate, self.channels = self.inner.name, self.inner.rate, self.inner.channels
        self.left = args["device_samples"]

    def read(self, n):
        if self.left >= n:
            self.left -= n
            return self.inner.read(n)
        time.sleep(n / self.rate)
        return bytes(2 * n * self.channels)

    def close(self):
        self.inner.close()


async def main():
    mic = PyAudioMicrophone(settings, open_stream=UpToFileEnd, queued_frames=100_000)
    try:
        await mic.open()
    except DeviceError as exc:
        print(json.dumps({"error": str(exc)}))
        return
    frames = [await asyncio.wait_for(mic.read(), 10) for _ in range(args["frames"])]
    await mic.aclose()
    with open(args["out"], "wb") as out:
        out.write(b"".join(frames))
    print(json.dumps({
        "device": mic.device_name, "rate": mic.device_rate, "dropped": mic.dropped_frames
    }))


asyncio.run(main())
"""


def run_child(
    tmp_path: Path, infile: Path, settings: dict, device_samples: int, frames: int
) -> dict:
    out = tmp_path / "captured.raw"
    args = {
        "settings": settings,
        "device_samples": device_samples,
        "frames": frames,
        "out": str(out),
    }
    result = run_with_alsa_config(tmp_path, ASOUNDRC.format(infile=infile), CHILD, args)
    if out.exists():
        result["pcm"] = out.read_bytes()
    return result


def write_device_file(path: Path, speech: bytes, rate: int, pad_s: float = 1.0) -> int:
    """Speech at the device rate, padded with silence to whole 30 ms blocks; length in samples."""
    block = rate * 30 // 1000
    samples = len(speech) // 2 + int(rate * pad_s)
    samples += -samples % block
    path.write_bytes(speech + bytes(2 * samples - len(speech)))
    return samples


def best_alignment(got: np.ndarray, want: np.ndarray, max_lag: int) -> tuple[int, float]:
    """The lag (samples) at which `got` best matches `want`, and the correlation there."""
    best = (0, -1.0)
    n = len(want)
    for lag in range(-max_lag, max_lag + 1):
        a = got[max(0, lag) : max(0, lag) + n].astype(np.float64)
        b = want[max(0, -lag) : max(0, -lag) + len(a)].astype(np.float64)
        m = min(len(a), len(b))
        a, b = a[:m], b[:m]
        corr = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))
        if corr > best[1]:
            best = (lag, corr)
    return best


def envelope(samples: np.ndarray, frame: int = 480) -> np.ndarray:
    usable = len(samples) // frame * frame
    return np.sqrt((samples[:usable].astype(np.float64).reshape(-1, frame) ** 2).mean(axis=1))


def test_speech_through_real_pyaudio_at_16k_arrives_unchanged(tmp_path, clip):
    speech = read_audio(clip).pcm  # 16 kHz
    infile = tmp_path / "mic.raw"
    samples = write_device_file(infile, speech, 16_000)
    frames = samples // 480
    result = run_child(
        tmp_path, infile, {"device": "heimdalltest", "sample_rate": None}, samples, frames
    )

    assert result["device"] == "heimdalltestmic"  # picked by part of its name
    assert result["rate"] == 16_000  # the card took 16 kHz: no resampling
    pcm = result["pcm"]
    assert len(pcm) == frames * FRAME_BYTES
    assert pcm == infile.read_bytes()  # byte for byte, in exact 960-byte frames
    assert result["dropped"] == 0


def test_speech_through_real_pyaudio_at_48k_is_resampled_to_16k(tmp_path, clip):
    source = read_audio(clip)  # the 16 kHz reference
    at_48k = read_audio(clip, sample_rate=48_000).pcm
    infile = tmp_path / "mic48.raw"
    samples = write_device_file(infile, at_48k, 48_000)
    frames = samples // 3 // 480 - 2  # the resampler holds back a few ms
    # The default device, forced to 48 kHz as a card that refuses 16 kHz would be.
    result = run_child(tmp_path, infile, {"device": None, "sample_rate": 48_000}, samples, frames)

    assert result["device"] == "default"
    assert result["rate"] == 48_000
    got = np.frombuffer(result["pcm"], dtype="<i2")
    want = np.frombuffer(source.pcm, dtype="<i2")
    assert len(result["pcm"]) == frames * FRAME_BYTES
    lag, corr = best_alignment(got, want, max_lag=160)  # within 10 ms
    assert corr > 0.98, f"resampled speech does not match the source (corr {corr:.3f} at lag {lag})"
    assert abs(lag) <= 16  # soxr's stream compensates its delay: at most 1 ms off
    env_got, env_want = envelope(got), envelope(want)
    m = min(len(env_got), len(env_want))
    assert np.corrcoef(env_got[:m], env_want[:m])[0, 1] > 0.99
    tail = got[len(want) + 480 :]  # the padding stays silent: no stale bytes were read
    assert np.abs(tail.astype(np.int32)).max(initial=0) < 50


def test_unknown_device_lists_the_devices_there_are(tmp_path):
    infile = tmp_path / "mic.raw"
    infile.write_bytes(bytes(9600))
    result = run_child(tmp_path, infile, {"device": "no-such-mic"}, 0, 0)
    message = result["error"]
    assert "'no-such-mic' not found" in message
    assert "heimdalltestmic" in message and "'default'" in message
    assert "microphone.device" in message and "arecord -l" in message


# --- format choice and conversion, without a device ---------------------------------------------


class FakePyAudio:
    """Just enough of pyaudio.PyAudio for device lookup and format choice."""

    def __init__(self, devices: list[dict], rates: set[int], channels: set[int]) -> None:
        self.devices, self.rates, self.channels = devices, rates, channels

    def get_device_count(self) -> int:
        return len(self.devices)

    def get_device_info_by_index(self, index: int) -> dict:
        return self.devices[index]

    def get_default_input_device_info(self) -> dict:
        raise OSError("No Default Input Device Available")

    def is_format_supported(
        self, rate, input_device=None, input_channels=None, input_format=None, **_
    ):
        if rate in self.rates and input_channels in self.channels:
            return True
        raise ValueError("Invalid sample rate")


SEEED = {"index": 1, "name": "seeed-2mic-voicecard: wm8960 (hw:1,0)", "maxInputChannels": 2}
HDMI = {
    "index": 0,
    "name": "vc4-hdmi-0: MAI PCM (hw:0,0)",
    "maxInputChannels": 0,
    "maxOutputChannels": 2,
}


def test_a_card_refusing_16k_is_opened_at_48k_stereo():
    pa = FakePyAudio([HDMI, SEEED], rates={48_000, 44_100}, channels={2})
    assert find_device(pa, "SEEED", "input", "microphone.device") == (1, SEEED["name"])
    assert find_device(pa, "1", "input", "microphone.device") == (1, SEEED["name"])
    assert choose_input_format(pa, 1, SEEED["name"], None) == (48_000, 2)
    with pytest.raises(DeviceError, match="16000"):
        choose_input_format(pa, 1, SEEED["name"], 16_000)


def test_no_default_input_device_says_what_there_is():
    pa = FakePyAudio([HDMI], rates=set(), channels=set())
    with pytest.raises(DeviceError) as caught:
        find_device(pa, None, "input", "microphone.device")
    assert "no default input device" in str(caught.value)
    assert "none (is a sound card attached?" in str(caught.value)  # HDMI cannot record


@pytest.mark.parametrize("rate", [48_000, 44_100])
def test_converter_resamples_stereo_blocks_into_exact_16k_frames(rate):
    t = np.arange(rate * 2) / rate
    tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
    stereo = np.repeat(tone, 2)  # the same on both channels
    converter = FrameConverter(rate, channels=2)
    block = rate * 30 // 1000
    out = []
    for start in range(0, len(stereo), block * 2):
        out += converter.push(stereo[start : start + block * 2].tobytes())
    assert all(len(frame) == FRAME_BYTES for frame in out)
    assert len(out) >= 2 * 1000 // 30 - 2  # nearly 2 s; the resampler keeps ~25 ms back
    got = np.frombuffer(b"".join(out), dtype="<i2")[1600:]  # skip the filter's warm-up
    want = (np.sin(2 * np.pi * 440 * np.arange(32_000) / 16_000) * 8000)[1600 : 1600 + len(got)]
    lag, corr = best_alignment(got, want, max_lag=40)
    assert corr > 0.99 and abs(lag) <= 2


# --- outages: reopen with backoff (fake streams, no waiting) -------------------------------------


class FakeStream:
    """A 16 kHz device that hands out numbered frames, then fails or goes quiet."""

    rate, channels, name = 16_000, 1, "fake mic"

    def __init__(self, numbers: list[int], then: str = "quiet") -> None:
        self.numbers, self.then, self.closed = list(numbers), then, False

    def read(self, n: int) -> bytes:
        if self.numbers:
            return np.full(n, self.numbers.pop(0), dtype="<i2").tobytes()
        if self.then == "fail":
            raise OSError(-9999, "Unanticipated host error")
        time.sleep(0.002)
        return bytes(2 * n)

    def close(self) -> None:
        self.closed = True


class FlakyDevice:
    """Opens fail `failures[i]` times before the i-th stream is handed out."""

    def __init__(self, streams: list[FakeStream], failures: list[int]) -> None:
        self.streams, self.failures = streams, failures
        self.opened: list[FakeStream] = []
        self.attempts = 0

    def __call__(self) -> FakeStream:
        self.attempts += 1
        if self.failures and self.failures[0] > 0:
            self.failures[0] -= 1
            raise DeviceError("input device 'fake' not found; input devices: none")
        if self.failures:
            self.failures.pop(0)
        stream = self.streams.pop(0)
        self.opened.append(stream)
        return stream


async def read_value(mic: PyAudioMicrophone) -> int:
    """The value of the next non-silent frame."""
    while True:
        frame = await mic.read()
        if any(frame):
            return int(np.frombuffer(frame, dtype="<i2")[0])


async def test_vanishing_microphone_reopens_with_capped_backoff_and_logs_once_per_outage(caplog):
    sleeps: list[float] = []
    now = [100.0]

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    first, second = FakeStream([1, 2], then="fail"), FakeStream([3, 4])
    device = FlakyDevice([first, second], failures=[0, 6])
    settings = MicrophoneSettings(reopen_max_backoff_s=4)
    mic = PyAudioMicrophone(settings, open_stream=device, sleep=fake_sleep, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="heimdall_edge.devices.microphone")

    async def scenario() -> list[int]:
        await mic.open()
        return [await read_value(mic) for _ in range(4)]

    try:
        values = await asyncio.wait_for(scenario(), timeout=10)
    finally:
        await mic.aclose()

    assert values == [1, 2, 3, 4]  # reads simply waited through the outage
    assert first.closed  # the failed stream was closed before reopening
    assert device.attempts == 1 + 6 + 1
    assert sleeps == [0.5, 1, 2, 4, 4, 4, 4]  # doubling, capped at reopen_max_backoff_s
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "reopening with backoff" in warnings[0].getMessage()
    back = [r.getMessage() for r in caplog.records if "is back after" in r.getMessage()]
    assert back == ["microphone fake mic is back after 19.5 s"]  # the sum of the waits
    assert mic.outages == 1


async def test_missing_microphone_at_start_raises_unless_told_to_wait():
    device = FlakyDevice([FakeStream([7])], failures=[1])
    mic = PyAudioMicrophone(MicrophoneSettings(), open_stream=device, sleep=lambda s: None)
    with pytest.raises(DeviceError, match="not found"):
        await asyncio.wait_for(mic.open(), timeout=5)
    await mic.aclose()

    device = FlakyDevice([FakeStream([7])], failures=[2])
    mic = PyAudioMicrophone(MicrophoneSettings(), open_stream=device, sleep=lambda s: None)
    try:
        assert await asyncio.wait_for(read_value(mic), timeout=5) == 7  # read() waits for it
    finally:
        await mic.aclose()
    assert mic.outages == 1


async def test_overflow_drops_the_oldest_frames_and_flush_empties_the_queue():
    gate = threading.Event()

    class Burst(FakeStream):
        def read(self, n: int) -> bytes:
            if not self.numbers:
                gate.set()
            return super().read(n)

    mic = PyAudioMicrophone(
        MicrophoneSettings(), open_stream=lambda: Burst(list(range(1, 11))), queued_frames=4
    )
    try:
        await asyncio.wait_for(mic.open(), timeout=5)
        await asyncio.wait_for(asyncio.to_thread(gate.wait), timeout=5)
        await asyncio.sleep(0.05)  # let the loop run the queued deliveries
        assert mic.dropped_frames >= 6
        mic.flush()
        frame = await asyncio.wait_for(mic.read(), timeout=5)
        assert not any(frame)  # only fresh (quiet) frames after a flush
    finally:
        await mic.aclose()


# --- the simulated microphone ---------------------------------------------------------------------


async def test_file_microphone_plays_files_then_tail_silence_then_ends(clip):
    pcm = read_audio(clip).pcm
    mic = FileMicrophone(clip, realtime=False, tail_silence_ms=300)

    async def drain() -> list[bytes]:
        got = []
        with pytest.raises(MicrophoneEnded):
            while True:
                got.append(await mic.read())
        return got

    got = await asyncio.wait_for(drain(), timeout=10)
    speech_frames = -(-len(pcm) // FRAME_BYTES)
    assert len(got) == speech_frames + 10  # 300 ms of silence after the speech
    assert b"".join(got)[: len(pcm)] == pcm
    assert not any(b"".join(got[speech_frames:]))

    mic.queue(clip)  # a new utterance revives it
    assert await asyncio.wait_for(mic.read(), timeout=5) == got[0]


async def test_file_microphone_with_noise_floor_is_not_digital_silence():
    mic = FileMicrophone([], realtime=False, tail_silence_ms=90, noise_dbfs=-60)
    frames = [await asyncio.wait_for(mic.read(), timeout=5) for _ in range(3)]
    assert all(len(f) == FRAME_BYTES and any(f) for f in frames)
    with pytest.raises(MicrophoneEnded):
        await asyncio.wait_for(mic.read(), timeout=5)


async def test_realtime_file_microphone_paces_30ms_frames_and_never_ends(clip):
    now = [0.0]
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    mic = FileMicrophone(
        [clip], realtime=True, tail_silence_ms=60, clock=lambda: now[0], sleep=fake_sleep
    )
    speech_frames = -(-len(read_audio(clip).pcm) // FRAME_BYTES)

    async def read_many(n: int) -> None:
        for _ in range(n):
            await mic.read()

    await asyncio.wait_for(read_many(speech_frames + 100), timeout=10)  # far past the tail: no end
    assert now[0] == pytest.approx((speech_frames + 99) * 0.030)
    assert all(w == pytest.approx(0.030) for w in waits)

    mic.flush()  # e.g. after speaking: the schedule restarts from now, no burst, no wait
    before = len(waits)
    await asyncio.wait_for(mic.read(), timeout=5)
    assert len(waits) == before


async def test_realtime_file_microphone_really_takes_real_time(clip):
    mic = FileMicrophone([clip], realtime=True)
    started = time.monotonic()
    for _ in range(20):
        await asyncio.wait_for(mic.read(), timeout=5)
    assert 0.5 <= time.monotonic() - started < 1.5  # 19 waits of 30 ms
