"""Clock steps for the chaos driver: libfaketime, and a store that refuses a skewed signature.

An NTP step (a Pi has no real-time clock: the first sync after boot can move it by
hours or days, and a bad server can move it back) changes the wall clock only: the
monotonic clock goes on. The service processes run under libfaketime (Debian
package `faketime`, installed by scripts/bootstrap.sh) with

    LD_PRELOAD=.../libfaketime.so.1
    FAKETIME_TIMESTAMP_FILE=<file>      an offset such as "+1h", "+1d", "-10m" or "+0"
    FAKETIME_DONT_FAKE_MONOTONIC=1      CLOCK_MONOTONIC (asyncio, breakers) is left alone
    FAKETIME_NO_CACHE=1                 the file is read at every call: a step lands at once

and `ClockStepper` rewrites the file (atomically, by rename) while they run, so every
process of the device sees the same wall clock, as on a real device.

AWS refuses a request whose signature time is more than 15 minutes from its own
clock (S3: 403 RequestTimeTooSkewed; DynamoDB: 400 InvalidSignatureException,
"Signature expired" or "Signature not yet current"). moto does not check that (moto
5.2 ignores X-Amz-Date), so `SkewCheckingMotoServer` puts a check of AWS's rule in
front of moto's app: after a step of +1 h or +1 day the store refuses the device
until the clock comes back, a step of -10 minutes is within the limit.
"""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from heimdall_edge.testing.moto import MotoServer

FAKETIME_LIBS = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/arm-linux-gnueabihf/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
)
REAL = "+0"
OFFSETS_S = {"+0": 0.0, "+1h": 3600.0, "+1d": 86400.0, "-10m": -600.0}
"""The steps: an hour and a day ahead (the store refuses the signature), ten minutes back
(within AWS's 15 minutes), and back to the real time."""
REFUSED = ("+1h", "+1d")
"""The steps past MAX_SKEW_S."""
MAX_SKEW_S = 15 * 60
"""AWS's limit on the difference between a request's signature time and its own clock."""


def faketime_lib() -> Path:
    """libfaketime.so.1, or FileNotFoundError saying how to get it."""
    for candidate in (os.environ.get("HEIMDALL_FAKETIME_LIB"), *FAKETIME_LIBS):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError(
        "libfaketime.so.1 not found: install the Debian package faketime "
        "(scripts/bootstrap.sh does), or set HEIMDALL_FAKETIME_LIB"
    )


def faketime_env(timestamp_file: Path) -> dict[str, str]:
    """Environment for a process whose wall clock follows `timestamp_file` (monotonic untouched)."""
    return {
        "LD_PRELOAD": str(faketime_lib()),
        "FAKETIME_TIMESTAMP_FILE": str(timestamp_file),
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }


def write_offset(timestamp_file: Path, offset: str) -> None:
    """Atomically (a reader sees the old offset or the new one, never an empty file)."""
    temp = timestamp_file.with_name(timestamp_file.name + ".new")
    temp.write_text(offset + "\n")
    os.replace(temp, timestamp_file)


PROBE = """
import sys, time
for line in sys.stdin:
    print(f"{time.time():.3f} {time.monotonic():.3f}", flush=True)
"""


