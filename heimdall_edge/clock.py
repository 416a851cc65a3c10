"""The one clock type, so every part that is given a clock takes the same thing.

Time is injected (breakers, endpointers, backoff, the watchdog): a test hands in a
`heimdall_edge.testing.clocks.FakeClock` and never sleeps.
"""

from collections.abc import Callable

Clock = Callable[[], float]
"""Seconds on a monotonic scale; `time.monotonic` unless a test says otherwise."""
