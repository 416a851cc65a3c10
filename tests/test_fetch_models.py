"""scripts/fetch-models: name -> Hub mapping, skip-if-present, layout; never touches the network."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fetch-models"


def load_script():
    loader = importlib.machinery.SourceFileLoader("fetch_models", str(SCRIPT))
    spec = importlib.util.spec_from_loader("fetch_models", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


fm = load_script()


def no_network(*args, **kwargs):
    raise AssertionError(f"tried to download: {args} {kwargs}")


@pytest.fixture(autouse=True)
def hub_unreachable(monkeypatch):
    """Make any accidental real hub call fail at once instead of waiting on DNS."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(fm, "_hub", no_network)


def make_whisper(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        (folder / name).write_bytes(b"x")
    return folder


def make_voice(folder: Path, voice: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{voice}.onnx").write_bytes(b"x")
    (folder / f"{voice}.onnx.json").write_bytes(b"{}")
    return folder


# --- names ---------------------------------------------------------------------


def test_whisper_names():
    assert fm.whisper_repo("tiny.en") == "Systran/faster-whisper-tiny.en"
    assert fm.whisper_folder("tiny.en") == "faster-whisper-tiny.en"
    assert fm.whisper_repo("base.en") == "Systran/faster-whisper-base.en"
    assert fm.whisper_repo("distil-small.en") == "Systran/faster-distil-whisper-small.en"
    assert fm.whisper_folder("distil-small.en") == "faster-whisper-distil-small.en"
    assert fm.whisper_repo("someone/faster-whisper-custom") == "someone/faster-whisper-custom"
    assert fm.whisper_folder("someone/faster-whisper-custom") == "faster-whisper-custom"
    with pytest.raises(fm.FetchError, match="unknown faster-whisper model 'tiny.fr'"):
        fm.whisper_repo("tiny.fr")
    with pytest.raises(fm.FetchError):
        fm.whisper_repo("a/b/c")


def test_whisper_names_match_faster_whisper():
    from faster_whisper import utils

    for name, repo in fm.WHISPER_REPOS.items():
        assert utils._MODELS.get(name, repo) == repo, name


def test_piper_names():
    assert fm.piper_repo_files("en_US-joe-medium") == {
        "en_US-joe-medium.onnx": "en/en_US/joe/medium/en_US-joe-medium.onnx",
        "en_US-joe-medium.onnx.json": "en/en_US/joe/medium/en_US-joe-medium.onnx.json",
    }
    assert fm.piper_folder("en_US-joe-medium") == "piper-en_US-joe-medium"
    assert fm.piper_model_card("en_US-joe-medium") == "en/en_US/joe/medium/MODEL_CARD"
    # Speakers with underscores, other languages, other qualities.
    assert fm.piper_repo_files("en_GB-northern_english_male-medium")[
        "en_GB-northern_english_male-medium.onnx"
    ] == ("en/en_GB/northern_english_male/medium/en_GB-northern_english_male-medium.onnx")
    assert fm.piper_voice_parts("de_DE-thorsten-x_low") == ("de_DE", "thorsten", "x_low")
    for bad in ("en_US-joe", "joe-medium", "enUS-joe-medium", "en_US-joe-loud", "en_US--medium"):
        with pytest.raises(fm.FetchError):
            fm.piper_voice_parts(bad)


# --- already present: skip, nothing downloaded ---------------------------------


def test_present_models_are_skipped_without_downloading(tmp_path, capsys):
    make_whisper(tmp_path / "faster-whisper-tiny.en")
    make_voice(tmp_path / "piper-en_US-joe-medium", "en_US-joe-medium")
    assert fm.fetch_whisper("tiny.en", tmp_path, snapshot_download=no_network) is False
    assert fm.fetch_voice("en_US-joe-medium", tmp_path, hf_hub_download=no_network) is False
    assert fm.main(["--dest", str(tmp_path)]) == 0  # default downloaders: _hub would fail
    out = capsys.readouterr().out
    assert "already in" in out and "models ready" in out


def test_the_shared_models_count_as_present(models_dir: Path):
    assert fm.whisper_present(models_dir / "faster-whisper-tiny.en")
    assert fm.piper_present(models_dir / "piper-en_US-joe-medium", "en_US-joe-medium")


def test_default_dest(monkeypatch):
    assert fm.default_dest({}) == Path("/var/lib/heimdall-edge/models")
    assert fm.default_dest({"HEIMDALL_MODELS_DIR": "/m"}) == Path("/m")
    monkeypatch.setenv("HEIMDALL_MODELS_DIR", "/elsewhere")
    assert fm.parse_args([]).dest == Path("/elsewhere")
    args = fm.parse_args(["--dest", "/x", "--whisper", "base.en", "--voice", "en_US-amy-low"])
    assert (args.dest, args.whisper, args.voice) == (Path("/x"), "base.en", "en_US-amy-low")


def test_empty_name_skips_that_model(tmp_path, capsys):
    make_voice(tmp_path / "piper-en_US-joe-medium", "en_US-joe-medium")
    assert fm.main(["--dest", str(tmp_path), "--whisper", ""]) == 0
    assert not (tmp_path / "faster-whisper-tiny.en").exists()
    make_whisper(tmp_path / "faster-whisper-base.en")
    assert fm.main(["--dest", str(tmp_path), "--whisper", "base.en", "--voice="]) == 0


def test_bad_names_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fm.parse_args(["--voice", "joe"])
    assert exit_info.value.code == 2
    assert "Piper voice 'joe'" in capsys.readouterr().err


def test_incomplete_models_are_not_present(tmp_path):
    whisper = make_whisper(tmp_path / "w")
    (whisper / "tokenizer.json").unlink()
    assert not fm.whisper_present(whisper)
    voice = make_voice(tmp_path / "v", "en_US-joe-medium")
    (voice / "en_US-joe-medium.onnx").write_bytes(b"")  # truncated
    assert not fm.piper_present(voice, "en_US-joe-medium")


# --- downloading, with fake downloaders -----------------------------------------


def test_whisper_download_lands_in_place(tmp_path):
    calls = []

    def snapshot_download(*, repo_id, local_dir, allow_patterns):
        calls.append(repo_id)
        assert "model.bin" in allow_patterns and "vocabulary.*" in allow_patterns
        make_whisper(Path(local_dir))
        (Path(local_dir) / ".cache").mkdir()
        return local_dir

    assert fm.fetch_whisper("base.en", tmp_path, snapshot_download=snapshot_download) is True
    assert calls == ["Systran/faster-whisper-base.en"]
    folder = tmp_path / "faster-whisper-base.en"
    assert fm.whisper_present(folder)
    assert not (folder / ".cache").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faster-whisper-base.en"]


def test_voice_download_lands_flat(tmp_path):
    def hf_hub_download(*, repo_id, filename, revision, local_dir):
        assert (repo_id, revision) == ("rhasspy/piper-voices", "v1.0.0")
        if filename.endswith("MODEL_CARD"):
            raise OSError("no card today")  # optional: must not fail the voice
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"data")
        return str(path)

    assert fm.fetch_voice("en_US-amy-low", tmp_path, hf_hub_download=hf_hub_download) is True
    folder = tmp_path / "piper-en_US-amy-low"
    assert sorted(p.name for p in folder.iterdir()) == [
        "en_US-amy-low.onnx",
        "en_US-amy-low.onnx.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["piper-en_US-amy-low"]


def test_offline_failure_is_clear_and_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    def offline(**kwargs):
        raise ConnectionError("[Errno -3] Temporary failure in name resolution")

    # A stale partial folder from a killed run is cleaned up too.
    (tmp_path / ".faster-whisper-tiny.en.abc.partial").mkdir()
    with pytest.raises(fm.HubUnreachable, match="unreachable.*network access"):
        fm.fetch_whisper("tiny.en", tmp_path, snapshot_download=offline)
    with pytest.raises(fm.FetchError, match="unreachable"):
        fm.fetch_voice("en_US-joe-medium", tmp_path, hf_hub_download=offline)
    assert list(tmp_path.iterdir()) == []

    class FakeHub:
        snapshot_download = staticmethod(offline)
        hf_hub_download = staticmethod(offline)

    monkeypatch.setattr(fm, "_hub", lambda: FakeHub)
    assert fm.main(["--dest", str(tmp_path / "models")]) == 1
    err = capsys.readouterr().err
    assert err.count("fetch-models: error:") == 1  # offline: the voice is not tried in vain
    assert "Hugging Face Hub is unreachable" in err


def test_a_missing_model_does_not_stop_the_next(tmp_path, capsys, monkeypatch):
    from huggingface_hub import errors

    fetched = []

    class Missing(errors.RepositoryNotFoundError):
        def __init__(self) -> None:
            Exception.__init__(self, "404 Client Error: Repository Not Found")

    def snapshot_download(**kwargs):
        raise Missing()

    def hf_hub_download(*, repo_id, filename, revision, local_dir):
        fetched.append(filename)
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"data")
        return str(path)

    class FakeHub:
        pass

    FakeHub.snapshot_download = staticmethod(snapshot_download)
    FakeHub.hf_hub_download = staticmethod(hf_hub_download)
    monkeypatch.setattr(fm, "_hub", lambda: FakeHub)
    assert fm.main(["--dest", str(tmp_path), "--whisper", "someone/nothing"]) == 1
    assert "not found on the Hub" in capsys.readouterr().err
    assert fm.piper_present(tmp_path / "piper-en_US-joe-medium", "en_US-joe-medium")
    assert len(fetched) == 3  # model, config, model card


@pytest.mark.parametrize(
    ("error_name", "message"),
    [
        ("LocalEntryNotFoundError", "Hugging Face Hub is unreachable"),
        ("OfflineModeIsEnabled", "Hugging Face Hub is unreachable"),
    ],
)
def test_huggingface_hub_errors_are_explained(tmp_path, error_name, message):
    """The exception types the real client raises when offline (constructed, not provoked)."""
    from huggingface_hub import errors

    error = getattr(errors, error_name)("Got: ConnectError: [Errno -2] Name or service not known")

    def download(**kwargs):
        raise error

    with pytest.raises(fm.FetchError, match=message) as info:
        fm.fetch_whisper("tiny.en", tmp_path, snapshot_download=download)
    assert info.value.__cause__ is error
    assert list(tmp_path.iterdir()) == []


def test_not_found_is_explained(tmp_path):
    from huggingface_hub import errors

    class Missing(errors.RepositoryNotFoundError):
        def __init__(self) -> None:
            Exception.__init__(self, "404 Client Error: Repository Not Found")

    def download(**kwargs):
        raise Missing()

    with pytest.raises(fm.FetchError, match="not found on the Hub"):
        fm.fetch_whisper("someone/nothing", tmp_path, snapshot_download=download)


def test_unwritable_dest_is_reported(tmp_path, capsys):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        dest = blocker / "models"  # mkdir fails even for root
    else:
        dest = tmp_path / "ro" / "models"
        (tmp_path / "ro").mkdir(mode=0o500)
    assert fm.main(["--dest", str(dest)]) == 1
    assert "fetch-models: error:" in capsys.readouterr().err


def test_script_is_executable():
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3")
