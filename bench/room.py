"""The listening front end in simulated rooms: today's beside the new one, on the same audio.

Today's front end wakes on any speech (webrtcvad onset) and end-points with
webrtcvad; the new one wakes on a wake word and end-points with Silero woken by
webrtcvad. Both hear the same streams in the same run: Piper's voice (paces
0.8-1.4, pitches 0.85-1.15) and the shared recordings, through shoebox rooms
(RT60 0.3-0.6 s, 1-3 m away) with pink, brown, hum or babble noise at 5-20 dB SNR.
  1. false wakes: captures in long streams of talk, babble and noise without a
     wake word (per hour), and in near-miss phrases;
  2. wake phrase + command found, per built-in wake word and cutoff;
  3. end-pointing: capture end minus the command's last word, captures that ran to max_ms;
  4. words kept: faster-whisper tiny.en's WER on the capture vs on the command's whole stretch;
  5. noise suppression and auto gain: detection and WER;
  6. CPU per second of audio of each component, with a Pi 4 ESTIMATE;
  7. the device's own voice: captures while and after it speaks (devices/room.py).
A benchmark: it prints figures, it never passes or fails.

Usage: python -m bench.room [--quick] [--negatives-minutes 30] [--seed 0] [--markdown]
(HEIMDALL_MODELS_DIR defaults to ../shared/models, HEIMDALL_SPEECH_DIR to ../shared/speech.)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import room_listen
from bench.machine import machine_info
from bench.room_barge import barge_in_section
from bench.room_cpu import cpu_section
from bench.room_listen import pool_map, run_negative, run_positive
from bench.room_material import (
    BASELINE,
    SETTINGS_GRID,
    Material,
    acoustics,
    cutoffs,
    make_negatives,
    make_positives,
    new_front_end,
    wake_model,
)
from bench.room_tables import (
    Printer,
    detection,
    endpointing,
    false_wakes,
    front_end_settings,
    negative_hours,
    words_kept,
)
from heimdall_edge.audio import FRAME_MS, SAMPLE_RATE, Audio
from heimdall_edge.settings import BUILTIN_WAKE_WORDS, ListeningSettings
from heimdall_edge.testing import voices

REPO = Path(__file__).resolve().parents[1]


def choose_wake_word(
    score: dict[tuple[str, float], tuple[int, float, float]], barge: dict[str, float]
) -> tuple[str, float]:
    """The default wake word and cutoff: fewest false wakes first (zero wanted), then
    detection at >= 10 dB plus barge-in with the echo at -6 dB, then detection at 5 dB."""
    (wake_word, cutoff), _ = min(
        score.items(), key=lambda kv: (kv[1][0], -(kv[1][1] + barge[kv[0][0]]), -kv[1][2])
    )
    return wake_word, cutoff


# ----------------------------------------------------------------------------- own voice


async def own_voice(
    material: Material, fronts: dict[str, ListeningSettings], replies: list[str]
) -> list[list[Any]]:
    """Captures of the device's own replies, played with echo at -6 dB, guarded and unguarded."""
    rows = []
    for name, settings in fronts.items():
        phrase = wake_model(settings.wake_word)[0] if settings.wake_word else "Okay Nabu"
        lines = [*replies, f"You can say {phrase} whenever you need me."]
        for guarded in (True, False):
            captures, interrupted = await _own_voice_run(material, settings, lines, guarded)
            rows.append(
                [name, "ListeningSpeaker (as the appliance plays)" if guarded else "plain speaker, listening throughout",
                 len(lines), len(captures), sum(c.has_speech for c in captures), interrupted]
            )  # fmt: skip
    return rows


async def _own_voice_run(
    material: Material, settings: ListeningSettings, lines: list[str], guarded: bool
) -> tuple[list[Any], int]:
    from heimdall_edge.devices.microphone import FileMicrophone
    from heimdall_edge.devices.room import SimulatedRoom
    from heimdall_edge.devices.speaker import WavFileSpeaker
    from heimdall_edge.listen.listener import build_listener
    from heimdall_edge.listen.playback import ListeningSpeaker

    room = SimulatedRoom(
        FileMicrophone(tail_silence_ms=3_600_000), WavFileSpeaker(None), echo_db=-6
    )
    listener = build_listener(room.microphone, None, settings)
    speaker = ListeningSpeaker(room.speaker, listener) if guarded else room.speaker
    captures, interrupted = [], 0
    window = round(2000 / FRAME_MS)

    async def one(audio: Audio) -> AsyncIterator[Audio]:
        yield audio

    async def listen_between() -> None:
        """Listen for `window` frames; a capture still going then is ended there, and counts."""
        task = asyncio.create_task(listener.next_utterance())
        start = room.microphone.position
        while not task.done():
            if room.microphone.position - start >= window:
                listener.finish()
            await asyncio.sleep(0)
        utterance = task.result()
        if utterance is not None and utterance.audio.pcm:
            captures.append(utterance)

    background = None if guarded else asyncio.create_task(_listen_always(listener, captures))
    for line in lines:
        audio = Audio(voices.to_pcm(material.speaker.say(line)), SAMPLE_RATE)
        playback = await speaker.play(one(audio), asyncio.Event())
        interrupted += playback.interrupted
        if guarded:
            await listen_between()
    if background is not None:
        start = room.microphone.position
        while room.microphone.position - start < window:
            await asyncio.sleep(0)
        listener.finish()
        background.cancel()
        await asyncio.gather(background, return_exceptions=True)
    await room.microphone.aclose()
    return captures, interrupted


