"""Shared fixtures: where the real models and recordings are, and isolated settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_asyncio

from heimdall_edge.engines.local.faster_whisper import FasterWhisperEngine
from heimdall_edge.engines.local.piper import PiperEngine
from heimdall_edge.settings import SpeechToTextSettings, TextToSpeechSettings
from heimdall_edge.testing.data import shared_dir


def _shared_dir(env: str, name: str) -> Path:
    try:
        return shared_dir(env, name)
    except FileNotFoundError as exc:
        pytest.fail(f"{exc} (CI sets it to ../shared/{name})")


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return _shared_dir("HEIMDALL_MODELS_DIR", "models")


@pytest.fixture(scope="session")
def speech_dir() -> Path:
    return _shared_dir("HEIMDALL_SPEECH_DIR", "speech")


@pytest.fixture(scope="session")
def clip(speech_dir: Path) -> Path:
    """A short real recording ("what time is it", 48 kHz stereo) for device tests."""
    return speech_dir / "v2j_what_time_is_it.wav"


@pytest.fixture(scope="session")
def transcripts(speech_dir: Path) -> dict[str, str]:
    lines = (speech_dir / "transcripts.tsv").read_text().splitlines()
    return dict(line.split("\t", 1) for line in lines if line.strip())


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the machine's /etc config or writes /var/lib."""
    for name in list(os.environ):
        if name.startswith("HEIMDALL_") and name not in (
            "HEIMDALL_MODELS_DIR",
            "HEIMDALL_SPEECH_DIR",
        ):
            monkeypatch.delenv(name)
    for name in (
        "OPENAI_API_KEY",
        "ELEVENLABS_API_KEY",
        "CREDENTIALS_DIRECTORY",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HEIMDALL_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HEIMDALL_MODELS_DIR", str(_shared_dir("HEIMDALL_MODELS_DIR", "models")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest_asyncio.fixture(scope="session")
async def whisper(models_dir: Path) -> FasterWhisperEngine:
    """The real tiny.en model, loaded once for the whole run."""
    engine = FasterWhisperEngine(SpeechToTextSettings(), models_dir)
    await engine.load()
    return engine


@pytest_asyncio.fixture(scope="session")
async def piper(models_dir: Path) -> PiperEngine:
    """The real en_US-joe-medium voice, loaded once for the whole run."""
    engine = PiperEngine(TextToSpeechSettings(), models_dir)
    await engine.load()
    return engine
