"""On-device speech-to-text with faster-whisper (CTranslate2), loaded once and kept warm."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from heimdall_edge.audio import SAMPLE_RATE, Audio
from heimdall_edge.engines.base import EngineError, Transcript
from heimdall_edge.engines.hallucinations import screened
from heimdall_edge.engines.local.models import whisper_model_dir
from heimdall_edge.settings import SpeechToTextSettings

if TYPE_CHECKING:
    from faster_whisper import WhisperModel


class FasterWhisperEngine:
    name = "faster-whisper"

    def __init__(self, settings: SpeechToTextSettings, models_dir: Path) -> None:
        self._settings = settings
        self._models_dir = models_dir
        self._model: WhisperModel | None = None
        # One inference at a time: CTranslate2 already uses every core for one.
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        async with self._lock:
            if self._model is None:
                self._model = await asyncio.to_thread(self._load)

    def _load(self) -> WhisperModel:
        folder = whisper_model_dir(self._models_dir, self._settings.model)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub at run time
        from faster_whisper import WhisperModel

        try:
            return WhisperModel(
                str(folder),
                device="cpu",
                compute_type=self._settings.compute_type,
                cpu_threads=self._settings.cpu_threads,
                local_files_only=True,
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise EngineError(
                f"faster-whisper model in {folder} failed to load ({exc}): "
                "the files may be corrupt; fetch the model again"
            ) from exc

    async def transcribe(self, audio: Audio) -> Transcript:
        """What was said; "" when nothing was, or Whisper wrote only a stock phrase made up from noise."""
        if audio.sample_rate != SAMPLE_RATE:
            raise EngineError(
                f"faster-whisper needs {SAMPLE_RATE} Hz audio, got {audio.sample_rate}"
            )
        await self.load()
        await self._lock.acquire()
        # The lock is let go when the inference ends, not when its caller stops waiting: a
        # transcription dropped half-way (a lost hedge, a speculation the person talked over)
        # runs on in its thread, and the next one must not share the cores with it.
        inference = asyncio.ensure_future(asyncio.to_thread(self._transcribe, audio))
        inference.add_done_callback(self._inference_done)
        text = await asyncio.shield(inference)
        return Transcript(text=screened(text, self.name), engine=self.name)

    def _inference_done(self, inference: asyncio.Future[str]) -> None:
        self._lock.release()
        if not inference.cancelled():
            inference.exception()  # retrieved: a dropped caller's error is not "never retrieved"

    def _transcribe(self, audio: Audio) -> str:
        assert self._model is not None
        samples = np.frombuffer(audio.pcm, dtype=np.int16).astype(np.float32) / 32768.0
        segments, _info = self._model.transcribe(
            samples,
            beam_size=self._settings.beam_size,
            language=self._settings.language,
            condition_on_previous_text=False,
            without_timestamps=True,
        )
        # `segments` is lazy: decoding happens while we join, inside this worker thread.
        return " ".join(segment.text.strip() for segment in segments).strip()
