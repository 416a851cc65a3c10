"""Factory seams: turn settings into engines, devices and the spool.

The CLI and the tests build the appliance through these, so `run --simulate`,
`demo` and the real service differ only in which devices they ask for.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from heimdall_edge.app.appliance import Devices
from heimdall_edge.clock import Clock
from heimdall_edge.cloud.breaker import CircuitBreaker
from heimdall_edge.cloud.connectivity import Connectivity, tcp_probe
from heimdall_edge.cloud.policy import CallPolicy, LatencyNorm, RateLimit
from heimdall_edge.engines.cloud.elevenlabs import ElevenLabsEngine
from heimdall_edge.engines.cloud.openai_reply import OpenAIReplyEngine
from heimdall_edge.engines.cloud.openai_whisper import OpenAIWhisperEngine
from heimdall_edge.engines.local.faster_whisper import FasterWhisperEngine
from heimdall_edge.engines.local.offline_reply import OfflineReplyEngine
from heimdall_edge.engines.local.piper import PiperEngine
from heimdall_edge.settings import Settings, SettingsError
from heimdall_edge.spool.store import Spool
from heimdall_edge.sync.cloudstore import CaptureStore
from heimdall_edge.sync.iot_credentials import IotCredentialsProvider, IotIdentity, iot_session
from heimdall_edge.sync.store_config import StoreConfig
from heimdall_edge.sync.store_errors import StoreError
from heimdall_edge.sync.syncer import Syncer
from heimdall_edge.turn.routing import Cloud, Engines
from heimdall_edge.turn.voice_cache import VoiceCache, VoiceCacheError

log = logging.getLogger(__name__)
OPENAI_DEFAULT_URL = "https://api.openai.com/v1"
ELEVENLABS_DEFAULT_URL = "https://api.elevenlabs.io"


def build_engines(
    settings: Settings, *, voice_cache: bool = True, breaker_clock: Clock = time.monotonic
) -> Engines:
    """Local engines always; each cloud engine too when its key is set and the cloud is enabled.

    Each cloud service has its own breaker, rate limit and connectivity (probing its own
    host); OpenAI's speech-to-text and reply share OpenAI's. `voice_cache=False` for
    commands that never speak and may run without a writable state dir; `breaker_clock`
    lets a test move the breakers' time (open -> half-open) without waiting.
    """
    secrets, cloud, resilience = settings.secrets, settings.cloud, settings.resilience

    def policy(
        service: str,
        breaker: CircuitBreaker,
        limit: RateLimit,
        deadline_s: float,
        connectivity: Connectivity,
    ) -> CallPolicy:
        return CallPolicy(
            service,
            breaker,
            limit,
            deadline_s=deadline_s,
            max_attempts=resilience.max_attempts,
            connectivity=connectivity,
            norm=LatencyNorm(
                factor=resilience.slow_factor, margin_s=resilience.slow_margin_ms / 1000
            ),
        )

    def breaker(service: str) -> CircuitBreaker:
        return CircuitBreaker(
            service,
            failure_threshold=resilience.failure_threshold,
            window_s=resilience.failure_window_s,
            reset_s=resilience.reset_s,
            auth_reset_s=resilience.auth_reset_s,
            clock=breaker_clock,
        )

    engines = Engines(
        stt=FasterWhisperEngine(settings.stt, settings.models),
        reply=OfflineReplyEngine(),
        tts=PiperEngine(settings.tts, settings.models),
        hedge_after_s={
            "stt": resilience.stt_hedge_after_ms / 1000,
            "reply": resilience.reply_hedge_after_ms / 1000,
            "tts": resilience.tts_hedge_after_ms / 1000,
        },
        cache=_open_voice_cache(settings) if voice_cache and settings.voice_cache.max_mb else None,
    )
    if cloud.enabled and secrets.openai_api_key is not None:
        from openai import AsyncOpenAI

        openai_url = settings.openai_base_url or OPENAI_DEFAULT_URL
        client = AsyncOpenAI(
            api_key=secrets.openai_api_key.get_secret_value(),
            base_url=openai_url,
            max_retries=0,  # one retry layer: ours
        )
        openai_breaker, openai_limit = (
            breaker("openai"),
            RateLimit(resilience.requests_per_minute, resilience.concurrency),
        )
        openai_reachable = service_connectivity("openai", openai_url, settings)
        engines.cloud_stt = Cloud(
            OpenAIWhisperEngine(client, model=cloud.stt_model, language=settings.stt.language),
            policy(
                "openai", openai_breaker, openai_limit, resilience.stt_deadline_s, openai_reachable
            ),
        )
        engines.cloud_reply = Cloud(
            OpenAIReplyEngine(client, model=cloud.reply_model, max_tokens=cloud.reply_max_tokens),
            policy(
                "openai",
                openai_breaker,
                openai_limit,
                resilience.reply_deadline_s,
                openai_reachable,
            ),
        )
    if cloud.enabled and secrets.elevenlabs_api_key is not None:
        from elevenlabs.client import AsyncElevenLabs

        elevenlabs_url = settings.elevenlabs_base_url or ELEVENLABS_DEFAULT_URL
        elevenlabs = AsyncElevenLabs(
            api_key=secrets.elevenlabs_api_key.get_secret_value(),
            base_url=elevenlabs_url,
        )
        engines.cloud_tts = Cloud(
            ElevenLabsEngine(
                elevenlabs,
                voice_id=cloud.tts_voice_id,
                model=cloud.tts_model,
                output_format=cloud.tts_output_format,
            ),
            policy(
                "elevenlabs",
                breaker("elevenlabs"),
                RateLimit(resilience.requests_per_minute, resilience.concurrency),
                resilience.tts_deadline_s,
                service_connectivity("elevenlabs", elevenlabs_url, settings),
            ),
        )
    return engines


def service_connectivity(service: str, url: str, settings: Settings) -> Connectivity:
    """Whether `service` can be reached, probing the host (and port) of `url` while it cannot."""
    return Connectivity(
        tcp_probe(url), service=service, probe_interval_s=settings.resilience.probe_interval_s
    )


def _open_voice_cache(settings: Settings) -> VoiceCache | None:
    """The voice cache, or None when it cannot be opened (a full disk, say): it only saves time."""
    try:
        return VoiceCache(
            settings.state_dir / "voice-cache", int(settings.voice_cache.max_mb * 1024**2)
        )
    except VoiceCacheError as exc:
        log.warning("voice cache off: %s", exc)
        return None


def build_syncer(settings: Settings, spool: Spool) -> Syncer:
    """The store-and-forward syncer; with no bucket set it keeps captures local (and still keeps the quota).

    A store that cannot be configured (no region anywhere, say) turns sync off with one error
    line rather than stopping the service: captures wait on the device until it is fixed.
    The store has its own connectivity, probing the S3 endpoint's host; no speech service's.
    """
    try:
        config = StoreConfig.from_settings(settings)
    except SettingsError as exc:
        log.error("sync is off until this is fixed (captures wait on the device): %s", exc)
        config = None
    resilience = settings.resilience
    breaker = CircuitBreaker(
        "s3",
        failure_threshold=resilience.failure_threshold,
        window_s=resilience.failure_window_s,
        reset_s=resilience.reset_s,
        auth_reset_s=resilience.auth_reset_s,
    )
    assert settings.device_id is not None
    store = open_store(config, settings) if config else None
    return Syncer(
        spool,
        store,
        settings.sync,
        settings.device_id,
        connectivity=(
            service_connectivity("store", store.endpoint_url, settings) if store else None
        ),
        breaker=breaker,
    )


def open_store(config: StoreConfig, settings: Settings, **timeouts: float) -> CaptureStore:
    """The store, signing with the credentials `[sync] credentials` names.

    With IoT credentials, a certificate or key that cannot work is said once here; sync
    still runs, so the captures wait and go up once the files are fixed (no restart).
    """
    identity = IotIdentity.from_settings(settings.sync)
    if identity is None:
        return CaptureStore(config, **timeouts)
    provider = IotCredentialsProvider(identity)
    try:
        provider.check_files()
    except StoreError as exc:
        log.error("sync cannot get AWS credentials (captures wait on the device): %s", exc)
    return CaptureStore(config, session=iot_session(provider), **timeouts)


def prepare_state_dir(settings: Settings) -> Path:
    """Create the state dir private to the service user, or say plainly why we cannot."""
    state = settings.state_dir
    try:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = state / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        hint = (
            "free some space"
            if exc.errno == errno.ENOSPC
            else "set HEIMDALL_STATE_DIR to a writable folder or run as the service user"
        )
        raise SettingsError(f"state dir {state} is not usable ({exc.strerror}): {hint}") from exc
    return state


def open_spool(settings: Settings) -> Spool:
    prepare_state_dir(settings)
    return Spool(settings.spool_dir)


def build_devices(settings: Settings) -> Devices:
    """The real hardware: gpiozero pins, PyAudio, picamera2."""
    from heimdall_edge.devices.camera import PiCamera
    from heimdall_edge.devices.gpio import GpioButton, GpioIndicator
    from heimdall_edge.devices.microphone import PyAudioMicrophone
    from heimdall_edge.devices.speaker import PyAudioSpeaker

    return Devices(
        microphone=PyAudioMicrophone(settings.microphone),
        button=GpioButton(settings.button),
        indicator=GpioIndicator(settings.led),
        camera=PiCamera(settings.camera),
        speaker=PyAudioSpeaker(settings.speaker),
    )


def build_simulated_devices(
    settings: Settings,
    *,
    inputs: Sequence[Path | bytes] = (),
    realtime: bool = True,
    speaker_wav: Path | None = None,
    pin_factory: Any = None,
    echo_db: float | None = None,
    noise: str | None = None,
    snr_db: float = 15.0,
) -> Devices:
    """Simulated hardware: mock GPIO pins, a synthetic camera, and a simulated room.

    In the room a person says `inputs` one after another (waiting while the device
    speaks), the speaker's sound comes back into the microphone `echo_db` down (None:
    it does not), and `noise` (pink, brown, hum or an audio file) runs `snr_db` below
    the person's speech.
    """
    from gpiozero.pins.mock import MockFactory

    from heimdall_edge.devices.camera import SyntheticCamera
    from heimdall_edge.devices.gpio import GpioButton, GpioIndicator
    from heimdall_edge.devices.room import build_room

    pin_factory = pin_factory or MockFactory()
    room = build_room(
        inputs,
        realtime=realtime,
        speaker_wav=speaker_wav,
        echo_db=echo_db,
        noise=noise,
        snr_db=snr_db,
    )
    return Devices(
        microphone=room.microphone,
        button=GpioButton(settings.button, pin_factory=pin_factory),
        indicator=GpioIndicator(settings.led, pin_factory=pin_factory),
        camera=SyntheticCamera(settings.camera),
        speaker=room.speaker,
    )
