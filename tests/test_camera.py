"""Cameras: the synthetic pattern, the Pi camera off the Pi, frames taken while someone speaks."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import sys
import time
from typing import ClassVar

import pytest
from PIL import Image

from heimdall_edge.devices.camera import PiCamera, SyntheticCamera, frames_while
from heimdall_edge.settings import CameraSettings


async def test_synthetic_camera_gives_jpegs_of_the_configured_size():
    camera = SyntheticCamera(CameraSettings(width=640, height=360, jpeg_quality=70))
    first = await asyncio.wait_for(camera.capture_jpeg(), timeout=10)
    second = await asyncio.wait_for(camera.capture_jpeg(), timeout=10)
    assert camera.available
    for jpeg in (first, second):
        assert jpeg is not None and jpeg[:2] == b"\xff\xd8"
        image = Image.open(io.BytesIO(jpeg))
        assert image.format == "JPEG" and image.size == (640, 360)
    assert first != second  # the counter and the moving box change every frame
    await camera.aclose()


async def test_disabled_synthetic_camera_gives_nothing():
    camera = SyntheticCamera(CameraSettings(enabled=False))
    assert not camera.available
    assert await asyncio.wait_for(camera.capture_jpeg(), timeout=5) is None


async def test_pi_camera_off_the_pi_is_unavailable_and_warns_once(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "picamera2", None)  # as off the Pi: import fails
    caplog.set_level(logging.WARNING, logger="heimdall_edge.devices.camera")
    camera = PiCamera(CameraSettings())

    assert camera.available is False
    for _ in range(3):
        assert await asyncio.wait_for(camera.capture_jpeg(), timeout=5) is None
    assert camera.open() is False

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "audio only" in warnings[0]
    for hint in (
        "ribbon cable",
        "rpicam-hello --list-cameras",
        "python3-picamera2",
        "--system-site-packages",
    ):
        assert hint in warnings[0]
    await camera.aclose()


class StandInPicamera2:
    """picamera2's Picamera2 as PiCamera uses it (it imports only on Raspberry Pi OS).

    `capture_file` raises while `vanished` is set, as libcamera does when the
    ribbon cable is pulled or the camera times out.
    """

    vanished = False
    made: ClassVar[list[StandInPicamera2]] = []

    def __init__(self, camera_num: int = 0) -> None:
        self.camera_num = camera_num
        self.options: dict[str, int] = {}
        self.size = (0, 0)
        self.started = self.closed = False
        StandInPicamera2.made.append(self)

    @staticmethod
    def global_camera_info() -> list[dict[str, object]]:
        return [{"Model": "imx708", "Num": 0}]

    def create_video_configuration(self, main: dict[str, object]) -> dict[str, object]:
        return {"main": main}

    def configure(self, config: dict[str, dict[str, object]]) -> None:
        self.size = config["main"]["size"]  # type: ignore[assignment]

    def start(self) -> None:
        self.started = True

    def capture_file(self, target: io.BytesIO, format: str) -> None:
        if StandInPicamera2.vanished:
            raise RuntimeError("Camera frontend has timed out!")
        Image.new("RGB", self.size).save(target, format=format, quality=self.options["quality"])

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        self.closed = True


async def test_pi_camera_that_vanishes_mid_run_skips_frames_then_recovers(monkeypatch, caplog):
    module = type(sys)("picamera2")
    module.Picamera2 = StandInPicamera2  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "picamera2", module)
    monkeypatch.setattr(StandInPicamera2, "made", [])
    caplog.set_level(logging.INFO, logger="heimdall_edge.devices.camera")
    camera = PiCamera(CameraSettings(width=320, height=240, jpeg_quality=60))

    first = await asyncio.wait_for(camera.capture_jpeg(), timeout=5)
    assert first is not None and Image.open(io.BytesIO(first)).size == (320, 240)
    monkeypatch.setattr(StandInPicamera2, "vanished", True)
    for _ in range(3):  # no exception reaches the turn: the capture goes on with audio only
        assert await asyncio.wait_for(camera.capture_jpeg(), timeout=5) is None
    monkeypatch.setattr(StandInPicamera2, "vanished", False)
    assert await asyncio.wait_for(camera.capture_jpeg(), timeout=5) is not None

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one per run of failures, not one per frame
    assert "Camera frontend has timed out" in warnings[0] and "ribbon cable" in warnings[0]
    assert any("work again" in r.getMessage() for r in caplog.records)
    (picam,) = StandInPicamera2.made
    await camera.aclose()
    assert picam.closed and not picam.started


async def test_disabled_pi_camera_does_not_warn(caplog):
    caplog.set_level(logging.WARNING, logger="heimdall_edge.devices.camera")
    camera = PiCamera(CameraSettings(enabled=False))
    assert await asyncio.wait_for(camera.capture_jpeg(), timeout=5) is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


class CountingCamera:
    available = True

    def __init__(self) -> None:
        self.taken_at: list[float] = []

    async def capture_jpeg(self) -> bytes | None:
        self.taken_at.append(time.monotonic())
        return b"\xff\xd8jpeg%d" % len(self.taken_at)

    async def aclose(self) -> None:
        return None


async def test_frames_while_takes_count_frames_at_the_interval():
    camera = CountingCamera()
    started = time.monotonic()
    frames = await asyncio.wait_for(frames_while(camera, asyncio.Event(), 3, 100), timeout=5)
    assert len(frames) == 3
    assert camera.taken_at[0] - started < 0.05  # the first at once
    gaps = [b - a for a, b in itertools.pairwise(camera.taken_at)]
    assert all(0.09 <= gap < 0.2 for gap in gaps)


async def test_frames_while_stops_when_the_person_stops_speaking():
    camera = CountingCamera()
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.25, stop.set)
    started = time.monotonic()
    frames = await asyncio.wait_for(frames_while(camera, stop, 30, 100), timeout=5)
    assert len(frames) == 3  # at 0, 0.1 and 0.2 s
    assert time.monotonic() - started < 0.35  # returned as soon as stop was set


async def test_frames_while_always_takes_the_first_frame_and_none_when_count_is_zero():
    stop = asyncio.Event()
    stop.set()
    assert len(await asyncio.wait_for(frames_while(CountingCamera(), stop, 3, 100), timeout=5)) == 1
    assert (
        await asyncio.wait_for(frames_while(CountingCamera(), asyncio.Event(), 0, 100), timeout=5)
        == []
    )


async def test_frames_while_without_a_camera_returns_nothing_at_once(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)
    frames = await asyncio.wait_for(
        frames_while(PiCamera(CameraSettings()), asyncio.Event(), 3, 100), timeout=5
    )
    assert frames == []


@pytest.mark.parametrize("size", [(64, 64), (1280, 720)])
async def test_synthetic_camera_renders_small_and_large(size):
    camera = SyntheticCamera(CameraSettings(width=size[0], height=size[1]))
    jpeg = await asyncio.wait_for(camera.capture_jpeg(), timeout=10)
    assert jpeg is not None and Image.open(io.BytesIO(jpeg)).size == size
