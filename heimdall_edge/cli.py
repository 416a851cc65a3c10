"""The `heimdall-edge` command: run, demo, transcribe, say, captures, doctor.

`--json` output is a stable contract: one JSON object (or list) on stdout,
logs on stderr. Everything printed goes through `visible`: text from the cloud
or a capture record never reaches the terminal as escape sequences.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from heimdall_edge.app import builders
from heimdall_edge.app.appliance import Devices
from heimdall_edge.app.visible import VisibleFormatter, visible, visible_json
from heimdall_edge.audio import AudioError, read_audio
from heimdall_edge.devices.base import DeviceError, MicrophoneEnded
from heimdall_edge.engines.base import EngineError
from heimdall_edge.settings import Settings, SettingsError, load_settings
from heimdall_edge.spool.errors import SpoolError
from heimdall_edge.spool.record import CaptureRecord
from heimdall_edge.sync.results import SyncProgress, SyncReport
from heimdall_edge.sync.syncer import Syncer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
captures_app = typer.Typer(help="List captures kept on the device, or show one.")
app.add_typer(captures_app, name="captures")

log = logging.getLogger("heimdall_edge")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Config file (default: $HEIMDALL_CONFIG or /etc/heimdall-edge/config.toml).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
EchoOption = Annotated[
    float | None,
    typer.Option(
        "--echo-db",
        help="Simulated room: the speaker's sound comes back into the microphone this many dB "
        "down (e.g. -6). Unset: no echo.",
        max=0,
    ),
]
NoiseOption = Annotated[
    str | None,
    typer.Option(
        "--noise", help="Simulated room: background noise, pink, brown, hum or an audio file."
    ),
]
SnrOption = Annotated[
    float, typer.Option("--snr", help="Simulated room: the noise this many dB below the speech.")
]

EXPECTED_ERRORS = (SettingsError, AudioError, EngineError, DeviceError, SpoolError)


class State:
    config: Path | None = None
    verbose: bool = False


@app.callback()
def main(
    config: ConfigOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    State.config, State.verbose = config, verbose


def _settings() -> Settings:
    settings = load_settings(State.config)
    level = logging.DEBUG if State.verbose else getattr(logging, settings.log_level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(VisibleFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    # Third-party chatter stays quiet unless asked for.
    for noisy in ("faster_whisper", "piper", "gpiozero", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    return settings


def _echo(text: str, *, err: bool = False, multiline: bool = False) -> None:
    """Print as `visible` shows it: what came from the cloud or a record cannot drive the terminal."""
    typer.echo(visible(text, multiline=multiline), err=err)


def _quoted(text: str | None) -> str:
    """A transcript or reply in a one-line listing: quoted as repr() would (but not escaped:
    `_echo` does that), "-" for none, "(no speech)" for ""."""
    if text is None:
        return "-"
    if not text:
        return "(no speech)"
    quote = '"' if "'" in text and '"' not in text else "'"
    return f"{quote}{text}{quote}"


def _fail(exc: BaseException) -> NoReturn:
    _echo(f"heimdall-edge: {exc}", err=True, multiline=True)
    raise typer.Exit(2)


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except EXPECTED_ERRORS as exc:
        _fail(exc)


def _emit(payload: Any) -> None:
    typer.echo(visible_json(json.dumps(payload, ensure_ascii=False, indent=None)))


def default_demo_input() -> Path:
    return Path(str(resources.files("heimdall_edge") / "data" / "what_time_is_it.wav"))


@app.command()
def run(
    simulate: Annotated[
        bool, typer.Option("--simulate", help="Simulated devices (mock GPIO, a simulated room).")
    ] = False,
    inputs: Annotated[
        list[Path] | None,
        typer.Option("--input", help="With --simulate: what the person in the room says."),
    ] = None,
    fast: Annotated[
        bool,
        typer.Option(
            "--fast", help="With --simulate: play the inputs as fast as possible, then stop."
        ),
    ] = False,
    echo_db: EchoOption = None,
    noise: NoiseOption = None,
    snr: SnrOption = 15.0,
) -> None:
    """Run the appliance (the systemd service). Under --simulate, SIGUSR1 presses the button."""
    try:
        settings = _settings()
        if simulate:
            devices = builders.build_simulated_devices(
                settings,
                inputs=inputs or [],
                realtime=not fast,
                echo_db=echo_db,
                noise=noise,
                snr_db=snr,
            )
        elif inputs or fast or echo_db is not None or noise:
            raise SettingsError("--input, --fast, --echo-db and --noise need --simulate")
        else:
            devices = builders.build_devices(settings)
    except EXPECTED_ERRORS as exc:
        _fail(exc)
    _run(serve(settings, devices, simulate=simulate))


async def serve(settings: Settings, devices: Devices, *, simulate: bool = False) -> None:
    """The service until SIGTERM/SIGINT: start, serve turns, stop gracefully, close devices."""
    from heimdall_edge.app.appliance import Appliance
    from heimdall_edge.app.sdnotify import Notifier, extending_startup

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = [signal.SIGTERM, signal.SIGINT]
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    if simulate:
        signals.append(signal.SIGUSR1)
        loop.add_signal_handler(
            signal.SIGUSR1, lambda: asyncio.ensure_future(press_mock_button(devices.button))
        )
    notifier = Notifier()
    try:
        async with extending_startup(notifier):
            spool = await asyncio.to_thread(builders.open_spool, settings)  # may recover
            engines = builders.build_engines(settings)
            syncer = builders.build_syncer(settings, spool)
            appliance = Appliance(
                settings, devices, engines, spool, syncer=syncer, notifier=notifier
            )
            await appliance.start()
        log.info("ready: listening in %s mode", settings.listening.mode)
        await appliance.serve(stop)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await devices.aclose()
    log.info("stopped cleanly")


async def press_mock_button(button: Any, hold_s: float = 0.1) -> None:
    """A short press of a simulated (gpiozero MockPin) button."""
    button.pin.drive_low()
    await asyncio.sleep(hold_s)
    button.pin.drive_high()


@app.command()
def demo(
    input: Annotated[
        Path | None, typer.Option("--input", help="Audio the simulated person says (WAV/FLAC).")
    ] = None,
    trigger: Annotated[
        str | None,
        typer.Option(
            help="wake: the person says the wake word first (the default when one is set); "
            "button: the person taps the button."
        ),
    ] = None,
    echo_db: EchoOption = None,
    noise: NoiseOption = None,
    snr: SnrOption = 15.0,
    json_out: JsonOption = False,
) -> None:
    """One whole interaction on simulated hardware: wake (or press), speak, transcribe, reply, speak, keep."""
    try:
        settings = _settings()
        audio_path = input or default_demo_input()
        said = read_audio(audio_path)  # a bad file fails here, clearly, before anything loads
        wake_phrase = _demo_wake_phrase(settings, trigger)
        room = {"echo_db": echo_db, "noise": noise, "snr_db": snr}
        builders.build_simulated_devices(settings, inputs=[], realtime=False, **room)  # checks
    except (*EXPECTED_ERRORS, ValueError) as exc:
        _fail(exc)
    result = _run(_demo(settings, said.pcm, wake_phrase, room))
    if result is None:
        _fail(RuntimeError(f"no speech heard in {audio_path}: nothing to answer"))
    if json_out:
        _emit(result.to_json())
        return
    timings = result.timings_ms
    if wake_phrase:
        _echo(f"woke on: {_quoted(wake_phrase)}")
    _echo(
        f"heard:   {_quoted(result.transcript)}  ({result.engines.get('stt')}, {timings.get('transcribe', 0):.0f} ms)"
    )
    _echo(f"reply:   {_quoted(result.reply)}  ({result.engines.get('reply', '-')})")
    _echo(
        f"spoke:   {result.engines.get('tts')}, first audio {timings.get('end_to_first_audio', 0):.0f} ms "
        "after the end of the utterance"
    )
    _echo(f"capture: {result.capture_id} in {settings.spool_dir} (pending sync)")


def _demo_wake_phrase(settings: Settings, trigger: str | None) -> str | None:
    """The phrase the simulated person wakes the device with; None: they press the button."""
    from heimdall_edge.listen.wakeword import WakeWordDetector, WakeWordError

    if trigger not in (None, "wake", "button"):
        raise SettingsError(f"--trigger {trigger!r}: use wake or button")
    listening = settings.listening
    if trigger == "button" or (trigger is None and not listening.wake_word):
        return None
    if not listening.wake_word or listening.mode == "button":
        raise SettingsError(
            "--trigger wake needs a wake word and listening.mode voice or both "
            "(HEIMDALL_LISTENING__WAKE_WORD, HEIMDALL_LISTENING__MODE)"
        )
    try:
        detector = WakeWordDetector.from_settings(listening)
    except WakeWordError as exc:
        if trigger == "wake":
            raise SettingsError(str(exc)) from exc
        log.warning("%s: the demo presses the button instead", exc)
        return None
    detector.close()
    return detector.model.phrase


async def _demo(
    settings: Settings, said: bytes, wake_phrase: str | None, room: dict[str, Any]
) -> Any:
    from heimdall_edge.app.appliance import Appliance
    from heimdall_edge.audio import SAMPLE_RATE, joined, silence

    mode = "voice" if wake_phrase else "button"
    settings = settings.model_copy(
        update={"listening": settings.listening.model_copy(update={"mode": mode})}
    )
    spool = builders.open_spool(settings)
    engines = builders.build_engines(settings)
    lines = [said]
    if wake_phrase:  # the person says the wake word, pauses, then the rest
        await engines.tts.load()
        spoken = [chunk async for chunk in engines.tts.synthesize(f"{wake_phrase}.")]
        wake = joined(spoken, SAMPLE_RATE)
        lines = [silence(500) + wake + silence(400) + said]
    devices = builders.build_simulated_devices(settings, inputs=lines, realtime=False, **room)
    appliance = Appliance(settings, devices, engines, spool)  # keeps the quota; `sync` delivers
    try:
        await appliance.start()
        if not wake_phrase:  # the simulated person taps the button, then speaks
            devices.button.pin.drive_low()
            devices.button.pin.drive_high()
        try:
            return await appliance.one_turn()
        except MicrophoneEnded:
            raise DeviceError(
                f"the simulated person said {wake_phrase!r} but the device did not wake "
                "(too much noise or echo?): raise --snr, or use --trigger button"
            ) from None
    finally:
        await devices.aclose()


@app.command()
def transcribe(
    audio: Annotated[Path, typer.Argument(help="WAV or FLAC file.")], json_out: JsonOption = False
) -> None:
    """Transcribe an audio file: the cloud when it answers, else on the device."""
    try:
        settings = _settings()
        clip = read_audio(audio)
    except EXPECTED_ERRORS as exc:
        _fail(exc)
    engines = builders.build_engines(settings, voice_cache=False)

    async def go() -> tuple[str, str, float]:
        await engines.stt.load()  # the voice is not needed to transcribe
        started = time.perf_counter()
        transcript = await engines.transcribe(clip)
        return transcript.text, transcript.engine, (time.perf_counter() - started) * 1000

    text, name, latency_ms = _run(go())
    if json_out:
        _emit({"text": text, "engine": name, "latency_ms": round(latency_ms, 1)})
    else:
        _echo(text)


@app.command()
def say(
    text: Annotated[str, typer.Argument(help="What to say.")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write a WAV file instead of playing.")
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Speak text through the speaker (or into a WAV file)."""
    if not text.strip():
        _fail(ValueError("nothing to say: give some text"))
    try:
        settings = _settings()
    except SettingsError as exc:
        _fail(exc)
    payload = _run(_say(settings, text, output))
    if json_out:
        _emit(payload)
    elif output is not None:
        _echo(f"wrote {payload['audio_seconds']:.2f} s of speech to {output}")


