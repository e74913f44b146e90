"""Quantization of bundles to fp16, int8 and int4 (issue 4; nothing here yet)."""
