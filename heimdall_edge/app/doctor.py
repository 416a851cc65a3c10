"""`heimdall-edge doctor`: one line per thing that must be right, with the fix."""

from __future__ import annotations

import enum
import json
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from heimdall_edge.engines.base import EngineError
from heimdall_edge.engines.local.models import piper_voice_files, whisper_model_dir
from heimdall_edge.settings import Settings, SettingsError, config_path

DISK_WARN_BYTES = 500 * 1024**2
DISK_FAIL_BYTES = 50 * 1024**2


class Level(enum.IntEnum):
    OK = 0
    WARN = 1
    FAIL = 2


@dataclass(frozen=True)
class Check:
    level: Level
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.level.name:4} {self.name}: {self.detail}"


def run_checks(settings: Settings, explicit_config: Path | None) -> Iterator[Check]:
    checks: list[Callable[[Settings], Check]] = [
        lambda s: _config(explicit_config),
        _state_dir,
        _disk,
        _whisper,
        _piper,
        _microphone,
        _speaker,
        _camera,
        _gpio,
        _listening,
        *[
            _credential(name, env)
            for name, env in (("OpenAI", "openai_api_key"), ("ElevenLabs", "elevenlabs_api_key"))
        ],
        _cloud_state,
        _sync,
    ]
    for check in checks:
        try:
            yield check(settings)
        except Exception as exc:  # noqa: BLE001 - a broken check is reported, never a crash
            yield Check(
                Level.FAIL, getattr(check, "__name__", "check").strip("_"), f"check crashed: {exc}"
            )


def _config(explicit: Path | None) -> Check:
    path, _ = config_path(explicit)
    if path.is_file():
        return Check(Level.OK, "settings", f"{path} is valid")
    return Check(
        Level.WARN, "settings", f"{path} not found: using defaults (copy config.example.toml there)"
    )


def _state_dir(settings: Settings) -> Check:
    from heimdall_edge.app.builders import prepare_state_dir

    try:
        state = prepare_state_dir(settings)
    except SettingsError as exc:
        return Check(Level.FAIL, "state dir", str(exc))
    mode = state.stat().st_mode & 0o777
    if mode & 0o077:
        return Check(Level.WARN, "state dir", f"{state} is mode {mode:o}: run `chmod 700 {state}`")
    return Check(Level.OK, "state dir", f"{state} (private)")


def _disk(settings: Settings) -> Check:
    free = shutil.disk_usage(settings.state_dir).free
    text = f"{free / 1024**3:.1f} GiB free under {settings.state_dir}"
    if free < DISK_FAIL_BYTES:
        return Check(Level.FAIL, "disk", f"{text}: free space or captures cannot be kept")
    if free < DISK_WARN_BYTES:
        return Check(Level.WARN, "disk", f"{text}: running low")
    return Check(Level.OK, "disk", text)


def _model_check(name: str, find: Callable[[], Path]) -> Check:
    try:
        return Check(Level.OK, name, str(find()))
    except EngineError as exc:
        return Check(Level.FAIL, name, str(exc))


def _whisper(settings: Settings) -> Check:
    return _model_check(
        "speech-to-text model", lambda: whisper_model_dir(settings.models, settings.stt.model)
    )


def _piper(settings: Settings) -> Check:
    return _model_check(
        "text-to-speech voice", lambda: piper_voice_files(settings.models, settings.tts.voice).onnx
    )


def _audio_device(
    direction: Literal["input", "output"], wanted: str | int | None, setting: str
) -> Check:
    from heimdall_edge.devices.base import DeviceError
    from heimdall_edge.devices.portaudio import find_device, quiet_portaudio

    name = "microphone" if direction == "input" else "speaker"
    audio = quiet_portaudio()
    try:
        _index, found = find_device(audio, wanted, direction, setting)
    except DeviceError as exc:
        return Check(Level.FAIL, name, str(exc))
    finally:
        audio.terminate()
    return Check(Level.OK, name, repr(found))


def _microphone(settings: Settings) -> Check:
    return _audio_device("input", settings.microphone.device, "microphone.device")


def _speaker(settings: Settings) -> Check:
    return _audio_device("output", settings.speaker.device, "speaker.device")


def _camera(settings: Settings) -> Check:
    if not settings.camera.enabled:
        return Check(Level.OK, "camera", "disabled in settings")
    try:
        from picamera2 import Picamera2  # type: ignore[import-not-found]
    except ImportError:
        return Check(
            Level.WARN,
            "camera",
            "picamera2 not importable: captures will be audio only "
            "(on the Pi: apt install python3-picamera2, venv with --system-site-packages)",
        )
    cameras = Picamera2.global_camera_info()
    if not cameras:
        return Check(
            Level.WARN,
            "camera",
            "no camera attached: check the ribbon cable and `rpicam-hello --list-cameras`",
        )
    return Check(Level.OK, "camera", f"{cameras[0].get('Model', 'camera')} attached")