async def _listen_always(listener: Any, captures: list[Any]) -> None:
    while True:
        utterance = await listener.next_utterance()
        if utterance is not None and utterance.audio.pcm:
            captures.append(utterance)


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a few conditions: minutes, a smoke run"
    )
    parser.add_argument(
        "--negatives-minutes",
        type=float,
        default=None,
        help="minutes of audio without a wake word (default 30; 3 with --quick)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of rooms, voices, noise and babble"
    )
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: one per core)"
    )
    args = parser.parse_args()

    logging.basicConfig(level=logging.ERROR)
    models = Path(
        os.environ.setdefault("HEIMDALL_MODELS_DIR", str(REPO.parent / "shared" / "models"))
    )
    speech = Path(
        os.environ.setdefault("HEIMDALL_SPEECH_DIR", str(REPO.parent / "shared" / "speech"))
    )
    os.environ["HF_HUB_OFFLINE"] = "1"
    quick = args.quick
    minutes = args.negatives_minutes or (3.0 if quick else 30.0)
    started = time.perf_counter()
    out = Printer(args.markdown)

    def stage(text: str) -> None:
        print(f"[room] {text} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    material = room_listen.MATERIAL = Material(models, speech, args.seed)
    rooms = acoustics(quick)
    for room in rooms:  # the responses, once, before the workers fork
        voices.room_impulse_response(room.rt60, room.distance_m, room.geometry)
    stage("rooms ready")
    material.positives = make_positives(material, rooms, 1 if quick else 2)
    stage(f"{len(material.positives)} positives synthesized")
    material.negatives = make_negatives(material, minutes, quick)
    stage("negatives synthesized")

    negative_fronts = [("today", BASELINE)] + [
        (f"new {w} @{c:g}", new_front_end(w, c)) for w in BUILTIN_WAKE_WORDS for c in cutoffs(w)
    ]
    jobs = [
        (group, name, settings)
        for group in material.negatives
        for name, settings in negative_fronts
    ]
    negatives = pool_map(run_negative, jobs, args.workers, "false wakes")
    jobs = [
        (
            i,
            [
                ("today", BASELINE),
                (
                    f"new {p.wake_word} @{wake_model(p.wake_word)[1]:g}",
                    new_front_end(p.wake_word, wake_model(p.wake_word)[1]),
                ),
            ],
            True,
        )
        for i, p in enumerate(material.positives)
    ]
    results = pool_map(run_positive, jobs, args.workers, "positives")

    info = machine_info()
    hours = negative_hours(material)
    print(
        ("# " if args.markdown else "") + "Listening front end in simulated rooms (bench/room.py)"
    )
    out.note(
        f"\n{datetime.now(UTC):%Y-%m-%d %H:%M UTC}; machine: {info['cpu']}, {info['logical_cores']} cores, "
        f"{info['python']}, {info['os']}; seed {args.seed}{', --quick' if quick else ''}. "
        f"{len(material.positives)} positives ({len(rooms)} rooms × noises × SNRs, {len(BUILTIN_WAKE_WORDS)} wake words); "
        "today's = no wake word (webrtcvad speech onset), vad webrtc; new = wake word, vad silero."
    )
    totals = false_wakes(out, material, negatives)
    score = detection(out, material, results, totals, hours)
    barge = barge_in_section(out, material, 6 if quick else 20)
    wake_word, cutoff = choose_wake_word(score, barge)
    endpointing(out, material, results)
    words_kept(out, material, results)

    chosen = [
        i for i, p in enumerate(material.positives) if p.wake_word == wake_word and p.transcribe
    ]
    grid = [
        (f"ns{ns} ag{ag}", new_front_end(wake_word, cutoff, ns, ag)) for ns, ag in SETTINGS_GRID
    ]
    tried = pool_map(
        run_positive, [(i, grid, False) for i in chosen], args.workers, "front-end settings"
    )
    ns, ag = front_end_settings(out, material, tried, wake_word)

    stage("CPU")
    cpu_section(out, material, wake_word, 15.0 if quick else 60.0)
    stage("own voice")
    out.heading("7. The device's own voice")
    replies = [s for s in voices.TALK[:100]][: 3 if quick else 15]
    fronts = {"today's": BASELINE, f"new ({wake_word})": new_front_end(wake_word, cutoff)}
    rows = asyncio.run(own_voice(material, fronts, replies))
    out.note(
        "devices/room.py's SimulatedRoom: Piper replies (TALK sentences, and one that says the wake phrase) "
        "played with their echo at -6 dB (20 ms late, no reverberation), nobody else speaking. "
        "Guarded: the appliance's way, ListeningSpeaker around each reply and next_utterance() for 2 s "
        "between replies; unguarded: next_utterance() running throughout while a plain speaker plays."
    )
    out.table(
        ["front end", "playback", "replies", "captures", "with speech", "replies interrupted"], rows
    )

    out.heading("Chosen defaults")
    quiet = {
        w: min((c for (m, c), v in score.items() if m == w and v[0] == 0), default=None)
        for w in BUILTIN_WAKE_WORDS
    }
    out.note(
        f"wake_word = {wake_word!r}, wake_cutoff = {cutoff:g}, noise_suppression = {ns}, "
        f"auto_gain_dbfs = {ag} (rules: fewest false wakes, then best detection at ≥ 10 dB plus "
        "barge-in at -6 dB echo, then detection at 5 dB; noise suppression / gain only for ≥ 2 "
        "points less WER with no fewer commands found). The lowest cutoff tried that woke on none "
        "of table 1's audio, per built-in (listen/wakeword.py's MEASURED_CUTOFFS where it is above "
        "the model's own): "
        + ", ".join(f"{w} {'none' if c is None else format(c, 'g')}" for w, c in quiet.items())
        + "."
    )
    stage("done")
    out.note(f"The whole run took {(time.perf_counter() - started) / 60:.1f} min.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
