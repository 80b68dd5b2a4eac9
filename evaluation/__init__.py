"""Benchmark scripts (run as modules: ``python -m evaluation.NAME``), their common module and results."""
