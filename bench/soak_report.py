"""The soak's result as text (the tables bench/soak.py prints) and as a plot of RSS and fds."""

from __future__ import annotations

from pathlib import Path

from bench.soak import CYCLE_TURNS, SoakResult


def mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def report(result: SoakResult) -> str:
    lines = [
        (
            f"turns: {result.turns} in {result.seconds:.0f} s ({result.seconds / result.turns * 1000:.0f} ms/turn), "
            f"store: {result.store}; warm-up: first {result.warmup_turns} turns; "
            f"windows: {result.window_turns} turns (fault cycle: {CYCLE_TURNS} turns)"
        ),
        "engines: "
        + "; ".join(
            f"{stage} " + ", ".join(f"{name} {n}" for name, n in counter.most_common())
            for stage, counter in result.engines.items()
        ),
        "fault phases (turns, mean ms per turn): "
        + ", ".join(
            f"{name} {n} ({result.phase_seconds[name] / n * 1000:.0f})"
            for name, n in result.phases.items()
        ),
        "mean stage timings (ms): "
        + ", ".join(f"{k} {v / result.turns:.0f}" for k, v in result.stage_ms.items()),
        f"turns with no speech heard: {result.no_speech}; turns with a failed stage: "
        + (", ".join(f"{k} {v}" for k, v in result.errors.items()) or "0"),
        (
            f"spool: {result.spool_counts}, {mib(result.spool_bytes)} MiB on disk; "
            f"voice cache: {mib(result.cache_bytes)} MiB on disk (clips and index); "
            f"sync: {result.sync.get('message')} totals {result.sync.get('totals')}"
        ),
        "SQLite files: "
        + ", ".join(f"{name} {size / 1024:.0f} KiB" for name, size in result.index_bytes.items()),
        "appliance log records: "
        + ", ".join(f"{k} {v}" for k, v in sorted(result.log_counts.items())),
        "",
        "| metric | after start() | warm-up (median) | final (median) | max | growth after warm-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for metric, fmt in (
        ("rss", lambda v: f"{mib(v)} MiB"),
        ("fds", lambda v: f"{v:.0f}"),
        ("threads", lambda v: f"{v:.0f}"),
        ("tasks", lambda v: f"{v:.0f}"),
        ("objects", lambda v: f"{v:.0f}"),
    ):
        g = result.growth(metric)
        lines.append(
            f"| {metric} | {fmt(g.start)} | {fmt(g.warm)} | {fmt(g.final)} | {fmt(g.peak)} | {g.percent:+.2f} % |"
        )
    lines += [
        "",
        "| turn | elapsed s | RSS MiB | open fds | threads | asyncio tasks | gc objects |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    marks = {0, result.warmup_turns, result.turns} | set(range(100, result.turns, 100))
    for s in result.samples:
        if s.turn in marks:
            lines.append(
                f"| {s.turn} | {s.elapsed_s:.0f} | {mib(s.rss)} | {s.fds} | {s.threads} | {s.tasks} | {s.objects} |"
            )
    if result.type_growth:
        lines += [
            "",
            "gc objects that grew most after the warm-up:",
            "| type | after warm-up | growth |",
            "|---|---:|---:|",
        ] + [f"| {name} | {before} | +{n} |" for name, before, n in result.type_growth]
    if result.traced:
        warm = [b for t, b in result.traced if result.warmup_turns < t]
        lines += [
            "",
            (
                f"tracemalloc: {mib(result.traced[0][1])} MiB traced after start(), "
                f"{mib(warm[0])} after the warm-up, {mib(result.traced[-1][1])} at the end; "
                "the lines whose live allocations grew most after the warm-up:"
            ),
        ] + [f"  {line}" for line in result.traced_growth]
    if result.log_errors:
        lines += ["", "last appliance errors logged:"] + [f"  {e}" for e in result.log_errors]
    return "\n".join(lines)


def plot(result: SoakResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = [s.turn for s in result.samples]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    top.plot(turns, [s.rss / 2**20 for s in result.samples], label="RSS")
    top.set_ylabel("RSS (MiB)")
    bottom.plot(turns, [s.fds for s in result.samples], label="open fds", color="tab:orange")
    bottom.set_ylabel("open file descriptors")
    bottom.set_xlabel("turn")
    for axis in (top, bottom):
        axis.axvline(result.warmup_turns, color="grey", linestyle="--", linewidth=1)
        axis.grid(alpha=0.3)
    top.set_title(f"heimdall-edge soak: {result.turns} turns (warm-up dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
