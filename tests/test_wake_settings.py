"""Wake-word settings that cannot work are refused with the key and what is allowed; a runtime
that cannot load falls back to the button, says so once, and doctor shows it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pymicro_wakeword
import pytest

from heimdall_edge.app.doctor import Level, _listening
from heimdall_edge.listen import wakeword
from heimdall_edge.listen.listener import build_listener
from heimdall_edge.settings import ListeningSettings, Settings, SettingsError, load_settings


def refused(monkeypatch: pytest.MonkeyPatch, key: str, value: str) -> str:
    monkeypatch.setenv(f"HEIMDALL_LISTENING__{key.upper()}", value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    message = str(error.value)
    assert f"listening.{key}" in message and f"HEIMDALL_LISTENING__{key.upper()}" in message
    return message


def model_config(folder: Path, model_bytes: bytes) -> Path:
    (folder / "mine.tflite").write_bytes(model_bytes)
    config = folder / "mine.json"
    config.write_text(
        json.dumps(
            {
                "wake_word": "Hey Mine",
                "model": "mine.tflite",
                "micro": {"probability_cutoff": 0.9, "sliding_window_size": 5},
            }
        )
    )
    return config


@pytest.mark.parametrize("value", ["hey_siri", "HEY_JARVIS", "jarvis"])
def test_an_unknown_built_in_lists_the_ones_there_are(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    message = refused(monkeypatch, "wake_word", value)
    assert "hey_jarvis, okay_nabu, alexa, hey_mycroft" in message


def test_a_model_path_that_does_not_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    message = refused(monkeypatch, "wake_word", str(tmp_path / "nope.json"))
    assert "nope.json" in message and "neither a built-in wake word nor a model" in message


def test_a_json_that_is_not_a_model_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"hello": 1}')
    assert "is not a microWakeWord model config" in refused(
        monkeypatch, "wake_word", str(tmp_path / "x.json")
    )
    (tmp_path / "y.json").write_text("not json at all")
    assert "is not a microWakeWord model config" in refused(
        monkeypatch, "wake_word", str(tmp_path / "y.json")
    )


def test_a_model_file_that_is_not_a_tflite_model_never_reaches_tflite(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """TensorFlow Lite crashes the whole process on such a file: it must be caught before."""
    config = model_config(tmp_path, b"this is not a model, just text")
    assert "not a TensorFlow Lite model" in refused(monkeypatch, "wake_word", str(config))
    (tmp_path / "mine.tflite").unlink()
    assert "which does not exist" in refused(monkeypatch, "wake_word", str(config))


def test_a_model_given_by_path_loads_and_wakes_like_the_built_in(tmp_path: Path) -> None:
    import shutil

    import pymicro_wakeword

    shipped = Path(pymicro_wakeword.__file__).parent / "models"
    shutil.copy(shipped / "hey_jarvis.tflite", tmp_path / "mine.tflite")
    config = model_config(tmp_path, (tmp_path / "mine.tflite").read_bytes())
    settings = ListeningSettings(wake_word=str(config))
    detector = wakeword.WakeWordDetector.from_settings(settings)
    assert (detector.model.phrase, detector.model.cutoff) == ("Hey Mine", 0.9)


@pytest.mark.parametrize(
    ("wake_word", "setting", "expected"),
    [("hey_jarvis", None, 0.985), ("hey_mycroft", None, 0.975), ("okay_nabu", None, "own"),
     ("alexa", None, "own"), ("hey_jarvis", 0.9, 0.9)],
)  # fmt: skip
def test_the_cutoff_is_the_setting_else_the_measured_one_else_the_models_own(
    wake_word: str, setting: float | None, expected: float | str
) -> None:
    detector = wakeword.WakeWordDetector(wake_word, cutoff=setting, refractory_ms=0)
    own = json.loads(
        (Path(pymicro_wakeword.__file__).parent / "models" / f"{wake_word}.json").read_text()
    )["micro"]["probability_cutoff"]
    assert detector.model.own_cutoff == own
    assert detector.model.cutoff == (own if expected == "own" else expected)


@pytest.mark.parametrize(("key", "value"), [("wake_cutoff", "1.5"), ("wake_cutoff", "0"),
                                            ("wake_refractory_ms", "-1"), ("vad", "cobra"),
                                            ("noise_suppression", "5"), ("auto_gain_dbfs", "32"),
                                            ("follow_up_s", "60"), ("vad_threshold", "1")])  # fmt: skip
def test_out_of_range_values_name_the_key(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str
) -> None:
    refused(monkeypatch, key, value)


def test_the_empty_wake_word_is_todays_any_speech_trigger() -> None:
    assert ListeningSettings(wake_word="  ").wake_word == ""


class Button:
    def pending(self):
        return None


def test_a_runtime_that_cannot_load_falls_back_to_the_button_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(wake_word: str):
        raise OSError("libtensorflowlite_c.so: cannot open shared object file")

    monkeypatch.setattr("pymicro_wakeword.MicroWakeWord.from_builtin", broken)
    caplog.set_level(logging.ERROR)
    listener = build_listener(object(), Button(), ListeningSettings(mode="voice"))  # type: ignore[arg-type]
    assert listener.mode == "button" and listener.wake_word is None
    without_button = build_listener(object(), None, ListeningSettings(mode="voice"))  # type: ignore[arg-type]
    assert without_button.mode == "voice" and without_button.wake_word is None
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2  # once per listener built: once per service start
    assert "cannot run on this device" in errors[0] and "falls back to the button" in errors[0]
    assert "falls back to waking on any speech" in errors[1]
    check = _listening(Settings())
    assert check.level is Level.FAIL and "falls back to the button" in check.detail


def test_doctor_shows_the_wake_word_and_the_front_end() -> None:
    check = _listening(Settings())
    assert check.level is Level.OK
    assert "'Hey Jarvis'" in check.detail and "VAD silero" in check.detail
    assert "noise suppression off" in check.detail and "follow-up 5 s" in check.detail
    assert _listening(Settings(listening=ListeningSettings(wake_word=""))).level is Level.WARN
