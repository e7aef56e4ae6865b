"""Benchmarks of headroom_memory_integrations: ``python -m benchmarks --help``; see
docs/benchmarks.md."""
