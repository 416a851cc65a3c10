"""Bad input, as the appliance meets it: broken or odd audio, a full disk, missing models and devices.

Every case ends one of two ways: the work is done (the words kept), or a short
clear message says what is wrong and what to do, with exit code 2 and no
traceback. Nothing already kept is ever lost on the way.

The full-disk tests mount a really small file system (tmpfs; a loop-mounted
ext4 image where tmpfs is not allowed) as the state directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile

from heimdall_edge.app import builders
from heimdall_edge.app.appliance import Appliance, Devices
from heimdall_edge.audio import SAMPLE_RATE, AudioError, frames, read_audio, silence
from heimdall_edge.devices.base import DeviceError
from heimdall_edge.devices.microphone import PyAudioMicrophone
from heimdall_edge.devices.speaker import WavFileSpeaker
from heimdall_edge.engines.local.offline_reply import OfflineReplyEngine
from heimdall_edge.settings import MicrophoneSettings, load_settings
from heimdall_edge.spool.store import Spool
from heimdall_edge.testing.text import words
from heimdall_edge.turn.interaction import SAY_STORAGE_FULL
from heimdall_edge.turn.routing import Engines
from tests.shared import until

REPO = Path(__file__).resolve().parents[1]
SPEECH = "ls_1089-134691-0001.flac"  # 5.4 s, 16 kHz: "for a full hour he had paced up and down..."
SHORT = "ps_goforward.wav"  # 2.8 s: "go forward ten meters"


def heimdall(*args: str, env: dict[str, str] | None = None, timeout: float = 180):
    return subprocess.run(
        [sys.executable, "-m", "heimdall_edge.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
        cwd=REPO,
    )


def clear_error(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, the message on the last stderr line, every needle in it, no traceback."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("heimdall-edge: "), done.stderr[-3000:]
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def wer(reference: str, text: str) -> float:
    return jiwer.wer(words(reference), words(text))


# =============================================================================================
# Audio: corrupt, empty, huge, silent, clipped, odd rates
# =============================================================================================


@pytest.fixture(scope="module")
def speech(speech_dir: Path) -> tuple[np.ndarray, int]:
    samples, rate = soundfile.read(speech_dir / SPEECH, dtype="float64")
    assert rate == SAMPLE_RATE and samples.ndim == 1
    return samples, rate


def clipped(samples: np.ndarray) -> np.ndarray:
    """A hot microphone: the recording peaking at full scale, clipped at +-0.2 of full scale,
    then 5x gain: flat-topped, square-wave-like speech at full scale."""
    return np.clip(samples / np.abs(samples).max(), -0.2, 0.2) * 5.0


def resampled(samples: np.ndarray, rate: int) -> np.ndarray:
    import soxr

    return soxr.resample(samples, SAMPLE_RATE, rate)


def write_variant(folder: Path, name: str, samples: np.ndarray) -> Path:
    """The test recording as a file some other device might have made."""
    stereo = np.stack([samples, samples * 0.8], axis=1)
    variants = {
        "clipped.wav": (clipped(samples), SAMPLE_RATE, "PCM_16"),
        "8k.wav": (resampled(samples, 8_000), 8_000, "PCM_16"),
        "44k1.wav": (resampled(samples, 44_100), 44_100, "PCM_16"),
        "48k-stereo.wav": (resampled(stereo, 48_000), 48_000, "PCM_16"),
        "24bit-44k1-stereo.wav": (resampled(stereo, 44_100), 44_100, "PCM_24"),
        "24bit-48k.flac": (resampled(samples, 48_000), 48_000, "PCM_24"),
        "float32-22k05.wav": (resampled(samples, 22_050), 22_050, "FLOAT"),
        "8bit-u8-16k.wav": (samples, SAMPLE_RATE, "PCM_U8"),
    }
    data, rate, subtype = variants[name]
    path = folder / name
    soundfile.write(path, data, rate, subtype=subtype)
    return path


VARIANTS = [
    "clipped.wav",
    "8k.wav",
    "44k1.wav",
    "48k-stereo.wav",
    "24bit-44k1-stereo.wav",
    "24bit-48k.flac",
    "float32-22k05.wav",
    "8bit-u8-16k.wav",
]


def test_clipping_really_is_square_wave_like(speech: tuple[np.ndarray, int]) -> None:
    original, square = speech[0], clipped(speech[0])

    def crest(samples: np.ndarray) -> float:  # peak / RMS: 1 for a square wave, ~1.4 for a sine
        return float(np.abs(samples).max() / np.sqrt(np.mean(samples**2)))

    assert np.abs(square).max() == pytest.approx(1.0)
    loud = np.abs(square) > 0.1
    assert np.mean(np.abs(square[loud]) >= 0.999) > 0.05  # the loud part is flat-topped
    assert crest(original) > 10 and crest(square) < 4, (crest(original), crest(square))


@pytest.mark.parametrize("variant", VARIANTS)
async def test_engine_keeps_the_words_of_clipped_and_odd_rate_audio(
    whisper,
    tmp_path: Path,
    speech: tuple[np.ndarray, int],
    transcripts: dict[str, str],
    variant: str,
) -> None:
    samples, _ = speech
    path = write_variant(tmp_path, variant, samples)
    audio = read_audio(path)
    assert audio.sample_rate == SAMPLE_RATE
    assert audio.seconds == pytest.approx(
        len(samples) / SAMPLE_RATE, abs=0.01
    )  # resampled, not cut
    heard = await asyncio.wait_for(whisper.transcribe(audio), 60)
    assert wer(transcripts[SPEECH], heard.text) <= 0.1, heard.text


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.wav", b"", "cannot be decoded"),
        ("text.wav", b"this is not audio at all\n" * 40, "cannot be decoded"),
        ("jpeg.flac", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(500), "cannot be decoded"),
        ("cut-header.wav", b"RIFF\x24\x00\x00\x00WAVEfmt ", "cannot be decoded"),
        ("flac-magic-only.flac", b"fLaC", "cannot be decoded"),
    ],
)
def test_corrupt_audio_is_an_audio_error_naming_the_file(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(AudioError, match=message) as caught:
        read_audio(path)
    assert str(path) in str(caught.value)


def test_zero_samples_and_absurd_rates_are_refused_not_inflated(tmp_path: Path) -> None:
    empty = tmp_path / "zero-samples.wav"
    soundfile.write(empty, np.zeros((0, 2)), 48_000, subtype="PCM_24")
    with pytest.raises(AudioError, match="holds no samples"):
        read_audio(empty)
    # A damaged header claiming 2 Hz: 20 KB of samples would become 320 MB at 16 kHz.
    absurd = tmp_path / "two-hertz.wav"
    soundfile.write(absurd, np.zeros(10_000, dtype=np.int16), 2, subtype="PCM_16")
    with pytest.raises(AudioError, match="2 Hz"):
        read_audio(absurd)


async def test_engine_hears_nothing_in_silence_and_in_a_blip(whisper, tmp_path: Path) -> None:
    quiet = tmp_path / "silence.wav"
    soundfile.write(quiet, np.zeros(SAMPLE_RATE * 3), SAMPLE_RATE, subtype="PCM_16")
    heard = await asyncio.wait_for(whisper.transcribe(read_audio(quiet)), 60)
    assert len(words(heard.text).split()) <= 2, heard.text
    blip = tmp_path / "one-sample.wav"
    soundfile.write(blip, np.array([0.5]), SAMPLE_RATE, subtype="PCM_16")
    heard = await asyncio.wait_for(whisper.transcribe(read_audio(blip)), 60)
    assert len(words(heard.text).split()) <= 2, heard.text


# --- the same through the command line ---------------------------------------------------------


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory: pytest.TempPathFactory, speech_dir: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("odd-audio")
    samples, _ = soundfile.read(speech_dir / SPEECH, dtype="float64")
    files = {name: write_variant(folder, name, samples) for name in VARIANTS}
    (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" + os.urandom(64))
    files["corrupt.wav"] = folder / "corrupt.wav"
    (folder / "empty.wav").write_bytes(b"")
    files["empty.wav"] = folder / "empty.wav"
    soundfile.write(folder / "no-samples.wav", np.zeros((0, 2)), 48_000, subtype="PCM_24")
    files["no-samples.wav"] = folder / "no-samples.wav"
    soundfile.write(
        folder / "silence.wav", np.zeros(SAMPLE_RATE * 3), SAMPLE_RATE, subtype="PCM_16"
    )
    files["silence.wav"] = folder / "silence.wav"
    rng = np.random.default_rng(7)
    noise = rng.normal(0.0, 0.1, SAMPLE_RATE * 600)  # ten minutes of loud hiss
    soundfile.write(folder / "noise-10min.wav", noise, SAMPLE_RATE, subtype="PCM_16")
    files["noise-10min.wav"] = folder / "noise-10min.wav"
    return files


@pytest.mark.parametrize(
    ("command", "name", "message"),
    [
        ("transcribe", "corrupt.wav", "cannot be decoded"),
        ("transcribe", "empty.wav", "cannot be decoded"),
        ("transcribe", "no-samples.wav", "holds no samples"),
        ("demo", "corrupt.wav", "cannot be decoded"),
        ("demo", "empty.wav", "cannot be decoded"),
        ("demo", "no-samples.wav", "holds no samples"),
        ("demo", "silence.wav", "no speech heard"),
    ],
)
def test_cli_refuses_unusable_audio_clearly(
    odd_files: dict[str, Path], command: str, name: str, message: str
) -> None:
    path = odd_files[name]
    args = [command, str(path)] if command == "transcribe" else [command, "--input", str(path)]
    clear_error(heimdall(*args, "--json"), message, str(path))
    captures = Path(os.environ["HEIMDALL_STATE_DIR"]) / "spool" / "captures"
    assert not captures.exists() or not any(captures.iterdir())  # nothing was kept of it


def test_cli_transcribes_silence_to_nothing(odd_files: dict[str, Path]) -> None:
    done = heimdall("transcribe", str(odd_files["silence.wav"]), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["engine"] == "faster-whisper"
    assert len(words(result["text"]).split()) <= 2, result


@pytest.mark.parametrize("name", ["clipped.wav", "24bit-44k1-stereo.wav", "8k.wav"])
def test_cli_keeps_the_words_of_clipped_and_odd_rate_files(
    odd_files: dict[str, Path], transcripts: dict[str, str], name: str
) -> None:
    done = heimdall("transcribe", str(odd_files[name]), "--json")
    assert done.returncode == 0, done.stderr
    assert wer(transcripts[SPEECH], json.loads(done.stdout)["text"]) <= 0.1, done.stdout


def test_cli_transcribes_ten_minutes_of_noise_without_inventing_speech(
    odd_files: dict[str, Path],
) -> None:
    """`transcribe` accepts long files (the 15 s cap is the appliance's, not the command's)."""
    started = time.monotonic()
    done = heimdall("transcribe", str(odd_files["noise-10min.wav"]), "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["engine"] == "faster-whisper"
    assert len(words(result["text"]).split()) <= 20, result["text"][:500]
    assert time.monotonic() - started < 240


def test_demo_on_ten_minutes_of_noise_finds_no_speech_and_keeps_nothing(
    odd_files: dict[str, Path],
) -> None:
    """Silero (the default judge) does not take noise for speech: after the press nobody
    speaks, so the capture gives up at no_speech_timeout_ms instead of recording on."""
    done = heimdall("demo", "--input", str(odd_files["noise-10min.wav"]), "--json")
    clear_error(done, "no speech heard", "noise-10min.wav")
    assert "capture ended (no_speech) without speech" in done.stderr
    with Spool(Path(os.environ["HEIMDALL_STATE_DIR"]) / "spool") as spool:
        assert spool.list() == []


def test_demo_caps_ten_minutes_of_noise_at_the_longest_utterance_with_webrtcvad(
    odd_files: dict[str, Path],
) -> None:
    """webrtcvad alone hears noise as speech: max_ms is what stops the capture."""
    done = heimdall(
        "demo", "--input", str(odd_files["noise-10min.wav"]), "--json",
        env={"HEIMDALL_LISTENING__VAD": "webrtc"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["timings_ms"]["listen"] <= 15_000  # listening.max_ms
    shown = json.loads(heimdall("captures", "show", result["capture_id"], "--json").stdout)
    assert shown["files"]["audio.wav"]["bytes"] <= 15 * SAMPLE_RATE * 2 + 1024
    with Spool(Path(os.environ["HEIMDALL_STATE_DIR"]) / "spool") as spool:
        assert spool.verify(result["capture_id"]) == []


# =============================================================================================
# Full disk
# =============================================================================================


def mount_small_disk(where: Path, size_kb: int) -> str:
    """Mount a file system of `size_kb` at `where`; return which kind worked."""
    tried = []
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode == 0:
        return "tmpfs"
    tried.append(f"tmpfs: {done.stderr.strip()}")
    image = where.parent / (where.name + ".img")
    with open(image, "wb") as file:
        file.truncate(max(size_kb, 4096) * 1024)  # ext4 wants room for its journal
    for command in (
        ["mkfs.ext4", "-q", "-F", "-m", "0", str(image)],
        ["mount", "-o", "loop", str(image), str(where)],
    ):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tried.append(f"{' '.join(command[:2])}: {done.stderr.strip()}")
            pytest.fail("no small file system could be mounted here: " + "; ".join(tried))
    return "ext4 loop image"


def unmount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], check=False, capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "small-disk"
    where.mkdir()
    method = mount_small_disk(where, 2048)
    print(f"small disk: {method}")  # shown with -rP: which way of filling a disk worked
    try:
        yield where
    finally:
        unmount(where)


def fill(disk: Path, leave_kb: int) -> Path:
    """Fill the disk so that only `leave_kb` stay free; return the filler to remove later."""
    stat = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as file:
        file.write(bytes(max(0, stat.f_bavail * stat.f_frsize - leave_kb * 1024)))
    return filler


def check_spool_whole(spool_dir: Path, acknowledged: list[str], exact: bool) -> None:
    """No partial capture anywhere; every acknowledged capture intact (all of it, SHA-256)."""
    assert not any((spool_dir / "tmp").iterdir()), list((spool_dir / "tmp").iterdir())
    with Spool(spool_dir) as spool:
        report = spool.recovered
        assert report.staging_removed == 0 and report.quarantined == 0, report
        assert report.unlisted_files_removed == 0, report
        listed = [r.capture_id for r in spool.list()]
        assert set(acknowledged) <= set(listed)
        if exact:
            assert sorted(listed) == sorted(acknowledged)
        for capture_id in listed:
            assert spool.verify(capture_id) == [], capture_id
    assert not any((spool_dir / "quarantine").iterdir())


def test_demo_turns_until_the_disk_is_full(small_disk: Path, speech_dir: Path) -> None:
    state = small_disk / "state"
    env = {"HEIMDALL_STATE_DIR": str(state)}
    acknowledged: list[str] = []
    refused: list[dict] = []
    for turn in range(20):
        if turn == 1:  # other things share the disk: about three captures' worth is left
            fill(small_disk, leave_kb=700)
        done = heimdall("demo", "--input", str(speech_dir / SHORT), "--json", env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout)
        if result["capture_id"] is not None:
            assert not refused, "a capture was kept after one was refused for lack of space"
            assert "go forward" in result["transcript"].lower()
            acknowledged.append(result["capture_id"])
            continue
        refused.append(result)
        assert "is full" in result["error"] and "free space" in result["error"], result
        assert set(result["timings_ms"]) == {"listen", "keep"}  # nothing ran on the lost audio
        if len(refused) == 2:
            break
    assert len(acknowledged) >= 3 and len(refused) == 2, (acknowledged, refused)
    check_spool_whole(state / "spool", acknowledged, exact=True)
    listed = json.loads(heimdall("captures", "--json", env=env).stdout)
    assert sorted(c["capture_id"] for c in listed) == sorted(acknowledged)


def test_a_disk_filled_by_something_else_evicts_synced_captures_first(
    small_disk: Path, speech_dir: Path
) -> None:
    """The quota is far away, but the disk is full (logs, another program): captures that are
    safe in the cloud go, oldest first, before a new one would be refused."""
    state = small_disk / "state"
    env = {"HEIMDALL_STATE_DIR": str(state)}
    kept = []
    for _ in range(3):
        done = heimdall("demo", "--input", str(speech_dir / SHORT), "--json", env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        kept.append(json.loads(done.stdout)["capture_id"])
    with Spool(state / "spool") as spool:
        for capture_id in kept[:2]:  # as if the cloud had them
            spool.update(capture_id, sync_state="synced")
    fill(small_disk, leave_kb=60)  # less than one capture's audio
    done = heimdall("demo", "--input", str(speech_dir / SHORT), "--json", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["capture_id"] is not None and "error" not in result, (result, done.stderr[-3000:])
    assert f"evicted synced capture {kept[0]}" in done.stderr
    assert "to stay within the disk's free space" in done.stderr
    listed = {c["capture_id"] for c in json.loads(heimdall("captures", "--json", env=env).stdout)}
    assert kept[2] in listed and result["capture_id"] in listed  # the unsynced one stays
    assert kept[0] not in listed


async def test_the_person_hears_that_storage_is_full(
    small_disk: Path, speech_dir: Path, whisper, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The service on a full disk: the capture is refused, and the person is told so, aloud."""
    monkeypatch.setenv("HEIMDALL_STATE_DIR", str(small_disk / "state"))
    monkeypatch.setenv("HEIMDALL_LISTENING__MODE", "button")
    settings = load_settings()
    spool = builders.open_spool(settings)
    engines = builders.build_engines(settings)
    first = Appliance(
        settings, builders.build_simulated_devices(settings, realtime=False), engines, spool
    )
    await asyncio.wait_for(first.start(), 60)  # renders the fixed phrases while there is room
    await first.devices.aclose()
    filler = fill(small_disk, leave_kb=40)
    heard_wav = tmp_path / "heard.wav"  # the speaker, on another disk
    devices = builders.build_simulated_devices(
        settings, inputs=[speech_dir / SHORT], realtime=False, speaker_wav=heard_wav
    )
    appliance = Appliance(settings, devices, engines, spool)
    try:
        devices.button.pin.drive_low()
        devices.button.pin.drive_high()
        result = await asyncio.wait_for(appliance.one_turn(), 60)
    finally:
        await devices.aclose()
        spool.close()
    assert result is not None and result.capture_id is None and "is full" in result.error
    heard = await whisper.transcribe(read_audio(heard_wav))
    assert wer(SAY_STORAGE_FULL, heard.text) <= 0.2, heard.text
    filler.unlink()
    check_spool_whole(settings.spool_dir, [], exact=True)


