"""The DynamoDB index item of one capture revision: what `CaptureStore.put_index` writes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from heimdall_edge.spool.record import CaptureRecord, iso_utc


def index_item(
    record: CaptureRecord,
    keys: Mapping[str, str],
    sizes: Mapping[str, int] | None = None,
    *,
    bucket: str | None = None,
    synced_at: datetime | None = None,
) -> dict[str, Any]:
    """The DynamoDB index item for a capture whose files are at `keys` (name -> object key).

    Plain Python values, numbers as Decimal (DynamoDB's numbers), None left out.
    `sizes` defaults to the sizes the spool recorded; `bucket` defaults to the store's
    (put_index fills it in); `synced_at` to now.
    """
    if sizes is None:
        sizes = {name: info["bytes"] for name, info in record.files.items() if name in keys}
    item: dict[str, Any] = {
        "device_id": record.device_id,
        "capture_id": record.capture_id,
        "created_at": iso_utc(record.created_at),
        "trigger": record.trigger,
        "status": record.status,
        "transcript": record.transcript,
        "transcript_on_device": record.transcript_on_device,
        "speculative": record.speculative or None,
        "reply": record.reply,
        "error": record.error,
        "engines": dict(record.engines),
        "timings_ms": {
            stage: Decimal(str(ms)) for stage, ms in record.timings_ms.items() if math.isfinite(ms)
        },
        "s3_bucket": bucket,
        "s3_keys": dict(keys),
        "sizes": {name: int(size) for name, size in sizes.items()},
        "sha256": {name: record.files[name]["sha256"] for name in keys if name in record.files},
        "synced_at": iso_utc(synced_at or datetime.now(UTC)),
        "schema_version": record.schema_version,
        "revision": record.revision,
        "extra": dict(record.extra) or None,
    }
    return {name: value for name, value in item.items() if value is not None}


def dynamo_value(value: Any) -> Any:
    """Values DynamoDB takes: floats as Decimal (non-finite as text), tuples as lists."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        return Decimal(str(value)) if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): dynamo_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [dynamo_value(v) for v in value]
    return value
