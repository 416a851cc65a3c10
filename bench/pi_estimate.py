"""ESTIMATES for a Raspberry Pi 4 and Pi 5 from figures measured on this machine.

CPU-bound figures are scaled by how many times slower each Pi is at the same kind of work
(bench/machine.py's CPU probe against published Pi figures); waiting is not scaled. Used by
the report's tables and plot and by other benchmarks that print a Pi column.
"""

from __future__ import annotations

from statistics import median as med
from typing import Any

# The stages of one turn after the capture ends, in order (bench/latency.py's turn runner).
STAGES = ("keep", "transcribe", "reply", "speak (first sentence)")

# --- Published / assumed figures for the Raspberry Pi estimate (see the report for the basis) ---
PI = {
    "Pi 4": {
        "cpu": "4× Cortex-A72 @ 1.8 GHz (BCM2711)",
        # HPL (High-Performance Linpack, double precision, 4 cores): Jeff Geerling's
        # top500-benchmark results table, "Raspberry Pi 4 (BCM2711 @ 1.8 GHz)".
        "hpl_gflops": 11.889,
        # Pure-Python n-body: Chaitanya Mehta, "Performance analysis of languages on Raspberry
        # Pi" (2020): 5,000,000 steps in 158.3 s on a Pi 4 rev 1.1 (1.5 GHz), Raspbian's
        # Python 3 of the day; scaled by clock to 1.8 GHz, then / 1.25 for CPython 3.11.
        "nbody_us_published": 158.263 / 5e6 * 1e6,
        "nbody_clock_scale": 1.5 / 1.8,
        "python_speedup": 1.25,
        "nbody_vs_pi4": 1.0,
        # faster-whisper (CTranslate2 int8), tiny, beam 1, 4 threads, jfk (11 s): 3.9 s on a
        # Pi 400 (same BCM2711 at 1.8 GHz): fquirin/speech-recognition-experiments, Feb 2023.
        "ct2_jfk_beam1_s": 3.9,
        "ct2_vs_pi4": 1.0,
    },
    "Pi 5": {
        "cpu": "4× Cortex-A76 @ 2.4 GHz (BCM2712)",
        # Same table: "Raspberry Pi 5 (BCM2712 @ 2.4 GHz)".
        "hpl_gflops": 30.249,
        "nbody_us_published": None,
        # Assumed 2.0× a Pi 4 per core: sysbench single-thread 2737 vs 1478 events/s (1.85×,
        # leoncode.co.uk), Raspberry Pi Ltd's "2–3×" launch claim, 2.07× for faster-whisper below.
        "nbody_vs_pi4": 2.0,
        # BotYue/Pi-Whisper-RSS25-Workshop (RSS 2025 workshop): faster-whisper tiny.en on the same
        # ten Common Voice clips, mean 3.42 s on a Pi 4 (4 GB) vs 1.65 s on a Pi 5 (8 GB): 2.07×.
        "ct2_vs_pi4": 3.41509 / 1.64667,
    },
}
BOTYUE_TINY_EN_MEAN_S = {"Pi 4": 3.41509, "Pi 5": 1.64667}
PIPER_PI4_RTF_ANECDOTE = 0.5  # "Piper ... at 200% speed on Raspberry Pi 4" (rhasspy/rhasspy3 #36)


def pi_factors(probe: dict[str, list[float]], stt: dict[str, Any] | None) -> dict[str, Any]:
    """How many times slower each Pi is than this machine, per kind of work."""
    # The best run of each: other processes can only ever slow a run down.
    here_nbody = min(probe["nbody_us"])
    here_dgemm = max(probe["dgemm_gflops"])
    jfk_ms = None
    if stt and "jfk.flac" in stt["beams"].get(1, {}).get("per", {}):
        jfk_ms = med(stt["beams"][1]["per"]["jfk.flac"]["ms"])
    pi4 = PI["Pi 4"]
    pi4_nbody = pi4["nbody_us_published"] * pi4["nbody_clock_scale"] / pi4["python_speedup"]
    pi4_ct2 = pi4["ct2_jfk_beam1_s"] * 1000 / jfk_ms if jfk_ms else None
    out: dict[str, Any] = {"here_nbody_us": here_nbody, "here_dgemm": here_dgemm,
                           "here_jfk_beam1_ms": jfk_ms}  # fmt: skip
    for pi, spec in PI.items():
        nbody = pi4_nbody / spec["nbody_vs_pi4"]
        single = nbody / here_nbody
        multi = here_dgemm / spec["hpl_gflops"]
        ct2 = pi4_ct2 / spec["ct2_vs_pi4"] if pi4_ct2 else multi
        out[pi] = {"nbody_us": nbody, "single": single, "multi": multi, "ct2": ct2,
                   "ct2_anchored": pi4_ct2 is not None}  # fmt: skip
    return out


def stage_medians(rec: dict[str, Any]) -> dict[str, float]:
    """One recording's stage medians (ms), in turn order: what the estimates scale."""
    return {s: med(rec[s]) for s in STAGES}


def estimate_turn(stages: dict[str, float], f: dict[str, float]) -> dict[str, float]:
    """Stage medians (ms) of one turn on a Pi: each stage scaled by its kind of work."""
    return {
        "keep": stages["keep"] * f["single"],
        "transcribe": stages["transcribe"] * f["ct2"],
        "reply": stages["reply"] * f["single"],
        "speak (first sentence)": stages["speak (first sentence)"] * f["multi"],
    }


def fallback_estimates(
    fb: dict[str, Any], data: dict[str, Any], factors: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """Scenario medians on a Pi: the local work scaled, the waiting (network, backoff, hedge) not."""
    results = fb["results"]
    local_name = next(n for n in results if n.startswith("local only"))
    local = med(results[local_name])
    injected = sum(fb["injected_ms"].values())
    ratios = turn_ratios(data, factors)
    out: dict[str, dict[str, float]] = {}
    for pi in ("Pi 4", "Pi 5"):
        if pi not in ratios:
            continue
        est_local = local * ratios[pi]
        row = {}
        for name, values in results.items():
            m = med(values)
            if name == local_name:
                row[name] = est_local
            elif name == "cloud healthy":
                row[name] = injected + max(0.0, m - injected) * factors[pi]["single"]
            else:
                row[name] = est_local + max(0.0, m - local)
        out[pi] = row
    return out


def turn_ratios(data: dict[str, Any], factors: dict[str, Any]) -> dict[str, float]:
    """Per Pi: estimated / measured capture end → first audio, median over the e2e recordings."""
    e2e = data.get("e2e")
    if not e2e:
        return {}
    out = {}
    for pi in ("Pi 4", "Pi 5"):
        ratios = []
        for rec in e2e["recordings"].values():
            stages = stage_medians(rec)
            ratios.append(sum(estimate_turn(stages, factors[pi]).values()) / sum(stages.values()))
        out[pi] = med(ratios)
    return out
