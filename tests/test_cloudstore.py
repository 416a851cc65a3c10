"""CaptureStore against a real moto server on 127.0.0.1: S3 objects, DynamoDB index, failures.

What moto 5.2 checks and what it does not (so what these tests can and cannot prove):
it enforces If-None-Match on PutObject and CompleteMultipartUpload (412), the 5 MiB
minimum part, missing buckets and tables, and (only after `enable_auth()`) credentials
and IAM permissions. It does NOT verify x-amz-checksum-sha256 (a wrong one is stored as
given), nor part checksums, nor that a KMS key id exists. Hence the store also hashes
every file locally, and the wire tests below check the checksum headers we send.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from boto3.dynamodb.types import TypeDeserializer
from botocore.config import Config
from botocore.parsers import ResponseParserError

from heimdall_edge.cloud.errors import CloudError, ErrorKind
from heimdall_edge.settings import Settings, SettingsError
from heimdall_edge.spool.record import CaptureRecord
from heimdall_edge.sync.cloudstore import READ_BLOCK, CaptureStore, PutResult
from heimdall_edge.sync.index_item import index_item
from heimdall_edge.sync.store_config import StoreConfig
from heimdall_edge.sync.store_errors import StoreError, classify_aws
from heimdall_edge.testing.moto import MotoServer, use_aws_test_env

BUCKET = "heimdall-test"
TABLE = "heimdall-index"
MiB = 1024**2
DEVICE = "pi-kitchen"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def aws(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """A clean moto with the bucket and the table, and dummy credentials in the environment."""
    moto.start()  # a test that stopped it and failed must not take the others down
    moto.reset()
    use_aws_test_env(monkeypatch, moto.region)
    moto.create_bucket(BUCKET)
    moto.create_table(TABLE)
    return moto


def make_config(aws: MotoServer, **changes: Any) -> StoreConfig:
    options: dict[str, Any] = {
        "bucket": BUCKET,
        "prefix": "captures",
        "table": TABLE,
        "region": aws.region,
        "s3_endpoint_url": aws.url,
        "dynamodb_endpoint_url": aws.url,
        "multipart_threshold_bytes": 5 * MiB,
        "part_size_bytes": 5 * MiB,
    }
    options.update(changes)
    return StoreConfig(**options)


_SHARED: Any = object()


def make_store(aws: MotoServer, session: Any = _SHARED, **changes: Any) -> CaptureStore:
    """A store on moto; session=None: the standard credential chain (the environment)."""
    if session is _SHARED:
        session = aws.session  # quick: the service models are loaded once
    clock = changes.pop("clock", time.time)
    return CaptureStore(
        make_config(aws, **changes),
        session=session,
        connect_timeout_s=1,
        read_timeout_s=10,
        clock=clock,
    )


@pytest.fixture
def store(aws: MotoServer) -> CaptureStore:
    return make_store(aws)


def make_record(**changes: Any) -> CaptureRecord:
    options: dict[str, Any] = {
        "capture_id": "20261127T233000123Z-0a1b2c3d",
        "device_id": DEVICE,
        # 00:30 in UTC+1 is still the 27th in UTC: the key's date must say so.
        "created_at": datetime(2026, 11, 28, 0, 30, tzinfo=timezone(timedelta(hours=1))),
        "trigger": "button",
        "files": {"audio.wav": {"bytes": 4, "sha256": "0" * 64}},
    }
    options.update(changes)
    return CaptureRecord(**options)


def write(tmp_path: Path, name: str, data: bytes) -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def meta() -> dict[str, str]:
    return {"capture-id": "20261127T233000123Z-0a1b2c3d", "device-id": DEVICE}


class Wire:
    """Every request the store's S3 client sends: (operation, headers)."""

    def __init__(self, store: CaptureStore) -> None:
        self.sent: list[tuple[str, dict[str, str]]] = []
        store._s3.meta.events.register("before-send.s3", self._record)

    def _record(self, request: Any, **kwargs: Any) -> None:
        operation = kwargs["event_name"].rsplit(".", 1)[-1]  # before-send.s3.PutObject
        headers = {
            k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()
        }
        self.sent.append((operation, headers))

    def ops(self) -> list[str]:
        return [operation for operation, _ in self.sent]

    def headers(self, operation: str) -> list[dict[str, str]]:
        return [headers for op, headers in self.sent if op == operation]


