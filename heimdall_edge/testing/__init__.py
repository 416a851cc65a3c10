"""The test kit for tests and benchmarks: fake cloud, moto, clocks, synthetic voices and rooms."""
