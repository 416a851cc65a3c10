"""The command line as a person (or a script) uses it: real processes, real models, the JSON contract."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import wave
from pathlib import Path

import jiwer
import pytest

from heimdall_edge.app import builders
from heimdall_edge.audio import Audio
from heimdall_edge.settings import load_settings
from heimdall_edge.testing.text import words
from tests.shared import printed

TIME_REPLY = re.compile(r"^It's \d{1,2}:\d\d [AP]M\.$")


def heimdall(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "heimdall_edge.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, **(env or {})),
    )


def ok_json(*args: str) -> object:
    result = heimdall(*args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_demo_answers_what_time_is_it_and_keeps_the_capture(speech_dir: Path) -> None:
    demo = ok_json("demo", "--input", str(speech_dir / "v2j_what_time_is_it.wav"), "--json")
    assert isinstance(demo, dict)
    assert set(demo) == {
        "capture_id",
        "transcript",
        "reply",
        "engines",
        "timings_ms",
        "speculative",
    }
    assert isinstance(demo["speculative"], bool)
    assert re.sub(r"[^a-z ]", "", demo["transcript"].lower()).strip() == "what time is it"
    assert TIME_REPLY.match(demo["reply"])
    assert demo["engines"] == {"stt": "faster-whisper", "reply": "offline", "tts": "piper"}
    assert {
        "listen",
        "keep",
        "transcribe",
        "reply",
        "speak",
        "end_to_first_audio",
        "record",
    } <= set(demo["timings_ms"])
    listed = ok_json("captures", "--json")
    assert [c["capture_id"] for c in listed] == [demo["capture_id"]]
    assert listed[0]["sync_state"] == "pending"
    shown = ok_json("captures", "show", demo["capture_id"], "--json")
    folder = Path(shown["path"])
    with wave.open(str(folder / "reply.wav")) as reply:
        assert reply.getnframes() / reply.getframerate() > 0.5  # the spoken reply was kept
    assert (folder / "audio.wav").stat().st_mode & 0o777 == 0o600


def test_demo_default_input_is_shipped_with_the_package() -> None:
    demo = ok_json("demo", "--json")
    assert "time" in demo["transcript"].lower()
    assert TIME_REPLY.match(demo["reply"])


def test_transcribe_jfk(speech_dir: Path, transcripts: dict[str, str]) -> None:
    result = ok_json("transcribe", str(speech_dir / "jfk.flac"), "--json")
    assert set(result) == {"text", "engine", "latency_ms"}
    assert result["engine"] == "faster-whisper"
    assert jiwer.wer(words(transcripts["jfk.flac"]), words(result["text"])) < 0.1
    assert result["latency_ms"] > 0


def test_say_writes_a_wav_and_reports_first_audio(tmp_path: Path) -> None:
    out = tmp_path / "hello.wav"
    result = ok_json("say", "Hello. The door is locked.", "-o", str(out), "--json")
    assert result["engine"] == "piper" and result["cached"] is False
    assert 0 < result["first_audio_ms"] < 10_000
    with wave.open(str(out)) as wav:
        seconds = wav.getnframes() / wav.getframerate()
    assert abs(seconds - result["audio_seconds"]) < 0.05
    assert seconds > 1.0


def test_captures_on_an_empty_device() -> None:
    assert ok_json("captures", "--json") == []


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["transcribe", "missing.wav"], {}, "does not exist"),
        (["captures", "show", "20260101T000000000Z-00000000"], {}, "no capture"),
        (["demo"], {"HEIMDALL_LISTENING__SILENCE_MS": "soon"}, "HEIMDALL_LISTENING__SILENCE_MS"),
        (
            ["transcribe", "x.wav"],
            {"HEIMDALL_STT__MODEL": "medium.en"},
            "fetch-models --whisper medium.en",
        ),
        (["say", "hi", "-o", "x.wav"], {"HEIMDALL_TTS__VOICE": "de_DE-nobody-low"}, "Piper voice"),
    ],
)
def test_bad_input_is_a_clear_error_not_a_traceback(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    (tmp_path / "x.wav").write_bytes(
        (Path(__file__).parents[1] / "heimdall_edge/data/what_time_is_it.wav").read_bytes()
    )
    args = [str(tmp_path / a) if a.endswith(".wav") else a for a in args]
    result = heimdall(*args, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_and_empty_audio_are_refused_clearly(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage")
    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
    for path, message in ((corrupt, "cannot be decoded"), (empty, "holds no samples")):
        result = heimdall("transcribe", str(path))
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_doctor_reports_one_line_per_check_and_fails_without_devices() -> None:
    result = heimdall("doctor", env={"OPENAI_API_KEY": "sk-canary-doctor"})
    lines = result.stdout.splitlines()
    assert result.returncode == 1  # no sound card or GPIO on a test machine
    assert all(re.match(r"^(OK|WARN|FAIL) +[\w -]+: ", line) for line in lines), lines
    names = [line.split(":")[0].split(maxsplit=1)[1] for line in lines]
    assert names[:5] == [
        "settings",
        "state dir",
        "disk",
        "speech-to-text model",
        "text-to-speech voice",
    ]
    assert any(line.startswith("OK   speech-to-text model") for line in lines)
    assert any(line.startswith("OK   OpenAI key: set") for line in lines)
    assert "canary" not in result.stdout + result.stderr


def test_doctor_shows_what_the_service_saw_of_the_cloud() -> None:
    state = Path(os.environ["HEIMDALL_STATE_DIR"])
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    breaker = {"state": "open", "failures_in_window": 3, "last_error": "server"}
    status = {"updated_at": 0, "online": True, "breakers": {"openai": breaker}, "captures": {}}
    (state / "status.json").write_text(json.dumps(status))
    lines = heimdall("doctor").stdout.splitlines()
    [line] = [line for line in lines if "cloud state" in line]
    assert line.startswith("WARN cloud state: online") and "openai breaker open" in line


@pytest.mark.parametrize(
    ("reachable", "expected"),
    [
        (
            {"openai": False, "elevenlabs": True, "store": True},
            (
                "WARN cloud state: OFFLINE (N s ago), elevenlabs reachable, openai UNREACHABLE, "
                "store reachable, elevenlabs breaker closed, openai breaker closed: "
                "answering with local engines"
            ),
        ),
        (
            {"openai": True, "elevenlabs": True, "store": False},
            (
                "WARN cloud state: online (N s ago), elevenlabs reachable, openai reachable, "
                "store UNREACHABLE, elevenlabs breaker closed, openai breaker closed: "
                "captures wait on the device"
            ),
        ),
        (
            {"openai": True, "elevenlabs": True, "store": True},
            (
                "OK   cloud state: online (N s ago), elevenlabs reachable, openai reachable, "
                "store reachable, elevenlabs breaker closed, openai breaker closed"
            ),
        ),
    ],
    ids=["openai-down", "store-down", "all-up"],
)
def test_doctor_shows_each_service_on_its_own(reachable: dict, expected: str) -> None:
    state = Path(os.environ["HEIMDALL_STATE_DIR"])
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    closed = {"state": "closed", "failures_in_window": 0, "last_error": None}
    status = {
        "updated_at": time.time(),
        "online": reachable["openai"] and reachable["elevenlabs"],
        "reachable": reachable,
        "breakers": {"openai": closed, "elevenlabs": closed},
        "captures": {},
    }
    (state / "status.json").write_text(json.dumps(status))
    lines = heimdall("doctor").stdout.splitlines()
    shown = [re.sub(r"\d+ s ago", "N s ago", line) for line in lines if "cloud state" in line]
    assert shown == [expected]


# --- text from the cloud or a record never drives the operator's terminal ---------------------

HOSTILE = "\x1b[2J\x1b]0;pwned\x07"
"""Clear the screen, retitle the window: what a reply steered by the camera could say."""
ACTIVE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
"""What a terminal acts on (a newline between lines aside), raw."""


def hostile_capture() -> dict[str, str]:
    """A capture as a turn with a hostile cloud would record it; returns the fields set."""
    fields = {
        "transcript": "what do you see\x1b[31m\nnext line\ttab",
        "reply": f"A cat.{HOSTILE} \u202eevil\u202c \x9b31m \u2713 caf\u00e9 \u4f60\u597d",
        "error": "reply: cloud said \x1b[5mblink\x07",
    }
    with builders.open_spool(load_settings()) as spool:
        record = spool.create(
            device_id="pi-test",
            trigger="button",
            frames=[],
            audio_wav=Audio(bytes(320), 16000).to_wav(),
        )
        spool.update(
            record.capture_id, engines={"stt": "openai\x1b[8m", "reply": "openai"}, status="failed", **fields
        )  # fmt: skip
    return {"capture_id": record.capture_id, **fields}


def shown_to_the_operator(*args: str) -> str:
    code, received, stderr = printed([sys.executable, "-m", "heimdall_edge.cli", *args])
    assert code == 0, stderr
    text = received.decode()
    assert not ACTIVE.search(text), f"raw control characters reached the terminal: {text!r}"
    return text


def test_captures_show_makes_escape_sequences_visible_and_keeps_unicode() -> None:
    capture = hostile_capture()
    lines = shown_to_the_operator("captures", "show", capture["capture_id"]).splitlines()
    fields = {line.split(maxsplit=1)[0]: line.split(maxsplit=1)[1] for line in lines}
    assert fields["transcript"] == "what do you see\\x1b[31m\\nnext line\\ttab"  # one line
    assert (
        fields["reply"]
        == "A cat.\\x1b[2J\\x1b]0;pwned\\x07 \\u202eevil\\u202c \\x9b31m \u2713 caf\u00e9 \u4f60\u597d"
    )
    assert fields["error"] == "reply: cloud said \\x1b[5mblink\\x07"
    assert "'stt': 'openai\\x1b[8m'" in fields["engines"]


def test_captures_list_shows_each_capture_on_one_line() -> None:
    capture = hostile_capture()
    lines = shown_to_the_operator("captures").splitlines()
    assert lines[0] == "0 failed, 1 pending, 0 synced"
    assert lines[1].startswith(capture["capture_id"]) and len(lines) == 2
    assert lines[1].endswith("'what do you see\\x1b[31m\\nnext line\\ttab'")


def test_json_output_stays_valid_and_exact_with_no_raw_control_characters() -> None:
    capture = hostile_capture()
    for args in (["captures", "--json"], ["captures", "show", capture["capture_id"], "--json"]):
        done = heimdall(*args)
        assert done.returncode == 0, done.stderr
        assert not ACTIVE.search(done.stdout), done.stdout
        shown = json.loads(done.stdout)
        shown = shown[0] if isinstance(shown, list) else shown
        assert (shown["transcript"], shown["reply"]) == (capture["transcript"], capture["reply"])


def test_log_lines_make_escape_sequences_visible() -> None:
    """A folder in the spool whose name is an escape sequence: `captures` logs that it is set aside."""
    with builders.open_spool(load_settings()) as spool:
        stray = spool.root / "captures" / HOSTILE
    stray.mkdir()
    done = heimdall("captures")
    assert done.returncode == 0, done.stderr
    assert "quarantined capture \\x1b[2J\\x1b]0;pwned\\x07:" in done.stderr
    assert not ACTIVE.search(done.stderr.replace("\n", " ")), done.stderr
