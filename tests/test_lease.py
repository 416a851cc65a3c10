"""The lease that says a capture's turn is still being recorded, checked against real processes."""

from __future__ import annotations

import json
import subprocess
import sys

from heimdall_edge.spool import lease

PRINT_LEASE = (
    "import json; from heimdall_edge.spool import lease; print(json.dumps(lease.this_process()))"
)


def test_this_process_holds_its_own_lease() -> None:
    mine = lease.this_process()
    assert mine["boot_id"] == lease.boot_id() != ""
    assert lease.is_held(mine)


def test_a_lease_of_a_process_that_ended_is_not_held() -> None:
    child = subprocess.run(
        [sys.executable, "-c", PRINT_LEASE], capture_output=True, text=True, check=True, timeout=60
    )
    taken = json.loads(child.stdout)
    assert taken["pid"] > 0 and not lease.is_held(taken)


def test_a_running_process_holds_its_lease_until_it_is_killed() -> None:
    child = subprocess.Popen(
        [sys.executable, "-u", "-c", PRINT_LEASE + "; import time; time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        taken = json.loads(child.stdout.readline())
        assert lease.is_held(taken)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert not lease.is_held(taken)


def test_another_boot_or_a_reused_pid_does_not_hold_it() -> None:
    mine = lease.this_process()
    assert not lease.is_held({**mine, "boot_id": "a-boot-before-this-one"})
    assert not lease.is_held({**mine, "start": mine["start"] - 1})  # same pid, another process
    assert not lease.is_held(None)
