"""A simulated room between the file microphone and the WAV speaker: a person, echo, noise.

`run --simulate` and `demo` run the whole pipeline on simulated devices. On the
device the microphone also hears the speaker (the earcon, the reply: through
the air, a little late) and the room's noise, and barge-in, the endpointer and
the earcon canceller all have to cope with that. The room mixes it in: the
person (a FileMicrophone) says their lines but waits while the device speaks,
what the speaker plays comes back `echo_delay_ms` later at `echo_db`, noise
sits `snr_db` below the person's speech, and `interject` has the person talk
over a reply.

Without `realtime` the microphone is the clock: the speaker plays at most a
block ahead of what the microphone has read, the microphone waits for a block
that is ready, and a playback lasts as many frames as its audio. Runs are fast,
exact and repeatable.
"""

from __future__ import annotations

import asyncio
import collections
import enum
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from heimdall_edge.audio import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE, Audio
from heimdall_edge.devices.base import MicrophoneEnded, Playback
from heimdall_edge.devices.microphone import FileMicrophone
from heimdall_edge.devices.noise import NoiseSource, noise_source, speech_level
from heimdall_edge.devices.speaker import WavFileSpeaker, blocks
from heimdall_edge.streams import aclose

NO_SPEECH_RMS = 32767 * 10 ** (-30 / 20)
"""The speech level noise is set against when the person says nothing: -30 dBFS (1036)."""
NOISE_SEED = 0


class _Speaker(enum.Enum):
    """What the speaker is doing, as far as the microphone's lockstep cares."""

    IDLE = "idle"  # not playing, or only waiting for its sound to be heard
    THINKING = "thinking"  # waiting for the engine's next chunk
    BUSY = "busy"  # about to play a block
    SENDING = "sending"  # a block handed to the WAV speaker, not yet known to be written


class _Air:
    """The sound on its way to the microphone, and the clock the microphone and speaker share."""

    def __init__(self) -> None:
        self.frames = 0
        """Frames the microphone has handed out."""
        self.cursor = 0
        """The sample at which the speaker's next sound arrives, at the earliest."""
        self.speaker = _Speaker.IDLE
        self.playing = 0
        """play() calls in progress."""
        self.ended = False
        self.closed = False
        self._sound = np.zeros(0)  # from sample `now` on
        self._tick = asyncio.Event()

    @property
    def now(self) -> int:
        """Samples heard so far."""
        return self.frames * FRAME_SAMPLES

    @property
    def deaf(self) -> bool:
        """The microphone ended or was closed: nobody may wait for it."""
        return self.ended or self.closed

    @property
    def pending(self) -> bool:
        """A playback is going on, or there is sound in the air not heard yet."""
        return self.playing > 0 or len(self._sound) > 0

    def add(self, at: int, samples: np.ndarray) -> None:
        """Mix `samples` in from sample `at` on (the part already heard is left out)."""
        skip = max(0, self.now - at)
        samples, offset = samples[skip:], at + skip - self.now
        if (grow := offset + len(samples) - len(self._sound)) > 0:
            self._sound = np.concatenate([self._sound, np.zeros(grow)])
        self._sound[offset : offset + len(samples)] += samples

    def hear(self) -> np.ndarray:
        """The next frame of sound; the clock moves on by that frame."""
        frame = np.zeros(FRAME_SAMPLES)
        head = self._sound[:FRAME_SAMPLES]
        frame[: len(head)] = head
        self._sound = self._sound[FRAME_SAMPLES:]
        self.frames += 1
        self.changed()
        return frame

    def set_speaker(self, state: _Speaker) -> None:
        self.speaker = state
        self.changed()

    def changed(self) -> None:
        """Wake whoever waits on the clock or on the speaker."""
        self._tick.set()
        self._tick = asyncio.Event()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._tick.wait()

    async def wait_to_hear(self) -> None:
        """Wait until the speaker's sound for the next frame is in the air.

        A speaker waiting for its engine gets one frame of real time per frame, then the
        microphone goes on without it (the engine is late, as it would be on the device).
        """
        while not self._may_hear():
            timeout = FRAME_MS / 1000 if self.speaker is _Speaker.THINKING else None
            try:
                await asyncio.wait_for(self._tick.wait(), timeout)
            except TimeoutError:
                return

    def _may_hear(self) -> bool:
        if self.deaf or self.speaker is _Speaker.IDLE:
            return True
        return self.speaker is not _Speaker.SENDING and self.cursor >= self.now + FRAME_SAMPLES


