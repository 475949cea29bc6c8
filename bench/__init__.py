"""Benchmarks (not tests): `python -m bench.run` for serving throughput and latency against baselines.

In-process measurements (bench.roofline's decode step, the transformers baselines) allocate as the
server does: torch's large buffers on huge pages (bowline_runtime.host_pages), set before torch loads.
"""

from bowline_runtime.host_pages import prefer_huge_pages

prefer_huge_pages()
