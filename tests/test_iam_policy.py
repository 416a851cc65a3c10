"""The IAM policy in docs/ grants what sync needs and nothing more."""

from __future__ import annotations

import json
from pathlib import Path

POLICY = Path(__file__).resolve().parents[1] / "docs" / "iam-policy.json"

NEEDED = {
    "s3:PutObject",
    "s3:GetObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
    "s3:ListBucket",
    "s3:ListBucketMultipartUploads",
    "dynamodb:PutItem",
    "dynamodb:DescribeTable",
    "kms:GenerateDataKey",
    "kms:Decrypt",
}


def statements() -> list[dict]:
    return json.loads(POLICY.read_text())["Statement"]


def actions(statement: dict) -> set[str]:
    value = statement["Action"]
    return {value} if isinstance(value, str) else set(value)


def test_allows_exactly_what_sync_needs() -> None:
    allowed = set().union(*(actions(s) for s in statements() if s["Effect"] == "Allow"))
    assert allowed == NEEDED
    assert not any("*" in action for action in allowed)


def test_no_resource_is_a_wildcard_beyond_the_capture_prefix() -> None:
    for statement in statements():
        resources = statement["Resource"]
        for resource in [resources] if isinstance(resources, str) else resources:
            assert resource != "*"
            if statement["Effect"] == "Allow" and "*" in resource:
                assert resource == "arn:aws:s3:::BUCKET/captures/*", resource


def test_nothing_is_denied_that_multipart_uploads_need() -> None:
    """UploadPart is authorised as s3:PutObject without an SSE header: a deny on it breaks uploads."""
    assert [s for s in statements() if s["Effect"] == "Deny"] == []
