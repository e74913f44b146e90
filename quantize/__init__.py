"""Quantization of fp32 bundles to fp16, int8 and int4 (needs the ``export`` extra: onnx)."""