def s3(aws: MotoServer) -> Any:
    return aws.client("s3")


def uploads(aws: MotoServer) -> list[dict[str, Any]]:
    return s3(aws).list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])


# --- keys and configuration ---------------------------------------------------------------------


def test_object_keys_are_deterministic_and_dated_in_utc(store: CaptureStore) -> None:
    record = make_record()
    key = store.object_key(record, "audio.wav")
    assert key == f"captures/{DEVICE}/2026/11/27/20261127T233000123Z-0a1b2c3d/audio.wav"
    assert store.object_key(make_record(), "audio.wav") == key
    assert store.object_key(record, "frame-000.jpg") == key.replace("audio.wav", "frame-000.jpg")


@pytest.mark.parametrize(("prefix", "start"), [("", f"{DEVICE}/"), ("/a/b/", f"a/b/{DEVICE}/")])
def test_prefix_without_stray_slashes(aws: MotoServer, prefix: str, start: str) -> None:
    store = make_store(aws, prefix=prefix)
    assert store.object_key(make_record(), "audio.wav").startswith(start)


def test_config_from_settings() -> None:
    assert StoreConfig.from_settings(Settings()) is None  # no bucket: sync off
    settings = Settings(
        s3_bucket="b-1",
        s3_prefix="caps/",
        dynamodb_table="idx",
        s3_endpoint_url="http://127.0.0.1:9000",
        sync={"region": "eu-north-1", "sse": "aws:kms", "kms_key_id": "k-1"},
    )
    config = StoreConfig.from_settings(settings)
    assert config == StoreConfig(
        bucket="b-1",
        prefix="caps",
        table="idx",
        region="eu-north-1",
        s3_endpoint_url="http://127.0.0.1:9000",
        sse="aws:kms",
        kms_key_id="k-1",
        multipart_threshold_bytes=16 * MiB,
    )
    with pytest.raises(SettingsError, match="sync.kms_key_id"):
        StoreConfig.from_settings(Settings(s3_bucket="b-1", sync={"kms_key_id": "k-1"}))
    with pytest.raises(ValueError, match="part_size_bytes"):
        StoreConfig(bucket="b", prefix="", table=None, region="r", part_size_bytes=MiB)


@pytest.mark.parametrize(
    ("setting", "environment", "profile", "expected"),
    [
        (None, {"AWS_REGION": "eu-north-1", "AWS_DEFAULT_REGION": "us-east-2"}, None, "eu-north-1"),
        (None, {"AWS_DEFAULT_REGION": "us-east-2"}, None, "us-east-2"),
        (None, {}, "ap-southeast-2", "ap-southeast-2"),
        ("ca-central-1", {"AWS_REGION": "eu-north-1"}, None, "ca-central-1"),
    ],
)
def test_the_region_comes_from_the_standard_chain_unless_set(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    setting: str | None,
    environment: dict[str, str],
    profile: str | None,
    expected: str,
) -> None:
    use_aws_test_env(monkeypatch)
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    if profile is not None:
        (tmp_path / "config").write_text(f"[default]\nregion = {profile}\n")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    sync = {} if setting is None else {"region": setting}
    config = StoreConfig.from_settings(Settings(s3_bucket="b-1", sync=sync))
    assert config is not None and config.region == expected


def test_no_region_anywhere_or_a_made_up_one_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_aws_test_env(monkeypatch)
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(SettingsError, match=r"no AWS region .*sync\.region .*AWS_REGION"):
        StoreConfig.from_settings(Settings(s3_bucket="b-1"))
    monkeypatch.setenv("AWS_REGION", "mars-north-1")
    with pytest.raises(SettingsError, match=r"'mars-north-1' .*not an AWS region"):
        StoreConfig.from_settings(Settings(s3_bucket="b-1"))
    with pytest.raises(ValueError, match=r"'eu-west' is not an AWS region"):
        Settings(s3_bucket="b-1", sync={"region": "eu-west"})
    assert Settings(sync={"region": "cn-north-1"}).sync.region == "cn-north-1"


