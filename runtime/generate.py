"""The KV-cached generation loop: prefill once, then one decoder call per new token.

``generate_steps`` is a generator that yields the tokens of each step as they are chosen;
callers (batch generation, streaming, the CLI) build on it and time it from outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .backends.base import Backend
from .manifest import DecoderSpec
from .masks import attention_mask
from .prompt import PromptBatch
from .sampling import GenerationOptions, next_tokens


@dataclass
class DecodeState:
    """What the loop carries between decoder calls, besides the backend's KV cache."""

    cache: Any
    key_valid: np.ndarray  # [batch, cache slots] False on left padding
    prefix_len: int  # cache slots of the prompt block
    next_positions: np.ndarray  # [batch] position id of the next token


@dataclass(frozen=True)
class Step:
    """One generated token per row. ``active`` rows were still generating; others got padding."""

    tokens: np.ndarray  # [batch] int64
    active: np.ndarray  # [batch] bool
    reached_eos: np.ndarray  # [batch] bool, this token is an end-of-sequence id


def _masks(spec: DecoderSpec, key_valid: np.ndarray, prefix_len: int, q_start: int, q_len: int):
    masks = {"attention_mask": attention_mask(key_valid, prefix_len, q_start, q_len)}
    if spec.has_sliding_layers:
        masks["sliding_attention_mask"] = attention_mask(key_valid, prefix_len, q_start, q_len, spec.sliding_window)
    return masks


def prefill(backend: Backend, spec: DecoderSpec, batch: PromptBatch, image_embeds: np.ndarray):
    """Run the whole prompt block; returns last-position logits and the decode state."""
    text_ids = np.where(batch.image_positions, 0, batch.input_ids)
    embeds = backend.embed(text_ids)
    embeds[batch.image_positions] = image_embeds.reshape(-1, embeds.shape[-1])
    rows, width = batch.input_ids.shape
    state = DecodeState(
        cache=backend.new_cache(rows), key_valid=batch.valid.copy(), prefix_len=width,
        next_positions=batch.position_ids[:, -1] + 1,
    )
    logits = backend.step(embeds, _masks(spec, state.key_valid, width, 0, width), batch.position_ids, state.cache)
    return logits, state


def decode_step(backend: Backend, spec: DecoderSpec, state: DecodeState, tokens: np.ndarray) -> np.ndarray:
    """Feed one token per row; returns the logits for the following token."""
    slot = state.key_valid.shape[1]
    state.key_valid = np.concatenate([state.key_valid, np.ones((len(tokens), 1), dtype=bool)], axis=1)
    masks = _masks(spec, state.key_valid, state.prefix_len, slot, 1)
    logits = backend.step(backend.embed(tokens[:, None]), masks, state.next_positions[:, None], state.cache)
    state.next_positions = state.next_positions + 1
    return logits


def token_budget(spec: DecoderSpec, prompt_width: int, options: GenerationOptions) -> int:
    """New tokens allowed: the option, capped so the cache never exceeds the bundle's max sequence."""
    return max(0, min(options.max_new_tokens, spec.max_seq_len - prompt_width))


def generate_steps(
    backend: Backend,
    spec: DecoderSpec,
    batch: PromptBatch,
    image_embeds: np.ndarray,
    options: GenerationOptions,
    eos_ids: tuple[int, ...],
    pad_id: int,
) -> Iterator[Step]:
    """Yield each step's tokens until every row hit an eos id or the budget is spent."""
    rng = np.random.default_rng(options.seed)
    budget = token_budget(spec, batch.input_ids.shape[1], options)
    logits, state = prefill(backend, spec, batch, image_embeds)
    finished = np.zeros(len(batch.input_ids), dtype=bool)
    for index in range(budget):
        tokens = np.where(finished, pad_id, next_tokens(logits, options, rng))
        active = ~finished
        reached_eos = active & np.isin(tokens, eos_ids)
        finished = finished | reached_eos
        yield Step(tokens=tokens, active=active, reached_eos=reached_eos)
        if finished.all() or index == budget - 1:
            return
        logits = decode_step(backend, spec, state, tokens)
