"""Attention over query chunks, so that only one chunk's scores are alive at a time.

What is decided here: the default chunk (:func:`default_query_chunk`); how a query length is cut (a
static Python loop, so the traced graph is a fixed list of Slice -> scores -> softmax -> MatMul
blocks; the last chunk is open-ended, so no row is dropped whatever the length); the decoder's
grouped-head attention of one chunk (softcap, bool mask); and the transformers attention function the
vision tower uses while :class:`~.graphs.VisionEncoder` runs it.

Chunking over queries is exact: each query row's softmax is independent of the others. ONNX Runtime
frees one chunk's scores before the next chunk's are computed, which bounds the prefill's peak memory
by one chunk's [heads, chunk, total] scores instead of [heads, seq, total].
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# The default chunk's most query rows: a 224 px prompt (~266 positions) and every decode step fit in one.
QUERY_CHUNK = 512
# A default chunk's query rows x key positions (per head) at most, halving the rows down to MIN_QUERY_CHUNK:
# about 8 MB of float32 scores per head. 512 rows at 224 and 448 px (up to 3,906 positions), 256 at 896 px
# (4,096 image tokens; 4,608 decoder positions). Measured on mid int8 at 896 px (a 4,100-position prompt,
# in-place cache): peak RSS 868 MB with 512 rows in both graphs, 778 MB with 256.
SCORES_PER_CHUNK = 2_000_000
MIN_QUERY_CHUNK = 64


def default_query_chunk(length: int) -> int:
    """Query rows per chunk for attention over ``length`` keys: QUERY_CHUNK, halved while a chunk's scores
    would exceed SCORES_PER_CHUNK (each empty chunk costs a decode step a few nodes, so not smaller)."""
    chunk = QUERY_CHUNK
    while chunk > MIN_QUERY_CHUNK and chunk * length > SCORES_PER_CHUNK:
        chunk //= 2
    return chunk


def chunk_bounds(length: int, chunk: int) -> list[tuple[int, int | None]]:
    """(start, end) of each chunk of a sequence up to ``length`` long; the last one ends open (None)."""
    if chunk < 1:
        raise ValueError(f"query chunk must be >= 1, got {chunk}")
    starts = list(range(0, max(length, 1), chunk))
    return [(start, starts[i + 1] if i + 1 < len(starts) else None) for i, start in enumerate(starts)]


def grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
    scaling: float, softcap: float | None, num_kv_heads: int,
) -> torch.Tensor:
    """query [b, heads, s, d], key/value [b, kv, total, d], mask bool [b, 1, s, total] -> [b, heads, s, d].

    Grouped heads: [b, kv, groups*s, d] against [b, kv, total, d], no repeat of the cache.
    """
    batch, heads, seq, head_dim = query.shape
    total = key.shape[2]
    groups = heads // num_kv_heads
    grouped_query = query.reshape(batch, num_kv_heads, groups * seq, head_dim)
    scores = torch.matmul(grouped_query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(batch, num_kv_heads, groups, seq, total)  # no -1: a chunk may be empty
    scores = torch.where(mask.unsqueeze(1), scores, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.matmul(probs.view(batch, num_kv_heads, groups * seq, total), value)
    return out.view(batch, heads, seq, head_dim)


def chunked_grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
    scaling: float, softcap: float | None, num_kv_heads: int, max_len: int, chunk: int = QUERY_CHUNK,
) -> torch.Tensor:
    """:func:`grouped_attention` over query chunks of a dynamic length of at most ``max_len`` (longer still
    works: the last chunk takes the rest). One chunk (``max_len <= chunk``) is the plain computation."""
    bounds = chunk_bounds(max_len, chunk)
    if len(bounds) == 1:
        return grouped_attention(query, key, value, mask, scaling, softcap, num_kv_heads)
    outs = [
        grouped_attention(query[:, :, start:end], key, value, mask[:, :, start:end], scaling, softcap, num_kv_heads)
        for start, end in bounds
    ]
    return torch.cat(outs, dim=2)


def _plain_attention(query, key, value, mask, scaling):
    """SigLIP's eager attention for one block of queries: [b, h, q, d] -> [b, h, q, d]."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if mask is not None:
        scores = scores + mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value)


def chunked_vision_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, *, chunk: int = QUERY_CHUNK,
    **_interface_kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (the ``AttentionInterface`` signature; it passes extra keywords
    such as ``is_causal`` that a bidirectional encoder ignores): [b, h, n, d] -> ([b, n, h, d], None).

    The vision sequence is fixed per bundle, so the loop over chunks is static. Inference only: no dropout.
    """
    if dropout:
        raise ValueError("chunked vision attention is for export (eval mode): dropout must be 0")
    outs = []
    for start, end in chunk_bounds(query.shape[2], chunk):
        rows = None if attention_mask is None or attention_mask.shape[-2] == 1 else attention_mask[..., start:end, :]
        outs.append(_plain_attention(query[:, :, start:end], key, value,
                                     attention_mask if rows is None else rows, scaling))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def vision_attention_name(chunk: int) -> str:
    """Register the chunked vision attention for ``chunk`` with transformers (idempotent); its name."""
    from transformers import AttentionInterface

    name = f"paligemma_edge_chunked_{chunk}"
    if name not in AttentionInterface():  # the registry is class-wide; an instance reads it
        AttentionInterface.register(name, functools.partial(chunked_vision_attention, chunk=chunk))
    return name


@contextmanager
def attention_implementation(config, name: str) -> Iterator[None]:
    """Select the attention function ``name`` on a (sub-)config for the duration of the block only."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous
