"""Test helpers shared across files: systemd's side of NOTIFY_SOCKET, polling without sleeps in asserts."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import heimdall_edge

PACKAGE = Path(heimdall_edge.__file__).parent


class NotifyListener:
    """A real AF_UNIX datagram socket, bound like systemd's, collecting every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._running = True
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while self._running:
            try:
                self.messages.append(self._sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def lines(self) -> list[str]:
        return [line for message in list(self.messages) for line in message.splitlines()]

    def has(self, line: str) -> bool:
        return line in self.lines()

    def close(self) -> None:
        self._running = False
        self._thread.join(timeout=2)
        self._sock.close()


async def until(
    condition: Callable[[], bool], timeout: float, what: str, alive: asyncio.Future | None = None
) -> None:
    """Wait until `condition()` holds, polling; fail with `what` after `timeout` seconds.

    With `alive`, fail at once (with its exception) if that task ends first.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if alive is not None and alive.done():
            alive.result()
            raise AssertionError(f"service ended while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def run_with_alsa_config(tmp_path: Path, asoundrc: str, child: str, args: dict) -> dict:
    """Run `child` (Python source) in a process whose ALSA config is `asoundrc`.

    ALSA reads ~/.asoundrc once, when PortAudio starts, so each device test gets
    its own process and HOME. The child prints one JSON object as its last line.
    """
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / ".asoundrc").write_text(asoundrc)
    env = {**os.environ, "HOME": str(home), "JACK_NO_START_SERVER": "1"}
    done = subprocess.run(
        [sys.executable, "-c", child, json.dumps(args)],
        check=False,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"child failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def streams_left_to_the_gc() -> Iterator[list[str]]:
    """Names of async generators that nobody closed, so that the garbage collector had to.

    Such a stream is finalized on whatever thread the collector happens to run, in the
    middle of other work: once in a long chaos run that printed a stray traceback.
    """
    left: list[str] = []
    firstiter, finalizer = sys.get_asyncgen_hooks()

    def record(agen: Any) -> None:
        # Ours, and the SDK streams we iterate (closing them closes their HTTP response).
        # What the SDKs leave of their own inner generators is theirs to close.
        if Path(agen.ag_code.co_filename).is_relative_to(PACKAGE) or agen.__qualname__ in (
            "AsyncStream.__aiter__",  # openai
            "AsyncTextToSpeechClient.stream",  # elevenlabs
        ):
            left.append(agen.__qualname__)
        if finalizer is not None:
            finalizer(agen)

    sys.set_asyncgen_hooks(firstiter, record)
    try:
        yield left
        gc.collect()
    finally:
        sys.set_asyncgen_hooks(firstiter, finalizer)


def printed(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[int, bytes, str]:
    """Run `args` as an operator would: the exit code, every byte it printed, its stderr.

    stdout is a pipe, not a terminal: CI machines may have no /dev/pts. On a pipe click strips
    bare CSI sequences (ESC [ ... letter) but nothing else, so callers assert the exact visible
    text they expect rather than only the absence of raw control characters."""
    done = subprocess.run(
        args, capture_output=True, env={**os.environ, **(env or {})}, timeout=timeout, check=False
    )
    return done.returncode, done.stdout, done.stderr.decode()
