"""bench/room.py's tables: false wakes, detection, end-pointing, words kept, front-end settings."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from bench.room_listen import Capture
from bench.room_material import (
    BASELINE,
    KINDS,
    NOISES,
    SETTINGS_GRID,
    START_SLACK_MS,
    WHOLE_MARGIN_MS,
    Material,
    Positive,
    cutoffs,
    wake_model,
)
from heimdall_edge.audio import FRAME_SAMPLES
from heimdall_edge.settings import BUILTIN_WAKE_WORDS
from heimdall_edge.testing.text import words


def pct(hits: int, n: int) -> str:
    return f"{100 * hits / n:.0f} % ({hits}/{n})" if n else "–"


def quantiles(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values):.0f} / {np.percentile(values, 90):.0f}"


def wer(pairs: Iterable[tuple[str, str | None]]) -> tuple[float, int]:
    """Corpus word error rate (errors / reference words) and how many utterances it covers."""
    import jiwer

    errors = total = n = 0
    for reference, hypothesis in pairs:
        ref = words(reference)
        out = jiwer.process_words(ref, hypothesis or "")
        errors += out.substitutions + out.deletions + out.insertions
        total += len(ref.split())
        n += 1
    return (100 * errors / total if total else float("nan")), n


def wer_cell(pairs: Iterable[tuple[str, str | None]]) -> str:
    rate, n = wer(pairs)
    return f"{rate:.0f} % (n={n})" if n else "–"


def leaked(p: Positive, text: str | None) -> bool:
    """Whether a word of the wake phrase reached the transcript (and is not in the command)."""
    if not text:
        return False
    phrase = set(words(wake_model(p.wake_word)[0]).split())
    if "okay" in phrase:
        phrase.add("ok")
    return bool((phrase & set(text.split())) - set(words(p.clip.command).split()))


class Printer:
    def __init__(self, markdown: bool) -> None:
        self.markdown = markdown

    def heading(self, text: str) -> None:
        print(f"\n## {text}\n" if self.markdown else f"\n=== {text} ===\n")

    def note(self, text: str) -> None:
        print(text + "\n" if self.markdown else text)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
        if self.markdown:
            print("| " + " | ".join(cells[0]) + " |")
            print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
            for row in cells[1:]:
                print("| " + " | ".join(row) + " |")
        else:
            widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
            for j, row in enumerate(cells):
                print(
                    "  ".join(
                        c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))
                    )
                )
                if j == 0:
                    print("  ".join("-" * w for w in widths))
        print()


def negative_hours(material: Material) -> float:
    return sum(s.seconds for g, s in material.negatives.items() if g != "near misses") / 3600


def false_wakes(
    out: Printer, material: Material, negatives: list[tuple[str, str, list[Capture]]]
) -> dict[str, int]:
    """Table 1; returns the false wakes (all groups but near misses) per front end."""
    hours = negative_hours(material)
    by: dict[str, dict[str, list[Capture]]] = {}
    for group, name, captures in negatives:
        by.setdefault(name, {})[group] = captures
    groups = [g for g in material.negatives if g != "near misses"]
    out.heading("1. False wakes: captures without a wake word")
    minutes = {g: f"{material.negatives[g].seconds / 60:.1f}" for g in material.negatives}
    out.note(
        f"{hours * 60:.1f} minutes of audio without any wake word ("
        + ", ".join(f"{g} {minutes[g]} min" for g in groups)
        + f"), streamed through each front end as one microphone stream per group; "
        f"near misses ({minutes['near misses']} min) apart. Every capture counts; "
        '"with speech" ones are those the appliance would transcribe and answer.'
    )
    totals = {}
    rows = []
    for name, per_group in by.items():
        caps = [c for g in groups for c in per_group.get(g, [])]
        totals[name] = len(caps)
        near = per_group.get("near misses", [])
        rows.append(
            [name, len(caps), f"{len(caps) / hours:.1f}", sum(c.has_speech for c in caps),
             *[len(per_group.get(g, [])) for g in groups], len(near)]
        )  # fmt: skip
    out.table(["front end", "false wakes", "per hour", "with speech", *groups, "near misses"], rows)
    near_stream = material.negatives["near misses"]
    rows = []
    for name, per_group in by.items():
        if not name.startswith("new"):
            continue
        fired: dict[str, int] = {}
        for c in per_group.get("near misses", []):
            label = near_stream.label_before(c.start * FRAME_SAMPLES)
            fired[label] = fired.get(label, 0) + 1
        rows.append([name, ", ".join(f"{k} ×{v}" for k, v in sorted(fired.items())) or "none"])
    out.note(
        "Near-miss phrases that woke each new front end (phrase: the wake word it was written against):"
    )
    out.table(["front end", "near misses that woke it"], rows)
    return totals


def detection(
    out: Printer,
    material: Material,
    results: list[dict[str, Any]],
    totals: dict[str, int],
    hours: float,
) -> dict[tuple[str, float], tuple[int, float, float]]:
    """Table 2; returns (false wakes, detected at >= 10 dB, at 5 dB) per (wake word, cutoff)."""
    out.heading("2. Wake phrase + command found")
    out.note(
        "Found: a capture started by the wake word between the wake phrase's start and "
        f"{START_SLACK_MS} ms into the command, ending after the command's last word, with speech "
        "(today's: a capture holding the command). Detected at a cutoff: the wake model's probability "
        "passed it in that window (from the probability trace of the same run). "
        "False wakes are table 1's, at each cutoff."
    )
    rows, score = [], {}
    for wake_word in BUILTIN_WAKE_WORDS:
        mine = [
            (material.positives[r["index"]], r)
            for r in results
            if material.positives[r["index"]].wake_word == wake_word
        ]
        loud = [(p, r) for p, r in mine if p.room.snr_db >= 10]
        soft = [(p, r) for p, r in mine if p.room.snr_db < 10]
        own = wake_model(wake_word)[1]
        key = f"new {wake_word} @{own:g}"
        found = [sum(r[key]["found"] for _, r in group) for group in (loud, soft)]
        today = [sum(r["today"]["found"] for _, r in group) for group in (loud, soft)]
        delays = [r[key]["detect_ms"] for _, r in mine if r[key]["started"]]
        for cutoff in cutoffs(wake_word):
            name = f"new {wake_word} @{cutoff:g}"
            hit = [sum(r[key]["peak"] > cutoff for _, r in group) for group in (loud, soft)]
            wakes = totals.get(name)
            rows.append(
                [wake_word, f"{cutoff:g}" + (" (own)" if cutoff == own else ""),
                 pct(found[0], len(loud)) if cutoff == own else "", pct(found[1], len(soft)) if cutoff == own else "",
                 pct(hit[0], len(loud)), pct(hit[1], len(soft)),
                 "–" if wakes is None else f"{wakes} ({wakes / hours:.1f}/h)",
                 quantiles(delays) if cutoff == own else ""]
            )  # fmt: skip
            score[(wake_word, cutoff)] = (
                wakes or 0,
                hit[0] / max(1, len(loud)),
                hit[1] / max(1, len(soft)),
            )
        rows.append(
            [
                f"today's (same {wake_word} clips)",
                "–",
                pct(today[0], len(loud)),
                pct(today[1], len(soft)),
                "",
                "",
                f"{totals.get('today', 0)}",
                "",
            ]
        )
    out.table(
        ["wake word", "cutoff", "found, SNR ≥ 10 dB", "found, 5 dB", "detected ≥ 10 dB", "detected 5 dB",
         "false wakes", "detection after phrase end, ms (median / p90)"],
        rows,
    )  # fmt: skip
    out.note("Found at the model's own cutoff, by how the phrase was said (all SNRs):")
    out.table(["wake word", *KINDS], _found_by(material, results, "kind", KINDS, 0))
    out.note(
        "Found at the model's own cutoff at SNR ≥ 10 dB, by the voice's pitch (Piper's voice played "
        "faster or slower: a pitch below 1 also lowers the formants, a deeper and larger voice than "
        "Piper's, the kind the built-in models are least sure of); the wake phrase is Piper's in every kind:"
    )
    pitches = sorted({p.pitch for p in material.positives})
    out.table(["wake word", *map(str, pitches)], _found_by(material, results, "pitch", pitches, 10))
    return score


def _found_by(
    material: Material,
    results: list[dict[str, Any]],
    attribute: str,
    values: Sequence[Any],
    snr: int,
) -> list[list[str]]:
    """Per wake word, found at its own cutoff for each value of a positive's `attribute`."""
    rows = []
    for wake_word in BUILTIN_WAKE_WORDS:
        key = f"new {wake_word} @{wake_model(wake_word)[1]:g}"
        mine = [
            (p, r)
            for r in results
            if (p := material.positives[r["index"]]).wake_word == wake_word and p.room.snr_db >= snr
        ]
        cells = []
        for value in values:
            group = [r for p, r in mine if getattr(p, attribute) == value]
            cells.append(pct(sum(r[key]["found"] for r in group), len(group)))
        rows.append([wake_word, *cells])
    return rows


