"""Export a PaliGemma checkpoint to a bundle (needs the ``export`` extra: torch, transformers, onnx)."""
