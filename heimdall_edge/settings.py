"""Frozen, validated settings: TOML file, then environment, then credentials.

Built once at start-up. A bad value stops the service with a message that names
the key, the value and what is allowed; nothing downstream re-checks settings.
Environment overrides use `HEIMDALL_<SECTION>__<KEY>` (for example
`HEIMDALL_LISTENING__MODE=voice`), plus the top-level `HEIMDALL_STATE_DIR`,
`HEIMDALL_MODELS_DIR` and `HEIMDALL_DEVICE_ID`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG = Path("/etc/heimdall-edge/config.toml")
DEFAULT_STATE_DIR = Path("/var/lib/heimdall-edge")
ENV_PREFIX = "HEIMDALL_"

Ms = Annotated[int, Field(ge=0, le=600_000)]


class SettingsError(ValueError):
    """Settings that cannot be used; the message says which key and how to fix it."""


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class MicrophoneSettings(Section):
    device: str | int | None = None
    """PortAudio input device: a name (or part of one, e.g. "seeed") or an index. Unset: the default device."""
    sample_rate: Literal[16000, 44100, 48000] | None = None
    """Rate to open the card at. Unset: 16000 if the card takes it, else 48000 or 44100, resampled to 16 kHz."""
    reopen_max_backoff_s: Annotated[float, Field(gt=0, le=300)] = 30.0
    """Longest wait between attempts to reopen a microphone that disappeared."""


class SpeakerSettings(Section):
    device: str | int | None = None
    """PortAudio output device: a name (or part of one) or an index. Unset: the default device."""


class ButtonSettings(Section):
    pin: Annotated[int, Field(ge=0, le=27)] = 17
    """BCM GPIO number of the push button, wired to ground (internal pull-up)."""
    bounce_ms: Annotated[int, Field(ge=0, le=500)] = 30
    """Debounce time: edges closer together than this are one press."""
    long_press_s: Annotated[float, Field(gt=0.5, le=30)] = 3.0
    """Holding the button this long without speaking cancels the capture or the reply."""


class LedSettings(Section):
    enabled: bool = True
    """Drive a status LED: on while listening, fast blink while thinking, slow blink after an error."""
    pin: Annotated[int, Field(ge=0, le=27)] = 27
    """BCM GPIO number of the status LED (through a resistor to ground)."""


class CameraSettings(Section):
    enabled: bool = True
    """Take JPEG frames while the person speaks. Without a camera the loop carries on with audio only."""
    frames: Annotated[int, Field(ge=0, le=30)] = 3
    """Most frames kept per capture."""
    interval_ms: Annotated[int, Field(ge=100, le=10_000)] = 700
    """Time between frames while the person speaks."""
    width: Annotated[int, Field(ge=64, le=4608)] = 1280
    """Frame width in pixels."""
    height: Annotated[int, Field(ge=64, le=2592)] = 720
    """Frame height in pixels."""
    jpeg_quality: Annotated[int, Field(ge=10, le=100)] = 85
    """JPEG quality: 85 keeps a 720p frame near 100 KB."""


BUILTIN_WAKE_WORDS = ("hey_jarvis", "okay_nabu", "alexa", "hey_mycroft")
"""The microWakeWord models pymicro-wakeword ships in its wheel (a test keeps this in step)."""


class ListeningSettings(Section):
    mode: Literal["button", "voice", "both"] = "both"
    """What starts a capture: the button, the voice (the wake word, or speech onset without one), or either."""
    wake_word: str = "hey_jarvis"
    """Wake word: a built-in model (hey_jarvis, okay_nabu, alexa, hey_mycroft), a path to a microWakeWord model's .json, or "" to wake on any speech."""
    wake_cutoff: Annotated[float, Field(gt=0, lt=1)] | None = None
    """Wake word probability needed to wake (0-1, higher wakes less often). Unset: the one measured for a built-in (hey_jarvis 0.985, hey_mycroft 0.975), else the model's own."""
    wake_refractory_ms: Annotated[int, Field(ge=0, le=10_000)] = 2000
    """After a detection, further detections are ignored this long (one phrase wakes once)."""
    wake_sound: bool = True
    """Play a short earcon on waking and when a follow-up window opens (the capture never hears it)."""
    vad: Literal["silero", "webrtc"] = "silero"
    """Speech judge for end-pointing and speech onset: Silero (holds in noise; woken by webrtcvad) or webrtcvad alone."""
    vad_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """Silero speech probability that counts as speech (it stays speech down to 0.15 below this)."""
    vad_aggressiveness: Annotated[int, Field(ge=0, le=3)] = 2
    """webrtcvad aggressiveness: 0 keeps the most audio, 3 rejects the most noise. With vad = "silero" it only decides when Silero listens."""
    noise_suppression: Annotated[int, Field(ge=0, le=4)] = 0
    """webrtc noise suppression on the microphone path: 0 off, 1-4 stronger."""
    auto_gain_dbfs: Annotated[int, Field(ge=0, le=31)] = 0
    """webrtc automatic gain control target, in dB below full scale (e.g. 3 is loud); 0 off."""
    pre_roll_ms: Ms = 300
    """Audio kept from before a button press or speech onset, so the first syllable is not clipped."""
    min_speech_ms: Ms = 240
    """Speech needed before a voice trigger fires or a capture counts: shorter is a click or a cough."""
    silence_ms: Ms = 700
    """Silence after speech that ends the utterance (Home Assistant uses 0.7 s)."""
    speculate_after_ms: Ms = 250
    """At a pause this long, start answering what was said so far (dropped if speech resumes), so the answer is ready when the silence ends the utterance; 0 waits for the end."""
    max_ms: Annotated[int, Field(ge=1000, le=120_000)] = 15_000
    """Longest utterance; recording stops here even if the person is still talking."""
    no_speech_timeout_ms: Annotated[int, Field(ge=500, le=60_000)] = 5_000
    """After a button press or the wake word, give up if nobody speaks within this time."""
    settle_ms: Annotated[int, Field(ge=0, le=5000)] = 400
    """After playback has drained: the speaker's output latency plus the room's echo tail. Until it has passed, nothing the microphone hears wakes the device or is captured."""
    follow_up_s: Annotated[float, Field(ge=0, le=30)] = 5.0
    """After a reply that asks something, listen this long for an answer without the wake word; 0 turns follow-ups off."""
    follow_up_always: bool = False
    """Open the follow-up window after every reply, not only after questions."""

    @field_validator("wake_word")
    @classmethod
    def _known_wake_word(cls, value: str) -> str:
        value = value.strip()
        if value and value not in BUILTIN_WAKE_WORDS:
            check_wake_model_config(Path(value))
        return value


