"""The Markdown of each measured section of docs/PERFORMANCE.md, and the helpers they share.

One function per part, given its figures (and the whole measurements dict), yielding its
lines; measured() puts the headings and the parts that failed around them, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from statistics import median as med
from typing import Any


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """'median (min–max)' of a list of numbers."""
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(med(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def plural(n: int, word: str) -> str:
    """'1 run', '3 runs'."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def md_cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def failed(value: Any) -> str:
    """What stands in for a section that has no figures: its error, or that it did not run."""
    if isinstance(value, str):
        return f"**Not measured: this section failed** (`{md_cell(value.splitlines()[-1])}`)."
    return "Not measured in this run."


def speech_to_text(stt: dict[str, Any], data: dict[str, Any]) -> Iterator[str]:
    """faster-whisper on every recording, beam 1 and beam 5."""
    n = len(stt["recordings"])
    total_audio = sum(r["seconds"] for r in stt["recordings"].values())
    yield (
        f"faster-whisper `{stt['model']}` `{stt['compute_type']}` through "
        f"`FasterWhisperEngine` (language `en`, no timestamps, one inference at a time, "
        f"CTranslate2 choosing the threads), on all {n} recordings in `HEIMDALL_SPEECH_DIR` "
        f"({total_audio:.0f} s of audio, {min(r['seconds'] for r in stt['recordings'].values()):.1f}–"
        f"{max(r['seconds'] for r in stt['recordings'].values()):.1f} s each); "
        f"{plural(data['runs']['stt'], 'run')} per recording and beam after a warm-up "
        "(the appliance uses beam 1 unless `stt.beam_size` says otherwise). "
        "Latency is the `transcribe()` call on PCM already in memory; real-time factor (RTF) = "
        "latency ÷ audio length. Word error rate with jiwer after the tests' normalisation "
        "(lowercase, punctuation dropped: `heimdall_edge/testing/text.py` `words()`), "
        "over all reference words."
    )
    yield ""
    yield "| | beam 1 | beam 5 |"
    yield "|---|---:|---:|"
    b1, b5 = stt["beams"][1], stt["beams"][5]

    def across(beam: dict[str, Any], key: str, fmt: str) -> str:
        return spread([med(p[key]) for p in beam["per"].values()], fmt)

    yield (
        f"| latency, ms: median (min–max) of per-recording medians | {across(b1, 'ms', '{:.0f}')} | {across(b5, 'ms', '{:.0f}')} |"
    )
    yield (
        f"| real-time factor: median (min–max) | {across(b1, 'rtf', '{:.3f}')} | {across(b5, 'rtf', '{:.3f}')} |"
    )
    r1, r5 = (sum(med(p["ms"]) for p in b["per"].values()) / 1000 / total_audio for b in (b1, b5))
    yield f"| all audio: Σ latency ÷ Σ audio | {r1:.3f} | {r5:.3f} |"
    yield (
        f"| word error rate (all {b1['ref_words']} reference words) | **{b1['wer'] * 100:.1f} %** ({b1['errors']} errors: {b1['subs']} sub, {b1['dels']} del, {b1['ins']} ins) | **{b5['wer'] * 100:.1f} %** ({b5['errors']} errors: {b5['subs']} sub, {b5['dels']} del, {b5['ins']} ins) |"
    )
    yield (
        f"| recordings with no error | {sum(p['wer'] == 0 for p in b1['per'].values())} of {n} | {sum(p['wer'] == 0 for p in b5['per'].values())} of {n} |"
    )
    unstable = [nm for b in (b1, b5) for nm, p in b["per"].items() if not p["stable"]]
    yield (
        f"| transcript identical in every run | {'yes' if not unstable else 'no: ' + ', '.join(sorted(set(unstable)))} | |"
    )
    yield ""
    yield (
        "Latency hardly grows with the audio: Whisper encodes a fixed 30 s window whatever the "
        "length, so short commands have the worst real-time factor and the decoder's share "
        "(and beam 5's extra cost) grows with the number of words."
    )
    yield ""
    yield from recordings(stt)


def recordings(stt: dict[str, Any]) -> Iterator[str]:
    """The per-recording figures and the errors beam 1 made, folded away."""
    b1, b5 = stt["beams"][1], stt["beams"][5]
    yield "<details><summary>Every recording (latency ms and RTF: median (min–max))</summary>"
    yield ""
    yield (
        "| recording | audio s | words | beam 1 ms | beam 1 RTF | beam 1 WER | beam 5 ms | beam 5 RTF | beam 5 WER |"
    )
    yield "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for name, rec in stt["recordings"].items():
        p1, p5 = b1["per"][name], b5["per"][name]
        yield (
            f"| {name} | {rec['seconds']:.1f} | {len(rec['reference'].split())} | "
            f"{spread(p1['ms'])} | {med(p1['rtf']):.3f} | {p1['wer'] * 100:.0f} % | "
            f"{spread(p5['ms'])} | {med(p5['rtf']):.3f} | {p5['wer'] * 100:.0f} % |"
        )
    yield ""
    yield "</details>"
    errors = [(nm, p) for nm, p in b1["per"].items() if p["wer"] > 0]
    if errors:
        yield ""
        yield (
            "<details><summary>What beam 1 heard where it made errors (reference → transcript)</summary>"
        )
        yield ""
        yield "| recording | WER | reference | beam 1 | beam 5 |"
        yield "|---|---:|---|---|---|"
        for name, p in errors:
            yield (
                f"| {name} | {p['wer'] * 100:.0f} % | {md_cell(stt['recordings'][name]['reference'])} | "
                f"{md_cell(p['text'])} | {md_cell(b5['per'][name]['text'])} |"
            )
        yield ""
        yield (
            "Some of these are the normalisation's rather than the model's: numbers "
            'written as digits ("10 of clubs" for "ten of clubs"), "Mr." for "mister" '
            'and "there under" for "thereunder" count as errors.'
        )
        yield ""
        yield "</details>"


