"""Appliance latency, memory and start-up, on real models and real recordings.

Prints medians of several runs, each beside a baseline measured in the same run:
  1. per-stage latency of a whole turn (simulated devices, real engines) for a
     few recordings; baseline: the utterance's own duration (real-time factor);
  2. end of speech -> first reply audio: the endpointer's hang-over (silence_ms,
     paid in real time on a device) plus capture end -> first audio;
  3. RSS with both models loaded; baseline: the interpreter with the package imported;
  4. start-up to READY=1 of `heimdall-edge run --simulate`; baseline: importing the CLI.

Usage: HEIMDALL_MODELS_DIR=../shared/models python -m bench.latency [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SPEECH = Path(os.environ.get("HEIMDALL_SPEECH_DIR", REPO.parent / "shared" / "speech"))
MODELS = Path(os.environ.get("HEIMDALL_MODELS_DIR", REPO.parent / "shared" / "models"))
RECORDINGS = [
    "v2j_what_time_is_it.wav",
    "ps_goforward.wav",
    "picovoice_cheetah_test_en.wav",
    "jfk.flac",
]
STAGES = ["keep", "transcribe", "reply", "end_to_first_audio", "record"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values):.0f}"


async def turns(
    runs: int, recordings: list[str] | None = None
) -> dict[str, dict[str, list[float]]]:
    """Stage timings (ms) of `runs` whole turns per recording, after one dropped warm-up turn each."""
    from gpiozero.pins.mock import MockFactory

    from heimdall_edge.app import builders
    from heimdall_edge.app.appliance import Appliance
    from heimdall_edge.settings import load_settings

    settings = load_settings()
    settings = settings.model_copy(
        update={"listening": settings.listening.model_copy(update={"mode": "button"})}
    )
    engines = builders.build_engines(settings)
    await engines.load()
    spool = builders.open_spool(settings)
    results: dict[str, dict[str, list[float]]] = {}
    for name in recordings or RECORDINGS:
        timings: dict[str, list[float]] = {}
        for _ in range(runs + 1):  # the first run warms caches and is dropped
            pins = MockFactory()
            devices = builders.build_simulated_devices(
                settings, inputs=[SPEECH / name], realtime=False, pin_factory=pins
            )
            appliance = Appliance(settings, devices, engines, spool)
            pins.pin(settings.button.pin).drive_low()
            pins.pin(settings.button.pin).drive_high()
            result = await appliance.one_turn()
            await devices.aclose()
            assert result is not None, f"no speech heard in {name}"
            for stage, ms in result.timings_ms.items():
                timings.setdefault(stage, []).append(ms)
        results[name] = {stage: values[1:] for stage, values in timings.items()}
    return results


def rss_mib(code: str) -> float:
    """Peak RSS (VmHWM) of a fresh interpreter running `code`.

    Not ru_maxrss: Linux carries that across fork+exec from this (large) parent.
    """
    probe = code + "\nprint(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


LOAD_MODELS = """
import asyncio
from heimdall_edge.app import builders
from heimdall_edge.audio import read_audio
from heimdall_edge.settings import load_settings
async def main():
    engines = builders.build_engines(load_settings())
    await engines.load()
    await engines.stt.transcribe(read_audio({path!r}))
    [c async for c in engines.tts.synthesize("It's ten past three. I saved that.")]
asyncio.run(main())
"""


def time_to_ready(state: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "notify.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(path))
            sock.settimeout(120)
            env = dict(os.environ, NOTIFY_SOCKET=str(path), HEIMDALL_STATE_DIR=str(state))
            started = time.perf_counter()
            process = subprocess.Popen(
                [sys.executable, "-m", "heimdall_edge.cli", "run", "--simulate"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                while b"READY=1" not in sock.recv(4096):
                    pass
                return time.perf_counter() - started
            finally:
                process.terminate()
                process.wait(timeout=30)


def time_import() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import heimdall_edge.cli"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, default=5, help="measured runs per figure (after one warm-up)"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    state = Path(tempfile.mkdtemp(prefix="heimdall-bench-"))
    os.environ["HEIMDALL_STATE_DIR"] = str(state)

    from heimdall_edge.audio import read_audio
    from heimdall_edge.settings import ListeningSettings

    print(f"machine: {machine()}")
    print(
        f"runs: median of {args.runs} (after one warm-up); models: faster-whisper tiny.en int8 beam 1, Piper en_US-joe-medium\n"
    )

    results = asyncio.run(turns(args.runs))
    print("## Per-stage latency of one turn (ms, median)\n")
    print("| recording | audio s | " + " | ".join(STAGES) + " | transcribe RTF |")
    print("|---|---:|" + "---:|" * len(STAGES) + "---:|")
    for name, timings in results.items():
        seconds = read_audio(SPEECH / name).seconds
        rtf = statistics.median(timings["transcribe"]) / 1000 / seconds
        cells = " | ".join(median_ms(timings[stage]) for stage in STAGES)
        print(f"| {name} | {seconds:.1f} | {cells} | {rtf:.3f} |")

    hangover = ListeningSettings().silence_ms
    print("\n## End of speech -> first reply audio (ms, median)\n")
    print(
        f"| recording | capture end -> first audio | + hang-over ({hangover} ms) = end of speech -> first audio |"
    )
    print("|---|---:|---:|")
    for name, timings in results.items():
        after = statistics.median(timings["end_to_first_audio"])
        print(f"| {name} | {after:.0f} | {after + hangover:.0f} |")

    baseline = statistics.median(rss_mib("import heimdall_edge.cli") for _ in range(3))
    loaded = statistics.median(
        rss_mib(LOAD_MODELS.format(path=str(SPEECH / "jfk.flac"))) for _ in range(3)
    )
    print("\n## Memory (peak RSS, MiB, median of 3)\n")
    print("| package imported (baseline) | both models loaded and used | ratio |")
    print("|---:|---:|---:|")
    print(f"| {baseline:.0f} | {loaded:.0f} | {loaded / baseline:.1f}x |")

    imports = [time_import() for _ in range(args.runs)]
    ready = [time_to_ready(state / f"ready-{i}") for i in range(args.runs)]
    print(f"\n## Start-up (s, median of {args.runs})\n")
    print("| import CLI (baseline) | `run --simulate` to READY=1 | ratio |")
    print("|---:|---:|---:|")
    print(
        f"| {statistics.median(imports):.2f} | {statistics.median(ready):.2f} | {statistics.median(ready) / statistics.median(imports):.1f}x |"
    )


if __name__ == "__main__":
    main()
