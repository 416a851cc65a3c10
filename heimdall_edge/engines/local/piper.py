"""On-device text-to-speech with Piper, sentence by sentence so playback starts early."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from heimdall_edge.audio import Audio
from heimdall_edge.engines.base import EngineError, VoiceIdentity
from heimdall_edge.engines.local.models import piper_voice_files
from heimdall_edge.settings import TextToSpeechSettings

if TYPE_CHECKING:
    from piper import PiperVoice


class PiperEngine:
    name = "piper"

    def __init__(self, settings: TextToSpeechSettings, models_dir: Path) -> None:
        self._settings = settings
        self._models_dir = models_dir
        self._voice: PiperVoice | None = None
        self._lock = asyncio.Lock()

    @property
    def sample_rate(self) -> int | None:
        return self._voice.config.sample_rate if self._voice else None

    def cache_identity(self) -> VoiceIdentity:
        return VoiceIdentity(
            engine=self.name,
            voice=self._settings.voice,
            model="piper",
            output_format="pcm",
            settings={"length_scale": self._settings.length_scale},
        )

    async def load(self) -> None:
        async with self._lock:
            if self._voice is None:
                self._voice = await asyncio.to_thread(self._load)

    def _load(self) -> PiperVoice:
        files = piper_voice_files(self._models_dir, self._settings.voice)
        from piper import PiperVoice

        try:
            return PiperVoice.load(files.onnx, config_path=files.config)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(
                f"Piper voice {files.onnx} failed to load ({exc}): fetch the voice again"
            ) from exc

    async def synthesize(self, text: str) -> AsyncIterator[Audio]:
        await self.load()
        assert self._voice is not None
        from piper import SynthesisConfig

        config = SynthesisConfig(length_scale=self._settings.length_scale)
        sentences = iter(self._voice.synthesize(text, syn_config=config))
        async with self._lock:
            # Piper synthesizes one sentence per next(): run each in a worker thread.
            while (chunk := await asyncio.to_thread(next, sentences, None)) is not None:
                yield Audio(chunk.audio_int16_bytes, chunk.sample_rate)
