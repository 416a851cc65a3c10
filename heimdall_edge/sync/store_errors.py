"""What an S3 or DynamoDB failure means, and what a person should do about it.

A failure is a `StoreError` (a `CloudError` with service "s3" or "dynamodb") whose
`kind` tells the caller's policy whether to retry and whose message says what to
do. Messages never carry credentials, request signatures or response bodies: an
AWS error code is shown only when it looks like one.
"""

from __future__ import annotations

import re

import botocore.exceptions
from botocore.parsers import ResponseParserError

from heimdall_edge.cloud.classify import classify, parse_retry_after
from heimdall_edge.cloud.errors import CloudError, ErrorKind

MESSAGE_LIMIT = 300

_SAFE_CODE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_REGION = re.compile(r"[a-z0-9-]{1,32}")
PRECONDITION_FAILED = frozenset({"PreconditionFailed", "412"})
CONDITIONAL_CONFLICT = "ConditionalRequestConflict"
NOT_FOUND = frozenset({"404", "NotFound", "NoSuchKey"})


class StoreError(CloudError):
    """An S3 or DynamoDB call that failed; the message says what to do, and is safe to log.

    `code` is the AWS error code when there was one (e.g. "NoSuchBucket"). Our messages
    may run to MESSAGE_LIMIT characters (CloudError keeps 120), so the advice after the
    object key is never cut off.
    """

    def __init__(
        self,
        service: str,
        kind: ErrorKind,
        message: str = "",
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(service, kind, message, status=status, retry_after_s=retry_after_s)
        self.message = message[:MESSAGE_LIMIT]
        self.code = code
        self.args = (str(self),)

    def __repr__(self) -> str:
        return f"StoreError({str(self)!r})"


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_EXPIRED = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "TokenRefreshRequired",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "InvalidSignatureException",
        "InvalidToken",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "MissingAuthenticationTokenException",
        "AuthFailure",
        "NotAuthorized",
    }
)
_DENIED = frozenset(
    {"AccessDenied", "AccessDeniedException", "AllAccessDisabled", "Forbidden", "403"}
)
_CLOCK = frozenset({"RequestTimeTooSkewed", "RequestExpired"})
_THROTTLED = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "LimitExceededException",
        "KMS.ThrottlingException",
    }
)
_SERVER = frozenset(
    {
        "InternalError",
        "InternalFailure",
        "InternalServerError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "OperationAborted",
    }
)
_TIMEOUT = frozenset({"RequestTimeout", "RequestTimeoutException"})
_DIGEST = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidChecksum"})
_WRONG_REGION = frozenset(
    {
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        "IllegalLocationConstraintException",
        "301",
    }
)


def classify_aws(
    exc: BaseException,
    service: str,
    *,
    action: str | None = None,
    bucket: str | None = None,
    key: str | None = None,
    table: str | None = None,
    kms: bool = False,
    region: str | None = None,
) -> StoreError:
    """Map a botocore/boto3 exception to a StoreError whose message says what to do.

    The optional context (`action` like "s3:PutObject", bucket, key, table, whether
    SSE-KMS is on, region) only makes the message more precise. Never copies the
    exception's text (it can echo a signature's string-to-sign or a response body).
    """
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, CloudError):
        return StoreError(service, exc.kind, exc.message, status=exc.status,
                          retry_after_s=exc.retry_after_s)  # fmt: skip
    if isinstance(exc, botocore.exceptions.ClientError):
        return _from_client_error(exc, service, action, bucket, key, table, kms, region)
    return _from_transport_error(exc, service, region)