def test_one_attempt_per_call_and_botocores_max_attempts_trap(aws: MotoServer) -> None:
    """total_max_attempts=1 is one request; botocore's retries={"max_attempts": 1} is two."""
    store = make_store(aws)
    aws.stop()
    wire = Wire(store)
    with pytest.raises(StoreError):
        store.check(DEVICE)
    assert wire.ops() == ["ListObjectsV2"]

    naive = boto3.session.Session().client(
        "s3", endpoint_url=aws.url, config=Config(retries={"max_attempts": 1, "mode": "standard"})
    )
    attempts: list[str] = []
    naive.meta.events.register("before-send.s3", lambda **kw: attempts.append("sent"))
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        naive.head_bucket(Bucket=BUCKET)
    assert len(attempts) == 2  # the trap the store avoids


def test_tls_verification_is_left_on(store: CaptureStore) -> None:
    for client in (store._s3, store._ddb):
        verify = getattr(getattr(client._endpoint, "http_session", None), "_verify", True)
        assert verify is not False


# --- objects ------------------------------------------------------------------------------------


def test_put_file_writes_an_encrypted_checksummed_object(
    aws: MotoServer, store: CaptureStore, tmp_path: Path
) -> None:
    data = os.urandom(10_000)
    path, sha = write(tmp_path, "audio.wav", data)
    key = store.object_key(make_record(), "audio.wav")
    wire = Wire(store)

    assert store.put_file(key, path, sha256_hex=sha, metadata=meta()) is PutResult.WRITTEN

    [sent] = wire.headers("PutObject")
    assert sent["x-amz-checksum-sha256"] == b64sha(data)  # S3 recomputes and compares it
    assert sent["if-none-match"] == "*"
    head = s3(aws).head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
    assert head["ServerSideEncryption"] == "AES256"
    assert head["ChecksumSHA256"] == b64sha(data)
    assert head["Metadata"] == {
        "capture-id": meta()["capture-id"],
        "device-id": DEVICE,
        "sha256": sha,
    }
    assert head["ContentType"].startswith("audio/")
    assert s3(aws).get_object(Bucket=BUCKET, Key=key)["Body"].read() == data
    assert store.object_exists(key)
    assert not store.object_exists(key + ".missing")


def test_sse_kms_with_a_key_id_on_every_object(aws: MotoServer, tmp_path: Path) -> None:
    key_id = aws.create_kms_key()
    store = make_store(aws, sse="aws:kms", kms_key_id=key_id)
    small, small_sha = write(tmp_path, "audio.wav", b"riff")
    large_data = os.urandom(6 * MiB)
    large, large_sha = write(tmp_path, "frame.jpg", large_data)
    record = make_record()
    for name, path, sha in (("audio.wav", small, small_sha), ("frame.jpg", large, large_sha)):
        key = store.object_key(record, name)
        assert store.put_file(key, path, sha256_hex=sha, metadata=meta()) is PutResult.WRITTEN
        head = s3(aws).head_object(Bucket=BUCKET, Key=key)
        assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", key_id)


def test_a_second_put_is_already_there_and_changes_nothing(
    aws: MotoServer, store: CaptureStore, tmp_path: Path
) -> None:
    path, sha = write(tmp_path, "audio.wav", b"the same bytes")
    key = store.object_key(make_record(), "audio.wav")
    assert store.put_file(key, path, sha256_hex=sha, metadata=meta()) is PutResult.WRITTEN
    before = s3(aws).head_object(Bucket=BUCKET, Key=key)

    assert store.put_file(key, path, sha256_hex=sha, metadata=meta()) is PutResult.ALREADY_THERE

    after = s3(aws).head_object(Bucket=BUCKET, Key=key)
    assert (after["ETag"], after["LastModified"]) == (before["ETag"], before["LastModified"])
    listed = s3(aws).list_object_versions(Bucket=BUCKET).get("Versions", [])
    assert [v["Key"] for v in listed] == [key]


def test_a_different_file_at_the_same_key_is_refused_not_overwritten(
    aws: MotoServer, store: CaptureStore, tmp_path: Path
) -> None:
    key = store.object_key(make_record(), "audio.wav")
    first, first_sha = write(tmp_path, "a.wav", b"first")
    other, other_sha = write(tmp_path, "b.wav", b"other")
    store.put_file(key, first, sha256_hex=first_sha, metadata=meta())

    with pytest.raises(StoreError) as caught:
        store.put_file(key, other, sha256_hex=other_sha, metadata=meta())

    assert caught.value.kind is ErrorKind.CLIENT and caught.value.service == "s3"
    assert f"a different object already exists at key {key}" in str(caught.value)
    assert "not overwritten" in str(caught.value)
    assert s3(aws).get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"first"


