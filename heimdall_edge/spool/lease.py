"""Who is still recording a capture: a lease naming this boot and this process.

A Raspberry Pi has no real-time clock and NTP steps the wall clock at boot, so
"created more than five minutes ago" says nothing about whether a turn is still
going. A lease does: the capture names the process that holds it open (the boot
id, the pid and the process's start time, which a reused pid does not share),
and the lease is held exactly while that process lives. After a crash, a power
cut or a reboot it is recognised as broken at once, without waiting.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@cache
def boot_id() -> str:
    """This boot's id (Linux); "" where there is none, and then only the pid is compared."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot; None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return 0 if _exists(pid) else None
    # The command name (field 2) may hold spaces and parentheses: count from the last ")".
    return int(stat.rsplit(")", 1)[1].split()[19])


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def this_process() -> dict[str, Any]:
    """A lease held by the calling process, as a capture record stores it."""
    pid = os.getpid()
    return {"boot_id": boot_id(), "pid": pid, "start": _start_ticks(pid) or 0}


def is_held(lease: dict[str, Any] | None) -> bool:
    """Whether the process that took `lease` is still running (in this boot)."""
    if not lease:
        return False
    if lease.get("boot_id") != boot_id():
        return False
    started = _start_ticks(int(lease.get("pid", 0)))
    return started is not None and started == lease.get("start")
