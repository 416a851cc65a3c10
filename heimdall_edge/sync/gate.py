"""The store's gate (cloud/gate.py), which every call to S3 or DynamoDB goes through.

One breaker and one connectivity for S3 and DynamoDB together: every store call feeds
both, so the service loop knows when to wait and when the store is back. A failure of
the IoT credentials provider (another host) feeds the breaker only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from heimdall_edge.cloud.breaker import CircuitBreaker
from heimdall_edge.cloud.gate import BreakerGate
from heimdall_edge.sync.iot_credentials import SERVICE as CREDENTIALS_SERVICE

if TYPE_CHECKING:
    from heimdall_edge.cloud.connectivity import Connectivity

SERVICE = "s3"


def store_gate(breaker: CircuitBreaker, connectivity: Connectivity | None) -> BreakerGate:
    """The gate for the store's calls: a refused call is retried by the service loop."""
    return BreakerGate(
        SERVICE, breaker, connectivity, other_hosts={CREDENTIALS_SERVICE}, when_open="will retry"
    )
