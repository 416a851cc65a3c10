"""Measure everything and write docs/PERFORMANCE.md and docs/performance.png.

One command for the whole performance picture, on the machine it runs on:
  - on-device speech-to-text (faster-whisper tiny.en int8) on all shared recordings,
    beam 1 and beam 5: latency, real-time factor and word error rate (jiwer);
  - Piper: time to first audio and real-time factor for sentences of different lengths;
  - one whole turn, stage by stage: end of speech -> transcript -> reply -> first audio
    (bench/latency.py's turn runner);
  - the cloud fallback scenarios against the fake cloud (bench/fallback.py);
  - store-and-forward throughput against moto on loopback (bench/sync.py);
  - RSS idle (started, models loaded, no turn yet) and peak (after turns), start-up to READY=1;
  - an ESTIMATE for a Raspberry Pi 4 and a Pi 5: CPU-bound figures scaled by how much faster
    this machine is (a small fixed CPU workload measured here, against published Pi figures);
    network waits are not scaled.
Every figure is a median with its min and max over several runs.

Usage: python -m bench.report [--quick] [--out docs/] [--runs N] [--sync-captures N]
(HEIMDALL_MODELS_DIR defaults to ../shared/models, HEIMDALL_SPEECH_DIR to ../shared/speech.)
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from bench.pi_estimate import pi_factors
from bench.report_collect import REPO, measure
from bench.report_plot import plot
from bench.report_render import render


def main() -> int:
    """Measure (or load a --json file) and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer runs and recordings: a smoke run"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "docs",
        help="folder for PERFORMANCE.md and performance.png",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help="runs per figure (default 3 for speech-to-text, 5 elsewhere; 1 with --quick)",
    )
    parser.add_argument(
        "--sync-captures",
        type=int,
        default=None,
        help="captures in the sync benchmark (default 300; 50 with --quick)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each section, wait up to this long for the CPU to be idle (< 10 %%)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also save the raw measurements to this file"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="measure nothing: rewrite the report from a file saved with --json",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        data = json.loads(args.from_json.read_text(encoding="utf-8"))
        if isinstance(data.get("stt"), dict):
            data["stt"]["beams"] = {int(k): v for k, v in data["stt"]["beams"].items()}
        return write_outputs(data, args.out)
    data = measure(args)
    if data is None:
        return 2
    if args.json:
        args.json.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return write_outputs(data, args.out)


def write_outputs(data: dict[str, Any], out_dir: Path) -> int:
    """Pi factors, the plot and the markdown, from the measurements."""
    failures = data.get("failures", 0)
    probes = [p for p in (data.get("probe_start"), data.get("probe_end")) if isinstance(p, dict)]
    factors = None
    if probes:
        data["probe"] = {k: [v for p in probes for v in p[k]] for k in probes[0]}
        stt = data["stt"] if isinstance(data.get("stt"), dict) else None
        factors = pi_factors(data["probe"], stt)
    png = out_dir / "performance.png"
    try:
        plot(png, {k: v for k, v in data.items() if not isinstance(v, str) or k == "date"}, factors)
    except Exception:  # noqa: BLE001 - the figures are still worth writing
        failures += 1
        traceback.print_exc()
    markdown = render(data, factors, png.name)
    (out_dir / "PERFORMANCE.md").write_text(markdown + "\n", encoding="utf-8")
    print(
        f"[report] wrote {out_dir / 'PERFORMANCE.md'} and {png} "
        f"(measuring took {data['runtime_s'] / 60:.1f} min)"
        + (f"; {failures} section(s) FAILED" if failures else ""),
        file=sys.stderr,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
