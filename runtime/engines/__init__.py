"""TensorRT engines: building them from a bundle (``build``) and what the TensorRT backend shares with
the builder (``common``)."""
