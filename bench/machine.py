"""The machine a benchmark runs on: what it is, how fast its CPU is, and how busy.

Shared by bench/report.py and the other benchmarks, so that each can say what its figures
were measured on and scale them to a Raspberry Pi (bench/pi_estimate.py).
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
import time
from pathlib import Path
from typing import Any

PACKAGES = ["faster-whisper", "ctranslate2", "piper-tts", "onnxruntime", "numpy", "openai", "boto3"]


def cpu_busy_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
    return busy, getattr(t, "steal", 0.0)


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its children: subtracted from the machine's busy time."""
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def wait_quiet(max_s: float) -> dict[str, Any]:
    """Wait until the CPU is < 10 % busy for two 2 s windows in a row, or `max_s` has passed."""
    import psutil

    started = time.perf_counter()
    calm = 0
    while time.perf_counter() - started < max_s and calm < 2:
        busy = psutil.cpu_percent(interval=2)
        calm = calm + 1 if busy < 10 else 0
        if not calm:
            print(
                f"[report] waiting for a quiet CPU ({busy:.0f} % busy)", file=sys.stderr, flush=True
            )
    return {"seconds": time.perf_counter() - started, "quiet": calm >= 2}


def machine_info() -> dict[str, Any]:
    """CPU, cores, RAM, OS and package versions: what a reader needs to compare figures."""
    import psutil

    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "flags": set()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and "model_name" not in info:
                info["model_name"] = value
            elif key == "cpu family" and "family" not in info:
                info["family"] = value
            elif key == "model" and "model" not in info:
                info["model"] = value
            elif key == "cpu MHz" and "mhz" not in info:
                info["mhz"] = float(value)
            elif key == "flags" and not info["flags"]:
                info["flags"] = set(value.split())
    except OSError:
        pass
    os_name = platform.system()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    features = [
        name
        for flag, name in [
            ("avx2", "AVX2"),
            ("avx512f", "AVX-512"),
            ("avx512_vnni", "AVX-512 VNNI"),
            ("avx_vnni", "AVX-VNNI"),
            ("asimddp", "NEON dot product"),
        ]
        if flag in info["flags"]
    ]
    return {
        "cpu": info.get("model_name", info["cpu"]),
        "cpu_detail": ", ".join(
            x
            for x in [
                f"family {info['family']} model {info['model']}" if "family" in info else "",
                f"{info['mhz']:.0f} MHz nominal" if "mhz" in info else "",
                ("SIMD: " + ", ".join(features)) if features else "",
            ]
            if x
        ),
        "virtualised": "hypervisor" in info["flags"],
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": psutil.virtual_memory().total / 1024**3,
        "os": f"{os_name}, {platform.system()} {platform.release()} {platform.machine()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
    }


# ----------------------------------------------------------------------------- CPU probe

# The n-body program of the Computer Language Benchmarks Game, as in pyperformance's bm_nbody.
_SOLAR_MASS = 4 * 3.14159265358979323**2
_DAYS = 365.24


def _bodies() -> list[tuple[list[float], list[float], float]]:
    return [
        ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], _SOLAR_MASS),
        (
            [4.84143144246472090e00, -1.16032004402742839e00, -1.03622044471123109e-01],
            [1.66007664274403694e-03 * _DAYS, 7.69901118419740425e-03 * _DAYS,
             -6.90460016972063023e-05 * _DAYS],
            9.54791938424326609e-04 * _SOLAR_MASS,
        ),
        (
            [8.34336671824457987e00, 4.12479856412430479e00, -4.03523417114321381e-01],
            [-2.76742510726862411e-03 * _DAYS, 4.99852801234917238e-03 * _DAYS,
             2.30417297573763929e-05 * _DAYS],
            2.85885980666130812e-04 * _SOLAR_MASS,
        ),
        (
            [1.28943695621391310e01, -1.51111514016986312e01, -2.23307578892655734e-01],
            [2.96460137564761618e-03 * _DAYS, 2.37847173959480950e-03 * _DAYS,
             -2.96589568540237556e-05 * _DAYS],
            4.36624404335156298e-05 * _SOLAR_MASS,
        ),
        (
            [1.53796971148509165e01, -2.59193146099879641e01, 1.79258772950371181e-01],
            [2.68067772490389322e-03 * _DAYS, 1.62824170038242295e-03 * _DAYS,
             -9.51592254519715870e-05 * _DAYS],
            5.15138902046611451e-05 * _SOLAR_MASS,
        ),
    ]  # fmt: skip


def nbody_us_per_step(steps: int) -> float:
    """Single-core pure-Python speed, comparable with published Pi n-body timings."""
    bodies = _bodies()
    pairs = [(bodies[i], b) for i in range(len(bodies) - 1) for b in bodies[i + 1 :]]
    dt = 0.01
    started = time.perf_counter()
    for _ in range(steps):
        for ([x1, y1, z1], v1, m1), ([x2, y2, z2], v2, m2) in pairs:
            dx, dy, dz = x1 - x2, y1 - y2, z1 - z2
            mag = dt * ((dx * dx + dy * dy + dz * dz) ** (-1.5))
            b1m, b2m = m1 * mag, m2 * mag
            v1[0] -= dx * b2m
            v1[1] -= dy * b2m
            v1[2] -= dz * b2m
            v2[0] += dx * b1m
            v2[1] += dy * b1m
            v2[2] += dz * b1m
        for r, [vx, vy, vz], _m in bodies:
            r[0] += dt * vx
            r[1] += dt * vy
            r[2] += dt * vz
    return (time.perf_counter() - started) / steps * 1e6


def dgemm_gflops(n: int) -> float:
    """All-core float speed, comparable with the Pis' HPL results."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.random((n, n)), rng.random((n, n))
    started = time.perf_counter()
    a @ b
    return 2 * n**3 / (time.perf_counter() - started) / 1e9


def cpu_probe(reps: int) -> dict[str, list[float]]:
    """Pure-Python n-body (one core) and float64 matrix multiply (numpy/OpenBLAS, every core)."""
    dgemm_gflops(1024)  # warm up threads and caches
    nbody_us_per_step(10_000)
    return {
        "nbody_us": [nbody_us_per_step(100_000) for _ in range(reps)],
        "dgemm_gflops": [dgemm_gflops(3072) for _ in range(reps)],
    }
