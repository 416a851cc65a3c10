"""The store's breaker and connectivity, which every call to S3 or DynamoDB goes through.

One breaker and one connectivity for S3 and DynamoDB together: every store call feeds
both, so the service loop knows when to wait and when the store is back. A failure of
the IoT credentials provider (another host) feeds the breaker only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from heimdall_edge.cloud.breaker import BreakerState, CircuitBreaker
from heimdall_edge.cloud.errors import CloudError, ErrorKind
from heimdall_edge.sync.iot_credentials import SERVICE as CREDENTIALS_SERVICE

if TYPE_CHECKING:
    from heimdall_edge.cloud.connectivity import Connectivity

SERVICE = "s3"


class StoreGate:
    """Calls the store in worker threads (boto3 blocks), only while its breaker lets them."""

    def __init__(self, breaker: CircuitBreaker, connectivity: Connectivity | None) -> None:
        self.breaker = breaker
        self.connectivity = connectivity

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One store call in a worker thread, through the breaker.

        A CloudError (StoreError) counts for the breaker and the store's connectivity; any
        other exception (an OSError reading the file) says nothing about the store and
        propagates.
        """
        probing = self.breaker.state is BreakerState.HALF_OPEN
        if not self.breaker.allow():
            raise CloudError(SERVICE, ErrorKind.BREAKER_OPEN, "circuit breaker open; will retry")
        settled = False
        try:
            result = await asyncio.to_thread(fn, *args, **kwargs)
        except CloudError as error:
            self.record_failure(error)
            settled = True
            raise
        else:
            self.record_success()
            settled = True
            return result
        finally:
            if probing and not settled:
                self.breaker.release_probe()

    def record_success(self) -> None:
        self.breaker.record_success()
        if self.connectivity is not None:
            self.connectivity.record_success()

    def record_failure(self, error: CloudError) -> None:
        """For the breaker, and for the store's connectivity unless it was the credentials
        provider (another host) that could not be reached."""
        self.breaker.record_failure(error.kind)
        if self.connectivity is not None and error.service != CREDENTIALS_SERVICE:
            self.connectivity.record_failure(error.kind)
