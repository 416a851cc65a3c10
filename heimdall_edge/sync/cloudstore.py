"""The blocking writer of captures to S3 (encrypted, checksummed) and DynamoDB (the index).

Every write is idempotent, so the syncer may retry anything, any number of times,
and a crash between two steps never duplicates or loses a capture:

* object keys are deterministic (`CaptureStore.object_key`);
* objects are written with ``If-None-Match: *``: an object is never overwritten.
  When one is already there, its recorded SHA-256 decides: the same bytes mean
  `PutResult.ALREADY_THERE`, different bytes a `StoreError` (CLIENT);
* index items are written with ``attribute_not_exists(capture_id)``.

Every object carries server-side encryption (SSE-S3 or SSE-KMS), the SHA-256 the
spool recorded as ``x-amz-checksum-sha256`` (S3 recomputes it and refuses bytes that
differ) and as user metadata ``sha256`` (what the already-there check compares, as
it survives multipart uploads, whose S3 checksum is a checksum of part checksums).
The file is also hashed locally while it is read, so a damaged spool copy is
refused before it is sent (multipart) or together with S3 (single PUT).

One retry layer, ours: the botocore clients make exactly one attempt per call
(``total_max_attempts=1``; note that botocore's ``max_attempts=1`` means *one
retry*, two attempts). A failure is a `StoreError` (store_errors.py), safe to log.

All calls block: the syncer runs them in worker threads (`asyncio.to_thread`).
A `CaptureStore` may be shared by threads (boto3 clients are thread-safe).

Bandwidth: `put_file(..., read=...)` takes the function the uploader reads the file
with, ``read(n) -> bytes`` (at most n bytes, b"" at the end), called with blocks of
`READ_BLOCK` bytes. Wrap ``file.read`` in a token bucket to cap the upload rate:
every byte passes through it before it is sent, so the average rate stays under the
cap. A single PUT (up to `multipart_threshold_bytes`) or one part is read first and
then sent at link speed; lower the part size to make those bursts shorter.

IAM: the device needs s3:PutObject, s3:GetObject (HeadObject, for the already-there
check), s3:ListBucket (HeadBucket; without it a missing object reads as 403),
s3:ListBucketMultipartUploads, s3:AbortMultipartUpload, with SSE-KMS also
kms:GenerateDataKey and kms:Decrypt (multipart), and dynamodb:PutItem and
dynamodb:DescribeTable.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import io
import logging
import mimetypes
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
from boto3.dynamodb.types import TypeSerializer
from botocore.config import Config

from heimdall_edge.cloud.errors import ErrorKind
from heimdall_edge.spool.record import CaptureRecord
from heimdall_edge.sync.index_item import dynamo_value
from heimdall_edge.sync.store_config import StoreConfig
from heimdall_edge.sync.store_errors import (
    BOTO_ERRORS,
    CONDITIONAL_CONFLICT,
    NOT_FOUND,
    PRECONDITION_FAILED,
    StoreError,
    classify_aws,
    error_code,
    shorten,
)

log = logging.getLogger(__name__)

READ_BLOCK = 256 * 1024
"""How many bytes the uploader asks the `read` hook for at a time."""
SHA256_META = "sha256"
"""User-metadata key (x-amz-meta-sha256) holding the hex SHA-256 of the object."""
Read = Callable[[int], bytes]

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class PutResult(enum.Enum):
    WRITTEN = "written"
    ALREADY_THERE = "already_there"
    """The same bytes (or index item) were stored before: by an earlier attempt, say."""


# --- the store ----------------------------------------------------------------------------------


class CaptureStore:
    """Writes capture files to S3 and index items to DynamoDB; every call is one attempt."""

    def __init__(
        self,
        config: StoreConfig,
        *,
        session: boto3.session.Session | None = None,
        read_timeout_s: float = 30,
        connect_timeout_s: float = 5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._clock = clock
        # The standard credential chain (environment, shared files, container/instance
        # role) unless a session is given. TLS verification is botocore's default: on.
        if session is None:
            session = boto3.session.Session()
        common: dict[str, Any] = {
            "region_name": config.region,
            # total_max_attempts=1: no SDK retries. (retries={"max_attempts": 1} would
            # mean one *retry*: botocore adds the first attempt to it.)
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "connect_timeout": connect_timeout_s,
            "read_timeout": read_timeout_s,
            "max_pool_connections": 16,
            "tcp_keepalive": True,
            "user_agent_extra": "heimdall-edge",
        }
        s3_options: dict[str, Any] = {}
        if config.s3_endpoint_url:
            s3_options["addressing_style"] = "path"  # MinIO and friends; moto either way
        self._s3 = session.client(
            "s3",
            endpoint_url=config.s3_endpoint_url,
            config=Config(**common, s3=s3_options or None),
        )
        self._ddb = session.client(
            "dynamodb", endpoint_url=config.dynamodb_endpoint_url, config=Config(**common)
        )
        self._serializer = TypeSerializer()

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint the store talks to: the configured one, else the region's (as
        botocore resolves it, e.g. https://s3.eu-west-1.amazonaws.com). Its host is what
        the store's connectivity probes."""
        return str(self._s3.meta.endpoint_url)

    # --- keys -----------------------------------------------------------------------------------

    def device_prefix(self, device_id: str) -> str:
        """Where this device's objects live: "<prefix>/<device_id>/", or "<device_id>/"."""
        return f"{self.config.prefix}/{device_id}/" if self.config.prefix else f"{device_id}/"

    def object_key(self, record: CaptureRecord, name: str) -> str:
        """<prefix>/<device_id>/YYYY/MM/DD/<capture_id>/<name>, the date from created_at in UTC."""
        when = record.created_at
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
        return f"{self.device_prefix(record.device_id)}{when:%Y/%m/%d}/{record.capture_id}/{name}"

    # --- objects --------------------------------------------------------------------------------

    def put_file(
        self,
        key: str,
        path: Path,
        *,
        sha256_hex: str,
        metadata: dict[str, str],
        read: Read | None = None,
    ) -> PutResult:
        """Store the file at `path` under `key` once, encrypted and checksummed.

        `sha256_hex` is the SHA-256 the spool recorded; `metadata` becomes user metadata
        (capture id, device id; never secrets) and gets "sha256" added. `read`, if given,
        is how the file is read (see the module docstring): the caller opens the file.
        An OSError from reading becomes a StoreError (CLIENT); any other exception `read`
        raises (a "stop now", say) propagates unchanged, after the upload is aborted.
        Returns WRITTEN, or ALREADY_THERE when the same bytes are stored at `key` already.
        Raises StoreError: CLIENT for different bytes at `key` or a spool copy that does
        not match `sha256_hex`; otherwise whatever the service or the network said.
        """
        if not _SHA256_HEX.fullmatch(sha256_hex):
            raise ValueError(f"sha256_hex must be 64 lowercase hex digits, got {sha256_hex!r:.80}")
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise _unreadable(path, exc) from exc
        meta = {**metadata, SHA256_META: sha256_hex}
        with _reader(path, read) as reader:
            if size > self.config.multipart_threshold_bytes:
                return self._put_multipart(key, path, reader, size, sha256_hex, meta)
            return self._put_single(key, path, reader, sha256_hex, meta)

    def put_bytes(self, key: str, body: bytes, *, metadata: dict[str, str]) -> PutResult:
        """Store small `body` under `key` once (a capture's manifest), as put_file does a file."""
        sha256_hex = hashlib.sha256(body).hexdigest()
        meta = {**metadata, SHA256_META: sha256_hex}
        return self._put_single(key, Path(key), io.BytesIO(body).read, sha256_hex, meta)

    def manifest_key(self, record: CaptureRecord) -> str:
        """Where the record of one revision goes: capture.r<revision>.json beside the files.

        One object per revision, never overwritten; the highest revision is the current one.
        """
        return self.object_key(record, f"capture.r{record.revision}.json")

    def _put_single(
        self, key: str, path: Path, read: Read, sha256_hex: str, meta: dict[str, str]
    ) -> PutResult:
        try:
            body = b"".join(_blocks(read, limit=None))
        except OSError as exc:
            raise _unreadable(path, exc) from exc
        if hashlib.sha256(body).hexdigest() != sha256_hex:
            raise _damaged(path)
        try:
            self._s3.put_object(
                Bucket=self.config.bucket,
                Key=key,
                Body=body,
                ContentType=_content_type(key),
                Metadata=meta,
                ChecksumAlgorithm="SHA256",  # without it moto drops the checksum below
                ChecksumSHA256=_b64(sha256_hex),
                IfNoneMatch="*",
                **self._sse(),
            )
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) in PRECONDITION_FAILED or error_code(exc) == CONDITIONAL_CONFLICT:
                return self._settle_existing(key, len(body), sha256_hex, exc)
            raise self._error(exc, "s3", "s3:PutObject", key) from exc
        except Exception as exc:
            raise self._error(exc, "s3", "s3:PutObject", key) from exc
        log.debug("s3: wrote %s (%d bytes)", key, len(body))
        return PutResult.WRITTEN

    def _put_multipart(
        self, key: str, path: Path, read: Read, size: int, sha256_hex: str, meta: dict[str, str]
    ) -> PutResult:
        # A large file that is already there (an earlier attempt completed, then the
        # device crashed before noting it) costs one HEAD instead of the whole upload.
        try:
            existing = self.head(key)
        except StoreError as exc:
            if exc.kind is not ErrorKind.AUTH:
                raise
            # A device scoped to its prefix without an unconditioned s3:ListBucket gets 403,
            # not 404, for an object that is not there: upload; the completion is conditional.
            existing = None
        if existing is not None:
            return self._compare(key, existing, size, sha256_hex)
        bucket = self.config.bucket
        try:
            upload_id = self._s3.create_multipart_upload(
                Bucket=bucket,
                Key=key,
                ContentType=_content_type(key),
                Metadata=meta,
                ChecksumAlgorithm="SHA256",
                **self._sse(),
            )["UploadId"]
        except Exception as exc:
            raise self._error(exc, "s3", "s3:PutObject", key) from exc
        completing = False
        try:
            parts, whole, sent = self._upload_parts(key, path, read, upload_id)
            # The spool's SHA-256 covers the whole file, S3's only each part: compare here.
            if whole != sha256_hex:
                raise _damaged(path)
            completing = True
            self._s3.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",  # S3 (since 2024) and moto 5 honour it on complete
            )
        except BaseException as exc:
            self._abort(key, upload_id)
            if (
                completing
                and isinstance(exc, botocore.exceptions.ClientError)
                and (
                    error_code(exc) in PRECONDITION_FAILED
                    or error_code(exc) == CONDITIONAL_CONFLICT
                )
            ):
                return self._settle_existing(key, sent, sha256_hex, exc)
            if isinstance(exc, BOTO_ERRORS):
                raise self._error(exc, "s3", "s3:PutObject", key) from exc
            raise  # ours (StoreError), or the caller's `read` hook's own (say, "stop now")
        log.debug("s3: wrote %s (%d bytes in %d parts)", key, sent, len(parts))
        return PutResult.WRITTEN

    def _upload_parts(
        self, key: str, path: Path, read: Read, upload_id: str
    ) -> tuple[list[dict[str, Any]], str, int]:
        """Send the file part by part, each with its SHA-256; (parts, whole-file sha256, bytes)."""
        parts: list[dict[str, Any]] = []
        whole = hashlib.sha256()
        sent = 0
        while True:
            try:
                chunk = b"".join(_blocks(read, limit=self.config.part_size_bytes))
            except OSError as exc:
                raise _unreadable(path, exc) from exc
            if not chunk:
                return parts, whole.hexdigest(), sent
            whole.update(chunk)
            sent += len(chunk)
            checksum = base64.b64encode(hashlib.sha256(chunk).digest()).decode()
            number = len(parts) + 1
            answer = self._s3.upload_part(
                Bucket=self.config.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=chunk,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=checksum,
            )
            parts.append({"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": checksum})

    def _abort(self, key: str, upload_id: str) -> None:
        """Best effort: an upload left behind is removed later by abort_stale_uploads."""
        try:
            self._s3.abort_multipart_upload(Bucket=self.config.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # noqa: BLE001 - the upload's own error is the one that matters
            error = self._error(exc, "s3", "s3:AbortMultipartUpload", key)
            log.info(
                "s3: could not abort the upload of %s (%s); it is cleaned up later", key, error
            )

    def _settle_existing(
        self, key: str, size: int, sha256_hex: str, exc: botocore.exceptions.ClientError
    ) -> PutResult:
        """The conditional write found an object at `key`: is it ours?"""
        existing = self.head(key)
        if existing is None:  # a concurrent write that has not finished (409), or gone again
            raise self._error(exc, "s3", "s3:PutObject", key) from exc
        return self._compare(key, existing, size, sha256_hex)

    def _compare(self, key: str, head: dict[str, Any], size: int, sha256_hex: str) -> PutResult:
        same_sha = (head.get("Metadata") or {}).get(SHA256_META) == sha256_hex
        same_checksum = head.get("ChecksumSHA256") == _b64(sha256_hex)  # single-PUT objects
        if head.get("ContentLength") == size and (same_sha or same_checksum):
            log.debug("s3: %s is already there", key)
            return PutResult.ALREADY_THERE
        raise StoreError(
            "s3",
            ErrorKind.CLIENT,
            f"a different object already exists at key {key}: it was not overwritten; "
            "move it aside if it is wrong, or use another HEIMDALL_S3_PREFIX",
            code="PreconditionFailed",
        )

    def head(self, key: str) -> dict[str, Any] | None:
        """The object's HeadObject answer (with its checksum), or None if there is none."""
        try:
            return self._s3.head_object(Bucket=self.config.bucket, Key=key, ChecksumMode="ENABLED")
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) in NOT_FOUND:
                return None
            raise self._error(exc, "s3", "s3:GetObject", key) from exc
        except Exception as exc:
            raise self._error(exc, "s3", "s3:GetObject", key) from exc

    def object_exists(self, key: str) -> bool:
        return self.head(key) is not None

    def abort_stale_uploads(self, older_than_s: float, device_id: str) -> int:
        """Abort this device's multipart uploads begun more than `older_than_s` ago.

        Uploads left by a crash or a lost connection cost storage until aborted. Call it
        when the syncer starts, with `older_than_s` well above the longest upload (an
        hour or more), so an upload in flight in another thread is never cut off.
        Returns how many were aborted.
        """
        bucket = self.config.bucket
        prefix = self.device_prefix(device_id)
        now = self._clock()
        aborted = 0
        try:
            pages = self._s3.get_paginator("list_multipart_uploads").paginate(
                Bucket=bucket, Prefix=prefix
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    initiated = upload["Initiated"]
                    if initiated.tzinfo is None:
                        initiated = initiated.replace(tzinfo=UTC)
                    if now - initiated.timestamp() < older_than_s:
                        continue
                    try:
                        self._s3.abort_multipart_upload(
                            Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                    except botocore.exceptions.ClientError as exc:
                        if error_code(exc) == "NoSuchUpload":  # completed or aborted meanwhile
                            continue
                        raise self._error(
                            exc, "s3", "s3:AbortMultipartUpload", upload["Key"]
                        ) from exc
                    aborted += 1
        except StoreError:
            raise
        except Exception as exc:
            raise self._error(exc, "s3", "s3:ListBucketMultipartUploads", prefix) from exc
        if aborted:
            log.info("s3: aborted %d stale multipart upload(s) under %s", aborted, prefix)
        return aborted

    # --- index ----------------------------------------------------------------------------------

    def put_index(self, item: dict[str, Any]) -> PutResult:
        """Write the index item (see `index_item`) unless one of the same or a newer revision is there.

        Newer replaces older, never the reverse (a conditional write on "revision"):
        ALREADY_THERE when the table holds this revision or a later one. An item without
        "s3_bucket" gets this store's bucket.
        """
        table = self.config.table
        if not table:
            raise StoreError(
                "dynamodb",
                ErrorKind.CLIENT,
                "no DynamoDB table is configured: set HEIMDALL_DYNAMODB_TABLE, or skip the index",
            )
        item = {"s3_bucket": self.config.bucket, **item}
        try:
            typed = {
                name: self._serializer.serialize(dynamo_value(value))
                for name, value in item.items()
            }
        except (TypeError, ValueError) as exc:
            raise StoreError(
                "dynamodb",
                ErrorKind.CLIENT,
                f"the index item cannot be stored ({type(exc).__name__})",
            ) from exc
        try:
            self._ddb.put_item(
                TableName=table,
                Item=typed,
                ConditionExpression=(
                    "attribute_not_exists(capture_id) OR attribute_not_exists(#revision)"
                    " OR #revision < :revision"
                ),
                ExpressionAttributeNames={"#revision": "revision"},
                ExpressionAttributeValues={":revision": typed["revision"]},
            )
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                log.debug("dynamodb: %s is already indexed", item.get("capture_id"))
                return PutResult.ALREADY_THERE
            raise self._error(exc, "dynamodb", "dynamodb:PutItem", None) from exc
        except Exception as exc:
            raise self._error(exc, "dynamodb", "dynamodb:PutItem", None) from exc
        return PutResult.WRITTEN

    # --- health ---------------------------------------------------------------------------------

    def check(self, device_id: str) -> None:
        """Can we write? A listing of this device's prefix (all a device scoped to its own
        captures may list), then DescribeTable; a StoreError says what is wrong."""
        try:
            self._s3.list_objects_v2(
                Bucket=self.config.bucket, Prefix=self.device_prefix(device_id), MaxKeys=1
            )
        except Exception as exc:
            raise self._error(exc, "s3", "s3:ListBucket", None) from exc
        table = self.config.table
        if not table:
            return
        try:
            description = self._ddb.describe_table(TableName=table)["Table"]
        except Exception as exc:
            raise self._error(exc, "dynamodb", "dynamodb:DescribeTable", None) from exc
        keys = {(k["AttributeName"], k["KeyType"]) for k in description.get("KeySchema", [])}
        if keys != {("device_id", "HASH"), ("capture_id", "RANGE")}:
            raise StoreError(
                "dynamodb",
                ErrorKind.CLIENT,
                f"table {shorten(table)!r} has the wrong key: it needs partition key device_id (S) "
                "and sort key capture_id (S); create such a table or fix HEIMDALL_DYNAMODB_TABLE",
            )
        status = description.get("TableStatus")
        if status not in ("ACTIVE", "UPDATING"):
            raise StoreError(
                "dynamodb",
                ErrorKind.SERVER,
                f"table {shorten(table)!r} is {status}, not ACTIVE: wait for it, then retry",
            )

    # --- helpers --------------------------------------------------------------------------------

    def _sse(self) -> dict[str, str]:
        params = {"ServerSideEncryption": self.config.sse}
        if self.config.sse == "aws:kms" and self.config.kms_key_id:
            params["SSEKMSKeyId"] = self.config.kms_key_id
        return params

    def _error(self, exc: BaseException, service: str, action: str, key: str | None) -> StoreError:
        return classify_aws(
            exc,
            service,
            action=action,
            bucket=self.config.bucket,
            key=key,
            table=self.config.table,
            kms=self.config.sse == "aws:kms",
            region=self.config.region,
        )


# --- reading files ------------------------------------------------------------------------------


@contextlib.contextmanager
def _reader(path: Path, read: Read | None) -> Iterator[Read]:
    if read is not None:
        yield read
        return
    try:
        file = path.open("rb")
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    with file:
        yield file.read


def _blocks(read: Read, limit: int | None) -> Iterator[bytes]:
    """Blocks from `read` until EOF or `limit` bytes."""
    left = limit
    while left is None or left > 0:
        block = read(READ_BLOCK if left is None else min(READ_BLOCK, left))
        if not block:
            return
        if left is not None:
            left -= len(block)
        yield block


def _unreadable(path: Path, exc: OSError) -> StoreError:
    return StoreError(
        "s3",
        ErrorKind.CLIENT,
        f"cannot read {path.name} from the spool ({exc.strerror or type(exc).__name__}): "
        "check the spool's disk and permissions",
    )


def _damaged(path: Path) -> StoreError:
    return StoreError(
        "s3",
        ErrorKind.CLIENT,
        f"{path} does not match the SHA-256 the spool recorded: the copy on disk is damaged "
        "(check the SD card); it was not uploaded",
        code="BadDigest",
    )


def _b64(sha256_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


def _content_type(key: str) -> str:
    return mimetypes.guess_type(key, strict=False)[0] or "application/octet-stream"
