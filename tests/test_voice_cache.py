"""The voice cache: keys, exact round trips, LRU bound, persistence, crash repairs, threads."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import random
import sqlite3
import stat
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from heimdall_edge.audio import Audio
from heimdall_edge.spool import durable
from heimdall_edge.turn import voice_cache
from heimdall_edge.turn.voice_cache import VoiceCache, VoiceCacheError, cache_key, normalize_text

REPO = Path(__file__).resolve().parents[1]
REQUEST: dict[str, object] = {
    "engine": "elevenlabs",
    "voice": "21m00Tcm4TlvDq8ikWAM",
    "model": "eleven_flash_v2_5",
    "output_format": "pcm_16000",
    "settings": {"stability": 0.5, "similarity_boost": 0.75, "speed": 1.0},
    "text": "It is three o'clock.",
}


def key_of(name: object) -> str:
    """A well-formed key for tests that do not care what was said."""
    return hashlib.sha256(repr(name).encode()).hexdigest()


def speech(samples: int, rate: int = 16_000, seed: int = 0) -> Audio:
    return Audio(random.Random(seed).randbytes(samples * 2), rate)


def wav_size(audio: Audio) -> int:
    return len(audio.to_wav())


def clip_files(root: Path) -> set[str]:
    return {path.name for path in (root / "clips").iterdir()}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "state" / "voice-cache"


@pytest.fixture
def cache(root: Path) -> Iterator[VoiceCache]:
    with VoiceCache(root, max_bytes=100_000) as opened:
        yield opened


# -- keys -------------------------------------------------------------------------


def test_key_is_a_stable_sha256_of_the_whole_request() -> None:
    key = cache_key(**REQUEST)  # type: ignore[arg-type]
    assert key == cache_key(**REQUEST)  # type: ignore[arg-type]
    # Pinned: a change to the recipe silently empties every cache in the field.
    assert key == "1c0edd141043b1b384b89fe07ac6ebd2b3ac7d75987b5a75f795706313324126"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("engine", "piper"),
        ("voice", "pNInz6obpgDQGcFmaJgB"),
        ("model", "eleven_multilingual_v2"),
        ("output_format", "pcm_22050"),
        ("settings", {"stability": 0.6, "similarity_boost": 0.75, "speed": 1.0}),
        ("settings", {"stability": 0.5, "similarity_boost": 0.75}),
        ("settings", {"stability": 0.5, "similarity_boost": 0.75, "speed": 1.0, "style": 0}),
        ("settings", {}),
        ("text", "It is four o'clock."),
        ("text", "it is three o'clock."),
        ("text", "It is three o'clock?"),
        ("text", "It is three o'clock"),
    ],
)
def test_every_field_changes_the_key(field: str, value: object) -> None:
    assert cache_key(**(REQUEST | {field: value})) != cache_key(**REQUEST)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "  It is three o'clock.",
        "It is three o'clock.\n",
        "It  is\tthree\r\no'clock.",
        "It\u00a0is three\u3000o'clock.",  # no-break and ideographic spaces
        "\uff29\uff54 is three o'clock.",  # full-width letters (NFKC)
    ],
)
def test_whitespace_and_width_do_not_change_the_key(text: str) -> None:
    assert cache_key(**(REQUEST | {"text": text})) == cache_key(**REQUEST)  # type: ignore[arg-type]


def test_normalize_text_keeps_case_and_punctuation() -> None:
    assert normalize_text(" Wait…  WHAT?! \n") == "Wait... WHAT?!"


def test_settings_order_does_not_matter_but_types_do() -> None:
    def key(settings: dict[str, object]) -> str:
        return cache_key(**(REQUEST | {"settings": settings}))  # type: ignore[arg-type]

    assert key({"a": 1, "b": {"x": [1, 2], "y": None}}) == key(
        {"b": {"y": None, "x": (1, 2)}, "a": 1}
    )
    assert key({"a": True}) != key({"a": 1})
    assert key({"a": "1"}) != key({"a": 1})
    assert key({"a": None}) != key({})


def test_fields_cannot_run_into_each_other() -> None:
    one = cache_key(**(REQUEST | {"voice": "a b", "model": "c"}))  # type: ignore[arg-type]
    two = cache_key(**(REQUEST | {"voice": "a", "model": "b c"}))  # type: ignore[arg-type]
    assert one != two


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"settings": {"speed": float("nan")}}, ValueError),
        ({"settings": {"speed": float("inf")}}, ValueError),
        ({"settings": {1: "one"}}, TypeError),
        ({"settings": {"path": Path("/tmp")}}, TypeError),
        ({"settings": [("speed", 1.0)]}, TypeError),
        ({"text": b"bytes"}, TypeError),
        ({"voice": None}, TypeError),
    ],
)
def test_key_refuses_what_json_cannot_say_exactly(
    change: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        cache_key(**(REQUEST | change))  # type: ignore[arg-type]


def test_the_text_is_never_stored(root: Path) -> None:
    secret = "Your door code is 4711-marmalade"
    key = cache_key(**(REQUEST | {"text": secret}))  # type: ignore[arg-type]
    with VoiceCache(root, 100_000) as cache:
        cache.put(key, speech(1000))
    for path in root.rglob("*"):
        if path.is_file():
            assert b"marmalade" not in path.read_bytes(), path


# -- round trips and the bound ----------------------------------------------------


@pytest.mark.parametrize("rate", [8_000, 16_000, 22_050, 24_000, 44_100])
def test_round_trip_is_exact(cache: VoiceCache, rate: int) -> None:
    audio = speech(rate // 3, rate=rate, seed=rate)
    key = key_of(rate)
    assert cache.get(key) is None
    assert key not in cache
    cache.put(key, audio)
    assert key in cache
    got = cache.get(key)
    assert got is not None
    assert got.pcm == audio.pcm
    assert got.sample_rate == rate
    assert cache.entries == len(cache) == 1
    assert (
        cache.total_bytes == wav_size(audio) == (cache.root / "clips" / f"{key}.wav").stat().st_size
    )


def test_clips_are_plain_wav_files_named_by_key(cache: VoiceCache) -> None:
    audio = speech(500, rate=22_050)
    cache.put(key_of("wav"), audio)
    assert (cache.root / "clips" / f"{key_of('wav')}.wav").read_bytes() == audio.to_wav()


def test_least_recently_used_goes_first_and_get_counts_as_use(root: Path) -> None:
    audio = speech(1000)
    a, b, c, d, e = (key_of(name) for name in "abcde")
    with VoiceCache(root, max_bytes=3 * wav_size(audio)) as cache:
        for key in (a, b, c):
            cache.put(key, audio)
        assert cache.keys() == [a, b, c]
        assert cache.get(a) is not None
        assert cache.keys() == [b, c, a]
        cache.put(d, audio)
        assert cache.keys() == [c, a, d]
        cache.put(c, audio)  # a put of a stored key is a use too
        cache.put(e, audio)
        assert cache.keys() == [d, c, e]
        assert clip_files(root) == {f"{key}.wav" for key in (c, d, e)}
        assert cache.total_bytes == 3 * wav_size(audio)


def test_total_never_exceeds_the_bound(root: Path) -> None:
    rng = random.Random(7)
    limit = 50_000
    with VoiceCache(root, max_bytes=limit) as cache:
        for i in range(150):
            cache.put(key_of(i % 60), speech(rng.randint(1, 12_000), seed=i))
            if rng.random() < 0.3:
                cache.get(key_of(rng.randrange(60)))
            on_disk = sum(path.stat().st_size for path in (root / "clips").iterdir())
            assert cache.total_bytes == on_disk <= limit
            assert len(clip_files(root)) == cache.entries


def test_a_clip_bigger_than_the_whole_cache_is_not_stored(root: Path) -> None:
    small = speech(100)
    with VoiceCache(root, max_bytes=wav_size(small) + 1000) as cache:
        cache.put(key_of("small"), small)
        cache.put(key_of("big"), speech(100 + 501))  # one byte too many
        assert key_of("big") not in cache
        assert cache.keys() == [key_of("small")]  # and nothing was evicted for it
        exact = speech(100 + 500)
        cache.put(key_of("exact"), exact)  # exactly the bound fits
        assert cache.keys() == [key_of("exact")]
        assert cache.total_bytes == cache.max_bytes


def test_a_zero_bound_keeps_nothing(root: Path) -> None:
    with VoiceCache(root, max_bytes=0) as cache:
        cache.put(key_of(0), speech(10))
        assert cache.entries == 0
        assert clip_files(root) == set()


def test_empty_audio_is_not_stored(cache: VoiceCache) -> None:
    cache.put(key_of("empty"), Audio(b"", 16_000))
    assert key_of("empty") not in cache


def test_a_stored_key_keeps_its_first_clip(cache: VoiceCache) -> None:
    first, second = speech(100, seed=1), speech(200, seed=2)
    cache.put(key_of(1), first)
    cache.put(key_of(1), second)
    assert cache.get(key_of(1)) == first
    assert cache.entries == 1
    assert cache.total_bytes == wav_size(first)


def test_clear_drops_everything(cache: VoiceCache) -> None:
    for i in range(5):
        cache.put(key_of(i), speech(100, seed=i))
    cache.clear()
    assert cache.entries == cache.total_bytes == 0
    assert clip_files(cache.root) == set()
    cache.put(key_of(9), speech(100))
    assert cache.get(key_of(9)) == speech(100)


@pytest.mark.parametrize("bad", ["", "ABC", "../../etc/passwd", "0" * 63, "g" * 64, "A" * 64])
def test_keys_must_be_sha256_hex(cache: VoiceCache, bad: str) -> None:
    with pytest.raises(ValueError, match="64 lowercase hex"):
        cache.get(bad)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        cache.put(bad, speech(10))
    assert bad not in cache


def test_bad_audio_and_bounds_are_refused(root: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        VoiceCache(root, -1)
    with pytest.raises(ValueError, match="max_bytes"):
        VoiceCache(root, 1.5)  # type: ignore[arg-type]
    with VoiceCache(root, 1000) as cache:
        with pytest.raises(ValueError, match="s16le"):
            cache.put(key_of(1), Audio(b"\x00\x00\x00", 16_000))
        with pytest.raises(ValueError, match="positive rate"):
            cache.put(key_of(1), Audio(b"\x00\x00", 0))


def test_a_closed_cache_says_so(root: Path) -> None:
    cache = VoiceCache(root, 1000)
    cache.close()
    cache.close()  # twice is fine
    with pytest.raises(VoiceCacheError, match="closed"):
        cache.get(key_of(1))
    with pytest.raises(VoiceCacheError, match="closed"):
        cache.put(key_of(1), speech(10))


# -- persistence and repairs ------------------------------------------------------


def test_clips_and_their_order_survive_a_reopen(root: Path) -> None:
    clips = {key_of(i): speech(300 + i, rate=22_050, seed=i) for i in range(4)}
    with VoiceCache(root, 100_000) as cache:
        for key, audio in clips.items():
            cache.put(key, audio)
        cache.get(key_of(0))
        order = cache.keys()
    with VoiceCache(root, 100_000) as cache:
        assert cache.keys() == order
        for key, audio in clips.items():
            assert cache.get(key) == audio
        assert cache.keys() == list(clips)  # in the order of those gets


def test_a_smaller_bound_on_reopen_evicts_the_least_recently_used(root: Path) -> None:
    audio = speech(1000)
    with VoiceCache(root, 10 * wav_size(audio)) as cache:
        for i in range(5):
            cache.put(key_of(i), audio)
        cache.get(key_of(0))
    with VoiceCache(root, 2 * wav_size(audio)) as cache:
        assert cache.keys() == [key_of(4), key_of(0)]
        assert clip_files(root) == {f"{key_of(4)}.wav", f"{key_of(0)}.wav"}


def test_reopen_drops_rows_whose_clip_is_gone_or_cut_short(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with VoiceCache(root, 100_000) as cache:
        for i in range(3):
            cache.put(key_of(i), speech(500, seed=i))
    (root / "clips" / f"{key_of(0)}.wav").unlink()
    with open(root / "clips" / f"{key_of(1)}.wav", "r+b") as file:
        file.truncate(300)
    with caplog.at_level(logging.INFO, logger="heimdall_edge.turn.voice_cache"):
        cache = VoiceCache(root, 100_000)
    with cache:
        assert cache.keys() == [key_of(2)]
        assert cache.total_bytes == wav_size(speech(500))
        assert clip_files(root) == {f"{key_of(2)}.wav"}
    assert "its file is gone" in caplog.text
    assert "its index row says" in caplog.text


def test_reopen_removes_temp_files_and_unlisted_files(root: Path) -> None:
    with VoiceCache(root, 100_000) as cache:
        cache.put(key_of("kept"), speech(100))
    clips = root / "clips"
    (clips / ".tmp-0123456789ab").write_bytes(b"RIFF half a clip")
    (clips / f"{key_of('orphan')}.wav").write_bytes(speech(100).to_wav())
    (clips / "notes.txt").write_text("not ours")
    (clips / "a-folder").mkdir()
    with VoiceCache(root, 100_000) as cache:
        assert clip_files(root) == {f"{key_of('kept')}.wav"}
        assert key_of("orphan") not in cache
        assert cache.get(key_of("orphan")) is None
        assert cache.get(key_of("kept")) == speech(100)


def test_a_clip_removed_while_open_is_a_miss(
    cache: VoiceCache, caplog: pytest.LogCaptureFixture
) -> None:
    cache.put(key_of(1), speech(100))
    (cache.root / "clips" / f"{key_of(1)}.wav").unlink()
    with caplog.at_level(logging.INFO, logger="heimdall_edge.turn.voice_cache"):
        assert cache.get(key_of(1)) is None
    assert key_of(1) not in cache
    assert cache.total_bytes == 0
    assert "missing" in caplog.text
    cache.put(key_of(1), speech(100))  # and it can be stored again
    assert cache.get(key_of(1)) == speech(100)


def _flip_a_sample(path: Path) -> None:
    with open(path, "r+b") as file:
        file.seek(-1, os.SEEK_END)
        last = file.read(1)
        file.seek(-1, os.SEEK_END)
        file.write(bytes([last[0] ^ 0xFF]))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as file:
        file.truncate(100)


def _symlink(path: Path) -> None:
    target = path.with_name("elsewhere")
    path.rename(target)
    path.symlink_to(target)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _garbage_that_the_index_vouches_for(path: Path) -> None:
    """Defeats the size and CRC checks, so only reading the WAV itself can tell."""
    garbage = b"\x00" * path.stat().st_size
    path.write_bytes(garbage)
    db = sqlite3.connect(path.parent.parent / "index.sqlite3")
    with db:
        db.execute("UPDATE clips SET crc32 = ? WHERE key = ?", (zlib.crc32(garbage), path.stem))
    db.close()


def _wrong_rate_that_the_index_vouches_for(path: Path) -> None:
    data = Audio(speech(100).pcm, 8_000).to_wav()
    path.write_bytes(data)
    db = sqlite3.connect(path.parent.parent / "index.sqlite3")
    with db:
        db.execute("UPDATE clips SET crc32 = ? WHERE key = ?", (zlib.crc32(data), path.stem))
    db.close()


@pytest.mark.parametrize(
    "damage",
    [
        _flip_a_sample,
        _truncate,
        _symlink,
        _fifo,
        _folder,
        _garbage_that_the_index_vouches_for,
        _wrong_rate_that_the_index_vouches_for,
    ],
)
def test_a_damaged_clip_is_a_miss_and_is_deleted(
    cache: VoiceCache, caplog: pytest.LogCaptureFixture, damage: object
) -> None:
    key, audio = key_of("damaged"), speech(100)
    cache.put(key, audio)
    cache.put(key_of("fine"), speech(50))
    path = cache.root / "clips" / f"{key}.wav"
    damage(path)  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="heimdall_edge.turn.voice_cache"):
        assert cache.get(key) is None
    assert "damaged" in caplog.text
    assert not path.is_symlink() and not path.exists()
    assert key not in cache
    assert cache.get(key_of("fine")) == speech(50)
    cache.put(key, audio)
    assert cache.get(key) == audio


def test_a_clip_that_cannot_be_read_for_now_is_a_miss_but_stays(
    cache: VoiceCache, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache.put(key_of(1), speech(100))
    real_open = os.open

    def no_descriptors_left(path: object, *args: object, **kwargs: object) -> int:
        if str(path).endswith(".wav"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(voice_cache.os, "open", no_descriptors_left)
    with caplog.at_level(logging.WARNING, logger="heimdall_edge.turn.voice_cache"):
        assert cache.get(key_of(1)) is None
    assert "cannot be read now" in caplog.text
    monkeypatch.undo()
    assert cache.get(key_of(1)) == speech(100)


def test_a_busy_index_does_not_spoil_a_hit(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(voice_cache, "BUSY_TIMEOUT_S", 0.01)
    with VoiceCache(root, 100_000) as cache:
        cache.put(key_of(1), speech(100))
        other = sqlite3.connect(root / "index.sqlite3", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process in the middle of a put
        try:
            assert cache.get(key_of(1)) == speech(100)
        finally:
            other.execute("ROLLBACK")
            other.close()


@pytest.mark.parametrize(
    ("step", "error"),
    [("write_new_file", errno.ENOSPC), ("fsync_dir", errno.EIO)],
)
def test_a_failed_put_keeps_nothing_and_says_why(
    cache: VoiceCache, monkeypatch: pytest.MonkeyPatch, step: str, error: int
) -> None:
    cache.put(key_of("kept"), speech(100))

    def fail(*args: object) -> None:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(durable, step, fail)
    with pytest.raises(VoiceCacheError, match="full" if error == errno.ENOSPC else "Input/output"):
        cache.put(key_of("lost"), speech(200))
    monkeypatch.undo()
    assert cache.keys() == [key_of("kept")]
    assert clip_files(cache.root) == {f"{key_of('kept')}.wav"}
    cache.put(key_of("lost"), speech(200))
    assert cache.get(key_of("lost")) == speech(200)


def test_a_damaged_index_starts_the_cache_afresh(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with VoiceCache(root, 100_000) as cache:
        cache.put(key_of(1), speech(100))
    (root / "index.sqlite3").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (root / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING, logger="heimdall_edge.turn.voice_cache"):
        cache = VoiceCache(root, 100_000)
    with cache:
        assert "starting the cache afresh" in caplog.text
        assert cache.entries == 0
        assert clip_files(root) == set()
        cache.put(key_of(2), speech(100))
        assert cache.get(key_of(2)) == speech(100)


CRASHER = r"""
import os, sys
from heimdall_edge.spool import durable
from heimdall_edge.turn import voice_cache
from heimdall_edge.audio import Audio

