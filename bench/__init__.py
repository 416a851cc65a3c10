"""Benchmarks, run as `python -m bench.NAME`: they print figures, they do not pass or fail."""