def _from_client_error(
    exc: botocore.exceptions.ClientError,
    service: str,
    action: str | None,
    bucket: str | None,
    key: str | None,
    table: str | None,
    kms: bool,
    region: str | None,
) -> StoreError:
    response = exc.response or {}
    meta = response.get("ResponseMetadata") or {}
    status = meta.get("HTTPStatusCode")
    headers = meta.get("HTTPHeaders") or {}
    code = error_code(exc)
    safe_code = code if _SAFE_CODE.fullmatch(code) else None
    what = action or f"{service} ({code or 'request'})"
    if key is not None:
        where = f"{shorten(bucket or '?', 63)}/{key}"
    elif service == "s3":
        where = f"bucket {shorten(bucket or '?', 63)!r}"
    else:
        where = f"table {shorten(table or '?')!r}"
    bucket_text = repr(shorten(bucket or "?", 63))
    table_text = repr(shorten(table or "?"))

    def error(kind: ErrorKind, message: str) -> StoreError:
        retry_after = None
        if kind in (ErrorKind.RATE_LIMIT, ErrorKind.SERVER):
            retry_after = parse_retry_after({str(k): str(v) for k, v in headers.items()})
        return StoreError(
            service, kind, message, status=status, retry_after_s=retry_after, code=safe_code
        )

    label = safe_code or (f"HTTP {status}" if status else "no code")
    said = str((response.get("Error") or {}).get("Message") or "")
    if code in _CLOCK or (code == "InvalidSignatureException" and "expired" in said.lower()):
        # DynamoDB says "Signature expired" for the same skew. Not AUTH: a clock fixes
        # itself (NTP steps it within seconds of reaching a server), so the store is tried
        # again at the usual pace, not after the breaker's auth_reset_s.
        return error(
            ErrorKind.SERVER,
            f"the device clock is wrong ({label}), so AWS refuses the request: sync it "
            "(timedatectl status; NTP must be reachable)",
        )
    if code in _EXPIRED:
        return error(
            ErrorKind.AUTH,
            f"AWS credentials expired or invalid ({label}): renew them (AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the instance role)",
        )
    if code == "KMS.AccessDeniedException" or (code in _DENIED and status != 404):
        if service == "s3" and action == "s3:ListBucket" and code in ("403", "Forbidden"):
            return error(
                ErrorKind.AUTH,
                f"access denied to s3:ListBucket on bucket {bucket_text}, or it belongs to "
                "another account, or the credentials are invalid: see docs/iam-policy.json",
            )
        extra = " (and kms:GenerateDataKey, kms:Decrypt)" if kms and service == "s3" else ""
        return error(
            ErrorKind.AUTH,
            f"access denied to {what}{extra} on {where}: grant it, see docs/iam-policy.json",
        )
    if code.startswith("KMS.") or code == "KMSKeyNotFound":
        return error(
            ErrorKind.CLIENT,
            f"the KMS key cannot be used ({label}): fix HEIMDALL_SYNC__KMS_KEY_ID or enable the key",
        )
    if code in _THROTTLED or status == 429:
        return error(
            ErrorKind.RATE_LIMIT, f"{service} is throttling us ({label}): slow down, retry later"
        )
    if code in _TIMEOUT:
        return error(
            ErrorKind.TIMEOUT, f"{service} timed out waiting for our data ({label}): retry"
        )
    if code in _SERVER or (isinstance(status, int) and status >= 500):
        return error(ErrorKind.SERVER, f"{service} failed on its side ({label}): retry later")
    if code == CONDITIONAL_CONFLICT:
        return error(ErrorKind.SERVER, f"another write to {where} is in progress ({label}): retry")
    if code == "NoSuchUpload":
        return error(
            ErrorKind.SERVER, f"the multipart upload of {where} was aborted meanwhile: retry"
        )
    if code == "NoSuchBucket" or (action == "s3:ListBucket" and code in NOT_FOUND):
        return error(
            ErrorKind.CLIENT,
            f"bucket {bucket_text} does not exist: create it or fix HEIMDALL_S3_BUCKET",
        )
    if code == "InvalidBucketName":
        return error(
            ErrorKind.CLIENT, f"{bucket_text} is not a valid bucket name: fix HEIMDALL_S3_BUCKET"
        )
    if code in _WRONG_REGION:
        actual = headers.get("x-amz-bucket-region", "")
        hint = f" ({actual})" if _REGION.fullmatch(actual) else ""
        return error(
            ErrorKind.CLIENT,
            f"bucket {bucket_text} is in another region{hint} than {region or '?'}: "
            "set HEIMDALL_SYNC__REGION to the bucket's region",
        )
    if code == "ResourceNotFoundException":
        return error(
            ErrorKind.CLIENT,
            f"table {table_text} does not exist in {region or 'this region'}: create it "
            "(device_id HASH, capture_id RANGE) or fix HEIMDALL_DYNAMODB_TABLE",
        )
    if code in _DIGEST:
        return error(
            ErrorKind.CLIENT,
            f"S3 refused the bytes of {where} ({label}): they do not match the recorded SHA-256; "
            "the spool copy may be damaged",
        )
    if code in PRECONDITION_FAILED:
        return error(
            ErrorKind.CLIENT, f"an object already exists at {where}; it was not overwritten"
        )
    if code in NOT_FOUND:
        return error(ErrorKind.CLIENT, f"{where} was not found ({label})")
    if status in (401, 403):
        return error(
            ErrorKind.AUTH,
            f"{service} refused the credentials or the request ({label}) for {what}: check "
            "the credentials and docs/iam-policy.json",
        )
    if status == 408:
        return error(ErrorKind.TIMEOUT, f"{service} timed out waiting for us ({label}): retry")
    if isinstance(status, int) and 400 <= status < 500:
        return error(
            ErrorKind.CLIENT,
            f"{service} rejected {what} ({label}): a bug or a misconfiguration, not an outage; "
            "check the settings, then report it",
        )
    return error(
        ErrorKind.MALFORMED, f"{service} answered {what} with an error we cannot read ({label})"
    )