def test_a_damaged_spool_copy_is_refused_and_nothing_is_stored(
    aws: MotoServer, store: CaptureStore, tmp_path: Path
) -> None:
    """moto stores a wrong x-amz-checksum-sha256 as given, so the store hashes locally too."""
    recorded = hashlib.sha256(b"what the spool wrote").hexdigest()
    path, _ = write(tmp_path, "audio.wav", b"what the SD card returns")
    big, _ = write(tmp_path, "big.jpg", os.urandom(6 * MiB))
    for name, file in (("audio.wav", path), ("big.jpg", big)):
        key = store.object_key(make_record(), name)
        with pytest.raises(StoreError) as caught:
            store.put_file(key, file, sha256_hex=recorded, metadata=meta())
        assert caught.value.kind is ErrorKind.CLIENT
        assert "does not match the SHA-256 the spool recorded" in str(caught.value)
        assert not store.object_exists(key)
    assert uploads(aws) == []  # the multipart upload was aborted


def test_multipart_above_the_threshold(
    aws: MotoServer, store: CaptureStore, tmp_path: Path
) -> None:
    data = os.urandom(12 * MiB)
    path, sha = write(tmp_path, "video.h264", data)
    key = store.object_key(make_record(), "video.h264")
    wire = Wire(store)

    assert store.put_file(key, path, sha256_hex=sha, metadata=meta()) is PutResult.WRITTEN

    parts = wire.headers("UploadPart")
    assert len(parts) == 3
    chunks = [data[:5 * MiB], data[5 * MiB:10 * MiB], data[10 * MiB:]]  # fmt: skip
    assert [h["x-amz-checksum-sha256"] for h in parts] == [b64sha(c) for c in chunks]
    [create] = wire.headers("CreateMultipartUpload")
    assert create["x-amz-server-side-encryption"] == "AES256"
    assert create["x-amz-checksum-algorithm"] == "SHA256"
    assert wire.headers("CompleteMultipartUpload")[0]["if-none-match"] == "*"
    head = s3(aws).head_object(Bucket=BUCKET, Key=key)
    assert head["ServerSideEncryption"] == "AES256"
    assert head["ContentLength"] == len(data)
    assert head["Metadata"]["sha256"] == sha
    assert s3(aws).get_object(Bucket=BUCKET, Key=key)["Body"].read() == data
    assert uploads(aws) == []

    # Again: one HEAD, no upload at all.
    wire.sent.clear()
    assert store.put_file(key, path, sha256_hex=sha, metadata=meta()) is PutResult.ALREADY_THERE
    assert wire.ops() == ["HeadObject"]


