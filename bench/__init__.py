"""Benchmarks of mpq; results are written to bench/results/."""