class RoomMicrophone:
    """The room's microphone: the person, the speaker's echo, interjections and noise, mixed."""

    def __init__(
        self,
        person: FileMicrophone,
        air: _Air,
        noise: NoiseSource | None,
        noise_gain: float,
        name: str,
    ) -> None:
        self.name = name
        self._person = person
        self._air = air
        self._noise = noise
        self._noise_gain = noise_gain

    @property
    def position(self) -> int:
        """Frames read so far."""
        return self._air.frames

    @property
    def person(self) -> FileMicrophone:
        """Who talks in the room: `person.queue(path)` / `person.say(pcm)` gives them a line."""
        return self._person

    async def read(self) -> bytes:
        """The next frame. MicrophoneEnded once the person is done and nothing is left to hear."""
        air = self._air
        if not self._person.realtime:
            await asyncio.sleep(0)  # the speaker's turn, or whoever is about to start it
            await air.wait_to_hear()
        self._person.hold = air.playing > 0
        try:
            said = np.frombuffer(await self._person.read(), dtype="<i2")
            air.ended = False
        except MicrophoneEnded:
            if not air.pending:
                air.ended = True
                air.changed()
                raise
            said = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        mixed = said + air.hear()
        if self._noise is not None:
            mixed += self._noise_gain * self._noise.frame()
        return np.clip(np.rint(mixed), -32768, 32767).astype("<i2").tobytes()

    def flush(self) -> None:
        """Restart the person's real-time schedule; sound in the air stays."""
        self._person.flush()

    async def aclose(self) -> None:
        self._air.closed = True
        self._air.changed()
        await self._person.aclose()


@dataclass
class _Turn:
    """One playback's progress."""

    started: bool = False
    confirmed_s: float = 0.0
    """Seconds the WAV speaker is known to have written."""
    sending: tuple[Audio, int, np.ndarray] | None = None
    """The block handed over last: where its sound starts, and that sound."""
    rate: int = SAMPLE_RATE
    resampler: Any = None
    interjection: tuple[int, np.ndarray, int] | None = None
    """Where the person's interjection for this playback lands, what it is, and after_ms in samples."""


