"""Where the on-device models live, and a clear error when one is missing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from heimdall_edge.engines.base import EngineError

WHISPER_FILES = ("model.bin", "config.json", "tokenizer.json")


@dataclass(frozen=True)
class PiperVoiceFiles:
    onnx: Path
    config: Path


def _fetch_hint(models_dir: Path, flag: str, name: str) -> str:
    return (
        f"run `scripts/fetch-models {flag} {name} --dest {models_dir}` on a machine with network, "
        "or point HEIMDALL_MODELS_DIR at a folder that has it"
    )


def whisper_model_dir(models_dir: Path, name: str) -> Path:
    """A faster-whisper model folder, given as a path or as a size name such as tiny.en."""
    given = Path(name).expanduser()
    candidates = [given] if given.is_absolute() or "/" in name else []
    candidates += [models_dir / f"faster-whisper-{name}", models_dir / name]
    for folder in candidates:
        if all((folder / f).is_file() for f in WHISPER_FILES):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise EngineError(
        f"faster-whisper model {name!r} not found (looked in {looked}; a model folder holds "
        f"{', '.join(WHISPER_FILES)}): {_fetch_hint(models_dir, '--whisper', name)}"
    )


def piper_voice_files(models_dir: Path, voice: str) -> PiperVoiceFiles:
    """A Piper voice's .onnx and .onnx.json, given as a path or as a name such as en_US-joe-medium."""
    if voice.endswith(".onnx"):
        candidates = [Path(voice).expanduser()]
    else:
        candidates = [
            models_dir / f"piper-{voice}" / f"{voice}.onnx",
            models_dir / voice / f"{voice}.onnx",
            models_dir / f"{voice}.onnx",
        ]
    for onnx in candidates:
        config = onnx.with_name(onnx.name + ".json")
        if onnx.is_file() and config.is_file():
            return PiperVoiceFiles(onnx, config)
    looked = ", ".join(str(c) for c in candidates)
    raise EngineError(
        f"Piper voice {voice!r} not found (looked for {looked} with its .onnx.json beside it): "
        f"{_fetch_hint(models_dir, '--voice', voice)}"
    )