def check_wake_model_config(path: Path) -> None:
    """A microWakeWord .json that exists and names a model file beside it; ValueError otherwise."""
    allowed = f'use one of {", ".join(BUILTIN_WAKE_WORDS)}, a microWakeWord model\'s .json, or ""'
    if path.suffix != ".json" or not path.is_file():
        raise ValueError(
            f"{str(path)!r} is neither a built-in wake word nor a model .json file: {allowed}"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        model = path.parent / config["model"]
        config["micro"]["probability_cutoff"], config["micro"]["sliding_window_size"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f'{path} is not a microWakeWord model config (needs "model" and "micro" '
            f"with probability_cutoff and sliding_window_size; {exc!r}): {allowed}"
        ) from None
    if not model.is_file():
        raise ValueError(f"{path} names the model {model}, which does not exist: {allowed}")
    # TensorFlow Lite crashes the process on a file that is not a model: check its identifier.
    with model.open("rb") as head:
        if head.read(8)[4:8] != b"TFL3":
            raise ValueError(
                f"{path} names {model}, which is not a TensorFlow Lite model: {allowed}"
            )


class SpeechToTextSettings(Section):
    model: str = "tiny.en"
    """faster-whisper model: a size name found under the models dir (tiny.en, base.en, ...) or a folder path."""
    compute_type: Literal["int8", "int8_float32", "float32", "float16", "default"] = "int8"
    """CTranslate2 compute type; int8 is fastest on the Pi's Cortex-A cores."""
    beam_size: Annotated[int, Field(ge=1, le=10)] = 1
    """Beam width: 1 (greedy) is fastest; 5 is a little more accurate."""
    language: str | None = "en"
    """Language hint (ISO 639-1). Unset: detect it (not possible with .en models)."""
    cpu_threads: Annotated[int, Field(ge=0, le=64)] = 0
    """Inference threads; 0 lets CTranslate2 choose (all cores)."""
    upgrade: bool = True
    """With an OpenAI key: once cloud Whisper is reachable again, transcribe again what the device transcribed without it (idle time only; both transcripts kept)."""


class TextToSpeechSettings(Section):
    voice: str = "en_US-joe-medium"
    """Piper voice: a name found under the models dir, or a path to its .onnx file (the .onnx.json beside it)."""
    length_scale: Annotated[float, Field(gt=0.2, le=4)] | None = None
    """Speaking pace: above 1 is slower. Unset: the voice's own."""


class CloudSettings(Section):
    enabled: bool = True
    """Prefer the cloud engines when their API keys are set. Off: on-device engines only."""
    stt_model: str = "whisper-1"
    """OpenAI speech-to-text model."""
    reply_model: str = "gpt-4o-mini"
    """OpenAI chat model that answers (it sees the latest camera frame)."""
    reply_max_tokens: Annotated[int, Field(ge=16, le=1000)] = 120
    """Longest cloud answer, in tokens: one or two spoken sentences."""
    tts_voice_id: str = "JBFqnCBsd6RMkjVDRZzb"
    """ElevenLabs voice id."""
    tts_model: str = "eleven_flash_v2_5"
    """ElevenLabs model; the flash models have the lowest latency."""
    tts_output_format: Literal["pcm_16000", "pcm_22050", "pcm_24000"] = "pcm_16000"
    """ElevenLabs PCM format, played as it streams in."""
    history_turns: Annotated[int, Field(ge=0, le=20)] = 6
    """Earlier turns of the conversation the cloud reply sees; 0: each turn stands alone."""
    history_minutes: Annotated[float, Field(gt=0, le=240)] = 5.0
    """A conversation ends after this long without a turn; the next one starts afresh."""


class ResilienceSettings(Section):
    stt_hedge_after_ms: Annotated[int, Field(ge=0, le=30_000)] = 1500
    """If the cloud has not transcribed within this, start faster-whisper too; the first good answer wins."""
    reply_hedge_after_ms: Annotated[int, Field(ge=0, le=30_000)] = 1500
    """If the cloud has not started answering within this, start the offline answer too."""
    tts_hedge_after_ms: Annotated[int, Field(ge=0, le=30_000)] = 1000
    """If the cloud has sent no audio within this, start Piper too."""
    stt_deadline_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    """Longest a cloud transcription may take, retries included."""
    reply_deadline_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    """Longest the cloud may take to start answering, retries included."""
    tts_deadline_s: Annotated[float, Field(gt=0, le=120)] = 8.0
    """Longest the cloud may take to send the first audio, retries included."""
    slow_factor: Annotated[float, Field(ge=1.5, le=100)] = 3.0
    """A cloud answer this many times slower than the call's recent normal (median of the last 20) counts against its breaker, like a lost hedge."""
    slow_margin_ms: Annotated[int, Field(ge=0, le=60_000)] = 1000
    """...and at least this much slower: jitter on a fast service is not slowness."""
    max_attempts: Annotated[int, Field(ge=1, le=5)] = 2
    """Attempts per cloud call (only rate limits, 5xx, timeouts and connection errors are retried)."""
    failure_threshold: Annotated[int, Field(ge=1, le=100)] = 3
    """Failures within failure_window_s that open a service's circuit breaker."""
    failure_window_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    """Window in which failures are counted."""
    reset_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """How long an open breaker waits before letting one probe call through."""
    auth_reset_s: Annotated[float, Field(gt=0, le=86_400)] = 600.0
    """After a 401/403 the breaker stays open this long: a bad key does not fix itself."""
    requests_per_minute: Annotated[int, Field(ge=1, le=10_000)] = 60
    """Per-service request rate limit."""
    concurrency: Annotated[int, Field(ge=1, le=16)] = 2
    """Per-service requests in flight at once."""
    probe_interval_s: Annotated[float, Field(gt=0, le=3600)] = 15.0
    """While a service (OpenAI, ElevenLabs, the store) is out of reach, how often to probe its host (doubling, up to 2 minutes)."""


class VoiceCacheSettings(Section):
    max_mb: Annotated[float, Field(ge=0, le=100_000)] = 64.0
    """Disk the text-to-speech cache may use under the state dir (least recently used evicted); 0 turns it off."""


class SyncSettings(Section):
    region: str | None = None
    """AWS region of the bucket and the table (e.g. "eu-west-1"). Unset: the standard chain (AWS_REGION, AWS_DEFAULT_REGION, the profile's region)."""
    sse: Literal["AES256", "aws:kms"] = "AES256"
    """Server-side encryption of every object: S3-managed keys, or KMS with kms_key_id."""
    kms_key_id: str | None = None
    """KMS key id or ARN, with sse = "aws:kms". Unset: the account's aws/s3 key."""
    multipart_threshold_mb: Annotated[float, Field(ge=5, le=5000)] = 16.0
    """Files larger than this are uploaded in parts (S3's minimum part is 5 MB)."""
    concurrency: Annotated[int, Field(ge=1, le=16)] = 2
    """Captures uploaded at once."""
    bandwidth_kbps: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    """Upload bandwidth cap in kilobytes per second; 0: no cap."""
    retention_days: Annotated[float, Field(ge=0, le=3650)] = 7.0
    """Keep synced captures on the device this many days; 0 deletes them as soon as they are synced."""
    quota_mb: Annotated[float, Field(ge=10, le=10_000_000)] = 2048.0
    """Most disk the spool may use; synced captures are evicted first to stay under it."""
    evict_unsynced: bool = False
    """When the quota is reached and nothing synced is left, evict the oldest unsynced captures (counted and logged). Off: refuse new captures instead."""
    retry_max_s: Annotated[float, Field(gt=0, le=3600)] = 300.0
    """Longest wait between attempts while the store is unreachable (exponential backoff with jitter)."""
    interval_s: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    """How often the syncer looks for work when nothing wakes it (a new capture or connectivity returning does)."""
    credentials: Literal["chain", "iot"] = "chain"
    """Where the AWS credentials come from: "chain" is boto3's standard chain (environment, profile, instance role); "iot" is AWS IoT Core's credentials provider, with the iot_* settings below."""
    iot_endpoint: Annotated[str, Field(pattern=r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")] | None = None
    """The credentials provider's host (aws iot describe-endpoint --endpoint-type iot:CredentialProvider), optionally :port."""
    iot_role_alias: Annotated[str, Field(pattern=r"^[\w=,@-]{1,128}$")] | None = None
    """The role alias whose role the device takes (aws iot create-role-alias)."""
    iot_thing_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] | None = (
        None
    )
    """The device's thing, attached to its certificate; also its device_id, which the IAM policy's ${credentials-iot:ThingName} matches."""
    iot_cert: Path | None = None
    """The device certificate (PEM) registered in AWS IoT."""
    iot_key: Path | None = None
    """The certificate's private key (PEM, unencrypted, readable only by the service user)."""
    iot_ca: Path | None = None
    """CA that signs the provider's certificate (Amazon Root CA 1). Unset: the system's trust store."""

    @model_validator(mode="after")
    def _iot_complete(self) -> SyncSettings:
        if self.credentials == "iot":
            names = ("iot_endpoint", "iot_role_alias", "iot_thing_name", "iot_cert", "iot_key")
            missing = [f"sync.{name}" for name in names if getattr(self, name) is None]
            if missing:
                raise ValueError(
                    f'credentials = "iot" needs {", ".join(missing)}: set them (HEIMDALL_SYNC__'
                    f'{missing[0].removeprefix("sync.").upper()}, ...), or use credentials = "chain"'
                )
        return self

    @field_validator("region")
    @classmethod
    def _region_exists(cls, value: str | None) -> str | None:
        if value is not None and not is_aws_region(value):
            raise ValueError(
                f"{value!r} is not an AWS region: use one such as eu-west-1 or us-east-1 "
                "(aws ec2 describe-regions lists them), or leave it unset to take AWS_REGION"
            )
        return value


def is_aws_region(name: str) -> bool:
    """Whether `name` has the shape of a region in one of botocore's partitions (aws, aws-cn, ...).

    The shape, not a fixed list, so a region newer than the installed botocore still passes.
    """
    import re

    import botocore.loaders

    partitions = botocore.loaders.create_loader().load_data("endpoints")["partitions"]
    return any(re.fullmatch(partition["regionRegex"], name) for partition in partitions)


class EngineSettings(Section):
    preload: bool = True
    """Load the speech models at start-up, before READY, so the first reply is as fast as the rest."""


class Secrets(Section):
    """API keys, read from the environment or systemd credentials, never from the TOML file."""

    openai_api_key: SecretStr | None = None
    elevenlabs_api_key: SecretStr | None = None


SECRET_SOURCES = {"openai_api_key": "OPENAI_API_KEY", "elevenlabs_api_key": "ELEVENLABS_API_KEY"}


class Settings(BaseSettings):
    """Everything the appliance needs to know, in one frozen value."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        use_attribute_docstrings=True,
    )

    state_dir: Path = DEFAULT_STATE_DIR
    """Spool, caches and runtime state (HEIMDALL_STATE_DIR)."""
    models_dir: Path | None = None
    """Speech models (HEIMDALL_MODELS_DIR). Unset: <state_dir>/models."""
    device_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] | None = None
    """Name of this device in capture records (HEIMDALL_DEVICE_ID). Unset: derived from /etc/machine-id."""
    openai_base_url: Annotated[str, Field(pattern=r"^https?://")] | None = None
    """OpenAI-compatible API base URL (HEIMDALL_OPENAI_BASE_URL). Unset: https://api.openai.com/v1. With a key set, http:// only to loopback (a local test server)."""
    elevenlabs_base_url: Annotated[str, Field(pattern=r"^https?://")] | None = None
    """ElevenLabs-compatible API base URL (HEIMDALL_ELEVENLABS_BASE_URL). Unset: https://api.elevenlabs.io. With a key set, http:// only to loopback (a local test server)."""
    s3_bucket: str | None = None
    """Bucket captures are synced to (HEIMDALL_S3_BUCKET). Unset: sync is off and captures stay on the device."""
    s3_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9!_.*'()/-]*$")] = "captures"
    """Key prefix in the bucket (HEIMDALL_S3_PREFIX)."""
    dynamodb_table: str | None = None
    """DynamoDB table indexing the captures (HEIMDALL_DYNAMODB_TABLE). Unset: no index."""
    s3_endpoint_url: Annotated[str, Field(pattern=r"^https?://")] | None = None
    """S3-compatible endpoint (HEIMDALL_S3_ENDPOINT_URL), e.g. MinIO. Unset: AWS. https://, or http:// only to loopback (a local test server)."""
    dynamodb_endpoint_url: Annotated[str, Field(pattern=r"^https?://")] | None = None
    """DynamoDB-compatible endpoint (HEIMDALL_DYNAMODB_ENDPOINT_URL). Unset: AWS. https://, or http:// only to loopback (a local test server)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Journal verbosity; DEBUG adds per-frame and per-request detail."""
    stop_grace_s: Annotated[float, Field(gt=0, le=60)] = 15.0
    """On SIGTERM, how long the current turn may take to finish writing (keep below TimeoutStopSec)."""
    microphone: MicrophoneSettings = MicrophoneSettings()
    speaker: SpeakerSettings = SpeakerSettings()
    button: ButtonSettings = ButtonSettings()
    led: LedSettings = LedSettings()
    camera: CameraSettings = CameraSettings()
    listening: ListeningSettings = ListeningSettings()
    stt: SpeechToTextSettings = SpeechToTextSettings()
    tts: TextToSpeechSettings = TextToSpeechSettings()
    engines: EngineSettings = EngineSettings()
    cloud: CloudSettings = CloudSettings()
    resilience: ResilienceSettings = ResilienceSettings()
    voice_cache: VoiceCacheSettings = VoiceCacheSettings()
    sync: SyncSettings = SyncSettings()
    secrets: Secrets = Field(default=Secrets(), exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _fill_derived(self) -> Settings:
        if self.models_dir is None:
            object.__setattr__(self, "models_dir", self.state_dir / "models")
        thing = self.sync.iot_thing_name if self.sync.credentials == "iot" else None
        if thing and self.device_id not in (None, thing):
            raise ValueError(
                f"device_id {self.device_id!r} differs from sync.iot_thing_name {thing!r}: with "
                "IoT credentials the device may only write under its thing's name; unset "
                "device_id (it defaults to the thing name)"
            )
        if self.device_id is None:
            object.__setattr__(self, "device_id", thing or machine_device_id())
        return self

    @model_validator(mode="after")
    def _secrets_only_over_tls(self) -> Settings:
        """API keys, and the captures with their AWS session token, never travel unencrypted.

        A plain http:// URL is refused where they would go, except to loopback (the fake
        cloud, moto): the S3 and DynamoDB endpoints always, a base URL when its key is set.
        """
        keys = self.secrets
        sent = {  # setting: (what would travel through it, whether it would)
            "openai_base_url": ("OPENAI_API_KEY", keys.openai_api_key is not None),
            "elevenlabs_base_url": ("ELEVENLABS_API_KEY", keys.elevenlabs_api_key is not None),
            "s3_endpoint_url": ("the captures and any AWS session token", True),
            "dynamodb_endpoint_url": ("the capture index and any AWS session token", True),
        }
        problems = [
            f"{name} = {url!r} (set in the file or {ENV_PREFIX}{name.upper()}) would send "
            f"{what} unencrypted: use https://, or a loopback address (localhost, 127.0.0.1, "
            "::1) for a local test server"
            for name, (what, travels) in sent.items()
            if travels and (url := getattr(self, name)) is not None and in_clear(url)
        ]
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def models(self) -> Path:
        assert self.models_dir is not None  # filled by _fill_derived
        return self.models_dir


def in_clear(url: str) -> bool:
    """Whether a request to `url` leaves the device unencrypted: http:// to a host not on loopback
    (localhost, 127.0.0.0/8, ::1)."""
    if not url.lower().startswith("http://"):
        return False
    try:
        host = urlsplit(url).hostname
    except ValueError:  # e.g. an unclosed "[" of an IPv6 address: no host to trust
        return True
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host or "").is_loopback
    except ValueError:  # a name other than localhost, or no host at all
        return True


def machine_device_id(machine_id_file: Path = Path("/etc/machine-id")) -> str:
    """A stable, non-secret device name: a hash of the machine id, never the id itself."""
    try:
        machine_id = machine_id_file.read_text().strip()
    except OSError:
        machine_id = ""
    if not machine_id:
        machine_id = os.uname().nodename
    return "heimdall-" + hashlib.sha256(machine_id.encode()).hexdigest()[:12]


def read_secrets(environ: dict[str, str] | None = None) -> Secrets:
    """API keys from the environment, else from systemd's $CREDENTIALS_DIRECTORY."""
    environ = dict(os.environ) if environ is None else environ
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    found: dict[str, Any] = {}
    for field, env_var in SECRET_SOURCES.items():
        value = environ.get(env_var, "").strip()
        if not value and credentials:
            path = Path(credentials) / field
            if path.is_file():
                value = path.read_text().strip()
        if value:
            found[field] = value
    return Secrets(**found)


def config_path(explicit: Path | None, environ: dict[str, str] | None = None) -> tuple[Path, bool]:
    """The config file to read, and whether the person asked for it (then it must exist)."""
    environ = dict(os.environ) if environ is None else environ
    if explicit is not None:
        return explicit, True
    if environ.get("HEIMDALL_CONFIG"):
        return Path(environ["HEIMDALL_CONFIG"]), True
    return DEFAULT_CONFIG, False


def load_settings(explicit: Path | None = None) -> Settings:
    """Read, merge and validate settings once; raise SettingsError on any problem."""
    path, required = config_path(explicit)
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc
        except OSError as exc:
            raise SettingsError(f"config file {path} cannot be read: {exc}") from exc
        if "secrets" in data:
            raise SettingsError(
                f"config file {path} has a [secrets] table: keep API keys out of the config; "
                "set OPENAI_API_KEY / ELEVENLABS_API_KEY or use systemd LoadCredential="
            )
        # No setting starts with "_"; pydantic-settings' own arguments do (_env_file,
        # _secrets_dir, _cli_parse_args...): a config file must not reach them.
        if reserved := sorted(key for key in data if key.startswith("_")):
            raise SettingsError(
                f"invalid settings ({path}):\n"
                + "\n".join(
                    f"  {key}: unknown key; check its spelling against config.example.toml"
                    for key in reserved
                )
            )
    elif required:
        raise SettingsError(
            f"config file {path} does not exist: create it (see config.example.toml) "
            "or drop --config / HEIMDALL_CONFIG to use the defaults"
        )
    try:
        return Settings(**data, secrets=read_secrets())
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc, path)) from None


def describe_errors(exc: ValidationError, path: Path) -> str:
    """One line per bad key: where it is, the value given and what is allowed."""
    lines = [f"invalid settings ({path} and HEIMDALL_* environment):"]
    for error in exc.errors(include_url=False):
        key = ".".join(str(part) for part in error["loc"])
        env_name = ENV_PREFIX + "__".join(str(p) for p in error["loc"]).upper()
        if error["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; check its spelling against config.example.toml")
            continue
        if not error["loc"]:  # about several keys at once: the message names them
            lines.append("  " + error["msg"].removeprefix("Value error, "))
            continue
        lines.append(
            f"  {key} = {error['input']!r}: {error['msg']} (set in the file or {env_name})"
        )
    return "\n".join(lines)