def piper(tts: dict[str, Any], data: dict[str, Any]) -> Iterator[str]:
    """Piper's first audio and real-time factor per text."""
    yield (
        f"`PiperEngine`, voice `{tts['voice']}` (loaded in {tts['load_s']:.2f} s), "
        f"{plural(data['runs']['piper'], 'run')} per text after a warm-up; no voice cache. First audio = "
        "the first chunk out of `synthesize()` (Piper works sentence by sentence, so a "
        "multi-sentence reply starts after its first sentence); RTF = whole text ÷ audio length."
    )
    yield ""
    yield "| text | chars | audio s | first audio ms | whole text ms | RTF |"
    yield "|---|---:|---:|---:|---:|---:|"
    for text, row in tts["sentences"].items():
        yield (
            f"| {md_cell(text)} | {len(text)} | {med(row['audio_s']):.2f} | {spread(row['first_ms'])} | "
            f"{spread(row['total_ms'])} | {spread(row['rtf'], '{:.3f}')} |"
        )


def turns(e2e: dict[str, Any], data: dict[str, Any]) -> Iterator[str]:
    """Whole turns, stage by stage."""
    yield (
        f"Whole turns through the appliance (`bench/latency.py`'s turn runner: simulated "
        f"button, microphone fed from the file as fast as it is read, WAV speaker, real "
        f"models, offline reply, no cloud), {plural(data['runs']['e2e'], 'turn')} per recording after a "
        f"warm-up. The endpointer's hang-over ({e2e['hangover_ms']} ms of silence) is waited "
        "in real time on a device before the capture ends, so it is added, not measured. "
        "*speak* = capture end → first audio minus keep, transcribe and reply: Piper's first "
        "sentence and the start of playback. The voice cache is off here, so every reply is "
        "synthesized; in service, replies that repeat (the fixed phrases, rendered at "
        "start-up) come from the cache and *speak* drops to the cache hit time of the "
        "fallback section. ms, median (min–max):"
    )
    yield ""
    yield (
        "| recording | audio s | keep | transcribe | reply | speak (first sentence) | capture end → first audio | + hang-over = end of speech → first audio | record (after) |"
    )
    yield "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for name, rec in e2e["recordings"].items():
        yield (
            f"| {name} | {rec['seconds']:.1f} | {spread(rec['keep'])} | {spread(rec['transcribe'])} | "
            f"{spread(rec['reply'])} | {spread(rec['speak (first sentence)'])} | "
            f"{spread(rec['end_to_first_audio'])} | **{med(rec['end_to_first_audio']) + e2e['hangover_ms']:.0f}** | "
            f"{spread(rec['record'])} |"
        )


def fallback(fb: dict[str, Any], data: dict[str, Any]) -> Iterator[str]:
    """The cloud fallback scenarios against the fake cloud."""
    injected = sum(fb["injected_ms"].values())
    yield (
        "`bench/fallback.py`: real turns (real local models, the official OpenAI and ElevenLabs "
        "clients) against the fake cloud on loopback with fixed injected latencies ("
        + ", ".join(f"{k} {v:.0f} ms" for k, v in fb["injected_ms"].items())
        + f"; {injected:.0f} ms in all), one turn per recording over {fb['recordings']} "
        f"recordings; hedge delay {fb['hedge_ms']} ms per stage. Capture end → first reply "
        "audio, ms:"
    )
    yield ""
    local = med(next(v for k, v in fb["results"].items() if k.startswith("local only")))
    yield "| scenario | median (min–max) | ratio to local only | above injected latency |"
    yield "|---|---:|---:|---:|"
    for name, values in fb["results"].items():
        over = f"{med(values) - injected:.0f} ms" if name == "cloud healthy" else ""
        yield f"| {name} | {spread(values)} | {med(values) / local:.2f} | {over} |"
    hits = fb["cache_hits_ms"]
    yield (
        f"| voice-cache hit, request → first audio chunk ({len(hits)} runs) | {spread(hits, '{:.2f}')} | | |"
    )


