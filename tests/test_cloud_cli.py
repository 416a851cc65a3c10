"""The commands against a fake cloud on loopback: the cloud when it is healthy, local when it is not."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from heimdall_edge.testing.fakecloud.cloud import FakeCloud
from heimdall_edge.testing.fakecloud.wire import Fault
from heimdall_edge.turn.interaction import SAY_NOT_UNDERSTOOD
from tests.shared import printed

CLOUD_TEXT = "what time is it in the cloud"


@pytest.fixture
def cloud() -> Iterator[FakeCloud]:
    with FakeCloud(transcript=CLOUD_TEXT, reply="It is noon in the cloud. Anything else?") as fake:
        yield fake


def heimdall(cloud: FakeCloud, *args: str, **env: str) -> tuple[dict, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "heimdall_edge.cli", *args, "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **cloud.env(), **env},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), time.monotonic() - started


def test_healthy_cloud_serves_every_command(
    cloud: FakeCloud, speech_dir: Path, tmp_path: Path
) -> None:
    result, _ = heimdall(cloud, "transcribe", str(speech_dir / "jfk.flac"))
    assert (result["engine"], result["text"]) == ("openai", CLOUD_TEXT)
    said, _ = heimdall(cloud, "say", "Hello from the cloud.", "-o", str(tmp_path / "hello.wav"))
    assert said["engine"] == "elevenlabs" and said["cached"] is False
    again, _ = heimdall(cloud, "say", "Hello from the cloud.", "-o", str(tmp_path / "again.wav"))
    assert again["engine"] == "elevenlabs" and again["cached"] is True
    assert cloud.count("tts") == 1  # the second came from the voice cache
    demo, _ = heimdall(cloud, "demo", "--input", str(speech_dir / "v2j_what_time_is_it.wav"))
    assert demo["engines"] == {"stt": "openai", "reply": "openai", "tts": "elevenlabs"}
    assert demo["transcript"] == CLOUD_TEXT
    assert demo["reply"] == "It is noon in the cloud. Anything else?"


@pytest.mark.parametrize(
    "fault",
    [None, Fault(status=401), Fault(status=429, retry_after_s=30), Fault(status=503)],
    ids=["refused", "401", "429-retry-after-beyond-deadline", "503"],
)
def test_broken_cloud_is_answered_locally(
    cloud: FakeCloud, speech_dir: Path, tmp_path: Path, fault: Fault | None
) -> None:
    if fault is None:
        cloud.refuse_connections()
    else:
        for route in ("transcriptions", "chat", "tts"):
            cloud.fault(route, fault)
    result, _ = heimdall(cloud, "transcribe", str(speech_dir / "jfk.flac"))
    assert result["engine"] == "faster-whisper" and "fellow americans" in result["text"].lower()
    said, _ = heimdall(cloud, "say", "Hello locally.", "-o", str(tmp_path / "local.wav"))
    assert said["engine"] == "piper"
    demo, _ = heimdall(cloud, "demo", "--input", str(speech_dir / "v2j_what_time_is_it.wav"))
    assert demo["engines"] == {"stt": "faster-whisper", "reply": "offline", "tts": "piper"}
    assert re.match(r"^It's \d{1,2}:\d\d [AP]M\.$", demo["reply"])


def test_hung_cloud_costs_the_hedge_delay_not_the_deadline(
    cloud: FakeCloud, speech_dir: Path
) -> None:
    cloud.fault("transcriptions", Fault(hang=True))
    env = {
        "HEIMDALL_RESILIENCE__STT_HEDGE_AFTER_MS": "500",
        "HEIMDALL_RESILIENCE__STT_DEADLINE_S": "60",
    }
    result, _ = heimdall(cloud, "transcribe", str(speech_dir / "jfk.flac"), **env)
    assert result["engine"] == "faster-whisper"
    assert result["latency_ms"] < 10_000  # hedge (0.5 s) + local, nowhere near the 60 s deadline


def test_thank_you_from_cloud_whisper_is_no_speech(speech_dir: Path) -> None:
    """Cloud Whisper answers "Thank you." (what it writes for near-silence): the turn is not
    understood, nothing is asked of the chat model, and the capture keeps "" as its transcript."""
    with FakeCloud(transcript="Thank you.") as cloud:
        demo, _ = heimdall(cloud, "demo", "--input", str(speech_dir / "v2j_what_time_is_it.wav"))
        assert (demo["transcript"], demo["reply"]) == ("", SAY_NOT_UNDERSTOOD)
        assert demo["engines"] == {"stt": "openai", "tts": "elevenlabs"}
        assert cloud.count("transcriptions") == 1 and cloud.count("chat") == 0
        assert cloud.last("tts").json["text"] == SAY_NOT_UNDERSTOOD  # what the person heard
        shown, _ = heimdall(cloud, "captures", "show", demo["capture_id"])
    assert (shown["transcript"], shown["reply"], shown["status"]) == (
        "",
        SAY_NOT_UNDERSTOOD,
        "complete",
    )
    assert {"audio.wav", "reply.wav"} <= set(shown["files"])
    assert "thank" not in (Path(shown["path"]) / "capture.json").read_text().lower()


def test_a_reply_with_escape_sequences_reaches_the_terminal_visible(speech_dir: Path) -> None:
    """The cloud's reply (steered by what the camera saw) tries to clear the operator's screen
    and retitle the window: `demo` and `captures show` print it with the escapes visible."""
    hostile = "Done.\x1b[2J\x1b]0;pwned\x07 Bye."
    with FakeCloud(transcript=CLOUD_TEXT, reply=hostile) as cloud:
        cli = [sys.executable, "-m", "heimdall_edge.cli"]
        said = str(speech_dir / "v2j_what_time_is_it.wav")
        code, demo, stderr = printed([*cli, "demo", "--input", said], env=cloud.env())
        assert code == 0, stderr
        capture_id = re.search(rb"capture: (\S+)", demo)[1].decode()
        code, shown, stderr = printed([*cli, "captures", "show", capture_id], env=cloud.env())
        assert code == 0, stderr
    for received in (demo, shown):
        assert b"\x1b" not in received and b"\x07" not in received, received
        assert rb"Done.\x1b[2J\x1b]0;pwned\x07 Bye." in received, received
