"""Persistent, bounded text-to-speech cache, keyed by everything that shapes the sound.

"Sorry, I could not hear that" or an hourly time check costs a cloud call (or a
second of Piper on a Pi) every time it is synthesised; from the cache it starts at
once, online or not.

Layout under the root, e.g. <state_dir>/voice-cache (folders 0700, files 0600):

    index.sqlite3        one row per clip: key, bytes, sample_rate, crc32, last_used (WAL)
    clips/<key>.wav      mono s16le WAV; written once, never changed, only removed
    clips/.tmp-<random>  a put in flight; removed when the cache is next opened
    cache.lock           flock: the first process to open the cache repairs it

The key (`clip_key`, from the engine's `cache_identity()`) is a SHA-256 over everything that shapes the sound. Neither
the text nor any credential is stored: a clip is found only by asking for it again.

A put writes a temp file, fsyncs it, renames it to its key, fsyncs the folder, and
only then adds the index row and evicts the least recently used clips. The index
is a catalogue of clips already whole on disk, so a crash anywhere leaves at worst
a file without a row (deleted when the cache is opened) or a row without a file
(dropped when the cache is opened or by the next get); evictions and clear() remove
files first and commit the rows after, for the same reason. get() checks the WAV
header, the size and a CRC-32 before returning a clip, so a damaged clip is a miss,
never noise played aloud.

`last_used` is a counter (one more than the largest so far), not a clock time: a
Pi has no real-time clock and its clock leaps at the first NTP sync, which would
scramble a time-ordered LRU; a counter orders exactly, and tests need no clock.

The index runs with synchronous=NORMAL: in WAL mode that never corrupts it, and a
power cut loses at most the transactions since the last checkpoint (recency
updates, rows of new clips, deletions), which the repairs above absorb: they only
ever trust a row whose file is there at the right size. So a hit costs no fsync.

The API blocks: the service calls it through `asyncio.to_thread`. One VoiceCache
may be shared by threads; several processes (the service and the CLI) may open
the same cache, and only the first one repairs it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import operator
import os
import re
import sqlite3
import stat
import threading
import unicodedata
import wave
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Self

from heimdall_edge.audio import SAMPLE_WIDTH, Audio, wav_bytes
from heimdall_edge.engines.base import Voiced
from heimdall_edge.spool import durable

log = logging.getLogger(__name__)

KEY_VERSION = 1
"""Part of every key: bump it when the key's recipe changes, and old clips simply age out."""
SCHEMA_VERSION = 1
INDEX_NAME = "index.sqlite3"
CLIPS_NAME = "clips"
LOCK_NAME = "cache.lock"
CLIP_SUFFIX = ".wav"
BUSY_TIMEOUT_S = 10.0
KEY = re.compile(r"[0-9a-f]{64}")
CLIP_DAMAGED = frozenset({errno.ELOOP, errno.EISDIR, errno.EIO})

SCHEMA = """
CREATE TABLE IF NOT EXISTS clips (
    key TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    sample_rate INTEGER NOT NULL,
    crc32 INTEGER NOT NULL,
    last_used INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS clips_by_last_used ON clips (last_used);
"""
NEXT_USE = "(SELECT COALESCE(MAX(last_used), 0) + 1 FROM clips)"


class VoiceCacheError(Exception):
    """The cache cannot do what was asked; the message says why. A caller may speak uncached."""


class _DamagedClip(Exception):
    """A clip file that must not be played."""


# -- keys -------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """NFKC, whitespace collapsed and stripped; case and punctuation kept (they shape prosody)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return " ".join(unicodedata.normalize("NFKC", text).split())


def clip_key(voice: Voiced, text: str) -> str:
    """The key of `text` in `voice`: what shapes its sound is the engine's to say."""
    return cache_key(text=text, **voice.cache_identity())


