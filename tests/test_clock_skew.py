"""A wall clock that jumps (NTP stepping a Pi with no real-time clock) never holds sync back.

The real `heimdall-edge sync` daemon runs under libfaketime an hour ahead; the store
refuses its signatures as AWS does (`chaos_clock.SkewCheckingMotoServer`: S3's
RequestTimeTooSkewed, DynamoDB's "Signature expired"). When the clock is stepped back,
the capture goes up within seconds: a skewed clock is not a bad key, so the store's
breaker does not wait out auth_reset_s (600 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from heimdall_edge.spool.store import Spool
from heimdall_edge.testing.moto import AWS_ENV_TO_UNSET, aws_test_env
from tests.chaos_clock import SkewCheckingMotoServer, faketime_env, write_offset

BUCKET, TABLE = "heimdall-skew", "heimdall-skew-index"


def test_sync_resumes_within_seconds_once_a_skewed_clock_is_stepped_right(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Spool(state / "spool") as spool:
        capture = spool.create(device_id="pi", trigger="button", audio_wav=b"RIFF" * 100, frames=[])
    stamp = tmp_path / "faketime"
    write_offset(stamp, "+1h")  # an hour ahead: NTP has not stepped it yet
    env = {k: v for k, v in os.environ.items() if k not in AWS_ENV_TO_UNSET}
    with SkewCheckingMotoServer() as server:
        server.create_bucket(BUCKET)
        server.create_table(TABLE)
        env |= (
            aws_test_env()
            | faketime_env(stamp)
            | {
                "HEIMDALL_STATE_DIR": str(state),
                "HEIMDALL_DEVICE_ID": "pi",
                "HEIMDALL_S3_BUCKET": BUCKET,
                "HEIMDALL_DYNAMODB_TABLE": TABLE,
                "HEIMDALL_S3_ENDPOINT_URL": server.url,
                "HEIMDALL_DYNAMODB_ENDPOINT_URL": server.url,
                "HEIMDALL_SYNC__REGION": "eu-west-1",
                "HEIMDALL_SYNC__INTERVAL_S": "1",
                "HEIMDALL_SYNC__RETRY_MAX_S": "2",
                "HEIMDALL_RESILIENCE__RESET_S": "5",  # the breaker's usual pause; auth_reset_s stays 600
            }
        )
        daemon = subprocess.Popen(
            [sys.executable, "-m", "heimdall_edge.cli", "sync"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not server.refused and time.monotonic() < deadline:
                time.sleep(0.2)
            assert server.refused, "the store never saw the skewed clock"
            time.sleep(3)  # a few refused passes: the syncer has backed off, its breaker counted
            with Spool(state / "spool") as spool:
                assert spool.get(capture.capture_id).sync_state == "pending"
            write_offset(stamp, "+0")  # NTP steps the clock right
            deadline = time.monotonic() + 20  # the breaker's usual pause (5 s), not auth_reset_s
            synced = False
            while not synced and time.monotonic() < deadline:
                time.sleep(0.5)
                with Spool(state / "spool") as spool:
                    synced = spool.get(capture.capture_id).sync_state == "synced"
        finally:
            daemon.send_signal(signal.SIGTERM)
            _out, err = daemon.communicate(timeout=30)
    assert synced, "not synced 20 s after the clock came back:\n" + err
    assert "the device clock is wrong" in err
    assert "open for 600s" not in err
