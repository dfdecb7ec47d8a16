"""Benchmark suites for triton-ema: ``pytest benchmarks/ --benchmark-only``, ``python -m benchmarks.report``."""
