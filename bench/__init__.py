"""Benchmarks (not tests): `python -m bench.run` for serving throughput and latency against baselines."""
