"""Attention masks for the decoder graph, built by the caller (pure numpy).

PaliGemma is a prefix-LM: every prompt token (image tokens, <bos>, prefix text, "\\n")
attends to every other prompt token; generated tokens attend causally. Gemma 2's
sliding-window layers add ``kv > q - window`` to the causal part. This follows
transformers (masking_utils): ``((causal & window) | same prefix block) & key is real``,
with indices counted in cache slots, so left padding shifts queries and keys alike.
"""

from __future__ import annotations

import numpy as np


def attention_mask(
    key_valid: np.ndarray, prefix_len: int, q_start: int, q_len: int, window: int | None = None
) -> np.ndarray:
    """Boolean mask [batch, 1, q_len, kv_len]; True where the query may attend to the key.

    key_valid: [batch, kv_len] True for real (non-pad) cache slots.
    prefix_len: cache slots [0, prefix_len) hold the prompt block (bidirectional).
    q_start, q_len: the queries are cache slots [q_start, q_start + q_len).
    window: sliding window of the layer, or None for global layers.
    """
    kv_len = key_valid.shape[1]
    q = np.arange(q_start, q_start + q_len)[:, None]
    kv = np.arange(kv_len)[None, :]
    causal = kv <= q
    if window is not None:
        causal &= kv > q - window
    prefix_block = (q < prefix_len) & (kv < prefix_len)
    allowed = causal | prefix_block
    return (allowed[None, :, :] & key_valid[:, None, :])[:, None, :, :]


def position_ids(valid: np.ndarray) -> np.ndarray:
    """1-indexed positions that skip left padding, as transformers' PaliGemma uses (pads get 1)."""
    positions = np.cumsum(valid, axis=1, dtype=np.int64)
    return np.where(valid, positions, 1).astype(np.int64)