def _from_transport_error(exc: BaseException, service: str, region: str | None) -> StoreError:
    name = type(exc).__name__
    e = botocore.exceptions
    if isinstance(exc, e.NoCredentialsError | e.PartialCredentialsError):
        return StoreError(
            service,
            ErrorKind.AUTH,
            f"no usable AWS credentials ({name}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or give the device an instance role",
        )
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return StoreError(
            service,
            ErrorKind.AUTH,
            f"AWS credentials could not be loaded ({name}): check the profile, the credential "
            "process or the instance role",
        )
    if isinstance(exc, e.ReadTimeoutError | e.ConnectTimeoutError):
        return StoreError(
            service, ErrorKind.TIMEOUT, f"{service} did not answer in time ({name}): retry later"
        )
    if isinstance(exc, e.SSLError):
        return StoreError(
            service,
            ErrorKind.CONNECTION,
            f"TLS to {service} failed ({name}): check the device clock and any proxy; "
            "certificate checks stay on",
        )
    if isinstance(exc, e.ConnectionError | e.HTTPClientError | e.IncompleteReadError):
        endpoint = (
            "HEIMDALL_S3_ENDPOINT_URL" if service == "s3" else "HEIMDALL_DYNAMODB_ENDPOINT_URL"
        )
        return StoreError(
            service,
            ErrorKind.CONNECTION,
            f"cannot reach {service} ({name}): check the network (or {endpoint}); "
            "captures wait in the spool",
        )
    if isinstance(exc, e.NoRegionError | e.InvalidRegionError):
        return StoreError(
            service,
            ErrorKind.CLIENT,
            f"the AWS region {region!r} is not usable: fix HEIMDALL_SYNC__REGION",
        )
    if isinstance(exc, e.ChecksumError | ResponseParserError):
        return StoreError(
            service, ErrorKind.MALFORMED, f"{service} sent an answer we cannot read ({name})"
        )
    if isinstance(exc, e.ParamValidationError):
        return StoreError(
            service,
            ErrorKind.CLIENT,
            f"heimdall_edge built a bad {service} request ({name}): report it",
        )
    # Sockets and anything else: cloud.classify's rules (OSError unreachable -> CONNECTION, ...).
    general = classify(exc, service)
    return StoreError(
        service, general.kind, general.message, status=general.status,
        retry_after_s=general.retry_after_s,
    )  # fmt: skip


BOTO_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)
_CREDENTIAL_ERRORS: tuple[type[BaseException], ...] = tuple(
    cls
    for cls in (
        getattr(botocore.exceptions, name, None)
        for name in (
            "CredentialRetrievalError",
            "TokenRetrievalError",
            "UnknownCredentialError",
            "NoAuthTokenError",
            "SSOError",
            "LoginError",
        )
    )
    if isinstance(cls, type)
)


def error_code(exc: botocore.exceptions.ClientError) -> str:
    return str(((exc.response or {}).get("Error") or {}).get("Code") or "")
