"""Why the local turn is not shortened by encoding only the audio: what it costs in words.

faster-whisper pads every utterance to Whisper's 30 s window, so the encoder costs the
same for a 2 s command as for a 30 s one, and on a slow CPU it is most of a local
transcription. CTranslate2 accepts a shorter window (whisper.cpp's `audio_ctx`), which
cuts the encoder's work in proportion. This runs every shared recording of up to 29 s
both ways, greedy and without timestamps as the engine does: the full window through
faster-whisper's own `transcribe`, and windows of the audio plus some padding through
its encoder and decoder, and prints the word error rates and the time each took.

Usage: python -m bench.whisper_window [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jiwer
import numpy as np

from bench.latency import MODELS, SPEECH, machine
from bench.machine import nbody_us_per_step
from heimdall_edge.testing.text import words

PADDINGS_S = (0.5, 1.0, 2.0, 5.0)
FRAMES_PER_S = 100
FULL_WINDOW = 3000
LONGEST_S = 29.0


def main(runs: int) -> None:
    from faster_whisper import WhisperModel
    from faster_whisper.audio import decode_audio
    from faster_whisper.tokenizer import Tokenizer

    print(machine())
    print(f"CPU probe: pure-Python n-body {nbody_us_per_step(30_000):.2f} us/step")
    model = WhisperModel(str(MODELS / "faster-whisper-tiny.en"), device="cpu", compute_type="int8")
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, "transcribe", "en")
    prompt = model.get_prompt(tokenizer, previous_tokens=[], without_timestamps=True)

    def full(audio: np.ndarray) -> str:
        segments, _ = model.transcribe(
            audio, beam_size=1, language="en", condition_on_previous_text=False,
            without_timestamps=True,
        )  # fmt: skip
        return " ".join(s.text for s in segments)

    def cut(audio: np.ndarray, padding_s: float) -> str:
        features = model.feature_extractor(audio)
        window = min(FULL_WINDOW, features.shape[1] + int(padding_s * FRAMES_PER_S))
        window += window % 2  # the encoder halves it
        features = np.pad(features, ((0, 0), (0, max(0, window - features.shape[1]))))
        encoded = model.encode(features[:, :window])
        result = model.model.generate(encoded, [prompt], beam_size=1, max_length=224)
        return tokenizer.decode([t for t in result[0].sequences_ids[0] if t < tokenizer.eot])

    ways = {"full 30 s window": full} | {
        f"audio + {p:g} s": (lambda a, p=p: cut(a, p)) for p in PADDINGS_S
    }
    errors: dict[str, list[float]] = {name: [] for name in ways}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    rows = (SPEECH / "transcripts.tsv").read_text(encoding="utf-8").splitlines()
    for name, reference in (row.split("\t", 1) for row in rows if row):
        audio = decode_audio(str(SPEECH / name), sampling_rate=16_000)
        if len(audio) > LONGEST_S * 16_000:
            continue
        for way, transcribe in ways.items():
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                text = transcribe(audio)
                times.append(time.perf_counter() - started)
            seconds[way].append(statistics.median(times))
            errors[way].append(jiwer.wer(words(reference), words(text) or "-"))

    base = statistics.median(seconds["full 30 s window"])
    print(f"\n{len(errors['full 30 s window'])} recordings of up to {LONGEST_S:g} s, {runs} runs")
    print("| window | mean WER | recordings with WER > 0.25 | median s | × full window |")
    print("|---|---:|---:|---:|---:|")
    for way in ways:
        median = statistics.median(seconds[way])
        bad = sum(e > 0.25 for e in errors[way])
        print(
            f"| {way} | {statistics.mean(errors[way]):.2f} | {bad} | {median:.3f} "
            f"| {median / base:.2f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per recording and way")
    main(parser.parse_args().runs)
