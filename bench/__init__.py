"""Benchmarks: one module per topic, run as `python -m bench.<name>`; results go to bench/results/."""
