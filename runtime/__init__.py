"""The runtime: what ships to the device (numpy, pillow, tokenizers, onnxruntime)."""
