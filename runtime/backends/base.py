"""The interface every runtime backend implements, and the registry that picks one by name."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import BackendUnavailableError, InputError
from ..bundle.manifest import Manifest


class Backend(Protocol):
    """Runs a bundle's graphs. The KV cache is the backend's own object and stays on its device."""

    name: str

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [batch, 3, H, W] -> image embeddings [batch, tokens, hidden]."""

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """token ids [batch, seq] -> scaled token embeddings [batch, seq, hidden]."""

    def new_cache(self, batch: int) -> Any:
        """An empty KV cache for ``batch`` rows."""

    def step(
        self, inputs_embeds: np.ndarray, masks: dict[str, np.ndarray], position_ids: np.ndarray, cache: Any
    ) -> np.ndarray:
        """Run the decoder on new positions; extends ``cache``; returns last-position logits [batch, vocab]."""

    def close(self) -> None:
        """Release sessions and buffers."""

    # Optional: ``keep_rows(cache, rows) -> cache`` keeps only ``rows`` (indices) of a cache, so rows
    # that finished stop costing decode work. The generation loop uses it where a backend has it.


# name -> (module, class, what to install when the import fails)
BACKENDS = {
    "onnxruntime": ("paligemma_edge.runtime.backends.onnxruntime", "OnnxRuntimeBackend", "pip install onnxruntime"),
    "onnxruntime-cuda": ("paligemma_edge.runtime.backends.onnxruntime", "OnnxRuntimeCudaBackend",
                         "pip install onnxruntime-gpu"),
    "onnxruntime-tensorrt": ("paligemma_edge.runtime.backends.onnxruntime", "OnnxRuntimeTensorRTBackend",
                             "pip install onnxruntime-gpu"),
    "tensorrt": ("paligemma_edge.runtime.backends.tensorrt", "TensorRTBackend",
                 "pip install 'paligemma-edge[gpu]' (cuda-python); TensorRT comes with JetPack"),
    "tensorrt-rtx": ("paligemma_edge.runtime.backends.tensorrt", "TensorRTRtxBackend",
                     "pip install 'paligemma-edge[gpu,tensorrt-rtx]'"),
}


def create_backend(name: str, bundle_dir: Path, manifest: Manifest, threads: int | None = None) -> Backend:
    if name not in BACKENDS:
        raise InputError(f"unknown backend '{name}'; choose from: {', '.join(sorted(BACKENDS))}")
    module_name, class_name, install = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(f"backend '{name}' is not available ({exc.name} missing): {install}") from None
    return getattr(module, class_name)(bundle_dir, manifest, threads=threads)
