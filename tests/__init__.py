"""The tests: unit, loopback and real-model, importing the kit in heimdall_edge.testing."""