def store_and_forward(sy: dict[str, Any], data: dict[str, Any]) -> Iterator[str]:
    """Sync throughput, reconnection and resume against moto."""
    mb = sy["bytes"] / 1e6
    runs = len(sy["sync_s"])
    rate = [sy["captures"] / s for s in sy["sync_s"]]
    mbs = [mb / s for s in sy["sync_s"]]
    base_rate = [sy["captures"] / s for s in sy["baseline_s"]]
    cpu_ms = [c / sy["captures"] * 1000 for c in sy["cpu_s"]]
    yield (
        f"`bench/sync.py` against moto's S3 and DynamoDB on loopback (the store shares this "
        f"machine's CPU): {sy['captures']} captures ({mb:.0f} MB: 2 s of audio and a 40 KB "
        f"frame each), {plural(runs, 'run')}."
    )
    yield ""
    yield "| | median (min–max) |"
    yield "|---|---:|"
    yield (
        f"| `heimdall-edge sync --once` (a real process: S3 + DynamoDB, SSE, checksums, conditional writes), s | {spread(sy['sync_s'], '{:.1f}')} |"
    )
    yield f"| captures/s | {spread(rate)} |"
    yield f"| MB/s | {spread(mbs, '{:.1f}')} |"
    yield (
        f"| syncer CPU per capture (the process's own, start-up included), ms | {spread(cpu_ms, '{:.1f}')} |"
    )
    yield f"| syncer peak RSS, MiB | {spread(sy['peak_rss_mib'])} |"
    yield (
        f"| baseline: plain boto3 `put_object` of the same files, 2 threads, no checks, no index: captures/s | {spread(base_rate)} |"
    )
    yield f"| ratio, sync ÷ baseline time | {med(sy['sync_s']) / med(sy['baseline_s']):.2f}× |"
    yield (
        f"| connectivity back → first object uploaded (probe every 100 ms), ms | {spread([s * 1000 for s in sy['reconnect_s']])} |"
    )
    yield (
        f"| resume after SIGKILL half-way: the rerun, s | {sy['resume_s']:.1f} ({sy['resume_s'] / sy['full_sync_median_s']:.2f}× a full sync); {sy['items_after_resume']} DynamoDB items for {sy['captures']} captures |"
    )


def memory(mem: dict[str, Any], data: dict[str, Any]) -> Iterator[str]:
    """RSS idle and peak of the whole service."""
    yield (
        f"Each run a fresh process builds the service as `run --simulate --fast` does "
        f"(simulated devices, real engines), calls `Appliance.start()` (models loaded, the fixed "
        f"phrases rendered with Piper: the point where systemd gets READY=1), waits 0.5 s and "
        f"reads VmRSS (**idle**), then serves {int(med(mem['turns']))} turns (the recordings of "
        f"the end-to-end table, one after another) and reads VmHWM (**peak**). "
        f"{plural(len(mem['idle']), 'run')}; MiB."
    )
    yield ""
    yield "| | MiB, median (min–max) |"
    yield "|---|---:|"
    yield (
        f"| baseline: interpreter with `heimdall_edge.cli` imported (peak) | {spread(mem['baseline'])} |"
    )
    yield f"| **idle**: started, models loaded, before any turn (RSS) | **{spread(mem['idle'])}** |"
    yield f"| peak while starting (VmHWM at READY) | {spread(mem['hwm_ready'])} |"
    yield f"| **peak** after the turns (VmHWM) | **{spread(mem['peak'])}** |"
    yield f"| RSS after the turns | {spread(mem['after'])} |"


def startup(st: dict[str, Any], data: dict[str, Any]) -> Iterator[str]:
    """Start-up to READY=1."""
    yield (
        f"Start-up: `heimdall-edge run --simulate` as a process with a real `NOTIFY_SOCKET`, "
        f"from exec to READY=1 (models loaded, fixed phrases rendered), "
        f"{plural(len(st['ready_s']), 'run')}, page cache warm; baseline: a process importing the CLI."
    )
    yield ""
    yield "| | s, median (min–max) |"
    yield "|---|---:|"
    yield f"| import `heimdall_edge.cli` (baseline) | {spread(st['import_s'], '{:.2f}')} |"
    yield f"| **start → READY=1** | **{spread(st['ready_s'], '{:.2f}')}** |"


Body = Callable[[dict[str, Any], dict[str, Any]], Iterator[str]]
MEASURED: list[tuple[str, list[tuple[str, Body]]]] = [
    ("On-device speech-to-text", [("stt", speech_to_text)]),
    ("Text-to-speech: Piper", [("piper", piper)]),
    ("End of speech → first reply audio", [("e2e", turns)]),
    ("Cloud, fallback and hedging", [("fallback", fallback)]),
    ("Store and forward", [("sync", store_and_forward)]),
    ("Memory and start-up", [("memory", memory), ("startup", startup)]),
]
"""Each measured section of the document: its heading, then its parts (key in the data, body)."""


def measured(data: dict[str, Any]) -> Iterator[str]:
    """Every measured section in order; a part that failed or did not run says so instead."""
    for title, parts in MEASURED:
        yield f"## {title}"
        yield ""
        for key, body in parts:
            value = data.get(key)
            yield from body(value, data) if isinstance(value, dict) else [failed(value)]
            yield ""
