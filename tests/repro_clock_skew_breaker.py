"""Reproduction: a wall clock off by an hour keeps captures from syncing for 10 minutes.

S3 refuses a request signed more than 15 minutes off (RequestTimeTooSkewed; DynamoDB:
InvalidSignatureException "Signature expired"). cloudstore.classify_aws makes that
ErrorKind.AUTH, and CircuitBreaker.record_failure opens the store's breaker at once for
auth_reset_s (600 s: "a bad key does not fix itself"). A clock does fix itself (NTP steps
it within seconds), yet `heimdall-edge sync` (and the service's syncer) then waits out the
600 s before trying again: a capture kept before or after the step waits 10 minutes.

    HEIMDALL_MODELS_DIR=../shared/models .venv/bin/python tests/repro_clock_skew_breaker.py

Prints what the daemon logged and whether the capture was synced 15 s after the clock
came back (it is not; without the +1 h step it is synced within a second or two).
Needs libfaketime (the Debian package faketime).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chaos_clock import SkewCheckingMotoServer, faketime_env, write_offset
from moto_server import AWS_ENV_TO_UNSET, aws_test_env

from heimdall_edge.spool import Spool


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="skew-repro-"))
    server = SkewCheckingMotoServer()
    server.start()
    server.create_bucket("skew-repro")
    server.create_table("skew-repro-index")
    with Spool(work / "state" / "spool") as spool:
        capture = spool.create(device_id="pi", trigger="button", audio_wav=b"RIFF" * 100, frames=[])
    stamp = work / "faketime"
    write_offset(stamp, "+1h")  # the device clock an hour ahead (NTP has not stepped it yet)
    env = {k: v for k, v in os.environ.items() if k not in AWS_ENV_TO_UNSET}
    env |= aws_test_env() | faketime_env(stamp)
    env |= {
        "HEIMDALL_STATE_DIR": str(work / "state"),
        "HEIMDALL_DEVICE_ID": "pi",
        "HEIMDALL_S3_BUCKET": "skew-repro",
        "HEIMDALL_DYNAMODB_TABLE": "skew-repro-index",
        "HEIMDALL_S3_ENDPOINT_URL": server.url,
        "HEIMDALL_DYNAMODB_ENDPOINT_URL": server.url,
        "HEIMDALL_SYNC__REGION": "eu-west-1",
        "HEIMDALL_SYNC__INTERVAL_S": "1",
        "HEIMDALL_SYNC__RETRY_MAX_S": "2",
    }
    daemon = subprocess.Popen(
        [sys.executable, "-m", "heimdall_edge.cli", "sync"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(4)
    write_offset(stamp, "+0")  # NTP steps the clock right
    back = time.monotonic()
    time.sleep(15)
    with Spool(work / "state" / "spool") as spool:
        state = spool.get(capture.capture_id).sync_state
    daemon.send_signal(signal.SIGTERM)
    _out, err = daemon.communicate(timeout=30)
    server.stop()
    print(err)
    print(f"store refusals for the clock: {dict(server.refused)}")
    print(
        f"capture {capture.capture_id}: {state} {time.monotonic() - back:.0f} s after the "
        "clock came back (expected: synced)"
    )


if __name__ == "__main__":
    main()