def cache_key(
    *,
    engine: str,
    voice: str,
    model: str,
    output_format: str,
    settings: Mapping[str, object],
    text: str,
) -> str:
    """SHA-256 (hex) of a canonical JSON of the whole request: never of the text alone.

    `settings` are whatever else shapes the sound (speed, stability, style...): a
    mapping of strings to strings, numbers, booleans, None, lists and mappings.
    Keys are sorted, so their order does not matter; values are compared as JSON,
    so 1 and True differ (and 1 and 1.0 differ too: a miss, never a wrong hit).
    """
    if not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a mapping, got {type(settings).__name__}")
    request = {
        "v": KEY_VERSION,
        "engine": _name("engine", engine),
        "voice": _name("voice", voice),
        "model": _name("model", model),
        "output_format": _name("output_format", output_format),
        "settings": _canonical(settings, "settings"),
        "text": normalize_text(text),
    }
    blob = json.dumps(
        request, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _name(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str, got {type(value).__name__}")
    return value


def _canonical(value: object, where: str) -> object:
    """A JSON-ready copy of `value`, refusing anything JSON would encode ambiguously."""
    if value is None or isinstance(value, str | int):  # bool is an int; JSON keeps them apart
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        return value
    if isinstance(value, Mapping):
        result: dict[str, object] = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise TypeError(f"{where} keys must be strings, got {name!r:.40}")
            result[name] = _canonical(item, f"{where}.{name}")
        return result
    if isinstance(value, list | tuple):
        return [_canonical(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(
        f"{where} must hold only strings, numbers, booleans, None, lists and mappings, "
        f"got {type(value).__name__}"
    )


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not KEY.fullmatch(key):
        raise ValueError(
            f"a voice cache key is 64 lowercase hex digits (cache_key), got {key!r:.80}"
        )
    return key


# -- the cache --------------------------------------------------------------------


class VoiceCache:
    """Synthesised speech by key: at most `max_bytes` of WAV files, least recently used out first.

    Opening it repairs whatever a crash left behind. Close it (or use it as a
    context manager) so another process can repair it later.
    """

    def __init__(self, root: Path | str, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(
                f"max_bytes must be a whole number of bytes, 0 or more (0 keeps nothing), "
                f"got {max_bytes!r}"
            )
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._clips = self.root / CLIPS_NAME
        self._lock = threading.RLock()
        self._closed = False
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            durable.make_private_dir(self.root)
            durable.make_private_dir(self._clips)
            durable.fsync_dir(self.root)
            self._lock_fd = durable.open_private_file(self.root / LOCK_NAME)
        except OSError as exc:
            raise VoiceCacheError(
                f"cannot open the voice cache at {self.root}: {exc}; "
                "check that the state directory is writable by this user"
            ) from exc
        try:
            self._open()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def close(self) -> None:
        """Release the index and the lock."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()
            os.close(self._lock_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def get(self, key: str) -> Audio | None:
        """The clip stored under `key`, now the most recently used; None on a miss.

        A clip that is missing or damaged is a miss and is dropped (a damaged one with a
        warning). Raises VoiceCacheError only when the index itself cannot be read.
        """
        _check_key(key)
        path = self._path(key)
        with self._lock:
            self._check_open()
            try:
                row = self._db.execute(
                    "SELECT bytes, sample_rate, crc32 FROM clips WHERE key = ?", (key,)
                ).fetchone()
                if row is None:
                    return None
                try:
                    audio = _read_clip(path, *row)
                except FileNotFoundError:
                    # Evicted by another process since the SELECT, or an eviction or
                    # clear() cut short by a crash: expected, so not a warning.
                    log.info("voice cache clip %s is missing: treating it as a miss", path)
                    self._db.execute("DELETE FROM clips WHERE key = ?", (key,))
                    return None
                except (_DamagedClip, OSError) as exc:
                    # ELOOP, EISDIR: something else in its place. EMFILE and the like are
                    # not the clip's fault: a miss, but the clip stays.
                    if isinstance(exc, OSError) and exc.errno not in CLIP_DAMAGED:
                        log.warning("voice cache clip %s cannot be read now: %s", path, exc)
                        return None
                    log.warning(
                        "voice cache clip %s is damaged (%s): deleted it, treating it as a miss",
                        path, exc,
                    )  # fmt: skip
                    self._db.execute("DELETE FROM clips WHERE key = ?", (key,))
                    with contextlib.suppress(OSError):
                        durable.remove(path)
                    return None
                try:
                    self._touch(key)
                except sqlite3.OperationalError as exc:  # busy: keep the hit, lose the recency
                    log.debug("voice cache clip %s not marked as used: %s", key[:12], exc)
                return audio
            except sqlite3.Error as exc:
                raise VoiceCacheError(
                    f"cannot read the voice cache index {self.root / INDEX_NAME}: {exc}"
                ) from exc

    def put(self, key: str, audio: Audio) -> None:
        """Store a clip durably, then evict least recently used clips down to max_bytes.

        A clip larger than max_bytes (or empty) is not stored. A key already stored
        keeps its clip (the same key is the same request) and becomes most recently used.
        Raises VoiceCacheError when the disk or the index fails; nothing partial is kept.
        """
        _check_key(key)
        rate = audio.sample_rate
        if isinstance(rate, bool) or not hasattr(type(rate), "__index__"):
            raise TypeError(f"sample_rate must be a whole number, got {rate!r}")
        rate = operator.index(rate)  # numpy integers too
        if rate <= 0 or len(audio.pcm) % SAMPLE_WIDTH:
            raise ValueError(
                f"audio must be mono s16le PCM at a positive rate: got {len(audio.pcm)} bytes "
                f"at {rate} Hz"
            )
        if not audio.pcm:
            log.debug("not caching clip %s: it holds no audio", key[:12])
            return
        data = wav_bytes(bytes(audio.pcm), rate)
        if len(data) > self.max_bytes:
            log.debug(
                "not caching clip %s: %d bytes is more than the whole cache (%d bytes)",
                key[:12], len(data), self.max_bytes,
            )  # fmt: skip
            return
        path = self._path(key)
        with self._lock:
            self._check_open()
            try:
                if self._refresh_if_stored(key, path):
                    return
            except sqlite3.Error as exc:
                raise self._storage_error(exc, key) from exc
        # The slow part (the fsync of the clip) holds no lock: hits go on meanwhile.
        temp = self._clips / durable.temp_name()
        published = False
        try:
            durable.write_new_file(temp, data)
            with self._transaction():
                if self._refresh_if_stored(key, path):
                    return  # another thread stored it meanwhile
                os.rename(temp, path)
                published = True
                durable.fsync_dir(self._clips)
                self._db.execute(
                    "INSERT OR REPLACE INTO clips (key, bytes, sample_rate, crc32, last_used) "
                    f"VALUES (?, ?, ?, ?, {NEXT_USE})",
                    (key, len(data), rate, zlib.crc32(data)),
                )
                self._evict()
        except BaseException as exc:
            if published:  # the row was rolled back: a file without a row is garbage
                with contextlib.suppress(OSError):
                    os.unlink(path)
            if isinstance(exc, OSError | sqlite3.Error):
                raise self._storage_error(exc, key) from exc
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp)

    def __contains__(self, key: object) -> bool:
        """Whether the index lists `key` (a get may still miss if its clip proves damaged)."""
        if not isinstance(key, str) or not KEY.fullmatch(key):
            return False
        with self._lock:
            self._check_open()
            row = self._db.execute("SELECT 1 FROM clips WHERE key = ?", (key,)).fetchone()
        return row is not None

    def __len__(self) -> int:
        return self.entries

    @property
    def entries(self) -> int:
        """Number of clips stored."""
        with self._lock:
            self._check_open()
            return int(self._db.execute("SELECT COUNT(*) FROM clips").fetchone()[0])

    @property
    def total_bytes(self) -> int:
        """Bytes of WAV files stored (the index itself is not counted); never above max_bytes."""
        with self._lock:
            self._check_open()
            return int(self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM clips").fetchone()[0])

    def keys(self) -> list[str]:
        """Keys stored, least recently used first (the next to be evicted)."""
        with self._lock:
            self._check_open()
            rows = self._db.execute("SELECT key FROM clips ORDER BY last_used").fetchall()
        return [row[0] for row in rows]

    def clear(self) -> None:
        """Drop every clip."""
        try:
            with self._transaction():
                self._db.execute("DELETE FROM clips")
                for entry in os.scandir(self._clips):
                    if not entry.name.startswith(durable.TEMP_PREFIX):  # a put in flight owns it
                        durable.remove(Path(entry.path))
            durable.fsync_dir(self._clips)
        except (OSError, sqlite3.Error) as exc:
            raise VoiceCacheError(f"cannot clear the voice cache at {self.root}: {exc}") from exc

    # -- internals ---------------------------------------------------------------

    def _open(self) -> None:
        """Take the cross-process lock, open the index and, if first in, repair."""
        owner = durable.lock_first_opener(self._lock_fd)  # waits while another opener repairs
        db: sqlite3.Connection | None = None
        try:
            try:
                db = _connect(self.root / INDEX_NAME)
            except durable.IndexDamaged as exc:
                if not owner:
                    raise VoiceCacheError(
                        f"the voice cache index {self.root / INDEX_NAME} is damaged ({exc}) and "
                        "another process has the cache open: stop it, then open the cache again"
                    ) from exc
                log.warning(
                    "voice cache index %s is unusable (%s): starting the cache afresh",
                    self.root / INDEX_NAME, exc,
                )  # fmt: skip
                self._start_afresh()
                db = _connect(self.root / INDEX_NAME)
            self._db = db
            if owner:
                self._recover()
        except (OSError, sqlite3.Error, durable.IndexDamaged) as exc:
            if db is not None:
                db.close()
            raise VoiceCacheError(f"cannot open the voice cache at {self.root}: {exc}") from exc
        except BaseException:
            if db is not None:
                db.close()
            raise
        if owner:
            durable.share_lock(self._lock_fd)  # others may open it now

    def _start_afresh(self) -> None:
        for suffix in durable.SQLITE_SUFFIXES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.root / INDEX_NAME}{suffix}")
        for entry in os.scandir(self._clips):
            durable.remove(Path(entry.path))
        durable.fsync_dir(self._clips)
        durable.fsync_dir(self.root)

    def _recover(self) -> None:
        """Bring clips/ and the index back to agreement: only whole, listed clips stay."""
        rows = dict(self._db.execute("SELECT key, bytes FROM clips").fetchall())
        whole: set[str] = set()
        wrong_size: set[str] = set()
        removed = 0
        for entry in os.scandir(self._clips):
            name = entry.name
            key = name.removesuffix(CLIP_SUFFIX) if name.endswith(CLIP_SUFFIX) else ""
            if key in rows and entry.is_file(follow_symlinks=False):
                size = entry.stat(follow_symlinks=False).st_size
                if size == rows[key]:
                    whole.add(key)
                    continue
                wrong_size.add(key)
                log.warning(
                    "voice cache clip %s is %d bytes, its index row says %d: deleted it",
                    entry.path, size, rows[key],
                )  # fmt: skip
            elif name.startswith(durable.TEMP_PREFIX):
                log.info("removed %s: a voice cache put interrupted before it finished", entry.path)
            else:
                log.info("removed %s: not in the voice cache index", entry.path)
            durable.remove(Path(entry.path))
            removed += 1
        if removed:
            durable.fsync_dir(self._clips)
        with self._transaction():
            for key in rows.keys() - whole:
                self._db.execute("DELETE FROM clips WHERE key = ?", (key,))
                if key not in wrong_size:  # those are logged already
                    # An eviction or clear() cut short: files go first, the rows last.
                    log.info("voice cache clip %s was in the index but its file is gone", key[:12])
            self._evict()  # max_bytes may be smaller than last time

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Serialise a read-modify-write across threads (lock) and processes (sqlite)."""
        with self._lock:
            self._check_open()
            with durable.write_transaction(self._db):
                yield

    def _touch(self, key: str) -> None:
        self._db.execute(f"UPDATE clips SET last_used = {NEXT_USE} WHERE key = ?", (key,))

    def _refresh_if_stored(self, key: str, path: Path) -> bool:
        """Mark `key` most recently used if its clip is stored; say whether it was."""
        row = self._db.execute("SELECT 1 FROM clips WHERE key = ?", (key,)).fetchone()
        if row is None or not path.exists():
            return False
        self._touch(key)
        return True

    def _evict(self) -> None:
        """Drop least recently used clips until the total fits (inside a transaction)."""
        total = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM clips").fetchone()[0]
        if total <= self.max_bytes:
            return
        rows = self._db.execute("SELECT key, bytes FROM clips ORDER BY last_used").fetchall()
        for key, size in rows:
            if total <= self.max_bytes:
                break
            self._db.execute("DELETE FROM clips WHERE key = ?", (key,))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(key))
            total -= size
            log.debug("evicted voice cache clip %s (%d bytes)", key[:12], size)

    def _path(self, key: str) -> Path:
        return self._clips / (key + CLIP_SUFFIX)

    def _check_open(self) -> None:
        if self._closed:
            raise VoiceCacheError(f"the voice cache at {self.root} is closed")

    def _storage_error(self, exc: OSError | sqlite3.Error, key: str) -> VoiceCacheError:
        why = f"the disk holding {self.root} is full" if durable.is_disk_full(exc) else str(exc)
        return VoiceCacheError(f"clip {key[:12]} was not cached: {why}")


# -- files ------------------------------------------------------------------------


def _read_clip(path: Path, size: int, sample_rate: int, crc: int) -> Audio:
    """The audio of a clip file, or _DamagedClip if it is not exactly what was stored."""
    # O_NONBLOCK: a FIFO planted under the name must not hang the caller.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    with open(fd, "rb") as file:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _DamagedClip("not a regular file")
        if st.st_size != size:
            raise _DamagedClip(f"{st.st_size} bytes, the index says {size}")
        data = file.read()
    if len(data) != size or zlib.crc32(data) != crc:
        raise _DamagedClip("its content does not match the CRC-32 in the index")
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            params = wav.getparams()
            pcm = wav.readframes(params.nframes)
    except (wave.Error, EOFError) as exc:
        raise _DamagedClip(f"not a readable WAV: {exc}") from exc
    if (params.nchannels, params.sampwidth, params.framerate) != (1, SAMPLE_WIDTH, sample_rate):
        raise _DamagedClip(
            f"{params.nchannels} channel(s), {params.sampwidth * 8} bits at {params.framerate} Hz, "
            f"expected mono 16-bit at {sample_rate} Hz"
        )
    if not pcm or len(pcm) != params.nframes * SAMPLE_WIDTH:
        raise _DamagedClip(f"{len(pcm)} bytes of audio, its header says {params.nframes} frames")
    return Audio(pcm, sample_rate)


def _connect(path: Path) -> sqlite3.Connection:
    """Open the index in WAL mode (synchronous=NORMAL: see the module docstring).

    An index stamped with another SCHEMA_VERSION counts as damaged: the cache starts afresh.
    """
    return durable.open_sqlite(
        path,
        SCHEMA,
        synchronous="NORMAL",
        busy_timeout_s=BUSY_TIMEOUT_S,
        user_version=SCHEMA_VERSION,
    )
