"""Benchmarks against transformers (issue 6; nothing here yet)."""
