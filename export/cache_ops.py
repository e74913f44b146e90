"""How the traced decoder adds a step's keys and values to its KV cache.

A growing cache appends them (``torch.cat``, an ONNX Concat): every step copies the whole cache into a
new buffer and past and present are both alive. An in-place cache is one buffer of fixed size,
[batch, kv heads, cache slots, head dim]: the new positions are written at ``write_indices`` (the slot of
each row's first new position) by ``paligemma_edge::cache_write``, a custom torch op that the ONNX
exporter translates to ONNX's ``TensorScatter`` (opset 24). Attention then reads the whole buffer
through the mask, which masks the slots not written yet as it masks left padding. A runtime binds the
same memory as past and present, so nothing is copied: ONNX Runtime's TensorScatter skips its copy when
the two share a buffer, and TensorRT (10.15+) parses it as a KV-cache update layer, whose output
aliases its input.

What is decided here:

- The op is opaque to torch.export (its fake returns a tensor shaped like the past), so every shape the
  graph derives from the key length is the buffer's, not "past + new" as with a Concat.
- Its eager body (used when PyTorch runs the module, e.g. in tests) writes a copy; only the exported
  graph is in place.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

SEQUENCE_AXIS = 2  # of [batch, kv heads, positions, head dim]
INPLACE_OPSET = 24  # TensorScatter


@torch.library.custom_op("paligemma_edge::cache_write", mutates_args=())
def cache_write(past: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor) -> torch.Tensor:
    """``past`` with ``update`` [b, kv, seq, d] written at slots write_indices[row] .. + seq of each row."""
    present = past.clone()
    seq = update.shape[SEQUENCE_AXIS]
    for row in range(past.shape[0]):
        start = int(write_indices[row])
        present[row, :, start:start + seq] = update[row]
    return present


@cache_write.register_fake
def _cache_write_shape(past: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(past)


def _tensor_scatter(past, update, write_indices):
    from onnxscript.onnx_opset import opset24

    return opset24.TensorScatter(past, update, write_indices, axis=SEQUENCE_AXIS)


# torch.onnx.export's custom_translation_table for graphs that use cache_write
ONNX_TRANSLATIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.ops.paligemma_edge.cache_write.default: _tensor_scatter,
}


def add_to_cache(past: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor | None) -> torch.Tensor:
    """The keys (or values) attention reads after this step: appended (``write_indices`` None) or the
    buffer with ``update`` written in place."""
    if write_indices is None:
        return torch.cat((past, update), dim=SEQUENCE_AXIS)
    return cache_write(past, update, write_indices)
