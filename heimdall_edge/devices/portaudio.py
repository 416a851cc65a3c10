"""PortAudio, shared by the microphone, the speaker and `doctor`: start it quietly, find devices."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from heimdall_edge.devices.base import DeviceError

FALLBACK_RATES = (48_000, 44_100)
"""Rates tried, in order, when the card refuses 16 kHz (I2S mics and many HATs run at 48 kHz)."""


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """ALSA and JACK print pages of probe noise to fd 2 while PortAudio starts; keep the journal clean."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def quiet_portaudio() -> Any:
    """A pyaudio.PyAudio instance, started without the ALSA/JACK chatter."""
    import pyaudio

    with _stderr_silenced():
        return pyaudio.PyAudio()


def list_devices(pa: Any, kind: Literal["input", "output"]) -> list[tuple[int, str]]:
    """(index, name) of every PortAudio device that can record (or play)."""
    key = "maxInputChannels" if kind == "input" else "maxOutputChannels"
    found = []
    for index in range(pa.get_device_count()):
        info = pa.get_device_info_by_index(index)
        if int(info.get(key, 0)) > 0:
            found.append((index, str(info["name"])))
    return found


def describe_devices(devices: Iterable[tuple[int, str]]) -> str:
    listed = ", ".join(f"{index}: {name!r}" for index, name in devices)
    return listed or "none (is a sound card attached? `arecord -l` / `aplay -l` list them)"


def find_device(
    pa: Any, wanted: str | int | None, kind: Literal["input", "output"], setting: str
) -> tuple[int, str]:
    """(index, name) of the device a setting names: an index, part of a name, or None (default).

    Raises DeviceError listing the devices there are, so a wrong name is fixed in one go.
    """
    devices = list_devices(pa, kind)
    tool = "arecord -l" if kind == "input" else "aplay -l"
    if wanted is None:
        try:
            info = (
                pa.get_default_input_device_info()
                if kind == "input"
                else pa.get_default_output_device_info()
            )
        except OSError as exc:
            raise DeviceError(
                f"no default {kind} device ({exc}); {kind} devices: {describe_devices(devices)}. "
                f"Set {setting} to one of them, and check `{tool}`"
            ) from exc
        return int(info["index"]), str(info["name"])
    if isinstance(wanted, str) and wanted.strip().isdigit():
        wanted = int(wanted)
    if isinstance(wanted, int):
        for index, name in devices:
            if index == wanted:
                return index, name
    else:
        needle = wanted.casefold()
        for index, name in devices:
            if needle in name.casefold():
                return index, name
    raise DeviceError(
        f"{kind} device {wanted!r} not found; {kind} devices: {describe_devices(devices)}. "
        f"Set {setting} to a name (or part of one) or an index from this list, and check `{tool}`"
    )


def first_supported_format(
    pa: Any, index: int, kind: Literal["input", "output"], rates: Iterable[int]
) -> tuple[int, int] | None:
    """The first (rate, channels) of `rates` x (mono, stereo) the device takes as 16-bit, or None.

    Stereo is tried because raw I2S devices, amplifiers and HATs are often stereo-only.
    """
    import pyaudio

    for rate in rates:
        for channels in (1, 2):
            try:
                if pa.is_format_supported(
                    rate,
                    **{
                        f"{kind}_device": index,
                        f"{kind}_channels": channels,
                        f"{kind}_format": pyaudio.paInt16,
                    },
                ):
                    return rate, channels
            except ValueError:  # PortAudio's way of saying "no"
                continue
    return None