async def _say(settings: Settings, text: str, output: Path | None) -> dict[str, Any]:
    from heimdall_edge.devices.speaker import PyAudioSpeaker, WavFileSpeaker

    builders.prepare_state_dir(settings)  # the voice cache lives there
    engines = builders.build_engines(settings)
    await engines.tts.load()  # the speech-to-text model is not needed to speak
    speaker = WavFileSpeaker(output, realtime=False) if output else PyAudioSpeaker(settings.speaker)
    started = time.monotonic()
    try:
        speech = await engines.speak(text)
        playback = await speaker.play(speech.items(), asyncio.Event())
    finally:
        await speaker.aclose()
    first = playback.first_audio_at
    return {
        "engine": speech.engine,
        "cached": speech.cached,
        "first_audio_ms": round((first - started) * 1000, 1) if first else None,
        "audio_seconds": round(playback.seconds, 3),
    }


@app.command()
def sync(
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Deliver pending captures to S3 (and DynamoDB), with a progress bar; without --once, keep going."""
    try:
        settings = _settings()
        spool = builders.open_spool(settings)
        syncer = builders.build_syncer(settings, spool)
    except EXPECTED_ERRORS as exc:
        _fail(exc)
    if syncer.store is None:
        _fail(
            SettingsError(
                "sync is off: no bucket set (HEIMDALL_S3_BUCKET); captures stay on the device"
            )
        )
    if not once:
        _run(_sync_forever(syncer))
        return
    report = _run(_sync_with_progress(syncer, show=not json_out))
    if json_out:
        _emit(report.to_dict())
    else:
        _echo(report.summary())
    raise typer.Exit(0 if report.ok else 1)


async def _sync_with_progress(syncer: Syncer, *, show: bool) -> SyncReport:
    from tqdm import tqdm

    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, disable=not show, leave=True) as bar:

        def progress(update: SyncProgress) -> None:
            bar.total = update.bytes_total
            bar.set_description(f"captures {update.captures_done}/{update.captures_total}")
            bar.update(update.bytes_done - bar.n)

        return await syncer.sync_once(progress)


async def _sync_forever(syncer: Syncer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("syncing until Ctrl-C")
    await syncer.run(stop)


@captures_app.callback(invoke_without_command=True)
def captures(
    ctx: typer.Context,
    json_out: JsonOption = False,
    limit: Annotated[int, typer.Option(help="Most to list.")] = 50,
) -> None:
    """List the newest captures and how many wait to sync."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        spool = builders.open_spool(_settings())
        records = spool.list(limit=limit)
        counts = spool.counts()
    except EXPECTED_ERRORS as exc:
        _fail(exc)
    if json_out:
        _emit([_summary(r) for r in records])
        return
    _echo(", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no captures")
    for record in records:
        _echo(
            f"{record.capture_id}  {record.sync_state:8} {record.status:9} {_quoted(record.transcript)}"
        )


@captures_app.command("show")
def captures_show(capture_id: str, json_out: JsonOption = False) -> None:
    """Everything recorded about one capture."""
    try:
        spool = builders.open_spool(_settings())
        record = spool.get(capture_id)
    except EXPECTED_ERRORS as exc:
        _fail(exc)
    payload = record.to_dict() | {"path": str(spool.path(capture_id))}
    if json_out:
        _emit(payload)
    else:
        for key, value in payload.items():
            _echo(f"{key:12} {value}")


def _summary(record: CaptureRecord) -> dict[str, Any]:
    fields = ("capture_id", "created_at", "trigger", "status", "sync_state", "transcript", "reply")
    data = record.to_dict()
    return {key: data[key] for key in fields}


@app.command()
def doctor() -> None:
    """Check settings, devices, models, disk and credentials: one line each, with the fix."""
    from heimdall_edge.app.doctor import Level, run_checks

    try:
        settings = _settings()
    except SettingsError as exc:
        _echo(f"FAIL settings: {exc}", multiline=True)
        raise typer.Exit(1) from None
    worst = Level.OK
    for check in run_checks(settings, State.config):
        _echo(check.line())
        worst = max(worst, check.level)
    raise typer.Exit(1 if worst is Level.FAIL else 0)


if __name__ == "__main__":
    app()