@pytest.fixture(scope="module")
def one_capture_state(tmp_path_factory: pytest.TempPathFactory, speech_dir: Path) -> Path:
    """A state dir after one demo turn: a capture kept, the fixed phrases in the voice cache."""
    state = tmp_path_factory.mktemp("baseline") / "state"
    env = {"HEIMDALL_STATE_DIR": str(state), "HF_HUB_OFFLINE": "1"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEIMDALL_")} | env
    env["HEIMDALL_MODELS_DIR"] = os.environ.get("HEIMDALL_MODELS_DIR") or str(
        REPO.parent / "shared" / "models"
    )
    for name in ("OPENAI_API_KEY", "ELEVENLABS_API_KEY", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "heimdall_edge.cli", "demo", "--input", str(speech_dir / SHORT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return state


@pytest.mark.parametrize("free_kb", [0, 12, 40, 76, 150, 250, 320])
def test_demo_on_a_disk_with_little_room_left(
    small_disk: Path, one_capture_state: Path, speech_dir: Path, free_kb: int
) -> None:
    """Every way a nearly full disk can bite: the index, the voice cache, status.json,
    the capture, reply.wav, the record. Exit 0, or 2 with a message that says the disk
    is full; the capture kept before is intact; nothing partial is left."""
    state = small_disk / "state"
    shutil.copytree(one_capture_state, state, symlinks=True)
    with Spool(state / "spool") as spool:
        before = [r.capture_id for r in spool.list()]
    assert len(before) == 1
    filler = fill(small_disk, free_kb)
    done = heimdall(
        "demo", "--input", str(speech_dir / SHORT), "--json", env={"HEIMDALL_STATE_DIR": str(state)}
    )
    filler.unlink()
    acknowledged = list(before)
    if done.returncode == 2:
        message = clear_error(done)
        assert "full" in message, message
        check_spool_whole(state / "spool", acknowledged, exact=False)
        return
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    if result["capture_id"] is None:
        assert "is full" in result["error"], result
    else:
        acknowledged.append(result["capture_id"])
        if "error" in result:
            assert "full" in result["error"], result
    check_spool_whole(state / "spool", acknowledged, exact=True)


@pytest.mark.parametrize("free_kb", [0, 40, 120])
def test_say_on_a_full_disk_still_speaks(small_disk: Path, tmp_path: Path, free_kb: int) -> None:
    """The voice cache only saves time: a disk too full to open it or to add to it costs
    no speech, and what it held before is still there afterwards."""
    env = {"HEIMDALL_STATE_DIR": str(small_disk / "state")}
    first = heimdall("say", "Hello there.", "-o", str(tmp_path / "first.wav"), "--json", env=env)
    assert first.returncode == 0, first.stderr
    filler = fill(small_disk, free_kb)
    out = tmp_path / "full.wav"  # on another disk
    text = "The quick brown fox jumps over the lazy dog, again and again, all day long."
    done = heimdall("say", text, "-o", str(out), "--json", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["engine"] == "piper" and result["cached"] is False
    assert read_audio(out).seconds == pytest.approx(result["audio_seconds"], abs=0.05)
    assert result["audio_seconds"] > 3
    assert "voice cache" in done.stderr  # the journal says why nothing was cached
    filler.unlink()
    again = heimdall("say", "Hello there.", "-o", str(tmp_path / "again.wav"), "--json", env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["cached"] is True, again.stderr


# =============================================================================================
# Missing models, missing devices
# =============================================================================================


COMMANDS = {
    "demo": (["demo"], None),
    "transcribe": (["transcribe", "{clip}"], "whisper"),  # needs only the whisper model
    "say": (["say", "hello", "-o", "{out}"], "voice"),  # needs only the Piper voice
    "run --simulate": (["run", "--simulate", "--input", "{clip}"], None),
}


@pytest.mark.parametrize(
    ("args", "missing", "models"),
    [
        pytest.param(*COMMANDS[command], models, id=f"{command}-{models}")
        for command in COMMANDS
        for models in ("empty", "whisper only", "voice only")
        if command != "run --simulate" or models == "empty"
    ],
)
def test_missing_models_are_named_with_the_fix(
    tmp_path: Path,
    models_dir: Path,
    speech_dir: Path,
    args: list[str],
    missing: str | None,
    models: str,
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    if models == "whisper only":
        (folder / "faster-whisper-tiny.en").symlink_to(models_dir / "faster-whisper-tiny.en")
    if models == "voice only":
        (folder / "piper-en_US-joe-medium").symlink_to(models_dir / "piper-en_US-joe-medium")
    needs = {"whisper": models != "whisper only", "voice": models != "voice only"}
    if missing is not None:  # the command needs one model only
        needs = {name: needed and name == missing for name, needed in needs.items()}
    argv = [a.format(clip=speech_dir / SHORT, out=tmp_path / "out.wav") for a in args]
    done = heimdall(*argv, env={"HEIMDALL_MODELS_DIR": str(folder)}, timeout=120)
    if not any(needs.values()):
        assert done.returncode == 0, done.stderr[-3000:]  # what it needs is there
        return
    message = clear_error(done, str(folder), "scripts/fetch-models")
    named = {
        "whisper": "faster-whisper model 'tiny.en' not found" in message
        and "--whisper tiny.en" in message,
        "voice": "Piper voice 'en_US-joe-medium' not found" in message
        and "--voice en_US-joe-medium" in message,
    }
    assert any(named[name] for name, needed in needs.items() if needed), message
    assert not any(named[name] for name, needed in needs.items() if not needed), message


def test_run_without_simulate_on_a_machine_without_hardware(tmp_path: Path) -> None:
    home = tmp_path / "home"  # no ~/.asoundrc: no sound card here
    home.mkdir()
    done = heimdall("run", env={"HOME": str(home)}, timeout=60)
    message = clear_error(done, "GPIO17", "cannot be opened")
    assert "run --simulate" in message  # what to do off the Pi


def test_no_sound_card_is_a_device_error_listing_what_there_is(tmp_path: Path) -> None:
    code = (
        "import asyncio\n"
        "from heimdall_edge.devices.microphone import PyAudioMicrophone\n"
        "from heimdall_edge.devices.base import DeviceError\n"
        "from heimdall_edge.settings import MicrophoneSettings\n"
        "async def main():\n"
        "    mic = PyAudioMicrophone(MicrophoneSettings())\n"
        "    try:\n"
        "        await mic.open()\n"
        "    except DeviceError as exc:\n"
        "        print('DeviceError:', exc)\n"
        "    finally:\n"
        "        await mic.aclose()\n"
        "asyncio.run(main())\n"
    )
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith("DeviceError: ") and "arecord -l" in done.stdout, done.stdout
    said = heimdall("say", "hello", env={"HOME": str(home)}, timeout=120)
    clear_error(said, "no default output device", "aplay -l")


# --- a microphone that vanishes mid-run ----------------------------------------------------------


class ScriptedDevice:
    """A 16 kHz card that plays `pcm` in 30 ms blocks, paced, then is unplugged or goes quiet.

    With `wait_for`, it stays quiet until that event is set: the person has not spoken yet.
    """

    rate, channels = SAMPLE_RATE, 1

    def __init__(
        self,
        name: str,
        pcm: bytes,
        then: str,
        wait_for: threading.Event | None = None,
        pace_s: float = 0.01,
    ) -> None:
        self.name = name
        self.blocks = deque(frames(pcm))
        self.delivered = 0
        self.then, self.wait_for, self.pace_s = then, wait_for, pace_s
        self.closed = False

    def read(self, n: int) -> bytes:
        assert n == self.rate * 30 // 1000
        time.sleep(self.pace_s)
        if self.wait_for is not None and not self.wait_for.is_set():
            return bytes(2 * n)
        if self.blocks:
            self.delivered += 1
            return self.blocks.popleft()
        if self.then == "unplugged":
            raise OSError(-9988, "Stream closed")  # what PortAudio says when the USB mic goes
        return bytes(2 * n)

    def close(self) -> None:
        self.closed = True


async def test_microphone_unplugged_mid_run_reopens_and_nothing_is_lost(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    speech_dir: Path,
    transcripts: dict[str, str],
    whisper,
    piper,
) -> None:
    """Unplugged right after the person stopped speaking: the service waits (backing off)
    instead of crashing, and once the card is back the first utterance ends and is kept
    whole, and the next one is heard too."""
    monkeypatch.setenv("HEIMDALL_LISTENING__MODE", "voice")
    monkeypatch.setenv("HEIMDALL_LISTENING__WAKE_WORD", "")  # speech onset wakes it
    settings = load_settings()
    second_utterance = threading.Event()
    first = ScriptedDevice(
        "usb mic", silence(600) + read_audio(speech_dir / SHORT).pcm + silence(150), "unplugged"
    )
    second_clip = "v2j_turn_on_living_room_lamp.wav"
    second = ScriptedDevice(
        "usb mic",
        read_audio(speech_dir / second_clip).pcm + silence(1500),
        "quiet",
        wait_for=second_utterance,
    )
    attempts: list[float] = []
    sleeps: list[float] = []

    def open_stream() -> ScriptedDevice:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            return first
        if len(attempts) <= 4:  # three failed attempts while it is unplugged
            raise DeviceError("input device 'usb mic' not found; input devices: none")
        return second

    def backoff(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(0.01)

    microphone = PyAudioMicrophone(
        MicrophoneSettings(reopen_max_backoff_s=4),
        open_stream=open_stream,
        sleep=backoff,
        queued_frames=10_000,  # this test is about the outage, not about a slow reader
    )
    simulated = builders.build_simulated_devices(settings, realtime=False)
    devices = Devices(
        microphone=microphone,
        button=simulated.button,
        indicator=simulated.indicator,
        camera=simulated.camera,
        speaker=WavFileSpeaker(None),  # no room: the microphone here is not the room's
    )
    engines = Engines(stt=whisper, reply=OfflineReplyEngine(), tts=piper)
    spool = builders.open_spool(settings)
    appliance = Appliance(settings, devices, engines, spool)
    stop = asyncio.Event()

    def complete() -> list:
        return [r for r in spool.list() if r.status == "complete"]

    async def scenario() -> None:
        await appliance.start()
        service = asyncio.create_task(appliance.serve(stop))
        await until(lambda: len(complete()) == 1, 60, "the first capture", alive=service)
        second_utterance.set()  # the person speaks again
        await until(lambda: len(complete()) == 2, 60, "the second capture", alive=service)
        assert not service.done()
        stop.set()
        await service

    try:
        await asyncio.wait_for(scenario(), 120)
    finally:
        await devices.aclose()
        spool.close()

    assert first.closed and not first.blocks  # all it had was read before it went
    assert len(attempts) == 5 and sleeps == [0.5, 1.0, 2.0, 4.0]
    assert microphone.outages == 1
    assert microphone.dropped_frames == 0
    with Spool(settings.spool_dir) as reopened:
        older, newer = sorted(reopened.list(), key=lambda r: r.capture_id)
        assert reopened.verify(older.capture_id) == reopened.verify(newer.capture_id) == []
    assert wer(transcripts[SHORT], older.transcript) <= 0.25, older.transcript
    assert wer(transcripts[second_clip], newer.transcript) <= 0.2, newer.transcript
    assert older.trigger == newer.trigger == "voice"
