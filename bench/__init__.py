"""Benchmarks of the gateway against the engines it fronts (`python -m bench.realtime`)."""