def probe_steps(
    work_dir: Path, offsets: tuple[str, ...] = ("+1h", "+1d", "-10m", REAL)
) -> list[dict[str, float]]:
    """Step the clock of a small Python process under libfaketime and measure what it sees.

    For each offset: how far its time.time() and its time.monotonic() moved against the
    real clocks of this (unfaked) process. The test of the mechanism itself.
    """
    stamp = work_dir / "probe-faketime"
    write_offset(stamp, REAL)
    env = {**os.environ, **faketime_env(stamp)}
    process = subprocess.Popen(
        [sys.executable, "-c", PROBE],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    results = []
    try:

        def ask() -> tuple[float, float, float, float]:
            real_wall, real_mono = time.time(), time.monotonic()
            process.stdin.write("\n")  # type: ignore[union-attr]
            process.stdin.flush()  # type: ignore[union-attr]
            wall, mono = map(float, process.stdout.readline().split())  # type: ignore[union-attr]
            return wall, mono, real_wall, real_mono

        wall0, mono0, real_wall0, real_mono0 = ask()
        for offset in offsets:
            write_offset(stamp, offset)
            wall, mono, real_wall, real_mono = ask()
            results.append(
                {
                    "expected_s": OFFSETS_S[offset],
                    "wall_step_s": (wall - wall0) - (real_wall - real_wall0),
                    "monotonic_step_s": (mono - mono0) - (real_mono - real_mono0),
                }
            )
    finally:
        process.stdin.close()
        process.wait(timeout=10)
    return results


@dataclass
class Step:
    at: float
    """time.monotonic() of the driver when the file was rewritten."""
    offset: str
    previous: str
    reason: str
    """"timer" or "turn" (a capture had just been kept: a turn in progress)."""
    in_turn: list[str] | None = None
    """Captures whose turn was in progress across the step (filled in after the run)."""


class ClockStepper:
    """A thread that steps the wall clock of every faked process at seeded random moments.

    Every `interval_s` (a random span) and, with probability `turn_probability`, shortly
    after a turn began (`turn_started()`, called by the driver when a capture is kept).
    """

    def __init__(
        self,
        timestamp_file: Path,
        rng: random.Random,
        interval_s: tuple[float, float] = (1.5, 4.0),
        turn_probability: float = 0.6,
        turn_delay_s: tuple[float, float] = (0.0, 0.3),
    ) -> None:
        self.file = timestamp_file
        self.rng = rng
        self.interval_s = interval_s
        self.turn_probability = turn_probability
        self.turn_delay_s = turn_delay_s
        self.offset = REAL
        self.steps: list[Step] = []
        self._lock = threading.Lock()
        self._turn = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-clock", daemon=True)
        write_offset(self.file, REAL)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Back to the real time (the drain and the checks run on it)."""
        self._stop.set()
        self._turn.set()
        self._thread.join(timeout=10)
        self.step(REAL, "end")

    def turn_started(self) -> None:
        if self.rng.random() < self.turn_probability:
            self._turn.set()

    def step(self, offset: str, reason: str) -> None:
        with self._lock:
            if offset == self.offset:
                return
            write_offset(self.file, offset)
            self.steps.append(Step(time.monotonic(), offset, self.offset, reason))
            self.offset = offset

    def _next_offset(self) -> str:
        if self.offset != REAL and self.rng.random() < 0.5:
            return REAL
        return self.rng.choice([o for o in OFFSETS_S if o not in (REAL, self.offset)])

    def _turn_offset(self) -> str:
        """In a turn, mostly a step the store refuses: the turn's capture is synced as it ends."""
        refused = [o for o in REFUSED if o != self.offset]
        if self.offset in REFUSED and self.rng.random() < 0.5:
            return REAL
        if self.rng.random() < 0.7:
            return self.rng.choice(refused)
        return "-10m" if self.offset != "-10m" else REAL

    def _run(self) -> None:
        while not self._stop.is_set():
            by_turn = self._turn.wait(self.rng.uniform(*self.interval_s))
            if self._stop.is_set():
                return
            if by_turn:
                self._turn.clear()
                time.sleep(self.rng.uniform(*self.turn_delay_s))
                self.step(self._turn_offset(), "turn")
            else:
                self.step(self._next_offset(), "timer")


# --- a store that checks the signature's time, as AWS does -----------------------------------


class _SkewCheck:
    """WSGI middleware: refuse a request signed more than MAX_SKEW_S away from the real clock."""

    def __init__(self, app: Callable[..., Any], refused: collections.Counter[str]) -> None:
        self.app = app
        self.refused = refused
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        stamp = environ.get("HTTP_X_AMZ_DATE", "")
        auth = environ.get("HTTP_AUTHORIZATION", "")
        try:
            signed = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            return self.app(environ, start_response)  # unsigned (moto's own API): as it is
        now = datetime.now(UTC)
        skew = (signed - now).total_seconds()
        if abs(skew) <= MAX_SKEW_S:
            return self.app(environ, start_response)
        service = "dynamodb" if "/dynamodb/aws4_request" in auth else "s3"
        with self._lock:
            self.refused[service] += 1
        # Drain the body, as a server does before answering.
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length:
            environ["wsgi.input"].read(length)
        if service == "s3":
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>RequestTimeTooSkewed</Code>'
                "<Message>The difference between the request time and the current time is too "
                f"large.</Message><RequestTime>{stamp}</RequestTime><ServerTime>"
                f"{now:%Y-%m-%dT%H:%M:%SZ}</ServerTime><MaxAllowedSkewMilliseconds>"
                f"{MAX_SKEW_S * 1000}</MaxAllowedSkewMilliseconds></Error>"
            ).encode()
            start_response(
                "403 Forbidden",
                [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
            )
            return [body]
        limit = now.strftime("%Y%m%dT%H%M%SZ")
        message = (
            f"Signature expired: {stamp} is now earlier than {limit} (- 15 min.)"
            if skew < 0
            else f"Signature not yet current: {stamp} is still later than {limit} (+ 15 min.)"
        )
        body = json.dumps(
            {"__type": "com.amazon.coral.service#InvalidSignatureException", "message": message}
        ).encode()
        start_response(
            "400 Bad Request",
            [("Content-Type", "application/x-amz-json-1.0"), ("Content-Length", str(len(body)))],
        )
        return [body]


class SkewCheckingMotoServer(MotoServer):
    """MotoServer whose S3 and DynamoDB refuse a signature more than 15 minutes off, as AWS's do."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused: collections.Counter[str] = collections.Counter()

    def _app(self) -> Any:
        return _SkewCheck(super()._app(), self.refused)