root, point, key = sys.argv[1:4]
cache = voice_cache.VoiceCache(root, 1_000_000)

def crash(*args, **kwargs):
    os._exit(17)  # no cleanup, no finally: as good as a SIGKILL at this line

if point == "before-rename":
    voice_cache.os.rename = crash
elif point == "after-rename":
    durable.fsync_dir = crash
elif point == "before-commit":
    voice_cache.VoiceCache._evict = crash
cache.put(key, Audio(bytes(range(256)) * 40, 16000))
os._exit(0)
"""


@pytest.mark.parametrize(
    ("point", "left_behind"),
    [("before-rename", "temp"), ("after-rename", "orphan"), ("before-commit", "orphan")],
)
def test_a_crash_mid_put_leaves_nothing_that_get_returns(
    root: Path, point: str, left_behind: str
) -> None:
    kept, lost = key_of("kept"), key_of("lost")
    with VoiceCache(root, 1_000_000) as cache:
        cache.put(kept, speech(300))
    result = subprocess.run(
        [sys.executable, "-c", CRASHER, str(root), point, lost],
        cwd=REPO,
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 17, result.stderr.decode()
    names = clip_files(root) - {f"{kept}.wav"}
    if left_behind == "temp":
        assert len(names) == 1 and names.pop().startswith(".tmp-")
    else:
        assert names == {f"{lost}.wav"}
    with VoiceCache(root, 1_000_000) as cache:
        assert clip_files(root) == {f"{kept}.wav"}
        assert lost not in cache
        assert cache.get(lost) is None
        assert cache.get(kept) == speech(300)
        assert cache.total_bytes == wav_size(speech(300))


SHARER = r"""
import hashlib, random, sys
from heimdall_edge.turn import voice_cache
from heimdall_edge.audio import Audio
from heimdall_edge.turn.voice_cache import VoiceCache

