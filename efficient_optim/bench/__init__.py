"""Benchmarks users run: the quick optimizer comparison behind ``effopt bench``."""
