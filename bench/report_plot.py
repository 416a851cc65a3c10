"""docs/performance.png: four panels drawn from the report's measurements and Pi estimates."""

from __future__ import annotations

from pathlib import Path
from statistics import median as med
from typing import Any

from bench.pi_estimate import estimate_turn, fallback_estimates, stage_medians

HANGOVER_STAGE = "hang-over (silence_ms, waited in real time)"
STAGE_COLOURS = {
    HANGOVER_STAGE: "#bbbbbb",
    "keep": "#8c564b",
    "transcribe": "#1f77b4",
    "reply": "#2ca02c",
    "speak (first sentence)": "#ff7f0e",
}


def plot(path: Path, data: dict[str, Any], factors: dict[str, Any] | None) -> None:
    """Draw the panels of the sections that were measured and save the figure to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(16, 11.5))
    fig.suptitle(
        f"Heimdall Edge performance on {data['machine']['cpu']}, "
        f"{data['machine']['logical_cores']} cores ({data['date']}); "
        "hatched bars: Raspberry Pi ESTIMATES, not measurements",
        fontsize=13,
    )

    if data.get("stt"):
        _speech_to_text(axes[0][0], data["stt"])
    if data.get("e2e"):
        _turn(axes[0][1], data["e2e"], factors)
    if data.get("fallback"):
        _fallback(axes[1][0], data, factors)
    if data.get("piper"):
        _piper(axes[1][1], data["piper"])
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _speech_to_text(ax: Any, stt: dict[str, Any]) -> None:
    """Transcription latency against audio length, both beams."""
    for beam, marker, colour in [(1, "o", "#1f77b4"), (5, "s", "#d62728")]:
        per = stt["beams"][beam]["per"]
        xs = [stt["recordings"][n]["seconds"] for n in per]
        ys = [med(per[n]["ms"]) for n in per]
        lo = [y - min(per[n]["ms"]) for y, n in zip(ys, per, strict=True)]
        hi = [max(per[n]["ms"]) - y for y, n in zip(ys, per, strict=True)]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt=marker, color=colour, ecolor=colour,
                    alpha=0.8, capsize=2, markersize=5,
                    label=f"beam {beam}: WER {stt['beams'][beam]['wer'] * 100:.1f} %")  # fmt: skip
    ax.set_xlabel("audio length (s)")
    ax.set_ylabel("transcription latency (ms), median and min–max")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"Speech-to-text: faster-whisper {stt['model']} {stt['compute_type']}, "
        f"{len(stt['recordings'])} recordings (this machine)"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")


def _turn(ax: Any, e2e: dict[str, Any], factors: dict[str, Any] | None) -> None:
    """End of speech → first audio, stage by stage, with the Pi estimates of the first recording."""
    rows: list[tuple[str, dict[str, float], bool]] = []
    for name, rec in e2e["recordings"].items():
        stages = {HANGOVER_STAGE: e2e["hangover_ms"]}
        stages.update(stage_medians(rec))
        rows.append((f"{name} ({rec['seconds']:.1f} s)", stages, False))
    if factors:
        name = next(iter(e2e["recordings"]))
        rec = e2e["recordings"][name]
        base = stage_medians(rec)
        for pi in ("Pi 5", "Pi 4"):
            est = {HANGOVER_STAGE: e2e["hangover_ms"]}
            est.update(estimate_turn(base, factors[pi]))
            rows.append((f"{pi} ESTIMATE: {name}", est, True))
    for y, (label, stages, estimate) in enumerate(rows):
        left = 0.0
        for stage, ms in stages.items():
            ax.barh(y, ms, left=left, color=STAGE_COLOURS[stage],
                    hatch="//" if estimate else None, edgecolor="white" if not estimate else "black",
                    linewidth=0.5, label=stage if y == 0 else None)  # fmt: skip
            left += ms
        ax.text(left + 20, y, f"{left:.0f} ms", va="center", fontsize=9)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("end of speech → first reply audio (ms), medians")
    ax.set_title("One whole turn, local engines, stage by stage")
    ax.set_xlim(right=ax.get_xlim()[1] * 1.12)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)


def _fallback(ax: Any, data: dict[str, Any], factors: dict[str, Any] | None) -> None:
    """The fallback scenarios measured here, each beside its Pi estimates."""
    fb = data["fallback"]
    names = list(fb["results"])
    ests = fallback_estimates(fb, data, factors) if factors else {}
    width = 0.27 if ests else 0.6
    for i, scenario in enumerate(names):
        values = fb["results"][scenario]
        m = med(values)
        ax.barh(i, m, height=width, color="#1f77b4", label="this machine" if i == 0 else None,
                xerr=[[m - min(values)], [max(values) - m]], capsize=3)  # fmt: skip
        ax.text(max(values) + 40, i, f"{m:.0f}", va="center", fontsize=8)
        for k, (pi, colour) in enumerate([("Pi 5", "#9ecae1"), ("Pi 4", "#fdae6b")]):
            if pi in ests:
                v = ests[pi][scenario]
                ax.barh(i + (k + 1) * width, v, height=width, color=colour, hatch="//",
                        edgecolor="black", linewidth=0.5,
                        label=f"{pi} ESTIMATE" if i == 0 else None)  # fmt: skip
                ax.text(v + 30, i + (k + 1) * width, f"{v:.0f}", va="center", fontsize=8)
    ax.set_yticks([i + (width if ests else 0) for i in range(len(names))],
                  [n.replace(" (", "\n(") for n in names], fontsize=8)  # fmt: skip
    ax.invert_yaxis()
    ax.set_xlabel("end of utterance → first reply audio (ms); this machine: median, min–max")
    ax.set_title(
        f"Cloud fallback ({fb['recordings']} recordings; injected cloud latency "
        f"{sum(fb['injected_ms'].values()):.0f} ms)"
    )
    ax.set_xlim(right=ax.get_xlim()[1] * 1.1)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def _piper(ax: Any, tts: dict[str, Any]) -> None:
    """Piper's first audio and whole-text time per sentence."""
    labels, firsts, totals, audio = [], [], [], []
    for text, row in tts["sentences"].items():
        short = text if len(text) <= 34 else text[:31] + "..."
        labels.append(f"{short} ({len(text)} chars)")
        firsts.append(row["first_ms"])
        totals.append(med(row["total_ms"]))
        audio.append(med(row["audio_s"]))
    ys = range(len(labels))
    ax.barh(ys, totals, color="#ffbb78", label="whole text synthesized")
    m = [med(v) for v in firsts]
    ax.barh(ys, m, color="#ff7f0e", label="first audio",
            xerr=[[a - min(v) for a, v in zip(m, firsts, strict=True)],
                  [max(v) - a for a, v in zip(m, firsts, strict=True)]], capsize=3)  # fmt: skip
    for y, (t, a, f) in enumerate(zip(totals, audio, firsts, strict=True)):
        ax.text(max(t, max(f)) + 8, y, f"{a:.1f} s of audio, RTF {t / 1000 / a:.3f}",
                va="center", fontsize=8)  # fmt: skip
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms (median; first audio with min–max)")
    ax.set_title(f"Text-to-speech: Piper {tts['voice']} (this machine)")
    ax.set_xlim(right=max(max(totals), max(max(f) for f in firsts)) * 1.6)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
