"""Turn scenarios for bench/fallback.py: a hung cloud over ten turns, and speculative
against plain turns with the microphone in real time.

Each runs real turns (real faster-whisper and Piper, the official SDKs against the fake
cloud on loopback) and returns the end of the capture -> first reply audio of every
turn, in ms.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from heimdall_edge.audio import Audio, read_audio, silence
from heimdall_edge.capture import Capture
from heimdall_edge.devices.microphone import FileMicrophone
from heimdall_edge.devices.speaker import WavFileSpeaker
from heimdall_edge.listen.endpointer import EndReason, Utterance
from heimdall_edge.listen.listener import build_listener
from heimdall_edge.settings import load_settings
from heimdall_edge.spool.store import Spool
from heimdall_edge.turn.interaction import Interaction, answerable
from heimdall_edge.turn.routing import Engines
from heimdall_edge.turn.speculation import Speculation

MakeEngines = Callable[[], Engines]


class QuietIndicator:
    def show(self, state: object) -> None:
        pass

    def close(self) -> None:
        pass


def interaction(engines: Engines, spool: Spool) -> Interaction:
    return Interaction(
        device_id="bench",
        spool=spool,
        engines=engines,
        speaker=WavFileSpeaker(None),
        indicator=QuietIndicator(),  # type: ignore[arg-type]
    )


async def plain_turn(turn: Interaction, clip: Audio) -> dict[str, Any]:
    """One turn on a whole clip (no listening): its first audio (ms) and engines."""
    utterance = Utterance(clip, "button", EndReason.SILENCE, 1000, None, time.monotonic(), 240)
    result = await turn.run(Capture(utterance), asyncio.Event())
    return {"ms": result.timings_ms["end_to_first_audio"], "engines": dict(result.engines)}


async def successive_turns(engines: Engines, spool: Spool, clip: Audio, n: int) -> list[dict]:
    """`n` turns one after another on the same engines (their breakers learn as they go)."""
    turn = interaction(engines, spool)
    return [await plain_turn(turn, clip) for _ in range(n)]


async def listened_turn(engines: Engines, spool: Spool, clip: Audio, speculate: bool) -> float:
    """One turn as the device hears it: the clip from a real-time microphone through the
    Listener (voice onset, the real endpointer and its 700 ms hang-over), then the turn;
    the end of the capture -> first audio, in ms."""
    os.environ["HEIMDALL_LISTENING__SPECULATE_AFTER_MS"] = "250" if speculate else "0"
    settings = load_settings().listening.model_copy(update={"mode": "voice", "wake_word": ""})
    mic = FileMicrophone([silence(300) + clip.pcm], realtime=True)
    listener = build_listener(mic, None, settings)
    turn = interaction(engines, spool)
    speculation = Speculation(
        engines, lambda transcript: turn.request_for(transcript, [], ()), answerable
    )
    utterance = await listener.next_utterance(pauses=speculation)
    assert utterance is not None and utterance.has_speech
    result = await turn.run(Capture(utterance), asyncio.Event(), speculation=speculation)
    assert result.speculative is speculate, "a speculative turn answered plainly, or the reverse"
    return result.timings_ms["end_to_first_audio"]


async def speculative_against_plain(
    make: dict[str, MakeEngines], spool: Spool, clips: list[Path]
) -> dict[str, list[float]]:
    """For each engine set ("local", "cloud"): plain and speculative turns, alternating
    per recording so both meet the same machine load."""
    results: dict[str, list[float]] = {}
    for name, build in make.items():
        engines = build()
        for clip in clips:
            audio = read_audio(clip)
            for speculate in (False, True):
                key = f"{name}, {'speculative' if speculate else 'plain'}"
                results.setdefault(key, []).append(
                    await listened_turn(engines, spool, audio, speculate)
                )
    return results
