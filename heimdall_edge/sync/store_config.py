"""Where and how captures are stored: the bucket, prefix, table, region, encryption, parts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import boto3

if TYPE_CHECKING:
    from heimdall_edge.settings import Settings

MiB = 1024**2
MIN_PART_BYTES = 5 * MiB
"""S3's smallest part (all but the last); moto enforces it too (EntityTooSmall)."""
MAX_PART_BYTES = 5 * 1024 * MiB


@dataclass(frozen=True)
class StoreConfig:
    """Where and how captures are stored; built from Settings by `from_settings`."""

    bucket: str
    prefix: str
    """Key prefix without leading or trailing slashes; "" puts device folders at the top."""
    table: str | None
    """DynamoDB index table; None: no index (put_index refuses, check skips it)."""
    region: str
    s3_endpoint_url: str | None = None
    dynamodb_endpoint_url: str | None = None
    sse: Literal["AES256", "aws:kms"] = "AES256"
    kms_key_id: str | None = None
    """With sse="aws:kms": the key id or ARN; None: the account's aws/s3 key."""
    multipart_threshold_bytes: int = 16 * MiB
    """Files larger than this go up in parts."""
    part_size_bytes: int = 8 * MiB

    def __post_init__(self) -> None:
        if not self.bucket:
            raise ValueError("StoreConfig.bucket is empty")
        object.__setattr__(self, "prefix", self.prefix.strip("/"))
        if self.sse not in ("AES256", "aws:kms"):
            raise ValueError(f"StoreConfig.sse must be 'AES256' or 'aws:kms', not {self.sse!r}")
        if self.kms_key_id and self.sse != "aws:kms":
            raise ValueError("StoreConfig.kms_key_id is set but sse is not 'aws:kms'")
        if not MIN_PART_BYTES <= self.part_size_bytes <= MAX_PART_BYTES:
            raise ValueError(
                f"StoreConfig.part_size_bytes must be between {MIN_PART_BYTES} (S3's minimum) "
                f"and {MAX_PART_BYTES}, got {self.part_size_bytes}"
            )
        if self.multipart_threshold_bytes < 0:
            raise ValueError("StoreConfig.multipart_threshold_bytes must be >= 0")

    @classmethod
    def from_settings(cls, settings: Settings) -> StoreConfig | None:
        """The store the settings describe; None when s3_bucket is unset (sync is off)."""
        if not settings.s3_bucket:
            return None
        sync = settings.sync
        if sync.kms_key_id and sync.sse != "aws:kms":
            from heimdall_edge.settings import SettingsError

            raise SettingsError(
                "sync.kms_key_id is set but sync.sse is 'AES256': set sync.sse = \"aws:kms\" "
                "(HEIMDALL_SYNC__SSE) or remove the key id"
            )
        return cls(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            table=settings.dynamodb_table or None,
            region=sync.region or _chain_region(),
            s3_endpoint_url=settings.s3_endpoint_url,
            dynamodb_endpoint_url=settings.dynamodb_endpoint_url,
            sse=sync.sse,
            kms_key_id=sync.kms_key_id,
            multipart_threshold_bytes=int(sync.multipart_threshold_mb * MiB),
        )


def _chain_region() -> str:
    """AWS_REGION (the SDKs' and AWS CLI v2's first choice), else boto3's own chain
    (AWS_DEFAULT_REGION, the profile's region); an error if there is none."""
    from heimdall_edge.settings import SettingsError, is_aws_region

    region = os.environ.get("AWS_REGION") or boto3.session.Session().region_name
    if not region:
        raise SettingsError(
            "no AWS region for the bucket and table: set sync.region (HEIMDALL_SYNC__REGION), "
            "AWS_REGION, or a region in the AWS profile"
        )
    if not is_aws_region(region):
        raise SettingsError(
            f"the AWS region {region!r} (from AWS_REGION, AWS_DEFAULT_REGION or the profile) is "
            "not an AWS region: fix it there or set sync.region (HEIMDALL_SYNC__REGION)"
        )
    return region