def clip(i):
    return Audio(random.Random(i).randbytes(2 * (100 + 50 * i)), 16000)

root, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
with VoiceCache(root, 20_000) as cache:
    for _ in range(300):
        i = rng.randrange(30)
        key = hashlib.sha256(str(i).encode()).hexdigest()
        if rng.random() < 0.5:
            got = cache.get(key)
            assert got is None or got == clip(i), f"wrong clip for {i}"
        else:
            cache.put(key, clip(i))
        assert cache.total_bytes <= 20_000
"""


def test_processes_share_one_cache(root: Path) -> None:
    """The service and the CLI at once: every clip returned is the right one, the bound holds."""
    sharers = [
        subprocess.Popen(
            [sys.executable, "-c", SHARER, str(root), str(seed)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for seed in range(3)
    ]
    for sharer in sharers:
        _out, err = sharer.communicate(timeout=120)
        assert sharer.returncode == 0, err.decode()
    clips = {
        hashlib.sha256(str(i).encode()).hexdigest(): Audio(
            random.Random(i).randbytes(2 * (100 + 50 * i)), 16_000
        )
        for i in range(30)
    }
    with VoiceCache(root, 20_000) as cache:
        keys = cache.keys()
        assert keys, "nothing was stored"
        assert clip_files(root) == {f"{key}.wav" for key in keys}
        for key in keys:
            assert cache.get(key) == clips[key]


def test_only_the_first_opener_repairs(root: Path) -> None:
    first = VoiceCache(root, 100_000)
    stray = root / "clips" / ".tmp-inflight0000"
    stray.write_bytes(b"another process is writing this")
    with VoiceCache(root, 100_000) as second:  # as the CLI would, while the service runs
        assert stray.exists()
        first.put(key_of(1), speech(100))
        assert second.get(key_of(1)) == speech(100)
        second.put(key_of(2), speech(200))
        assert first.keys() == [key_of(1), key_of(2)]
    first.close()
    with VoiceCache(root, 100_000):
        assert not stray.exists()


# -- permissions, threads, asyncio ------------------------------------------------


def test_folders_are_0700_and_files_0600_whatever_the_umask(root: Path) -> None:
    (root / "clips").mkdir(parents=True, mode=0o755)  # left by an older, careless version
    root.chmod(0o755)
    old = os.umask(0)
    try:
        with VoiceCache(root, 100_000) as cache:
            cache.put(key_of(1), speech(100))
            cache.get(key_of(1))
            paths = [root, *root.rglob("*")]
            modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in paths}
    finally:
        os.umask(old)
    assert modes.pop(root.name) == modes.pop("clips") == 0o700
    assert {"index.sqlite3", "index.sqlite3-wal", "cache.lock", f"{key_of(1)}.wav"} <= set(modes)
    assert set(modes.values()) == {0o600}, modes


def test_threads_share_one_cache(root: Path) -> None:
    clips = {key_of(i): speech(200 + 97 * i, rate=22_050, seed=i) for i in range(40)}
    limit = 10 * wav_size(clips[key_of(20)])
    wrong: list[str] = []
    over: list[int] = []
    cache = VoiceCache(root, limit)
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        start.wait(timeout=10)
        for _ in range(150):
            key = rng.choice(list(clips))
            roll = rng.random()
            if roll < 0.5:
                got = cache.get(key)
                if got is not None and got != clips[key]:
                    wrong.append(key)
            elif roll < 0.97:
                cache.put(key, clips[key])
            elif roll < 0.98:
                cache.clear()
            else:
                _ = key in cache, cache.keys()
            total = cache.total_bytes
            if total > limit:
                over.append(total)

    with ThreadPoolExecutor(max_workers=8) as pool:
        for future in [pool.submit(worker, seed) for seed in range(8)]:
            future.result(timeout=120)
    assert wrong == [] and over == []
    keys = cache.keys()
    assert clip_files(root) == {f"{key}.wav" for key in keys}
    assert cache.total_bytes == sum(wav_size(clips[key]) for key in keys) <= limit
    for key in keys:
        assert cache.get(key) == clips[key]
    cache.close()
    with VoiceCache(root, limit) as reopened:
        assert set(reopened.keys()) == set(keys)


async def test_usable_from_asyncio_through_threads(cache: VoiceCache) -> None:
    audio = speech(16_000)
    await asyncio.wait_for(asyncio.to_thread(cache.put, key_of("async"), audio), timeout=10)
    got = await asyncio.wait_for(asyncio.to_thread(cache.get, key_of("async")), timeout=10)
    assert got == audio
