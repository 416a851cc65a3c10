"""On-device engines on real models and real speech."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import jiwer
import numpy as np
import pytest

from heimdall_edge.audio import Audio, read_audio, resample, to_int16
from heimdall_edge.engines.base import EngineError, ReplyRequest
from heimdall_edge.engines.local.faster_whisper import FasterWhisperEngine
from heimdall_edge.engines.local.offline_reply import OfflineReplyEngine
from heimdall_edge.engines.local.piper import PiperEngine
from heimdall_edge.settings import SpeechToTextSettings, TextToSpeechSettings
from heimdall_edge.testing.text import words


async def test_whisper_transcribes_jfk(
    whisper: FasterWhisperEngine, speech_dir: Path, transcripts: dict[str, str]
) -> None:
    transcript = await whisper.transcribe(read_audio(speech_dir / "jfk.flac"))
    assert transcript.engine == "faster-whisper"
    assert jiwer.wer(words(transcripts["jfk.flac"]), words(transcript.text)) < 0.1


@pytest.mark.parametrize(
    "name",
    [
        "v2j_what_time_is_it.wav",
        "ps_goforward.wav",
        "ls_1089-134691-0001.flac",
        "picovoice_cheetah_test_en.wav",
    ],
)
async def test_whisper_on_real_recordings(
    whisper: FasterWhisperEngine, speech_dir: Path, transcripts: dict[str, str], name: str
) -> None:
    transcript = await whisper.transcribe(read_audio(speech_dir / name))
    assert jiwer.wer(words(transcripts[name]), words(transcript.text)) <= 0.25, transcript.text


async def test_whisper_rejects_wrong_rate(whisper: FasterWhisperEngine) -> None:
    with pytest.raises(EngineError, match="16000 Hz"):
        await whisper.transcribe(Audio(bytes(4800), 48000))


async def test_missing_models_say_where_they_looked_and_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(
        EngineError,
        match=r"faster-whisper model 'small.en' not found .*fetch-models --whisper small.en",
    ):
        await FasterWhisperEngine(SpeechToTextSettings(model="small.en"), tmp_path).load()
    with pytest.raises(
        EngineError,
        match=r"Piper voice 'en_GB-alan-low' not found .*fetch-models --voice en_GB-alan-low",
    ):
        await PiperEngine(TextToSpeechSettings(voice="en_GB-alan-low"), tmp_path).load()


async def test_corrupt_model_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "faster-whisper-tiny.en"
    folder.mkdir()
    for name in ("model.bin", "config.json", "tokenizer.json"):
        (folder / name).write_bytes(b"garbage")
    with pytest.raises(EngineError, match="failed to load"):
        await FasterWhisperEngine(SpeechToTextSettings(), tmp_path).load()


async def test_piper_speaks_sentence_by_sentence_and_whisper_hears_it(
    piper: PiperEngine, whisper: FasterWhisperEngine
) -> None:
    text = "The kitchen light is on. It is seven degrees outside."
    chunks = [chunk async for chunk in piper.synthesize(text)]
    assert len(chunks) == 2
    assert all(chunk.sample_rate == 22050 and chunk.seconds > 0.5 for chunk in chunks)
    samples = (
        np.frombuffer(b"".join(c.pcm for c in chunks), dtype=np.int16).astype(np.float32) / 32768
    )
    heard = await whisper.transcribe(
        Audio(to_int16(resample(samples, 22050, 16000)).tobytes(), 16000)
    )
    assert jiwer.wer(words(text), words(heard.text)) <= 0.2, heard.text


def test_offline_replies_answer_what_needs_no_network() -> None:
    engine = OfflineReplyEngine(now=lambda: datetime(2026, 11, 26, 15, 4))
    ask = lambda text: engine.answer(ReplyRequest(text, status={"pending_captures": "3"}))
    assert ask("What time is it?") == "It's 3:04 PM."
    assert ask("what's the date today") == "Today is Thursday, November 26, 2026."
    assert ask("status please") == "I'm working. 3 captures are waiting to sync."
    assert ask("remember to buy milk") == "I saved that."
    assert ask("tell me a joke") == "Got it. I saved that."
    assert "didn't catch" in ask("  ")