def endpointing(out: Printer, material: Material, results: list[dict[str, Any]]) -> None:
    out.heading("3. End-pointing: capture end minus the command's last word")
    out.note(
        "Over the captures that hold the command (found), by the noise still running after the words; "
        "ms, median / 90th percentile; max_ms: captures holding the command that ran to the "
        f"{BASELINE.max_ms} ms limit. The hang-over (silence_ms {BASELINE.silence_ms}) is part of every lag."
    )
    rows = []
    for noise in NOISES:
        row: list[Any] = [noise]
        for name in ("today", "new"):
            lags, maxed, n = [], 0, 0
            for r in results:
                p = material.positives[r["index"]]
                if p.room.noise != noise:
                    continue
                res = (
                    r["today"]
                    if name == "today"
                    else r[f"new {p.wake_word} @{wake_model(p.wake_word)[1]:g}"]
                )
                n += 1
                maxed += res["max_length"]
                if res["lag_ms"] is not None:
                    lags.append(res["lag_ms"])
            row += [quantiles(lags), f"{maxed}/{n}"]
        rows.append(row)
    out.table(["noise", "today's lag", "today's max_ms", "new lag", "new max_ms"], rows)


def words_kept(out: Printer, material: Material, results: list[dict[str, Any]]) -> None:
    out.heading("4. Words kept: WER of the capture vs the command's whole stretch")
    out.note(
        "faster-whisper tiny.en (int8, beam 1) on what each front end captured and on the command's "
        f"own stretch of the same noisy stream (its words ± {WHOLE_MARGIN_MS} ms); lowercase words without "
        "punctuation. Over positives where the front end made a capture overlapping the command "
        "(misses are table 2's); whole: over all transcribed positives. Wake leak: a word of the wake "
        "phrase in the transcript."
    )
    rows = []
    transcribed = [r for r in results if material.positives[r["index"]].transcribe]

    def cells(selected: list[dict[str, Any]]) -> list[str]:
        ref = [(material.positives[r["index"]].clip.command, r) for r in selected]
        today = [(c, r["today"]["text"]) for c, r in ref if r["today"]["text"] is not None]
        new = [
            (c, r[new_key(material, r)]["text"])
            for c, r in ref
            if r[new_key(material, r)]["text"] is not None
        ]
        return [wer_cell((c, r["whole_text"]) for c, r in ref), wer_cell(today), wer_cell(new)]

    for noise, snr in itertools.product(
        NOISES, sorted({p.room.snr_db for p in material.positives})
    ):
        group = [
            r
            for r in transcribed
            if (p := material.positives[r["index"]]).room.noise == noise and p.room.snr_db == snr
        ]
        rows.append([f"{noise} {snr:g} dB", *cells(group)])
    for rt60 in sorted({p.room.rt60 for p in material.positives}):
        group = [r for r in transcribed if material.positives[r["index"]].room.rt60 == rt60]
        rows.append([f"RT60 {rt60} s (all noises)", *cells(group)])
    rows.append(["all", *cells(transcribed)])
    out.table(["condition", "whole stretch", "today's capture", "new capture"], rows)
    rows = []
    for wake_word in BUILTIN_WAKE_WORDS:
        group = [r for r in transcribed if material.positives[r["index"]].wake_word == wake_word]
        leaks = [
            sum(leaked(material.positives[r["index"]], r[key]["text"]) for r in group)
            for key in ("today", f"new {wake_word} @{wake_model(wake_word)[1]:g}")
        ]
        rows.append(
            [wake_word, *cells(group), f"{leaks[0]}/{len(group)}", f"{leaks[1]}/{len(group)}"]
        )
    out.table(
        [
            "wake word",
            "whole stretch",
            "today's capture",
            "new capture",
            "today's wake leaks",
            "new wake leaks",
        ],
        rows,
    )


