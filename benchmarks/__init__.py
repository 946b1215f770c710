"""Benchmarks of the fedq stack (run as ``python -m benchmarks.<name>``)."""
