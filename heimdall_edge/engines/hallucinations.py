"""Whisper's stock phrases on near-silence or noise ("Thank you.", "Thanks for watching!"): no speech.

Whisper learnt from subtitled videos, so given audio with no words in it, it often
writes what such videos end with (cloud Whisper too: openai/whisper discussion 928).
Measured here on the room tone before or after the words of the shared recordings
(47 stretches under -40 dBFS, 5 runs each): tiny.en wrote nothing 135 times, such a
phrase 70 times ("Thank you.", "We'll see you next time.", ". . . ."), and other
text 30 times ("Okay." 14). A transcript made of nothing but such phrases (one, or
several, or one repeated) and sound labels ("[BLANK_AUDIO]", "(music)") is no
speech. One with any other word is kept whole: "thank you, what time is it" is a
question.

The price: someone who says only "thank you" to the device is not understood.
"""

from __future__ import annotations

import logging
import re
import unicodedata

log = logging.getLogger(__name__)

PHRASES = (
    "you",
    "thank you",
    "thank you very much",
    "thank you so much",
    "thanks",
    "thank you for watching",
    "thank you so much for watching",
    "thank you very much for watching",
    "thanks for watching",
    "thank you for listening",
    "thanks for listening",
    "please subscribe",
    "subscribe",
    "like and subscribe",
    "please like and subscribe",
    "don't forget to like and subscribe",
    "subscribe to my channel",
    "please subscribe to my channel",
    "bye",
    "see you next time",
    "we'll see you next time",
    "I'll see you next time",
    "see you in the next video",
    "I'll see you in the next video",
    "subtitles by the Amara.org community",
    "subtitled by the Amara.org community",
    "subtitles by Amara.org",
    "captions by the Amara.org community",
)
"""What Whisper writes when nobody spoke, written as it is said; matching ignores case,
punctuation and spacing."""

_SOUND_LABEL = re.compile(r"\[[^\]]*\]|\([^)]*\)|\*[^*]*\*")
"""[BLANK_AUDIO], [Music], (upbeat music), *silence*: what Whisper writes for a sound, never words said."""


def _normalized(text: str) -> str:
    """Lower case, apostrophes dropped, every run of punctuation or space one space."""
    text = unicodedata.normalize("NFKC", text).casefold().replace("\u2019", "'").replace("'", "")
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


_LONGEST_FIRST = sorted({_normalized(phrase) for phrase in PHRASES}, key=len, reverse=True)
_ONLY_PHRASES = re.compile(f"(?:(?:{'|'.join(map(re.escape, _LONGEST_FIRST))})(?: |$))+")
"""One or more listed phrases, each ending at a word's end (so "you" never matches "youtube")."""


def is_hallucination(text: str) -> bool:
    """True when `text` holds no words but Whisper's stock phrases and sound labels (or nothing)."""
    words = _normalized(_SOUND_LABEL.sub(" ", text))
    return not words or _ONLY_PHRASES.fullmatch(words) is not None


def screened(text: str, engine: str) -> str:
    """`text` as Whisper wrote it, or "" (no speech) when it is only a stock phrase.

    What was dropped goes to the DEBUG log only, never into a transcript.
    """
    if text and is_hallucination(text):
        log.debug("%s: no speech (Whisper wrote only %r)", engine, text)
        return ""
    return text