def test_multipart_complete_is_conditional(
    aws: MotoServer, store: CaptureStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object that appears during the upload is not clobbered by CompleteMultipartUpload."""
    same, sha = write(tmp_path, "a.bin", os.urandom(6 * MiB))
    other, other_sha = write(tmp_path, "b.bin", os.urandom(6 * MiB))
    key = store.object_key(make_record(), "clip.bin")
    store.put_file(key, same, sha256_hex=sha, metadata=meta())
    real_head = store.head
    calls: list[str] = []

    def head_misses_once(k: str) -> dict[str, Any] | None:
        calls.append(k)
        return None if len(calls) == 1 else real_head(k)  # as if it landed just after

    monkeypatch.setattr(store, "head", head_misses_once)
    assert store.put_file(key, same, sha256_hex=sha, metadata=meta()) is PutResult.ALREADY_THERE
    calls.clear()
    with pytest.raises(StoreError, match="a different object already exists"):
        store.put_file(key, other, sha256_hex=other_sha, metadata=meta())
    assert uploads(aws) == []  # both uploads aborted
    assert s3(aws).get_object(Bucket=BUCKET, Key=key)["Body"].read() == same.read_bytes()


class RawBody:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_kwargs: Any) -> Iterator[bytes]:
        yield self._body


def test_a_device_scoped_to_its_prefix_still_uploads_a_large_file(
    aws: MotoServer, store: CaptureStore, tmp_path: Path
) -> None:
    """Without an unconditioned s3:ListBucket, S3 answers 403 (not 404) to a HEAD of an object
    that is not there. The large-file check before a multipart upload must not stop on it."""
    from botocore.awsrequest import AWSResponse

    def forbidden(request: Any, **_kwargs: Any) -> AWSResponse:
        return AWSResponse(request.url, 403, {}, RawBody(b""))

    store._s3.meta.events.register("before-send.s3.HeadObject", forbidden)
    path, sha = write(tmp_path, "big.bin", os.urandom(11 * MiB))
    assert store.put_file("k/big.bin", path, sha256_hex=sha, metadata=meta()) is PutResult.WRITTEN
    body = s3(aws).get_object(Bucket=BUCKET, Key="k/big.bin")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha


def test_a_failed_multipart_upload_is_aborted(
    aws: MotoServer, store: CaptureStore, tmp_path: Path
) -> None:
    path, sha = write(tmp_path, "big.bin", os.urandom(11 * MiB))
    served = 0

    with path.open("rb") as file:

        def read(n: int) -> bytes:
            nonlocal served
            if served >= 6 * MiB:
                raise OSError(5, "Input/output error")
            block = file.read(n)
            served += len(block)
            return block

        with pytest.raises(StoreError, match="cannot read big.bin") as caught:
            store.put_file("k/big.bin", path, sha256_hex=sha, metadata=meta(), read=read)
    assert caught.value.kind is ErrorKind.CLIENT
    assert uploads(aws) == []
    assert not store.object_exists("k/big.bin")


def test_the_read_hooks_own_exception_propagates_after_the_abort(
    aws: MotoServer, store: CaptureStore, tmp_path: Path
) -> None:
    class Halted(Exception):
        pass

    path, sha = write(tmp_path, "big.bin", os.urandom(11 * MiB))
    with path.open("rb") as file:

        def read(n: int) -> bytes:
            if file.tell() >= 6 * MiB:
                raise Halted("the syncer is stopping")
            return file.read(n)

        with pytest.raises(Halted):
            store.put_file("k/big.bin", path, sha256_hex=sha, metadata=meta(), read=read)
    assert uploads(aws) == []


def test_the_read_hook_sees_every_byte_in_small_blocks(
    aws: MotoServer, store: CaptureStore, tmp_path: Path
) -> None:
    """How a caller caps bandwidth: every byte is read through its function before it is sent."""
    data = os.urandom(7 * MiB)
    path, sha = write(tmp_path, "big.bin", data)
    asked: list[int] = []
    got: list[int] = []
    with path.open("rb") as file:

        def throttled(n: int) -> bytes:
            asked.append(n)
            block = file.read(n)
            got.append(len(block))
            return block

        store.put_file("k/big.bin", path, sha256_hex=sha, metadata=meta(), read=throttled)
    assert sum(got) == len(data)
    assert max(asked) <= READ_BLOCK
    assert s3(aws).get_object(Bucket=BUCKET, Key="k/big.bin")["Body"].read() == data


def test_a_missing_spool_file_says_so(store: CaptureStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot read gone.wav") as caught:
        store.put_file("k", tmp_path / "gone.wav", sha256_hex="0" * 64, metadata={})
    assert caught.value.kind is ErrorKind.CLIENT


def test_abort_stale_uploads_only_old_ones_of_this_device(aws: MotoServer) -> None:
    client = s3(aws)
    mine = [f"captures/{DEVICE}/2026/11/27/c{i}/video.h264" for i in range(2)]
    for key in [*mine, "captures/pi-hall/2026/11/27/c9/video.h264"]:
        client.create_multipart_upload(Bucket=BUCKET, Key=key, ServerSideEncryption="AES256")
    # moto stamps every upload with one fixed Initiated time: put the clock 10 s after it.
    initiated = uploads(aws)[0]["Initiated"].timestamp()
    store = make_store(aws, clock=lambda: initiated + 10)

    assert store.abort_stale_uploads(3600, DEVICE) == 0
    assert len(uploads(aws)) == 3
    assert store.abort_stale_uploads(5, DEVICE) == 2
    assert [u["Key"] for u in uploads(aws)] == ["captures/pi-hall/2026/11/27/c9/video.h264"]
    assert store.abort_stale_uploads(0, DEVICE) == 0


# --- index --------------------------------------------------------------------------------------


def test_index_item_shape() -> None:
    record = make_record(
        transcript="what time is it",
        engines={"stt": "openai", "tts": "piper"},
        timings_ms={"listen": 1523.4, "stt": 310.0},
        files={
            "audio.wav": {"bytes": 4, "sha256": "a" * 64},
            "frame-000.jpg": {"bytes": 9, "sha256": "b" * 64},
        },
    )
    keys = {"audio.wav": "p/audio.wav", "frame-000.jpg": "p/frame-000.jpg"}
    synced = datetime(2026, 11, 28, 1, 2, 3, tzinfo=UTC)
    item = index_item(record, keys, synced_at=synced)
    assert item["device_id"] == DEVICE and item["capture_id"] == record.capture_id
    assert item["created_at"] == "2026-11-27T23:30:00.000Z"
    assert item["synced_at"] == "2026-11-28T01:02:03.000Z"
    assert item["timings_ms"] == {"listen": Decimal("1523.4"), "stt": Decimal("310.0")}
    assert item["sizes"] == {"audio.wav": 4, "frame-000.jpg": 9}
    assert item["s3_keys"] == keys
    assert item["engines"] == {"stt": "openai", "tts": "piper"}
    assert "reply" not in item and "s3_bucket" not in item  # None is left out
    assert index_item(record, keys, {"audio.wav": 5}, bucket="b")["sizes"] == {"audio.wav": 5}


def test_put_index_is_conditional(aws: MotoServer, store: CaptureStore) -> None:
    record = make_record(reply="It is noon.", timings_ms={"stt": 12.5})
    keys = {"audio.wav": store.object_key(record, "audio.wav")}
    item = index_item(record, keys)

    assert store.put_index(item) is PutResult.WRITTEN
    assert store.put_index({**item, "synced_at": "later"}) is PutResult.ALREADY_THERE

    rows = aws.client("dynamodb").scan(TableName=TABLE)["Items"]
    assert len(rows) == 1
    row = {k: TypeDeserializer().deserialize(v) for k, v in rows[0].items()}
    assert row["s3_bucket"] == BUCKET
    assert row["s3_keys"] == keys
    assert row["timings_ms"] == {"stt": Decimal("12.5")}
    assert row["synced_at"] == item["synced_at"]  # the first write stands
    # Another capture of the same device is a new item.
    other = index_item(make_record(capture_id="20261127T233001000Z-0a1b2c3e"), keys)
    assert store.put_index(other) is PutResult.WRITTEN


def test_put_index_without_a_table(aws: MotoServer) -> None:
    with pytest.raises(StoreError, match="HEIMDALL_DYNAMODB_TABLE"):
        make_store(aws, table=None).put_index(index_item(make_record(), {}))


# --- health and failures -----------------------------------------------------------------------


def test_check_passes(aws: MotoServer, store: CaptureStore) -> None:
    store.check(DEVICE)
    make_store(aws, table=None).check(DEVICE)


def test_missing_bucket(aws: MotoServer, tmp_path: Path) -> None:
    store = make_store(aws, bucket="no-such-bucket")
    expected = "bucket 'no-such-bucket' does not exist: create it or fix HEIMDALL_S3_BUCKET"
    with pytest.raises(StoreError) as caught:
        store.check(DEVICE)
    assert (caught.value.kind, caught.value.message) == (ErrorKind.CLIENT, expected)
    path, sha = write(tmp_path, "a.wav", b"x")
    with pytest.raises(StoreError) as caught:
        store.put_file("k/a.wav", path, sha256_hex=sha, metadata={})
    assert caught.value.message == expected and caught.value.code == "NoSuchBucket"


def test_missing_table(aws: MotoServer) -> None:
    store = make_store(aws, table="no-such-table")
    with pytest.raises(StoreError) as caught:
        store.check(DEVICE)
    assert caught.value.service == "dynamodb" and caught.value.kind is ErrorKind.CLIENT
    assert "table 'no-such-table' does not exist in eu-west-1: create it" in str(caught.value)
    assert "HEIMDALL_DYNAMODB_TABLE" in str(caught.value)
    with pytest.raises(StoreError, match="does not exist"):
        store.put_index(index_item(make_record(), {}))


def test_a_table_with_the_wrong_key(aws: MotoServer) -> None:
    aws.client("dynamodb").create_table(
        TableName="flat",
        KeySchema=[{"AttributeName": "capture_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "capture_id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    with pytest.raises(StoreError, match="wrong key: it needs partition key device_id"):
        make_store(aws, table="flat").check(DEVICE)


def test_bad_credentials_and_missing_permissions(aws: MotoServer, tmp_path: Path) -> None:
    """moto checks credentials only with auth on: then its IAM decides, as AWS would."""
    key_id, secret = aws.create_user("device", ["s3:ListBucket", "s3:GetObject"])
    path, sha = write(tmp_path, "a.wav", b"x")
    aws.enable_auth()

    unknown = make_store(aws, session=None)  # the environment's dummy key: unknown to moto
    with pytest.raises(StoreError) as caught:
        unknown.put_file("k/a.wav", path, sha256_hex=sha, metadata={})
    assert caught.value.kind is ErrorKind.AUTH and caught.value.status == 403
    assert caught.value.message.startswith(
        "AWS credentials expired or invalid (InvalidAccessKeyId): renew them"
    )

    wrong_secret = boto3.session.Session(aws_access_key_id=key_id, aws_secret_access_key="nope")
    with pytest.raises(StoreError, match=r"invalid \(SignatureDoesNotMatch\)"):
        make_store(aws, session=wrong_secret).put_file("k/a.wav", path, sha256_hex=sha, metadata={})

    limited = boto3.session.Session(aws_access_key_id=key_id, aws_secret_access_key=secret)
    with pytest.raises(StoreError) as caught:
        make_store(aws, session=limited).put_file("k/a.wav", path, sha256_hex=sha, metadata={})
    assert caught.value.kind is ErrorKind.AUTH
    assert caught.value.message == (
        f"access denied to s3:PutObject on {BUCKET}/k/a.wav: grant it, see docs/iam-policy.json"
    )
    assert secret not in str(caught.value) and key_id not in str(caught.value)


def test_no_credentials_at_all(aws: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError) as caught:
        make_store(aws, session=None).check(DEVICE)
    assert caught.value.kind is ErrorKind.AUTH
    assert "no usable AWS credentials (NoCredentialsError)" in str(caught.value)


def test_store_down_fails_fast_as_connection_then_recovers(
    aws: MotoServer, store: CaptureStore, tmp_path: Path
) -> None:
    first, first_sha = write(tmp_path, "a.wav", b"before the outage")
    later, later_sha = write(tmp_path, "b.wav", b"during the outage")
    store.put_file("k/a.wav", first, sha256_hex=first_sha, metadata={})
    item = index_item(make_record(), {"a.wav": "k/a.wav"})
    aws.stop()

    started = time.monotonic()
    for attempt in (
        lambda: store.put_file("k/b.wav", later, sha256_hex=later_sha, metadata={}),
        lambda: store.put_index(item),
        lambda: store.check(DEVICE),
    ):
        with pytest.raises(StoreError) as caught:
            attempt()
        assert caught.value.kind is ErrorKind.CONNECTION
        assert "cannot reach" in str(caught.value) and "check the network" in str(caught.value)
    assert time.monotonic() - started < 1.0

    aws.start()  # same port, same data
    assert store.put_file("k/b.wav", later, sha256_hex=later_sha, metadata={}) is PutResult.WRITTEN
    assert store.put_file("k/a.wav", first, sha256_hex=first_sha, metadata={}) is (
        PutResult.ALREADY_THERE
    )
    assert store.put_index(item) is PutResult.WRITTEN


# --- classify_aws -------------------------------------------------------------------------------


def client_error(
    code: str,
    status: int,
    headers: dict[str, str] | None = None,
    message: str = "StringToSign AWS4-HMAC-SHA256 wJalrXUtnFEMI/K7MDENG secret",
) -> Exception:
    return botocore.exceptions.ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers or {}},
        },
        "PutObject",
    )


@pytest.mark.parametrize(
    ("exc", "kind", "text"),
    [
        (client_error("ExpiredToken", 400), ErrorKind.AUTH, "AWS credentials expired or invalid (ExpiredToken): renew them"),
        (client_error("ExpiredTokenException", 400), ErrorKind.AUTH, "expired or invalid"),
        (client_error("UnrecognizedClientException", 400), ErrorKind.AUTH, "expired or invalid"),
        (client_error("AccessDenied", 403), ErrorKind.AUTH, "access denied to s3:PutObject (and kms:GenerateDataKey, kms:Decrypt) on b-1/k: grant it, see docs/iam-policy.json"),
        # A skewed clock fixes itself (NTP): retried at the usual pace, never auth_reset_s.
        (client_error("RequestTimeTooSkewed", 403), ErrorKind.SERVER, "the device clock is wrong"),
        (client_error("InvalidSignatureException", 400, message="Signature expired: 20261202T210000Z is now earlier than 20261202T200000Z (20261202T195500Z - 5 min.)"), ErrorKind.SERVER, "the device clock is wrong"),
        (client_error("InvalidSignatureException", 400), ErrorKind.AUTH, "expired or invalid"),
        (client_error("SlowDown", 503), ErrorKind.RATE_LIMIT, "throttling"),
        (client_error("ProvisionedThroughputExceededException", 400), ErrorKind.RATE_LIMIT, "throttling"),
        (client_error("ThrottlingException", 400), ErrorKind.RATE_LIMIT, "throttling"),
        (client_error("InternalError", 500), ErrorKind.SERVER, "failed on its side"),
        (client_error("SomethingNew", 502), ErrorKind.SERVER, "failed on its side"),
        (client_error("RequestTimeout", 400), ErrorKind.TIMEOUT, "timed out"),
        (client_error("NoSuchBucket", 404), ErrorKind.CLIENT, "bucket 'b-1' does not exist: create it or fix HEIMDALL_S3_BUCKET"),
        (client_error("ResourceNotFoundException", 400), ErrorKind.CLIENT, "table 't-1' does not exist"),
        (client_error("PreconditionFailed", 412), ErrorKind.CLIENT, "already exists"),
        (client_error("ConditionalRequestConflict", 409), ErrorKind.SERVER, "in progress"),
        (client_error("BadDigest", 400), ErrorKind.CLIENT, "do not match the recorded SHA-256"),
        (client_error("PermanentRedirect", 301, {"x-amz-bucket-region": "us-west-2"}), ErrorKind.CLIENT, "another region (us-west-2)"),
        (client_error("KMS.NotFoundException", 400), ErrorKind.CLIENT, "HEIMDALL_SYNC__KMS_KEY_ID"),
        (client_error("InvalidArgument", 400), ErrorKind.CLIENT, "not an outage"),
        (client_error("Weird", 401), ErrorKind.AUTH, "refused the credentials"),
        (botocore.exceptions.EndpointConnectionError(endpoint_url="https://s3"), ErrorKind.CONNECTION, "cannot reach s3"),
        (botocore.exceptions.ConnectTimeoutError(endpoint_url="https://s3"), ErrorKind.TIMEOUT, "did not answer in time"),
        (botocore.exceptions.ReadTimeoutError(endpoint_url="https://s3"), ErrorKind.TIMEOUT, "did not answer in time"),
        (botocore.exceptions.ConnectionClosedError(endpoint_url="https://s3"), ErrorKind.CONNECTION, "cannot reach"),
        (botocore.exceptions.SSLError(endpoint_url="https://s3", error="x"), ErrorKind.CONNECTION, "device clock"),
        (botocore.exceptions.NoCredentialsError(), ErrorKind.AUTH, "no usable AWS credentials"),
        (botocore.exceptions.CredentialRetrievalError(provider="sso", error_msg="x"), ErrorKind.AUTH, "could not be loaded"),
        (ResponseParserError("<html>"), ErrorKind.MALFORMED, "cannot read"),
        (ConnectionResetError(), ErrorKind.CONNECTION, "ConnectionResetError"),
    ],
)  # fmt: skip
def test_classify_aws(exc: Exception, kind: ErrorKind, text: str) -> None:
    error = classify_aws(
        exc, "s3", action="s3:PutObject", bucket="b-1", key="k", table="t-1", kms=True
    )
    assert isinstance(error, StoreError) and isinstance(error, CloudError)
    assert error.kind is kind and error.service == "s3"
    assert text in str(error)
    for secret in ("wJalrXUtnFEMI", "StringToSign", "secret"):
        assert secret not in str(error)


def test_classify_aws_keeps_retry_after_and_the_status() -> None:
    error = classify_aws(client_error("SlowDown", 503, {"retry-after": "7"}), "s3")
    assert (error.status, error.retry_after_s, error.code) == (503, 7.0, "SlowDown")
    assert str(error).startswith("s3: rate_limit (HTTP 503): s3 is throttling us (SlowDown)")


def test_a_long_key_does_not_cut_off_the_advice() -> None:
    key = "captures/" + "d" * 64 + "/2026/11/27/20261127T233000123Z-0a1b2c3d/frame-000.jpg"
    error = classify_aws(
        client_error("AccessDenied", 403), "s3", action="s3:PutObject", bucket="b", key=key
    )
    assert error.message.endswith("see docs/iam-policy.json")
