"""Benchmarks: contender and baseline in one process, recorded as JSON with the machine."""
