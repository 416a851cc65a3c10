"""Whisper's stock phrases on near-silence are no speech; real words, even the same ones, are kept."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from heimdall_edge.audio import SAMPLE_RATE, Audio, read_audio
from heimdall_edge.engines.hallucinations import PHRASES, is_hallucination, screened
from heimdall_edge.engines.local.faster_whisper import FasterWhisperEngine


@pytest.mark.parametrize(
    "text",
    [
        "Thank you.",
        "thank you",
        "THANK YOU!!!",
        "  Thank   you . ",
        "Thank you. Thank you. Thank you.",
        "Thank you very much.",
        "Thank you so much.",
        "Thanks for watching!",
        "Thank you for watching.",
        "Thanks for watching! Please subscribe.",
        "you",
        "You you you",
        "Please subscribe",
        "Bye.",
        "Bye-bye.",
        "We'll see you next time.",
        "We\u2019ll see you next time.",  # a typographic apostrophe
        "Subtitles by the Amara.org community",
        "[BLANK_AUDIO]",
        "(music)",
        "[Music] Thank you.",
        "*silence*",
        "...",
        ". . . . .",
        "\u266a",
        "",
    ],
)
def test_stock_phrases_alone_or_repeated_are_no_speech(text: str) -> None:
    assert is_hallucination(text)
    assert screened(text, "openai") == ""


@pytest.mark.parametrize(
    "text",
    [
        "Thank you, what time is it?",
        "Thanks, turn on the living room lamp.",
        "Can you play some music?",  # a real "music", not a sound label
        "Subscribe me to the news.",
        "Say thank you to grandma for me.",
        "you know what time it is",
        "Youtube",
        "Bye, see you tomorrow.",
        "Okay.",
        "What time is it? [Music]",
        "8.",
    ],
)
def test_real_sentences_with_those_words_are_kept_whole(text: str) -> None:
    assert not is_hallucination(text)
    assert screened(text, "openai") == text


def test_every_listed_phrase_is_recognised_however_it_is_written() -> None:
    for phrase in PHRASES:
        assert is_hallucination(phrase.upper() + "!"), phrase
        assert is_hallucination(f"{phrase}. {phrase}."), phrase


def test_what_was_dropped_is_only_in_the_debug_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="heimdall_edge.engines.hallucinations"):
        assert screened("Thanks for watching!", "faster-whisper") == ""
    [record] = caplog.records
    assert record.levelno == logging.DEBUG and "Thanks for watching!" in record.getMessage()


async def test_tiny_en_makes_up_thank_you_from_near_silence_and_it_is_no_speech(
    whisper: FasterWhisperEngine, speech_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Real room tone, the last 300 ms of a shared recording (-45 dBFS, after the last word):
    tiny.en writes "Thank you." for it, every time (measured 12 of 12). Other near-silent
    stretches make it sample (temperature fallback): then it writes a different phrase
    each run, some listed here, some not ("That's it.")."""
    samples = np.frombuffer(read_audio(speech_dir / "sr_english.wav").pcm, dtype=np.int16)
    quiet = samples[-300 * SAMPLE_RATE // 1000 :]
    level_dbfs = 20 * np.log10(np.sqrt(np.mean(quiet.astype(np.float64) ** 2)) / 32768)
    assert level_dbfs < -40, "not near-silence"
    with caplog.at_level(logging.DEBUG, logger="heimdall_edge.engines.hallucinations"):
        transcript = await whisper.transcribe(Audio(quiet.tobytes(), SAMPLE_RATE))
    assert (transcript.text, transcript.engine) == ("", "faster-whisper")
    assert [r.getMessage() for r in caplog.records] == [
        "faster-whisper: no speech (Whisper wrote only 'Thank you.')"
    ]  # the model really wrote it; the filter dropped it
