"""Cameras: the Raspberry Pi camera through picamera2, and a synthetic test pattern.

A camera is a nice-to-have: when it is missing the appliance keeps working
with audio only, so a failing camera logs a warning and hands out None, never
an exception.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import Any

from heimdall_edge.devices.base import Camera
from heimdall_edge.settings import CameraSettings

log = logging.getLogger(__name__)

CAMERA_CHECKS = (
    "check that the ribbon cable is seated (contacts the right way round) and the camera enabled, "
    "that `rpicam-hello --list-cameras` lists it, that python3-picamera2 is installed "
    "(sudo apt install python3-picamera2) and that the venv was made with --system-site-packages"
)


class PiCamera:
    """A Raspberry Pi camera (Camera Module 2/3, HQ) via picamera2, imported only when opened.

    picamera2 exists only on Raspberry Pi OS (it needs libcamera from apt), so
    anywhere else this camera is simply unavailable.
    """

    def __init__(self, settings: CameraSettings, *, camera_num: int = 0) -> None:
        self.settings = settings
        self.camera_num = camera_num
        self._picam: Any = None
        self._opened = False
        self._warned = False
        self._failing = False

    @property
    def available(self) -> bool:
        """Whether frames can be taken; opens the camera on first use."""
        if not self._opened:
            self.open()
        return self._picam is not None

    def open(self) -> bool:
        """Find and start the camera once; return whether it is there."""
        if self._opened:
            return self._picam is not None
        self._opened = True
        if not self.settings.enabled:
            log.info(
                "camera disabled in settings (camera.enabled = false): captures hold audio only"
            )
            return False
        try:
            from picamera2 import Picamera2
        except Exception as exc:  # noqa: BLE001 - ImportError off the Pi, libcamera errors on a broken install
            self._warn_unavailable(f"picamera2 cannot be imported: {exc}")
            return False
        try:
            if not Picamera2.global_camera_info():
                self._warn_unavailable("libcamera finds no camera")
                return False
            picam = Picamera2(self.camera_num)
            size = (self.settings.width, self.settings.height)
            picam.configure(
                picam.create_video_configuration(main={"size": size, "format": "RGB888"})
            )
            picam.options["quality"] = self.settings.jpeg_quality
            picam.start()
        except Exception as exc:  # noqa: BLE001 - no camera is never fatal
            self._warn_unavailable(f"the camera cannot be started: {exc}")
            return False
        self._picam = picam
        log.info("camera %d open at %dx%d", self.camera_num, *size)
        return True

    def _warn_unavailable(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "no camera (%s): the loop carries on with audio only; %s", reason, CAMERA_CHECKS
            )

    async def capture_jpeg(self) -> bytes | None:
        if not self._opened:
            await asyncio.to_thread(self.open)
        if self._picam is None:
            return None
        try:
            jpeg = await asyncio.to_thread(self._capture)
        except Exception as exc:  # noqa: BLE001 - a failed frame is skipped, never fatal
            if not self._failing:  # one warning per run of failures
                self._failing = True
                log.warning(
                    "camera capture failed (%s): frames skipped until it recovers; %s",
                    exc,
                    CAMERA_CHECKS,
                )
            return None
        if self._failing:
            self._failing = False
            log.info("camera captures work again")
        return jpeg

    def _capture(self) -> bytes:
        buffer = io.BytesIO()
        self._picam.capture_file(buffer, format="jpeg")
        return buffer.getvalue()

    async def aclose(self) -> None:
        if self._picam is not None:
            picam, self._picam = self._picam, None
            await asyncio.to_thread(_stop_and_close, picam)


def _stop_and_close(picam: Any) -> None:
    try:
        picam.stop()
    finally:
        picam.close()


class SyntheticCamera:
    """A simulated camera: a test pattern with a frame counter and timestamp, as JPEG."""

    def __init__(self, settings: CameraSettings) -> None:
        self.settings = settings
        self.frames_taken = 0

    @property
    def available(self) -> bool:
        return self.settings.enabled

    async def capture_jpeg(self) -> bytes | None:
        if not self.settings.enabled:
            return None
        self.frames_taken += 1
        return await asyncio.to_thread(self.render, self.frames_taken)

    def render(self, number: int) -> bytes:
        from PIL import Image, ImageDraw, ImageFont

        width, height = self.settings.width, self.settings.height
        image = Image.new("RGB", (width, height))
        draw = ImageDraw.Draw(image)
        bars = [
            (255, 255, 255),
            (255, 255, 0),
            (0, 255, 255),
            (0, 255, 0),
            (255, 0, 255),
            (255, 0, 0),
            (0, 0, 255),
        ]
        for i, colour in enumerate(bars):  # SMPTE-like colour bars
            draw.rectangle(
                (i * width // len(bars), 0, (i + 1) * width // len(bars), height), fill=colour
            )
        step = max(1, width // 20)  # a box that moves, so consecutive frames differ
        x = (number * step) % max(1, width - step)
        draw.rectangle((x, height // 3, x + step, height // 3 + step), fill=(0, 0, 0))
        font = ImageFont.load_default(size=max(10, height // 12))
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        draw.rectangle((0, height - height // 6, width, height), fill=(0, 0, 0))
        draw.text(
            (10, height - height // 6 + 4),
            f"heimdall #{number}  {stamp}",
            fill=(255, 255, 255),
            font=font,
        )
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=self.settings.jpeg_quality)
        return buffer.getvalue()

    async def aclose(self) -> None:
        return None


async def frames_while(
    camera: Camera,
    stop: asyncio.Event,
    count: int,
    interval_ms: int,
    taken: list[bytes] | None = None,
) -> list[bytes]:
    """Up to `count` JPEG frames, `interval_ms` apart, until `stop` is set.

    The first is taken at once, even if `stop` is already set, so a short
    utterance still gets a picture. Stops early (keeping what it has) when the
    camera hands out None. Frames go into `taken` as they come (a speculative
    answer looks at the latest), and that list is returned.
    """
    taken = [] if taken is None else taken
    if count <= 0:
        return taken
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        jpeg = await camera.capture_jpeg()
        if jpeg is None:
            break
        taken.append(jpeg)
        if len(taken) >= count or stop.is_set():
            break
        next_at += interval_ms / 1000
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))
            break
        except TimeoutError:
            pass
    return taken
