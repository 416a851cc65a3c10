"""The IAM policy in docs/ grants what sync needs and nothing more."""

from __future__ import annotations

import json
from pathlib import Path

POLICY = Path(__file__).resolve().parents[1] / "docs" / "iam-policy.json"
BUCKET_POLICY = POLICY.with_name("bucket-policy.json")
THING = "${credentials-iot:ThingName}"

NEEDED = {
    "s3:PutObject",
    "s3:GetObject",
    "s3:AbortMultipartUpload",
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


def test_no_resource_is_a_wildcard_beyond_the_devices_own_prefix() -> None:
    for statement in statements():
        resources = statement["Resource"]
        for resource in [resources] if isinstance(resources, str) else resources:
            assert resource != "*"
            if statement["Effect"] == "Allow" and "*" in resource:
                assert resource == f"arn:aws:s3:::BUCKET/captures/{THING}/*", resource


def test_a_device_lists_and_indexes_only_under_its_own_identity() -> None:
    """With the IoT credentials provider, ThingName is the device: it cannot read, list,
    overwrite or forge another device's captures."""
    by_action = {a: s for s in statements() for a in actions(s)}
    assert by_action["s3:ListBucket"]["Condition"] == {
        "StringLike": {"s3:prefix": f"captures/{THING}/*"}
    }
    assert by_action["s3:ListBucketMultipartUploads"] is by_action["s3:ListBucket"]
    assert by_action["dynamodb:PutItem"]["Condition"] == {
        "ForAllValues:StringEquals": {"dynamodb:LeadingKeys": [THING]}
    }
    assert "Condition" not in by_action["dynamodb:DescribeTable"]  # no key to scope


def test_the_bucket_refuses_overwrites_but_not_the_parts_of_an_upload() -> None:
    [overwrites, transport] = json.loads(BUCKET_POLICY.read_text())["Statement"]
    assert (overwrites["Effect"], overwrites["Action"]) == ("Deny", "s3:PutObject")
    assert overwrites["Condition"] == {
        "Null": {"s3:if-none-match": "true"},  # no If-None-Match header...
        "Bool": {"s3:ObjectCreationOperation": "true"},  # ...on PutObject or the completion
    }
    assert transport["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_nothing_is_denied_that_multipart_uploads_need() -> None:
    """UploadPart is authorised as s3:PutObject without an SSE header: a deny on it breaks uploads
    (the bucket policy's deny is limited to object-creating operations for that reason)."""
    assert [s for s in statements() if s["Effect"] == "Deny"] == []
