"""Microphones: a real PortAudio input and a simulated one fed from audio files.

Both hand out the appliance's one format: 16 kHz mono s16le in 30 ms frames
(960 bytes). A card that cannot record at 16 kHz is opened at 48 or 44.1 kHz
and resampled here, so the rest of the code never sees another rate.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from heimdall_edge.audio import (
    FRAME_BYTES,
    FRAME_MS,
    SAMPLE_RATE,
    frames,
    noise,
    read_audio,
)
from heimdall_edge.devices.base import DeviceError, MicrophoneEnded
from heimdall_edge.devices.portaudio import (
    FALLBACK_RATES,
    find_device,
    first_supported_format,
    quiet_portaudio,
)
from heimdall_edge.settings import MicrophoneSettings

log = logging.getLogger(__name__)

QUEUED_FRAMES = 100
"""Frames kept while nobody reads (3 s); older ones are dropped first."""
FIRST_BACKOFF_S = 0.5


def choose_input_format(pa: Any, index: int, name: str, rate: int | None) -> tuple[int, int]:
    """(rate, channels) to open the card with: 16 kHz mono if it takes it, else what it does."""
    rates = (rate,) if rate else (SAMPLE_RATE, *FALLBACK_RATES)
    if found := first_supported_format(pa, index, "input", rates):
        return found
    raise DeviceError(
        f"input device {name!r} records at none of {', '.join(map(str, rates))} Hz as 16-bit "
        "mono or stereo: pick its plug/dsnoop ALSA device instead (see hardware/README.md) "
        "or unset microphone.sample_rate"
    )


# --- conversion -----------------------------------------------------------------------------


class FrameConverter:
    """Device blocks (any rate, mono or stereo s16le) to exact 30 ms frames of 16 kHz mono.

    Streaming, so resampling has no clicks at block edges and no sample is lost
    or repeated between blocks.
    """

    def __init__(self, rate: int, channels: int = 1) -> None:
        self.rate = rate
        self.channels = channels
        self._resampler: Any = None
        if rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="int16", quality="HQ")
        self._pending = bytearray()

    def push(self, data: bytes) -> list[bytes]:
        samples = np.frombuffer(data, dtype="<i2")
        if self.channels > 1:
            usable = len(samples) - len(samples) % self.channels
            samples = samples[:usable].reshape(-1, self.channels).mean(axis=1).astype(np.int16)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples)
        self._pending += samples.astype("<i2", copy=False).tobytes()
        whole = len(self._pending) - len(self._pending) % FRAME_BYTES
        out = [bytes(self._pending[i : i + FRAME_BYTES]) for i in range(0, whole, FRAME_BYTES)]
        del self._pending[:whole]
        return out


# --- the real microphone --------------------------------------------------------------------


class InputStream(Protocol):
    """An open capture stream: blocking reads of s16le at `rate` with `channels` interleaved."""

    rate: int
    channels: int
    name: str

    def read(self, frames: int) -> bytes: ...

    def close(self) -> None: ...


class PyAudioInput:
    """One open PortAudio input stream.

    It owns its PortAudio instance, so that reopening after a USB microphone was
    unplugged re-scans the devices and finds it again.
    """

    def __init__(self, settings: MicrophoneSettings) -> None:
        import pyaudio

        self._pa = quiet_portaudio()
        try:
            index, self.name = find_device(self._pa, settings.device, "input", "microphone.device")
            self.rate, self.channels = choose_input_format(
                self._pa, index, self.name, settings.sample_rate
            )
            try:
                self._stream = self._pa.open(
                    format=pyaudio.paInt16,
                    channels=self.channels,
                    rate=self.rate,
                    input=True,
                    input_device_index=index,
                    frames_per_buffer=self.rate * FRAME_MS // 1000,
                )
            except OSError as exc:
                raise DeviceError(
                    f"input device {self.name!r} cannot be opened at {self.rate} Hz ({exc}): "
                    "is another program (arecord, PulseAudio, PipeWire) holding it? "
                    "Use a dsnoop device to share it (see hardware/README.md)"
                ) from exc
        except BaseException:
            self._pa.terminate()
            raise
        log.info("microphone %r open at %d Hz, %d channel(s)", self.name, self.rate, self.channels)

    def read(self, frames: int) -> bytes:
        return self._stream.read(frames, exception_on_overflow=False)

    def close(self) -> None:
        try:
            self._stream.stop_stream()
            self._stream.close()
        except OSError:
            pass  # the device is already gone
        finally:
            self._pa.terminate()


class PyAudioMicrophone:
    """The sound card's microphone, read in a worker thread so the event loop never blocks.

    A microphone that disappears (USB unplugged, driver error) is closed and
    reopened with exponential backoff; `read()` simply waits meanwhile, so the
    service never dies of a loose cable. One warning per outage, one info when
    it is back.
    """

    def __init__(
        self,
        settings: MicrophoneSettings,
        *,
        open_stream: Callable[[], InputStream] | None = None,
        sleep: Callable[[float], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        queued_frames: int = QUEUED_FRAMES,
    ) -> None:
        self.settings = settings
        self.name = f"pyaudio:{settings.device if settings.device is not None else 'default'}"
        self._open_stream = open_stream or (lambda: PyAudioInput(settings))
        self._stopping = threading.Event()
        self._sleep = sleep or self._stopping.wait  # waking early on close
        self._clock = clock
        self._queued_frames = queued_frames
        self._queue: asyncio.Queue[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._open_lock = asyncio.Lock()
        self.dropped_frames = 0
        self._overflowing = False
        self.outages = 0
        self.device_name: str | None = None
        """The PortAudio device last opened, and the rate it runs at (for logs and `doctor`)."""
        self.device_rate: int | None = None

    async def open(self, wait_for_device: bool = False) -> None:
        """Open the card and start reading.

        Raises DeviceError (listing the input devices) if it cannot be opened,
        unless `wait_for_device`: then it is retried in the background like any outage.
        """
        async with self._open_lock:  # two early readers must not start two threads
            if self._thread is not None:
                return
            self._loop = asyncio.get_running_loop()
            self._queue = asyncio.Queue(maxsize=self._queued_frames)
            stream: InputStream | None = None
            try:
                stream = await asyncio.to_thread(self._open_stream)
            except Exception as exc:
                if not wait_for_device:
                    raise
                self._outage_started(exc)
            if stream is not None:
                self.device_name, self.device_rate = stream.name, stream.rate
            self._thread = threading.Thread(
                target=self._run, args=(stream,), name="heimdall-mic", daemon=True
            )
            self._thread.start()

    async def read(self) -> bytes:
        if self._thread is None:
            await self.open(wait_for_device=True)
        assert self._queue is not None
        frame = await self._queue.get()
        if self._queue.empty():
            self._overflowing = False
        return frame

    def flush(self) -> None:
        if self._queue is None:
            return
        while not self._queue.empty():
            self._queue.get_nowait()

    async def aclose(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 2.0)
            self._thread = None

    # -- worker thread --

    def _run(self, stream: InputStream | None) -> None:
        backoff = FIRST_BACKOFF_S
        outage_since: float | None = None if stream is not None else self._clock()
        converter: FrameConverter | None = None
        try:
            while not self._stopping.is_set():
                if stream is None:
                    self._sleep(backoff)
                    backoff = min(backoff * 2, self.settings.reopen_max_backoff_s)
                    if self._stopping.is_set():
                        break
                    try:
                        stream = self._open_stream()
                    except Exception as exc:  # noqa: BLE001 - whatever the cause, keep retrying
                        outage_since = self._outage_continues(outage_since, exc)
                        continue
                    self.device_name, self.device_rate = stream.name, stream.rate
                if (
                    converter is None
                    or converter.rate != stream.rate
                    or converter.channels != stream.channels
                ):
                    converter = FrameConverter(stream.rate, stream.channels)
                try:
                    data = stream.read(stream.rate * FRAME_MS // 1000)
                except Exception as exc:  # noqa: BLE001 - a read error is an outage, never a crash
                    outage_since = self._outage_continues(outage_since, exc)
                    _close_quietly(stream)
                    stream, converter = None, None
                    continue
                if outage_since is not None:
                    log.info(
                        "microphone %s is back after %.1f s",
                        stream.name,
                        self._clock() - outage_since,
                    )
                    outage_since, backoff = None, FIRST_BACKOFF_S
                for frame in converter.push(data):
                    if not self._deliver(frame):
                        return
        finally:
            if stream is not None:
                _close_quietly(stream)

    def _outage_continues(self, since: float | None, exc: BaseException) -> float:
        if since is None:
            self._outage_started(exc)
            return self._clock()
        log.debug("microphone still unavailable: %s", exc)
        return since

    def _outage_started(self, exc: BaseException) -> None:
        self.outages += 1
        log.warning(
            "microphone %s failed (%s): reopening with backoff up to %.0f s; captures wait "
            "meanwhile. Check the USB cable or HAT and `arecord -l`",
            self.device_name or self.name,
            exc,
            self.settings.reopen_max_backoff_s,
            exc_info=not isinstance(exc, (OSError, DeviceError)),
        )

    def _deliver(self, frame: bytes) -> bool:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._enqueue, frame)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False
        return True

    def _enqueue(self, frame: bytes) -> None:
        assert self._queue is not None
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped_frames += 1
            if not self._overflowing:
                self._overflowing = True
                log.warning("microphone frames are not being read fast enough: dropping the oldest")
        self._queue.put_nowait(frame)


def _close_quietly(stream: InputStream) -> None:
    try:
        stream.close()
    except Exception:  # closing a vanished device may fail in many ways; it is gone either way
        log.debug("closing the microphone stream failed", exc_info=True)


# --- the simulated microphone ---------------------------------------------------------------


class FileMicrophone:
    """A microphone that "hears" audio files, then silence.

    With `realtime` it hands out one frame per 30 ms, like a card, and never
    ends; without, it runs as fast as it is read and raises MicrophoneEnded once
    the queued audio is used up and `tail_silence_ms` of silence has followed
    (enough for an endpointer to close the utterance).

    Each queued file is a line, said `gap_ms` after the one before. While `hold`
    is set (the device is speaking) the person finishes the line they are in
    but starts no new one; once it is cleared, the pause before the next line
    starts over.
    """

    def __init__(
        self,
        path_or_paths: str | Path | bytes | Sequence[str | Path | bytes] = (),
        realtime: bool = False,
        *,
        tail_silence_ms: int = 2000,
        gap_ms: int = 1500,
        noise_dbfs: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        lines = (
            [path_or_paths]
            if isinstance(path_or_paths, (str, Path, bytes))
            else list(path_or_paths)
        )
        names = [Path(p).name if not isinstance(p, bytes) else "speech" for p in lines]
        self.name = "file:" + (",".join(names) or "silence")
        self.realtime = realtime
        self._tail_frames = max(1, -(-tail_silence_ms // FRAME_MS))
        self._gap_frames = -(-gap_ms // FRAME_MS)
        self._noise_dbfs = noise_dbfs
        self._clock = clock
        self._sleep = sleep
        self._frames: collections.deque[bytes] = collections.deque()
        """The rest of the line being said."""
        self._lines: collections.deque[tuple[int, list[bytes]]] = collections.deque()
        """Lines not begun yet: (silent frames due before it, its frames)."""
        self._paused = 0
        self._silent_frames = 0
        self._next_at: float | None = None
        self.hold = False
        """Start no new line: the person waits (e.g. for the device's reply)."""
        for line in lines:
            self.say(line) if isinstance(line, bytes) else self.queue(line)

    def queue(self, path: str | Path) -> None:
        """Add an utterance to be heard after what is already queued (and a pause, so they stay apart)."""
        self.say(read_audio(path).pcm)

    def say(self, pcm: bytes) -> None:
        """Like `queue`, for 16 kHz mono s16le PCM."""
        pause = self._gap_frames if self._frames or self._lines else 0
        self._lines.append((pause, frames(pcm)))
        self._silent_frames = 0

    @property
    def queued_pcm(self) -> bytes:
        """What the person is still to say (the pauses between lines left out)."""
        return b"".join(self._frames) + b"".join(b"".join(line) for _, line in self._lines)

    async def read(self) -> bytes:
        if self.realtime:
            await self._pace()
        if not self._frames and self._lines:
            pause = self._lines[0][0]
            if self.hold:
                self._paused = 0
            elif self._paused < pause:
                self._paused += 1
                return bytes(FRAME_BYTES)
            else:
                self._frames.extend(self._lines.popleft()[1])
                self._paused = self._silent_frames = 0
        if self._frames:
            return self._frames.popleft()
        if not self.realtime and not self._lines and self._silent_frames >= self._tail_frames:
            raise MicrophoneEnded(f"microphone {self.name}: no more audio")
        self._silent_frames += 1
        if self._noise_dbfs is None:
            return bytes(FRAME_BYTES)
        return noise(FRAME_MS, self._noise_dbfs, seed=self._silent_frames)

    async def _pace(self) -> None:
        now = self._clock()
        if self._next_at is None:
            self._next_at = now
        delay = self._next_at - now
        self._next_at += FRAME_MS / 1000
        if delay > 0:
            await self._sleep(delay)

    def flush(self) -> None:
        """Restart the real-time schedule; queued utterances stay (they are said next)."""
        self._next_at = None

    async def aclose(self) -> None:
        self._frames.clear()
        self._lines.clear()
