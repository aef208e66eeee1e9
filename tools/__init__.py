"""Fixtures and tools the tests and benchmarks import: the demo family, the other families, synthetic images."""
