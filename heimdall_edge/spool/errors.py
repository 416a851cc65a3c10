"""What can go wrong in the spool, for its callers to tell trouble from damage and absence."""

from __future__ import annotations


class SpoolError(Exception):
    """The spool cannot do what was asked; the message says why and what to do."""


class SpoolUnavailable(SpoolError):
    """A file could not be read just now (EIO on an under-volted Pi, EACCES, EMFILE): trouble,
    not damage. Nothing is quarantined or changed; the capture is tried again later."""


class SpoolFullError(SpoolError):
    """The disk under the spool is full; nothing of the failed write was kept."""


class CaptureNotFoundError(SpoolError, KeyError):
    """No capture with that id in this spool."""

    def __str__(self) -> str:
        # KeyError would print the repr of the message, quotes and all.
        return str(self.args[0]) if self.args else ""


class CaptureChangedError(SpoolError):
    """The capture changed since it was read (a new revision, another sync state): the
    caller decided on an older record and must look again."""
