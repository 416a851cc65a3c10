"""Crash-safe files and SQLite indexes, shared by the stores under the state directory.

The spool (captures), the voice cache and the appliance's status file must each come
through a crash or a power cut whole: a file is either all there or not there at all,
a rename or a create counts only once its folder is fsynced, and an SQLite index
that a crash damaged is noticed on opening, never trusted. What they keep is the
user's voice, so nothing here is readable by other users, whatever the umask.

Everything blocks (fsync is slow on an SD card): call it through `asyncio.to_thread`
from the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

DIR_MODE = 0o700
"""Folders: only this user may list or enter them (captures and clips are private speech)."""
FILE_MODE = 0o600
"""Files: only this user may read or write them."""
TEMP_PREFIX = ".tmp-"
"""Names of files still being written; any left when a store is opened are crash debris."""

SQLITE_SUFFIXES = ("", "-wal", "-shm")
"""An SQLite database is these files (name + suffix): move, delete or chmod them together."""
WAL_SIZE_LIMIT = 512 * 1024
"""About the most an index's write-ahead log holds: checkpointed then, and cut back to it."""


class IndexDamaged(Exception):
    """An SQLite index is unreadable (corrupt, not a database, or from another version).

    The store that owns it decides what to do: the spool rebuilds it from its capture
    folders, the voice cache starts afresh.
    """


def temp_name() -> str:
    """A fresh name for a file in flight: hidden, unguessable, recognisable by TEMP_PREFIX."""
    return TEMP_PREFIX + os.urandom(6).hex()


def make_private_dir(path: Path, exist_ok: bool = True) -> None:
    """Create a folder with DIR_MODE (also when it exists: fix its mode).

    The chmod is needed because mkdir's mode is filtered by the umask. Not durable by
    itself: fsync the parent (`fsync_dir`) when the folder must survive a power cut.
    """
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        if not exist_ok:
            raise
    os.chmod(path, DIR_MODE)


def open_private_file(path: Path) -> int:
    """Open (creating it if needed) a file read-write with FILE_MODE; return the descriptor.

    For lock files and for an SQLite database about to be created: sqlite gives its
    -wal and -shm files the mode of the database.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_new_file(path: Path, data: bytes) -> None:
    """Create a file holding exactly `data`, on the disk (not just in the page cache) on return.

    Fails with FileExistsError rather than overwrite anything (O_EXCL): files are
    written once, under a new name. The name itself is durable only after
    `fsync_dir` of the folder. On failure a partial file may remain: write under
    `temp_name()` and remove it, as `replace_file` does.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Set a file's content in one rename, durably: readers see the old or the new, never half.

    The new content is written to a temp file in the same folder (a rename does not
    cross file systems), fsynced, renamed over `path`, and the folder is fsynced. On
    failure the temp file is removed and `path` keeps its old content.
    """
    path = Path(path)
    temp = path.parent / temp_name()
    try:
        write_new_file(temp, data)
        os.replace(temp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a create, a rename, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a file or a whole folder; a symlink is removed, never followed; gone is fine."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def folder_bytes(folder: Path) -> int:
    """Bytes in the files under `folder`, subfolders included, for quotas and reports.

    Symlinks are not followed; a file or folder deleted while counting (an eviction, a
    sync) counts nothing. A missing `folder` raises FileNotFoundError.
    """
    total = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                if entry.is_dir(follow_symlinks=False):
                    total += folder_bytes(Path(entry.path))
                else:
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def is_disk_full(exc: BaseException) -> bool:
    """Whether a storage error means the disk (or the user's quota) is full."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    # SQLITE_IOERR_SHMSIZE: the WAL index (-shm) could not grow, "may indicate that the
    # underlying filesystem volume is out of space" (sqlite.org/rescode.html); on tmpfs it is.
    return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) in (
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_IOERR_SHMSIZE,
    )


def lock_first_opener(fd: int) -> bool:
    """Take a store's cross-process lock; True if this process is the first to open the store.

    The first opener holds the lock exclusively, so it may repair what a crash left
    behind while no one else uses the store; it then calls `share_lock`. Any later
    opener waits here until that repair is done, then shares the lock and must not
    repair: it would break the writes of the processes already in.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits while the owner is repairing
        return False
    return True


def share_lock(fd: int) -> None:
    """Let other processes open the store: the first opener's repair is done."""
    fcntl.flock(fd, fcntl.LOCK_SH)


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """Run the block as one SQLite transaction: all of it is committed, or none of it.

    BEGIN IMMEDIATE takes the database's write lock up front, so a read-modify-write
    cannot be overtaken by another process between its read and its write. Any
    exception rolls back and propagates. `db` must be in autocommit mode (as
    `open_sqlite` opens it); threads sharing it must hold the caller's lock.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def open_sqlite(
    path: Path,
    schema: str,
    *,
    synchronous: Literal["FULL", "NORMAL"],
    busy_timeout_s: float,
    user_version: int | None = None,
) -> sqlite3.Connection:
    """Open (creating it if needed) an SQLite index in WAL mode, checked and with `schema`.

    `synchronous`: FULL makes every commit survive a power cut; NORMAL (safe with WAL,
    it never corrupts the database) may lose the last commits, and saves an fsync per
    commit. `user_version`, when given, is stamped on the database, and a database
    stamped with another (non-zero) version is refused. The connection is in
    autocommit mode (transactions are explicit) and may be shared by threads under
    the caller's lock.

    Raises IndexDamaged when the database is corrupt, is not a database, fails
    quick_check or has another user_version; other errors (sqlite3.Error, OSError)
    pass through.
    """
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
    if not path.exists():
        os.close(open_private_file(path))  # sqlite gives -wal and -shm the mode of the database
    db = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s
    )
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"journal mode is {mode}, WAL is needed")
        db.execute(f"PRAGMA synchronous={synchronous}")
        # By default the WAL grows to 1000 pages (about 4 MB) and stays that size: for an
        # index of a few hundred KB, on an SD card and under the spool's quota, too much.
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_SIZE_LIMIT // 4096}")  # 4 KiB pages
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        if user_version is not None:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, user_version):
                raise IndexDamaged(f"schema version {version}, this program reads {user_version}")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise IndexDamaged(f"quick_check: {check}")
        db.executescript(schema)
        if user_version is not None:
            db.execute(f"PRAGMA user_version = {int(user_version)}")
    except sqlite3.DatabaseError as exc:
        db.close()
        if getattr(exc, "sqlite_errorcode", None) in (
            sqlite3.SQLITE_CORRUPT,
            sqlite3.SQLITE_NOTADB,
        ):
            raise IndexDamaged(str(exc)) from exc
        raise
    except BaseException:
        db.close()
        raise
    for suffix in SQLITE_SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", FILE_MODE)
    return db


def free_name(folder: Path, name: str) -> Path:
    """A path in `folder` named `name`, suffixed .1, .2... if that is taken."""
    target, n = folder / name, 0
    while target.exists():
        n += 1
        target = folder / f"{name}.{n}"
    return target