def _gpio(settings: Settings) -> Check:
    from gpiozero import Device
    from gpiozero.exc import BadPinFactory, PinFactoryFallback

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PinFactoryFallback)
            factory = Device.pin_factory or Device._default_pin_factory()
    except BadPinFactory:
        return Check(
            Level.FAIL,
            "gpio",
            f"no GPIO pin driver: button GPIO{settings.button.pin} cannot work "
            "(on the Pi: apt install python3-lgpio; elsewhere use `run --simulate`)",
        )
    return Check(
        Level.OK,
        "gpio",
        f"{type(factory).__name__}: button GPIO{settings.button.pin}, LED GPIO{settings.led.pin}",
    )


def _listening(settings: Settings) -> Check:
    """The voice trigger as it will run here: wake word (loaded for real), VAD, front end."""
    from heimdall_edge.listen.wakeword import WakeWordDetector, WakeWordError

    listening = settings.listening
    front = (
        f"VAD {listening.vad}, noise suppression {listening.noise_suppression or 'off'}, "
        f"auto gain {f'{listening.auto_gain_dbfs} dBFS' if listening.auto_gain_dbfs else 'off'}, "
        f"silence {listening.silence_ms} ms, follow-up "
        f"{f'{listening.follow_up_s:g} s' if listening.follow_up_s else 'off'}"
    )
    if listening.mode == "button":
        return Check(Level.OK, "listening", f"button only; {front}")
    if not listening.wake_word:
        return Check(Level.WARN, "listening", f"no wake word: any speech wakes it; {front}")
    try:
        detector = WakeWordDetector.from_settings(listening)
    except WakeWordError as exc:
        return Check(Level.FAIL, "listening", f"{exc}; the service falls back to the button")
    model = detector.model
    detector.close()
    return Check(
        Level.OK,
        "listening",
        f"wake word {model.phrase!r} ({model.name}, cutoff {model.cutoff:g}), mode "
        f"{listening.mode}; {front}",
    )


def _credential(label: str, field: str) -> Callable[[Settings], Check]:
    def check(settings: Settings) -> Check:
        if getattr(settings.secrets, field) is not None:
            return Check(Level.OK, f"{label} key", "set (not shown)")
        return Check(
            Level.WARN,
            f"{label} key",
            f"not set: the {label} cloud engine is off (set {field.upper()} or LoadCredential={field})",
        )

    check.__name__ = f"_{label.lower()}_key"
    return check


def _cloud_state(settings: Settings) -> Check:
    """What the running service last saw of the cloud (its status.json): whether its speech
    services were all reachable, each service's reachability (the store's too) and breakers."""
    from heimdall_edge.app.appliance import STATUS_FILE

    path = settings.state_dir / STATUS_FILE
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        return Check(Level.OK, "cloud state", "no status from a running service yet")
    except (OSError, ValueError) as exc:
        return Check(
            Level.WARN, "cloud state", f"{path} unreadable ({exc}): it is rewritten after each turn"
        )
    breakers = status.get("breakers", {})
    reachable = status.get("reachable", {})
    age_s = time.time() - float(status.get("updated_at", 0))
    parts = [f"{'online' if status.get('online') else 'OFFLINE'} ({age_s:.0f} s ago)"]
    parts += [
        f"{name} {'reachable' if up else 'UNREACHABLE'}" for name, up in sorted(reachable.items())
    ]
    parts += [f"{name} breaker {info.get('state')}" for name, info in sorted(breakers.items())]
    open_ = [name for name, info in breakers.items() if info.get("state") != "closed"]
    away = {name for name, up in reachable.items() if not up}
    effects = []
    if open_ or away & breakers.keys() or not status.get("online", True):
        effects.append("answering with local engines")
    if away - breakers.keys():  # the store: sync waits, the turns go on
        effects.append("captures wait on the device")
    if effects:
        return Check(Level.WARN, "cloud state", ", ".join(parts) + ": " + " and ".join(effects))
    return Check(Level.OK, "cloud state", ", ".join(parts))


def _sync(settings: Settings) -> Check:
    """Whether captures can reach the store, and how many are waiting."""
    from heimdall_edge.app.builders import open_store
    from heimdall_edge.spool.store import Spool
    from heimdall_edge.sync.store_config import StoreConfig
    from heimdall_edge.sync.store_errors import StoreError

    with Spool(settings.spool_dir) as spool:
        counts = spool.counts()
    waiting = f"{counts.get('pending', 0)} pending, {counts.get('failed', 0)} failed, {counts.get('synced', 0)} synced"
    try:
        config = StoreConfig.from_settings(settings)
    except SettingsError as exc:
        return Check(Level.FAIL, "sync", f"{exc}; captures wait on the device ({waiting})")
    if config is None:
        return Check(
            Level.WARN,
            "sync",
            f"off: no bucket set (HEIMDALL_S3_BUCKET); captures stay on the device ({waiting})",
        )
    try:
        store = open_store(config, settings, connect_timeout_s=3, read_timeout_s=5)
        store.check(settings.device_id or "")
    except StoreError as exc:
        return Check(Level.FAIL, "sync", f"{exc} ({waiting})")
    table = f" and table {config.table}" if config.table else ""
    return Check(Level.OK, "sync", f"bucket {config.bucket}{table} reachable ({waiting})")
