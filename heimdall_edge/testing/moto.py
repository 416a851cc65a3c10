"""A real moto server (S3, DynamoDB, KMS, IAM...) on 127.0.0.1, for loopback tests.

    from heimdall_edge.testing.moto import MotoServer, use_aws_test_env

    server = MotoServer()
    server.start()                       # a free port, chosen by the OS (bind to port 0)
    use_aws_test_env(monkeypatch)        # dummy credentials; ~/.aws and IMDS ignored
    server.create_bucket("captures-test")
    server.create_table("captures-test")
    ... boto3 with endpoint_url=server.url ...
    server.stop(); server.start()        # down, then back on the SAME port with the SAME data
    server.reset()                       # empty every service (between tests)
    server.stop()

It is moto's own WSGI app (the one `moto.server.ThreadedMotoServer` runs) in a werkzeug
server of ours: ThreadedMotoServer stops only at its next 0.5 s poll, and this one also
closes any connection still open when it stops (moto 5.2 closes them after every
response anyway), so a stopped store really refuses. The server runs in this process,
so moto's state (objects, tables) lives on across stop() and start(): a store that
went down and came back still has its data.

moto does not check credentials unless told to: `enable_auth()` makes it check them
against its IAM (unknown key -> InvalidAccessKeyId / 403, missing permission ->
AccessDenied); `reset()` turns that off again.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any, Self

import boto3
from botocore.config import Config
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import ThreadedWSGIServer

DEFAULT_REGION = "eu-west-1"
ACCESS_KEY = "testing"


AWS_ENV_TO_UNSET = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_DYNAMODB",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)
"""Variables that would change where boto3 finds credentials or endpoints: unset them."""


def aws_test_env(region: str = DEFAULT_REGION) -> dict[str, str]:
    """Environment for boto3 in tests: dummy keys, a region, no shared files, no IMDS.

    Set these and unset AWS_ENV_TO_UNSET (or call `use_aws_test_env(monkeypatch)`).
    """
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": ACCESS_KEY,
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def use_aws_test_env(monkeypatch: Any, region: str = DEFAULT_REGION) -> None:
    """Apply aws_test_env() with a pytest MonkeyPatch (undone after the test)."""
    for name in AWS_ENV_TO_UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in aws_test_env(region).items():
        monkeypatch.setenv(name, value)


def heimdall_store_env(server: MotoServer, bucket: str, table: str | None) -> dict[str, str]:
    """The HEIMDALL_* settings that point the appliance's sync at `server`."""
    env = {
        "HEIMDALL_S3_BUCKET": bucket,
        "HEIMDALL_S3_ENDPOINT_URL": server.url,
        "HEIMDALL_DYNAMODB_ENDPOINT_URL": server.url,
        "HEIMDALL_SYNC__REGION": server.region,
    }
    return env | ({"HEIMDALL_DYNAMODB_TABLE": table} if table else {})


@contextlib.contextmanager
def moto_store(
    monkeypatch: Any, bucket: str, table: str, *, heimdall_env: bool = True
) -> Iterator[MotoServer]:
    """An emptied moto server with `bucket` and `table`, boto3 pointed at it by the test
    environment (and the appliance's sync as well, with `heimdall_env`), for a fixture."""
    use_aws_test_env(monkeypatch)
    with MotoServer() as server:
        server.reset()  # moto's state is per process, not per server
        server.create_bucket(bucket)
        server.create_table(table)
        if heimdall_env:
            for name, value in heimdall_store_env(server, bucket, table).items():
                monkeypatch.setenv(name, value)
        yield server


class _QuietHandler(MotoRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one line per request would drown the test output


class _Server(ThreadedWSGIServer):
    """Remembers its open connections so that stop() can close them."""

    def __init__(self, host: str, port: int, app: Any) -> None:
        self.connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(host, port, app, handler=_QuietHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        request, address = super().get_request()
        with self._connections_lock:
            self.connections.add(request)
        return request, address

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self._connections_lock:
            connections, self.connections = list(self.connections), set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone


class MotoServer:
    """moto on 127.0.0.1; stop() and start() again keep the port and the data."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, region: str = DEFAULT_REGION):
        self.host = host
        self.port = port  # 0: the OS picks a free port at the first start(), then it sticks
        self.region = region
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._session = boto3.session.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=ACCESS_KEY, region_name=region
        )
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("MotoServer.url: call start() first")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        if self._server is not None:
            return
        server = _Server(self.host, self.port, self._app())
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=f"moto-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def _app(self) -> Any:
        """The WSGI app served: moto's own."""
        return DomainDispatcherApplication(create_backend_app)

    def stop(self) -> None:
        """Refuse connections from now on: the listening socket and every open one close."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # serve_forever returns and closes the listening socket
        server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- moto's control API -------------------------------------------------------------------

    def _post(self, path: str, body: bytes = b"") -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + path, data=body, method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    def reset(self) -> None:
        """Forget every bucket, table, key and user; credentials unchecked again."""
        self.disable_auth()
        self._post("/moto-api/reset")

    def enable_auth(self) -> None:
        """From the next request on, moto checks signatures and IAM permissions."""
        self._post("/moto-api/reset-auth", b"0")

    def disable_auth(self) -> None:
        self._post("/moto-api/reset-auth", b"inf")

    # --- fixtures -----------------------------------------------------------------------------

    @property
    def session(self) -> boto3.session.Session:
        """A boto3 session with the dummy credentials (making clients in it is quick)."""
        return self._session

    def client(self, service: str) -> Any:
        """A boto3 client for this server, with the dummy credentials and no retries (cached)."""
        with self._clients_lock:
            if service not in self._clients:
                self._clients[service] = self._session.client(
                    service,
                    endpoint_url=self.url,
                    config=Config(retries={"total_max_attempts": 1}),
                )
            return self._clients[service]

    def create_bucket(self, name: str) -> None:
        options: dict[str, Any] = {}
        if self.region != "us-east-1":
            options["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        self.client("s3").create_bucket(Bucket=name, **options)

    def create_table(self, name: str) -> None:
        """The capture index: device_id (HASH, S), capture_id (RANGE, S), on demand."""
        self.client("dynamodb").create_table(
            TableName=name,
            KeySchema=[
                {"AttributeName": "device_id", "KeyType": "HASH"},
                {"AttributeName": "capture_id", "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[
                {"AttributeName": "device_id", "AttributeType": "S"},
                {"AttributeName": "capture_id", "AttributeType": "S"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )

    def create_kms_key(self) -> str:
        """A symmetric KMS key; returns its id."""
        return self.client("kms").create_key(Description="heimdall test")["KeyMetadata"]["KeyId"]

    def create_user(self, name: str, actions: list[str]) -> tuple[str, str]:
        """An IAM user allowed only `actions` (on every resource); returns (key id, secret)."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
        }
        iam.put_user_policy(UserName=name, PolicyName="only", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]
