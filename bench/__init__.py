"""Benchmarks: `python -m bench.<name> [--quick]`, results under docs/bench/."""