class RoomSpeaker:
    """The room's speaker: plays through the WAV speaker and into the air, in step with the
    microphone unless real-time."""

    def __init__(
        self, wav: WavFileSpeaker, air: _Air, *, echo_gain: float, delay: int, realtime: bool
    ) -> None:
        self._wav = wav
        self._air = air
        self._gain = echo_gain
        self._delay = delay
        self._lead = max(FRAME_SAMPLES, SAMPLE_RATE * wav.block_ms // 1000)
        self._realtime = realtime
        self._one_at_a_time = asyncio.Lock()
        self._interjections: collections.deque[tuple[np.ndarray, int]] = collections.deque()

    def interject(self, pcm: bytes, after_ms: int) -> None:
        samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2").astype(np.float64)
        self._interjections.append((samples, SAMPLE_RATE * after_ms // 1000))

    async def play(self, chunks: AsyncIterable[Audio], stop: asyncio.Event) -> Playback:
        air = self._air
        air.playing += 1
        try:
            async with self._one_at_a_time:
                return await self._play(chunks, stop)
        finally:
            air.playing -= 1
            air.changed()

    async def _play(self, chunks: AsyncIterable[Audio], stop: asyncio.Event) -> Playback:
        air = self._air
        turn = _Turn()
        air.set_speaker(_Speaker.BUSY)
        try:
            playback = await self._wav.play(self._blocks(chunks, turn), stop)
            self._settle(turn, playback)
        finally:
            air.set_speaker(_Speaker.IDLE)
        if not turn.started:
            self._interject(air.now)
        elif turn.interjection is not None and not playback.interrupted:
            self._withdraw_if_unheard(turn.interjection)
        if not self._realtime and not playback.interrupted:
            # The sound has left the room once the microphone heard it all. A stopped playback
            # returns at once, as a real one does: who stopped it may be reading no more.
            await air.until(lambda: air.now >= air.cursor or air.deaf)
        return playback

    async def _blocks(self, chunks: AsyncIterable[Audio], turn: _Turn) -> AsyncIterator[Audio]:
        """The chunks in blocks, each put in the air as it goes to the WAV speaker."""
        air = self._air
        iterator = aiter(chunks)
        try:
            while True:
                air.set_speaker(_Speaker.THINKING)
                try:
                    chunk = await anext(iterator)
                except StopAsyncIteration:
                    break
                air.set_speaker(_Speaker.BUSY)
                for block in blocks(chunk, self._wav.block_ms):
                    if not self._realtime:
                        await air.until(
                            lambda: air.now + self._delay + self._lead >= air.cursor or air.deaf
                        )
                    turn.sending = (block, *self._send(turn, block))
                    air.set_speaker(_Speaker.SENDING)
                    yield block
                    turn.confirmed_s += block.seconds
                    turn.sending = None
                    air.set_speaker(_Speaker.BUSY)
            self._into_air(self._resampler_tail(turn))
        finally:
            await aclose(iterator)
            if turn.sending is None:
                air.set_speaker(_Speaker.IDLE)

    def _send(self, turn: _Turn, block: Audio) -> tuple[int, np.ndarray]:
        if not turn.started:
            turn.started = True
            turn.interjection = self._interject(self._air.now)
        if block.sample_rate != turn.rate:
            self._into_air(self._resampler_tail(turn))
            turn.rate = block.sample_rate
            if block.sample_rate != SAMPLE_RATE:
                import soxr

                turn.resampler = soxr.ResampleStream(
                    block.sample_rate, SAMPLE_RATE, 1, dtype="float64", quality="HQ"
                )
        samples = np.frombuffer(block.pcm, dtype="<i2").astype(np.float64)
        if turn.resampler is not None:
            samples = turn.resampler.resample_chunk(samples)
        return self._into_air(samples)

    def _resampler_tail(self, turn: _Turn) -> np.ndarray:
        """What the resampler still holds of the blocks it was given."""
        if turn.resampler is None:
            return np.zeros(0)
        tail = turn.resampler.resample_chunk(np.zeros(0), last=True)
        turn.resampler = None
        return tail

    def _into_air(self, samples: np.ndarray) -> tuple[int, np.ndarray]:
        """Send 16 kHz sound after what is already on its way; (where it starts, its echo)."""
        air = self._air
        start = max(air.cursor, air.now + self._delay)
        echo = samples * self._gain
        if len(echo):
            air.add(start, echo)
            air.cursor = start + len(echo)
            air.changed()
        return start, echo

    def _settle(self, turn: _Turn, playback: Playback) -> None:
        """Take back the sound of the block handed over last if it was never written (stopped)."""
        if turn.sending is None:
            return
        block, start, echo = turn.sending
        turn.sending = None
        if playback.seconds - turn.confirmed_s < block.seconds / 2 and len(echo):
            self._air.add(start, -echo)
            self._air.cursor = start

    def _interject(self, at: int) -> tuple[int, np.ndarray, int] | None:
        if not self._interjections:
            return None
        samples, after = self._interjections.popleft()
        self._air.add(at + after, samples)
        self._air.changed()
        return at + after, samples, after

    def _withdraw_if_unheard(self, interjection: tuple[int, np.ndarray, int]) -> None:
        """A playback that ended by itself before the person would have cut in (a short
        earcon) keeps nobody from talking: the interjection waits for the next one."""
        at, samples, after = interjection
        if self._air.cursor <= at and self._air.now <= at:
            self._air.add(at, -samples)
            self._interjections.appendleft((samples, after))

    async def aclose(self) -> None:
        await self._wav.aclose()


class SimulatedRoom:
    """A person, a speaker and the air between them; `.microphone` and `.speaker` are the devices.

    `echo_db` None means the microphone does not hear the speaker. Noise is set
    `snr_db` below `speech_rms`, by default the level of what the person is to say.
    """

    def __init__(
        self,
        person: FileMicrophone,
        speaker: WavFileSpeaker,
        *,
        echo_db: float | None = None,
        echo_delay_ms: int = 20,
        noise: NoiseSource | None = None,
        snr_db: float = 15.0,
        speech_rms: float | None = None,
    ) -> None:
        parts = [f"room:{person.name}"]
        if echo_db is not None:
            parts.append(f"echo {echo_db:g} dB")
        noise_gain = 0.0
        if noise is not None:
            parts.append(f"{noise.name} noise at {snr_db:g} dB SNR")
            if speech_rms is None:
                speech_rms = speech_level(person.queued_pcm) or NO_SPEECH_RMS
            noise_gain = speech_rms / 10 ** (snr_db / 20)
        self.name = ",".join(parts)
        air = _Air()
        self.microphone = RoomMicrophone(person, air, noise, noise_gain, self.name)
        self.speaker = RoomSpeaker(
            speaker,
            air,
            echo_gain=0.0 if echo_db is None else 10 ** (echo_db / 20),
            delay=SAMPLE_RATE * echo_delay_ms // 1000,
            realtime=person.realtime,
        )

    def interject(self, pcm: bytes, after_ms: int) -> None:
        """Have the person say `pcm` (16 kHz s16le) `after_ms` into the next playback's sound.

        It is heard in full even if the playback is stopped. A playback that ends by
        itself before `after_ms` (an earcon) passes it on to the next one. Each call is
        for one playback: the first for the next one, the second for the one after.
        """
        self.speaker.interject(pcm, after_ms)


def build_room(
    inputs: Sequence[Path | bytes],
    *,
    realtime: bool,
    speaker_wav: Path | None,
    echo_db: float | None,
    noise: str | None,
    snr_db: float,
) -> SimulatedRoom:
    """The room from command-line options; `noise` is one of NOISE_KINDS or an audio file.

    `inputs` are audio files or 16 kHz PCM, said one after another.
    """
    return SimulatedRoom(
        FileMicrophone(list(inputs), realtime=realtime),
        WavFileSpeaker(speaker_wav, realtime=realtime),
        echo_db=echo_db,
        noise=noise_source(noise, seed=NOISE_SEED) if noise else None,
        snr_db=snr_db,
    )
