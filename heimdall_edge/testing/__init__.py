"""Material for tests and benchmarks, made on the spot rather than shipped as recordings."""
