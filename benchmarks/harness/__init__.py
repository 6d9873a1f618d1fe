"""Benchmark harnesses behind the scripts in benchmarks/: not part of the installed package."""
