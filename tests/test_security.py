"""Secrets stay secret, files stay private, TLS stays on.

* Canary keys (OpenAI, ElevenLabs, AWS) go through every command with debug logging,
  against a fake cloud that refuses them (401/403) and one that accepts them; they
  must show up in no output, no file under the state dir, no S3 object and no
  DynamoDB item.
* Every file the appliance writes is 0600 and every folder 0700, whatever the umask,
  the SQLite -wal/-shm files included.
* Nothing in the package turns TLS verification off, and the clients it builds
  (boto3, OpenAI, ElevenLabs) verify certificates and host names.

The systemd unit's exposure and the IAM policy have their own tests
(test_systemd_unit.py, test_iam_policy.py).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from heimdall_edge.app import builders
from heimdall_edge.settings import load_settings
from heimdall_edge.sync.cloudstore import CaptureStore
from heimdall_edge.sync.store_config import StoreConfig
from heimdall_edge.testing.fakecloud.cloud import FakeCloud
from heimdall_edge.testing.moto import DEFAULT_REGION, MotoServer, moto_store, use_aws_test_env

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "heimdall_edge"
BUCKET, TABLE = "heimdall-canary", "heimdall-canary-captures"


def run(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "heimdall_edge.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


# =============================================================================================
# Canary secrets
# =============================================================================================


class Canaries:
    """One fresh, unmistakable value per secret, and the random core that any masking would cut."""

    def __init__(self) -> None:
        self.cores = {name: secrets.token_hex(16) for name in ("openai", "elevenlabs", "aws")}
        self.openai = f"sk-proj-CANARY{self.cores['openai']}T3BlbkFJ"
        self.elevenlabs = f"sk_canary{self.cores['elevenlabs']}"
        self.aws = f"CANARY{self.cores['aws']}/aws+Secret"

    def needles(self) -> list[bytes]:
        values = [self.openai, self.elevenlabs, self.aws, *self.cores.values()]
        return [value.encode() for value in values]

    def find_in(self, data: bytes) -> list[str]:
        return [needle.decode() for needle in self.needles() if needle in data]


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    with moto_store(monkeypatch, BUCKET, TABLE, heimdall_env=False) as server:
        yield server
        server.reset()


def everything_stored(server: MotoServer) -> list[tuple[str, bytes]]:
    """Every S3 object (body and metadata) and DynamoDB item, as bytes to search."""
    server.disable_auth()
    s3, found = server.client("s3"), []
    for listed in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        got = s3.get_object(Bucket=BUCKET, Key=listed["Key"])
        found.append((f"s3 {listed['Key']}", got["Body"].read()))
        found.append((f"s3 metadata {listed['Key']}", json.dumps(got["Metadata"]).encode()))
    for item in server.client("dynamodb").scan(TableName=TABLE)["Items"]:
        found.append((f"dynamodb {item['capture_id']['S']}", json.dumps(item).encode()))
    return found


def files_under(folder: Path) -> Iterator[Path]:
    for root, _dirs, names in os.walk(folder):
        for name in names:
            yield Path(root) / name


@pytest.mark.parametrize(
    "cloud_takes_the_keys", [False, True], ids=["keys-refused", "keys-accepted"]
)
def test_canary_keys_never_leave_the_places_they_belong(
    tmp_path: Path, speech_dir: Path, store: MotoServer, cloud_takes_the_keys: bool
) -> None:
    canary = Canaries()
    keys = {"openai_key": canary.openai, "elevenlabs_key": canary.elevenlabs}
    state = Path(os.environ["HEIMDALL_STATE_DIR"])
    with FakeCloud(**(keys if cloud_takes_the_keys else {})) as cloud:
        env = {
            **os.environ,
            **cloud.env(),
            "OPENAI_API_KEY": canary.openai,
            "ELEVENLABS_API_KEY": canary.elevenlabs,
            "AWS_SECRET_ACCESS_KEY": canary.aws,
            "HEIMDALL_S3_BUCKET": BUCKET,
            "HEIMDALL_DYNAMODB_TABLE": TABLE,
            "HEIMDALL_S3_ENDPOINT_URL": store.url,
            "HEIMDALL_DYNAMODB_ENDPOINT_URL": store.url,
            "HEIMDALL_SYNC__REGION": DEFAULT_REGION,
        }
        if not cloud_takes_the_keys:
            store.enable_auth()  # moto now checks signatures: 403 for these credentials
        clip = str(speech_dir / "v2j_what_time_is_it.wav")
        runs = {
            "demo": run("-v", "demo", "--input", clip, "--json", env=env),
            "say": run("-v", "say", "The door is locked.", "-o", str(tmp_path / "say.wav"), "--json", env=env),
            "transcribe": run("-v", "transcribe", str(speech_dir / "ps_goforward.wav"), "--json", env=env),
            "doctor": run("-v", "doctor", env=env),
            "captures": run("-v", "captures", "--json", env=env),
            "sync": run("-v", "sync", "--once", "--json", env=env),
        }  # fmt: skip
        # Refused, a 401 opens the service's breaker at once: OpenAI's chat is then never tried.
        assert cloud.count("transcriptions") and cloud.count("tts")
        assert bool(cloud.count("chat")) == cloud_takes_the_keys
        sent_right = [
            r.auth_ok for route in ("transcriptions", "chat", "tts") for r in cloud.requests[route]
        ]
    for name in ("demo", "say", "transcribe", "captures"):
        assert runs[name].returncode == 0, (name, runs[name].stderr[-3000:])
    demo = json.loads(runs["demo"].stdout)
    if cloud_takes_the_keys:  # the keys were really used, and they worked
        assert all(sent_right)
        assert demo["engines"] == {"stt": "openai", "reply": "openai", "tts": "elevenlabs"}
        assert json.loads(runs["say"].stdout)["engine"] == "elevenlabs"
        assert json.loads(runs["transcribe"].stdout)["engine"] == "openai"
        assert runs["sync"].returncode == 0, runs["sync"].stderr[-3000:]
        assert json.loads(runs["sync"].stdout)["synced"] == 1
    else:  # the keys were really sent, refused, and the turn answered locally
        assert not any(sent_right)
        assert demo["engines"] == {"stt": "faster-whisper", "reply": "offline", "tts": "piper"}
        assert runs["sync"].returncode == 1 and json.loads(runs["sync"].stdout)["error"]
    assert "DEBUG" in runs["demo"].stderr  # -v really turned on debug logging

    leaks = []
    for name, done in runs.items():
        for stream in ("stdout", "stderr"):
            if found := canary.find_in(getattr(done, stream).encode()):
                leaks.append(f"{name} {stream}: {found}")
    searched = list(files_under(state))
    assert any(p.name == "capture.json" for p in searched) and any(
        p.suffix == ".wav" for p in searched
    )
    assert (state / "status.json").is_file()
    for path in searched:
        if found := canary.find_in(path.read_bytes()):
            leaks.append(f"{path}: {found}")
    stored = everything_stored(store)
    assert bool(stored) == cloud_takes_the_keys
    for where, data in stored:
        if found := canary.find_in(data):
            leaks.append(f"{where}: {found}")
    assert not leaks, "\n".join(leaks)


# =============================================================================================
# File modes
# =============================================================================================


def umask_zero(*args: str) -> list[str]:
    """The command under umask 000: any mode it gets right, it sets itself."""
    return [
        "sh",
        "-c",
        'umask 000 && exec "$@"',
        "sh",
        sys.executable,
        "-m",
        "heimdall_edge.cli",
        *args,
    ]


def modes(state: Path) -> tuple[dict[Path, int], dict[Path, int]]:
    files, folders = {}, {state: stat.S_IMODE(state.stat().st_mode)}
    for root, dirs, names in os.walk(state):
        for name in dirs:
            with_path = Path(root) / name
            folders[with_path] = stat.S_IMODE(with_path.lstat().st_mode)
        for name in names:
            path = Path(root) / name
            try:
                files[path] = stat.S_IMODE(path.lstat().st_mode)
            except FileNotFoundError:
                continue  # a temp file renamed away while we looked
    return files, folders


def assert_private(state: Path, files: dict[Path, int], folders: dict[Path, int]) -> None:
    loose = {str(p.relative_to(state.parent)): oct(m) for p, m in files.items() if m != 0o600}
    loose |= {
        str(p.relative_to(state.parent)) + "/": oct(m) for p, m in folders.items() if m != 0o700
    }
    assert not loose, loose


def test_every_file_is_0600_and_every_folder_0700_whatever_the_umask(
    tmp_path: Path, speech_dir: Path
) -> None:
    state = Path(os.environ["HEIMDALL_STATE_DIR"])
    env = dict(os.environ, HEIMDALL_LISTENING__MODE="voice", HEIMDALL_LISTENING__WAKE_WORD="")
    clip = str(speech_dir / "v2j_what_time_is_it.wav")
    for args in (
        ["demo", "--input", clip, "--json"],
        ["say", "The door is locked.", "-o", str(tmp_path / "say.wav"), "--json"],
    ):
        done = subprocess.run(
            umask_zero(*args), env=env, capture_output=True, text=True, timeout=180, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
    files, folders = modes(state)
    assert any(p.name == "audio.wav" for p in files) and any(
        p.parent.name == "clips" for p in files
    )
    assert_private(state, files, folders)

    # The service holds its SQLite indexes open: look while it runs, -wal and -shm included.
    service = subprocess.Popen(
        umask_zero("run", "--simulate", "--input", clip),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            status = state / "status.json"
            try:
                pending = json.loads(status.read_text())["captures"]["pending"]
            except (FileNotFoundError, ValueError, KeyError):
                pending = 0
            if pending >= 2:  # the demo's capture and the service's own
                break
            assert service.poll() is None, service.stderr.read() if service.stderr else ""
            assert time.monotonic() < deadline, "the service kept no capture"
            time.sleep(0.1)
        files, folders = modes(state)
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            _, stderr = service.communicate(timeout=30)
        finally:
            if service.poll() is None:
                service.kill()
    assert service.returncode == 0, stderr[-3000:]
    names = {p.name for p in files}
    assert {"index.sqlite3-wal", "index.sqlite3-shm"} <= names, sorted(names)
    wal = [p for p in files if p.name.endswith(("-wal", "-shm"))]
    assert {p.parent.name for p in wal} >= {"spool", "voice-cache"}, wal
    assert_private(state, files, folders)
    assert_private(state, *modes(state))  # and after it stopped


# =============================================================================================
# TLS verification stays on
# =============================================================================================

TLS_OFF = re.compile(
    r"verify\s*=\s*False|verify_ssl|CERT_NONE|check_hostname\s*=\s*False|PYTHONHTTPSVERIFY"
    r"|insecure|_create_unverified_context|disable_warnings",
    re.IGNORECASE,
)
NO_TLS_AT_ALL = {"fakecloud.py"}  # test tooling: plain HTTP on loopback, no TLS to turn off


def test_no_code_in_the_package_turns_tls_verification_off() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 20 and PACKAGE / "sync" / "cloudstore.py" in sources
    hits = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sources
        if path.name not in NO_TLS_AT_ALL
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if TLS_OFF.search(line)
    ]
    assert not hits, "\n".join(hits)


def ssl_contexts(root: Any, depth: int = 8) -> list[ssl.SSLContext]:
    """Every SSLContext reachable from `root` through object attributes (the SDKs' transports)."""
    found: list[ssl.SSLContext] = []
    seen: set[int] = set()
    layer = [root]
    for _ in range(depth):
        following = []
        for obj in layer:
            if id(obj) in seen or isinstance(obj, str | bytes | int | float | bool | type(None)):
                continue
            seen.add(id(obj))
            if isinstance(obj, ssl.SSLContext):
                found.append(obj)
                continue
            children: list[Any] = []
            if isinstance(obj, dict):
                children = list(obj.values())
            elif isinstance(obj, list | tuple | set):
                children = list(obj)
            elif hasattr(obj, "__dict__"):
                children = list(vars(obj).values())
            following.extend(children)
        layer = following
    return found


def test_cloud_clients_verify_certificates_and_host_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ELEVENLABS_API_KEY", "el-test")
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "AWS_CA_BUNDLE", "PYTHONHTTPSVERIFY"):
        monkeypatch.delenv(name, raising=False)
    engines = builders.build_engines(load_settings(), voice_cache=False)
    clients = {
        "openai": engines.cloud_stt.engine._client,
        "openai (reply)": engines.cloud_reply.engine._client,
        "elevenlabs": engines.cloud_tts.engine._client,
    }
    for name, client in clients.items():
        contexts = ssl_contexts(client)
        assert contexts, f"no TLS context found in the {name} client"
        for context in contexts:
            assert context.verify_mode == ssl.CERT_REQUIRED, name
            assert context.check_hostname, name


@pytest.mark.parametrize("endpoint", [None, "https://s3.example.internal:9000"])
def test_capture_store_clients_verify_certificates(
    monkeypatch: pytest.MonkeyPatch, endpoint: str | None
) -> None:
    use_aws_test_env(monkeypatch)
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    monkeypatch.setenv("HEIMDALL_S3_BUCKET", "b")
    monkeypatch.setenv("HEIMDALL_DYNAMODB_TABLE", "t")
    if endpoint:
        monkeypatch.setenv("HEIMDALL_S3_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("HEIMDALL_DYNAMODB_ENDPOINT_URL", endpoint)
    config = StoreConfig.from_settings(load_settings())
    assert config is not None
    store = CaptureStore(config)
    for client in (store._s3, store._ddb):
        verify = client._endpoint.http_session._verify
        assert verify is True or (isinstance(verify, str) and Path(verify).is_file()), verify
        assert client.meta.endpoint_url.startswith("https://") or endpoint is None
