"""Benchmarks against transformers: ``paligemma-edge bench`` (harness.py), one process per row (worker.py),
the benchmark models built from configs (models.py)."""
