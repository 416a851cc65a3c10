"""Speakers: a real PortAudio output and a simulated one that writes a WAV file.

Audio is streamed: the first chunk plays while the engine is still producing
the rest. It goes out in ~50 ms blocks, and `stop` is checked between blocks,
so a button press (barge-in) silences the reply within about one block.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from heimdall_edge.audio import SAMPLE_WIDTH, Audio
from heimdall_edge.devices.base import DeviceError, Playback
from heimdall_edge.devices.portaudio import (
    FALLBACK_RATES,
    find_device,
    first_supported_format,
    quiet_portaudio,
)
from heimdall_edge.settings import SpeakerSettings
from heimdall_edge.streams import aclose

BLOCK_MS = 50
"""Size of each write, and so the longest a barge-in waits."""


# --- the playing loop shared by both speakers -----------------------------------------------


def blocks(chunk: Audio, block_ms: int = BLOCK_MS) -> Iterator[Audio]:
    """A chunk cut into blocks of at most `block_ms` (whole samples)."""
    size = max(1, chunk.sample_rate * block_ms // 1000) * SAMPLE_WIDTH
    usable = len(chunk.pcm) - len(chunk.pcm) % SAMPLE_WIDTH
    for start in range(0, usable, size):
        yield Audio(chunk.pcm[start : min(start + size, usable)], chunk.sample_rate)


async def next_unless_stopped(iterator: AsyncIterator[Audio], stop: asyncio.Event) -> Audio | None:
    """The next chunk, or None as soon as `stop` is set (even while the engine is still thinking).

    Raises StopAsyncIteration at the end of the chunks.
    """
    if stop.is_set():
        return None
    following = asyncio.ensure_future(anext(iterator))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({following, stopped}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        following.cancel()
        raise
    finally:
        stopped.cancel()
    if following.done():
        return following.result()
    following.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await following
    return None


WriteBlock = Callable[[Audio], Awaitable[float]]
"""Send one block; return the monotonic time it started going out."""


async def play_in_blocks(
    chunks: AsyncIterable[Audio], stop: asyncio.Event, write: WriteBlock, block_ms: int = BLOCK_MS
) -> Playback:
    """Write chunks block by block until they end or `stop` is set."""
    playback = Playback()
    iterator = aiter(chunks)
    try:
        while (chunk := await next_unless_stopped(iterator, stop)) is not None:
            for block in blocks(chunk, block_ms):
                if stop.is_set():
                    break
                started = await write(block)
                if playback.first_audio_at is None:
                    playback.first_audio_at = started
                playback.seconds += block.seconds
        playback.interrupted = True  # only `stop` leaves the loop this way
    except StopAsyncIteration:
        pass
    finally:
        with contextlib.suppress(RuntimeError):  # already running/closed after a cancelled anext
            await aclose(iterator)
    return playback


# --- the real speaker -----------------------------------------------------------------------


class OutputStream(Protocol):
    """An open playback stream taking mono s16le at `rate`."""

    rate: int

    def write(self, pcm: bytes) -> None:
        """Blocks until the card has room for it."""
        ...

    def drain(self) -> None:
        """Wait until everything written has been heard."""
        ...

    def close(self) -> None:
        """Stop at once, dropping what is still buffered."""
        ...


def choose_output_format(pa: Any, index: int, name: str, rate: int) -> tuple[int, int]:
    """(rate, channels) the card takes: the audio's own rate in mono if it can, else 48 or
    44.1 kHz, else stereo."""
    if found := first_supported_format(pa, index, "output", dict.fromkeys((rate, *FALLBACK_RATES))):
        return found
    raise DeviceError(
        f"output device {name!r} plays none of {rate}, 48000, 44100 Hz as 16-bit mono or stereo: "
        "set speaker.device to its plug/dmix ALSA device (see hardware/README.md)"
    )


class PyAudioOutput:
    """A PortAudio output stream for audio at `rate`, resampled and upmixed for the card."""

    def __init__(self, pa: Any, index: int, name: str, rate: int) -> None:
        import pyaudio

        self.rate = rate
        self.name = name
        self.device_rate, self.channels = choose_output_format(pa, index, name, rate)
        self._resampler: Any = None
        if self.device_rate != rate:
            import soxr

            self._resampler = soxr.ResampleStream(rate, self.device_rate, 1, dtype="int16")
        try:
            self._stream = pa.open(
                format=pyaudio.paInt16,
                channels=self.channels,
                rate=self.device_rate,
                output=True,
                output_device_index=index,
            )
        except OSError as exc:
            raise DeviceError(
                f"output device {name!r} cannot be opened at {self.device_rate} Hz ({exc}): "
                "is another program using it? Share it through dmix (see hardware/README.md)"
            ) from exc
        self._running = True

    def _convert(self, samples: np.ndarray, last: bool = False) -> bytes:
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=last)
        if self.channels == 2:
            samples = np.repeat(samples, 2)
        return samples.astype("<i2", copy=False).tobytes()

    def write(self, pcm: bytes) -> None:
        if not self._running:
            self._stream.start_stream()
            self._running = True
        self._stream.write(
            self._convert(np.frombuffer(pcm, dtype="<i2")), exception_on_underflow=False
        )

    def drain(self) -> None:
        if self._resampler is not None:
            tail = self._convert(np.zeros(0, dtype=np.int16), last=True)
            self._resampler.clear()
            if tail and self._running:
                self._stream.write(tail, exception_on_underflow=False)
        if self._running:
            self._stream.stop_stream()  # returns once the buffered audio has played
            self._running = False

    def close(self) -> None:
        self._stream.close()  # an active stream is aborted: pending audio is dropped


class PyAudioSpeaker:
    """The sound card's output.

    Blocking writes run in worker threads; the stream stays open between replies
    and is reopened only when the rate changes or after a barge-in dropped it.
    """

    def __init__(
        self,
        settings: SpeakerSettings,
        *,
        open_stream: Callable[[int], OutputStream] | None = None,
        block_ms: int = BLOCK_MS,
    ) -> None:
        self.settings = settings
        self.block_ms = block_ms
        self._open_stream = open_stream or self._open_pyaudio
        self._pa: Any = None
        self._stream: OutputStream | None = None

    def _open_pyaudio(self, rate: int) -> OutputStream:
        if self._pa is None:
            self._pa = quiet_portaudio()
        index, name = find_device(self._pa, self.settings.device, "output", "speaker.device")
        return PyAudioOutput(self._pa, index, name, rate)

    def _stream_for(self, rate: int) -> OutputStream:
        if self._stream is not None and self._stream.rate != rate:
            self._stream.drain()
            self._stream.close()
            self._stream = None
        if self._stream is None:
            self._stream = self._open_stream(rate)
        return self._stream

    async def play(self, chunks: AsyncIterable[Audio], stop: asyncio.Event) -> Playback:
        async def write(block: Audio) -> float:
            stream = (
                self._stream
                if self._stream is not None and self._stream.rate == block.sample_rate
                else None
            )
            if stream is None:
                stream = await asyncio.to_thread(self._stream_for, block.sample_rate)
            started = time.monotonic()
            await asyncio.to_thread(stream.write, block.pcm)
            return started

        try:
            playback = await play_in_blocks(chunks, stop, write, self.block_ms)
            if self._stream is not None:
                await asyncio.to_thread(
                    self._discard if playback.interrupted else self._stream.drain
                )
        except OSError as exc:
            await asyncio.to_thread(self._reset)
            raise DeviceError(
                f"speaker {self.settings.device or 'default'} failed ({exc}): check the amplifier "
                "or USB speaker and `aplay -l`; the next reply reopens it"
            ) from exc
        return playback

    def _discard(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _reset(self) -> None:
        """Forget the stream and PortAudio itself, so the next play re-scans the devices."""
        with contextlib.suppress(Exception):
            self._discard()
        self._stream = None
        if self._pa is not None:
            self._pa.terminate()
            self._pa = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self._reset)


# --- the simulated speaker ------------------------------------------------------------------


class WavFileSpeaker:
    """A speaker that appends what it plays to a WAV file (or, with no path, only counts it).

    With `realtime` every block takes its own duration to "play", so barge-in
    and first-audio timings behave as on a real speaker. The file is written at
    the rate of the first chunk; later chunks at other rates are resampled.
    """

    def __init__(
        self, path: str | Path | None = None, realtime: bool = False, *, block_ms: int = BLOCK_MS
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.realtime = realtime
        self.block_ms = block_ms
        self.sample_rate: int | None = None
        self.seconds_played = 0.0
        self.plays = 0
        self._resampler: Any = None
        self._resampler_rate: int | None = None

    async def play(self, chunks: AsyncIterable[Audio], stop: asyncio.Event) -> Playback:
        written = bytearray()
        next_at: float | None = None

        async def write(block: Audio) -> float:
            nonlocal next_at
            started = time.monotonic()
            if self.sample_rate is None:
                self.sample_rate = block.sample_rate
            written.extend(self._convert(block))
            if self.realtime:
                next_at = max(next_at or started, started) + block.seconds
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
            return started

        try:
            playback = await play_in_blocks(chunks, stop, write, self.block_ms)
        finally:
            written.extend(self._flush_resampler())
            if written and self.path is not None:
                await asyncio.to_thread(self._append, bytes(written))
        self.plays += 1
        self.seconds_played += playback.seconds
        return playback

    def _convert(self, block: Audio) -> bytes:
        if block.sample_rate == self.sample_rate:
            return block.pcm
        import soxr

        out = b""
        if self._resampler_rate != block.sample_rate:
            out = self._flush_resampler()
            self._resampler = soxr.ResampleStream(
                block.sample_rate, self.sample_rate, 1, dtype="int16"
            )
            self._resampler_rate = block.sample_rate
        return out + self._resampler.resample_chunk(np.frombuffer(block.pcm, dtype="<i2")).tobytes()

    def _flush_resampler(self) -> bytes:
        if self._resampler is None:
            return b""
        tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.int16), last=True).tobytes()
        self._resampler, self._resampler_rate = None, None
        return tail

    def _append(self, pcm: bytes) -> None:
        import soundfile

        assert self.path is not None and self.sample_rate is not None
        samples = np.frombuffer(pcm, dtype="<i2")
        if self.plays == 0 or not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(self.path, samples, self.sample_rate, subtype="PCM_16", format="WAV")
            return
        with soundfile.SoundFile(self.path, "r+") as wav:
            wav.seek(0, soundfile.SEEK_END)
            wav.write(samples)

    async def aclose(self) -> None:
        return None