def new_key(material: Material, r: dict[str, Any]) -> str:
    wake_word = material.positives[r["index"]].wake_word
    return f"new {wake_word} @{wake_model(wake_word)[1]:g}"


def front_end_settings(
    out: Printer, material: Material, tried: list[dict[str, Any]], wake_word: str
) -> tuple[int, int]:
    """Table 5; returns the (noise_suppression, auto_gain_dbfs) to use."""
    out.heading(f"5. Noise suppression and auto gain ({wake_word}, new front end)")
    out.note(
        "The same transcribed positives through webrtc-noise-gain before everything else. "
        "Found and WER as in tables 2 and 4."
    )
    rows, score = [], {}
    for ns, ag in SETTINGS_GRID:
        results = [(material.positives[r["index"]], r[f"ns{ns} ag{ag}"]) for r in tried]
        loud = [res for p, res in results if p.room.snr_db >= 10]
        soft = [res for p, res in results if p.room.snr_db < 10]
        rate, n = wer(
            (p.clip.command, res["text"]) for p, res in results if res["text"] is not None
        )
        found = sum(res["found"] for _, res in results)
        score[(ns, ag)] = (rate, -found)
        rows.append(
            [f"{ns}", f"{ag}", pct(sum(r["found"] for r in loud), len(loud)), pct(sum(r["found"] for r in soft), len(soft)),
             f"{rate:.0f} % (n={n})"]
        )  # fmt: skip
    out.table(
        [
            "noise_suppression",
            "auto_gain_dbfs",
            "found ≥ 10 dB",
            "found 5 dB",
            "WER of the capture",
        ],
        rows,
    )
    best = min(score, key=lambda k: score[k])
    off = score[(0, 0)]
    # Worth turning on only for a clear gain: 2 points of WER and no fewer commands found.
    return best if score[best][0] <= off[0] - 2 and score[best][1] <= off[1] else (0, 0)
