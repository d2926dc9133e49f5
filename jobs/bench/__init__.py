"""Benchmarks: scripts that print ratios measured in one run (results in README.md here)."""
