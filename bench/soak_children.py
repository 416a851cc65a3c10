"""The soak's children: the fake cloud and moto, each in a process of its own.

Their recorded requests, threads and sockets would otherwise be counted as the
appliance's growth. Each speaks a line protocol on stdin/stdout: the first line out is
the environment that points the appliance at it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _child_fakecloud() -> None:
    """The fake cloud; reads one JSON command per line ({"faults": ..., "refuse": ...}), answers ok."""
    from heimdall_edge.testing.fakecloud.cloud import FakeCloud
    from heimdall_edge.testing.fakecloud.wire import Fault

    asked = itertools.cycle(["what time is it", "what can you see", "what's the date today"])
    answer = itertools.count()
    cloud = FakeCloud(
        transcript=lambda _record: next(asked),
        reply=lambda _request: f"This is cloud answer {next(answer)}. Anything else?",
    ).start()
    print(json.dumps(cloud.env()), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        cloud.reset()  # forget recorded requests and faults
        if command.get("refuse"):
            cloud.refuse_connections()
        else:
            cloud.accept_connections()
        for route, fault in command.get("faults", {}).items():
            cloud.fault(route, Fault(**fault))
        print("ok", flush=True)
    cloud.stop()


def _child_moto() -> None:
    """moto's S3 and DynamoDB with a bucket and a table; runs until stdin closes."""
    from heimdall_edge.testing.moto import MotoServer, aws_test_env

    os.environ.update(aws_test_env())
    server = MotoServer()
    server.start()
    server.create_bucket("heimdall-soak")
    server.create_table("heimdall-soak")
    print(
        json.dumps(
            {
                **aws_test_env(),
                "HEIMDALL_S3_BUCKET": "heimdall-soak",
                "HEIMDALL_DYNAMODB_TABLE": "heimdall-soak",
                "HEIMDALL_S3_ENDPOINT_URL": server.url,
                "HEIMDALL_DYNAMODB_ENDPOINT_URL": server.url,
            }
        ),
        flush=True,
    )
    sys.stdin.read()
    server.stop()


class Child:
    """`python -m bench.soak_children KIND` with a line protocol on stdin/stdout."""

    def __init__(self, kind: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.soak_children", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError(f"the {kind} child process did not start")
        self.env: dict[str, str] = json.loads(line)

    def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        if self.process.stdout.readline().strip() != "ok":
            raise RuntimeError("the fake cloud child did not acknowledge a command")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


CHILDREN = {"fakecloud": _child_fakecloud, "moto": _child_moto}

if __name__ == "__main__":
    CHILDREN[sys.argv[1]]()
