"""Settings: TOML, environment overrides, credentials, and errors that name the key."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from heimdall_edge import settings as settings_module
from heimdall_edge.settings import (
    Settings,
    SettingsError,
    load_settings,
    machine_device_id,
    read_secrets,
)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    monkeypatch.delenv("HEIMDALL_MODELS_DIR")
    settings = load_settings()
    assert settings.listening.mode == "both"
    assert settings.listening.silence_ms == 700
    assert settings.state_dir == tmp_path / "state"
    assert settings.models == tmp_path / "state" / "models"
    assert settings.device_id and settings.device_id.startswith("heimdall-")


def test_toml_then_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[listening]\nmode = "voice"\nsilence_ms = 500\n[button]\npin = 5\n')
    monkeypatch.setenv("HEIMDALL_LISTENING__SILENCE_MS", "900")
    monkeypatch.setenv("HEIMDALL_DEVICE_ID", "porch-pi")
    settings = load_settings(path)
    assert (settings.listening.mode, settings.listening.silence_ms) == ("voice", 900)
    assert settings.button.pin == 5
    assert settings.device_id == "porch-pi"


def test_heimdall_config_variable_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEIMDALL_CONFIG", str(write(tmp_path, "[camera]\nframes = 1\n")))
    assert load_settings().camera.frames == 1


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""))
    with pytest.raises(ValidationError, match="frozen"):
        settings.listening.mode = "voice"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[listening]\nmode = "loud"\n',
            "listening.mode = 'loud': Input should be 'button', 'voice' or 'both'",
        ),
        (
            "[listening]\nsilence_ms = -1\n",
            "listening.silence_ms = -1: Input should be greater than or equal to 0",
        ),
        ("[button]\npin = 40\n", "button.pin = 40: Input should be less than or equal to 27"),
        ("[listening]\nsilense_ms = 100\n", "listening.silense_ms: unknown key"),
        ('device_id = "bad id!"\n', "device_id = 'bad id!'"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, text))
    assert expected in str(caught.value)


def test_bad_environment_value_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEIMDALL_LISTENING__MAX_MS", "lots")
    with pytest.raises(SettingsError, match="HEIMDALL_LISTENING__MAX_MS"):
        load_settings(write(tmp_path, ""))


def test_broken_toml_and_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(write(tmp_path, "[listening\n"))
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_secrets_are_refused_in_the_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="keep API keys out of the config"):
        load_settings(write(tmp_path, '[secrets]\nopenai_api_key = "sk-x"\n'))


def test_secrets_from_environment_then_credentials_never_shown(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "elevenlabs_api_key").write_text("el-canary-123\n")
    secrets = read_secrets({"OPENAI_API_KEY": "sk-canary-456", "CREDENTIALS_DIRECTORY": str(creds)})
    assert (
        secrets.openai_api_key is not None
        and secrets.openai_api_key.get_secret_value() == "sk-canary-456"
    )
    assert secrets.elevenlabs_api_key is not None
    assert secrets.elevenlabs_api_key.get_secret_value() == "el-canary-123"
    settings = Settings(secrets=secrets)
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    assert "canary" not in shown


def test_device_id_is_a_hash_not_the_machine_id(tmp_path: Path) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    device_id = machine_device_id(machine_id)
    assert device_id == machine_device_id(machine_id)
    assert "0123456789abcdef" not in device_id


def test_example_config_is_generated_from_the_settings_and_valid() -> None:
    example = REPO / "config.example.toml"
    generated = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen-config-example")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert example.read_text() == generated, "run scripts/gen-config-example > config.example.toml"
    data = tomllib.loads(generated)
    defaults = Settings().model_dump(exclude={"secrets"})
    assert Settings(**data).model_dump(exclude={"secrets"}) == defaults


REMOTE_HTTP = "http://api.example.com/v1"
FIX = "use https://, or a loopback address (localhost, 127.0.0.1, ::1) for a local test server"


@pytest.mark.parametrize(
    ("setting", "key"),
    [("openai_base_url", "OPENAI_API_KEY"), ("elevenlabs_base_url", "ELEVENLABS_API_KEY")],
)
def test_an_api_key_never_goes_over_plain_http_to_another_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str, key: str
) -> None:
    env = f"HEIMDALL_{setting.upper()}"
    monkeypatch.setenv(env, REMOTE_HTTP)
    assert getattr(load_settings(write(tmp_path, "")), setting) == REMOTE_HTTP  # no key: no harm
    monkeypatch.setenv(key, "sk-canary-789")
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, ""))
    message = str(caught.value)
    assert f"{setting} = {REMOTE_HTTP!r} (set in the file or {env}) would send {key}" in message
    assert FIX in message and "canary" not in message
    for allowed in (
        "https://api.example.com/v1",
        "http://127.0.0.1:8787/v1",
        "http://127.9.9.9:8787",
        "http://localhost:8787",
        "http://[::1]:8787/v1",
    ):
        monkeypatch.setenv(env, allowed)
        assert getattr(load_settings(write(tmp_path, "")), setting) == allowed


@pytest.mark.parametrize(
    "url",
    [
        "http://minio.lan:9000",
        "http://192.168.1.20:9000",
        "http://0.0.0.0:9000",
        "http://localhost.example.com",
        "http://[::ffff:10.0.0.1]:9000",
        "http://[::1",
    ],
)
def test_the_capture_store_never_goes_over_plain_http_to_another_host(
    tmp_path: Path, url: str
) -> None:
    """AWS signs requests, but the session token and the captures themselves would travel as sent."""
    for setting in ("s3_endpoint_url", "dynamodb_endpoint_url"):
        with pytest.raises(SettingsError) as caught:
            load_settings(write(tmp_path, f'{setting} = "{url}"\n'))
        assert f"{setting} = {url!r} (set in the file or HEIMDALL_{setting.upper()})" in str(
            caught.value
        )
        assert FIX in str(caught.value)
    local = (
        's3_endpoint_url = "http://127.0.0.1:5000"\ndynamodb_endpoint_url = "http://[::1]:5000"\n'
    )
    assert load_settings(write(tmp_path, local)).s3_endpoint_url == "http://127.0.0.1:5000"


def test_every_url_in_clear_text_is_named_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    text = f'openai_base_url = "{REMOTE_HTTP}"\ns3_endpoint_url = "http://minio.lan:9000"\n'
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, text))
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("invalid settings (")
    assert [line.split(" = ")[0] for line in lines[1:]] == [
        "  openai_base_url",
        "  s3_endpoint_url",
    ]


def test_doctor_shows_the_clear_text_url_as_a_failure(tmp_path: Path) -> None:
    config = write(tmp_path, f'elevenlabs_base_url = "{REMOTE_HTTP}"\n')
    doctor = subprocess.run(
        [sys.executable, "-m", "heimdall_edge.cli", "--config", str(config), "doctor"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "ELEVENLABS_API_KEY": "el-canary-321"},
    )  # fmt: skip
    assert doctor.returncode == 1
    assert doctor.stdout.startswith("FAIL settings: invalid settings")
    assert f"elevenlabs_base_url = {REMOTE_HTTP!r}" in doctor.stdout and FIX in doctor.stdout
    assert "canary" not in doctor.stdout + doctor.stderr
