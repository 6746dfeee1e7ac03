"""Benchmarks: `python -m bench.suite`, `python -m bench.bench_service`, pytest-benchmark micros."""
