"""Benchmarks: engine throughput now; load generation, goodput search, simulator later."""
