"""The KV-cached generation loop: prefill once, then one decoder call per new token.

``generate_steps`` is a generator that yields the tokens of each step as they are chosen;
callers (batch generation, streaming, the CLI) build on it and time it from outside.

The masks cover every cache slot the decoder reads: for a growing cache the slots written so far
and the new ones; for an in-place cache (DecoderSpec.cache_in_place) the whole buffer, whose slots
not written yet are masked out like left padding. The buffer holds the prompt and the most tokens
any row of the batch may still generate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..backends.base import Backend
from ..bundle.manifest import DecoderSpec
from ..errors import InputError
from .attention_masks import attention_mask
from .prompt import PromptBatch
from .sampling import GenerationOptions, Sampler


@dataclass
class DecodeState:
    """What the loop carries between decoder calls, besides the backend's KV cache."""

    cache: Any
    key_valid: np.ndarray  # [batch, cache slots the masks cover] False on left padding and unwritten slots
    prefix_len: int  # cache slots of the prompt block
    next_positions: np.ndarray  # [batch] position id of the next token
    length: int  # cache slots written


@dataclass(frozen=True)
class Step:
    """One generated token per row. ``active`` rows were still generating; others got padding."""

    tokens: np.ndarray  # [batch] int64
    active: np.ndarray  # [batch] bool
    reached_eos: np.ndarray  # [batch] bool, this token is an end-of-sequence id
    finished: np.ndarray  # [batch] bool, the row generates no more (eos or its budget; stopped rows aside)


def _masks(spec: DecoderSpec, key_valid: np.ndarray, prefix_len: int, q_start: int, q_len: int):
    masks = {"attention_mask": attention_mask(key_valid, prefix_len, q_start, q_len)}
    if spec.has_sliding_layers:
        masks["sliding_attention_mask"] = attention_mask(key_valid, prefix_len, q_start, q_len, spec.sliding_window)
    return masks


def prefill(backend: Backend, spec: DecoderSpec, batch: PromptBatch, image_embeds: np.ndarray,
            new_tokens: int | None = None):
    """Run the whole prompt block; returns last-position logits and the decode state.

    ``new_tokens``: the most decode steps that will follow (an in-place cache is sized for them);
    None: as many as the bundle's max sequence leaves room for."""
    text_ids = np.where(batch.image_positions, 0, batch.input_ids)
    embeds = backend.embed(text_ids)
    embeds[batch.image_positions] = image_embeds.reshape(-1, embeds.shape[-1])
    rows, width = batch.input_ids.shape
    capacity = max(width, spec.max_seq_len if new_tokens is None else min(spec.max_seq_len, width + new_tokens))
    key_valid = batch.valid.copy()
    if spec.cache_in_place:
        key_valid = np.zeros((rows, capacity), dtype=bool)
        key_valid[:, :width] = batch.valid
    state = DecodeState(
        cache=backend.new_cache(rows, capacity), key_valid=key_valid, prefix_len=width,
        next_positions=batch.position_ids[:, -1] + 1, length=width,
    )
    logits = backend.step(embeds, _masks(spec, state.key_valid, width, 0, width), batch.position_ids, state.cache)
    return logits, state


def decode_step(backend: Backend, spec: DecoderSpec, state: DecodeState, tokens: np.ndarray) -> np.ndarray:
    """Feed one token per row; returns the logits for the following token."""
    slot = state.length
    if spec.cache_in_place:
        if slot >= state.key_valid.shape[1]:
            raise InputError(f"the KV cache holds {slot} positions and is full: prefill with a larger new_tokens")
        state.key_valid[:, slot] = True
    else:
        state.key_valid = np.concatenate([state.key_valid, np.ones((len(tokens), 1), dtype=bool)], axis=1)
    masks = _masks(spec, state.key_valid, state.prefix_len, slot, 1)
    logits = backend.step(backend.embed(tokens[:, None]), masks, state.next_positions[:, None], state.cache)
    state.next_positions = state.next_positions + 1
    state.length += 1
    return logits


def keep_rows(backend: Backend, state: DecodeState, keep: np.ndarray) -> None:
    """Drop the other rows from the cache and the decode state (``keep``: indices into the current rows)."""
    state.cache = backend.keep_rows(state.cache, keep)
    state.key_valid = state.key_valid[keep]
    state.next_positions = state.next_positions[keep]


def generate_steps(
    backend: Backend,
    spec: DecoderSpec,
    batch: PromptBatch,
    image_embeds: np.ndarray,
    options: GenerationOptions | Sequence[GenerationOptions],
    eos_ids: tuple[int, ...],
    pad_id: int,
    stop: Callable[[], Iterable[int]] | None = None,
) -> Iterator[Step]:
    """Yield each step's tokens until every row hit an eos id or its token budget, or was stopped.

    ``options``: one for every row, or one per row (each row then samples as it would alone, see
    :class:`Sampler`), so rows may have different budgets. ``stop`` is called after each step and
    returns the rows the caller wants to end now (a client that went away). Rows that are done
    leave the backend's cache where the backend can drop rows (``can_drop_rows``): a batch then costs
    decode work only for the rows still generating.
    """
    rows, width = batch.input_ids.shape
    sampler = Sampler(options, rows)
    room = max(0, spec.max_seq_len - width)
    budgets = np.array([min(sampler.max_new_tokens(row), room) for row in range(rows)])
    stops_at_eos = np.array([sampler.stops_at_eos(row) for row in range(rows)])
    logits, state = prefill(backend, spec, batch, image_embeds, new_tokens=int(budgets.max(initial=0)))
    can_drop = backend.can_drop_rows
    in_cache = np.arange(rows)  # the batch rows the cache holds, in its order
    finished = budgets == 0
    produced = np.zeros(rows, dtype=np.int64)
    while not finished.all():
        active = ~finished
        tokens = np.full(rows, pad_id, dtype=np.int64)
        tokens[in_cache] = sampler.choose(logits, in_cache)
        tokens[finished] = pad_id
        reached_eos = active & stops_at_eos & np.isin(tokens, eos_ids)
        produced += active
        finished = finished | reached_eos | (produced >= budgets)
        yield Step(tokens=tokens, active=active, reached_eos=reached_eos, finished=finished.copy())
        if stop is not None:
            finished[list(stop())] = True
        if finished.all():
            return
        if can_drop and finished[in_cache].any():
            keep = np.flatnonzero(~finished[in_cache])
            keep_rows(backend, state, keep)
            in_cache = in_cache[keep]
        logits = decode_step(backend, spec, state, tokens[in_cache])
