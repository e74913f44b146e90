"""Choosing the next token from logits: greedy, temperature, top-k, top-p (pure numpy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding options. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.
    ``ignore_eos`` decodes on past end-of-sequence ids (kept as ordinary tokens) to ``max_new_tokens``:
    what benchmarks and profiles use to time a fixed number of steps."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise InputError(f"seed must be a non-negative integer, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_probabilities(logits: np.ndarray, options: GenerationOptions) -> np.ndarray:
    """Row-wise probabilities after temperature, top-k and top-p; [batch, vocab] float64."""
    scaled = logits.astype(np.float64) / options.temperature
    if options.top_k and options.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -options.top_k, axis=-1)[:, -options.top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if options.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep_sorted = (np.cumsum(sorted_probs, axis=-1) - sorted_probs) < options.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def next_tokens(logits: np.ndarray, options: GenerationOptions, rng: np.random.Generator) -> np.ndarray:
    """logits [batch, vocab] -> token ids [batch]."""
    if options.greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)
    probs = filtered_probabilities(logits, options)
    cumulative = np.cumsum(probs, axis=-1)
    draws = rng.random((probs.shape[0], 1)) * cumulative[:, -1:]
    # First token whose cumulative mass passes the draw; zero-probability tokens never do.
    return np.argmax(cumulative > draws, axis=-1).astype(np.int64)


class Sampler:
    """Each step's next tokens for the rows still generating.

    One ``GenerationOptions`` for the whole batch shares one random stream (seeded once), as a single
    ``generate_batch`` call always has. A list gives each row its own options and its own stream,
    seeded from its own seed: a row then draws exactly what it draws when generated alone, whatever
    else is in the batch (this is what lets a server batch unrelated requests).
    """

    def __init__(self, options: GenerationOptions | Sequence[GenerationOptions], rows: int):
        if isinstance(options, GenerationOptions):
            self.per_row: list[GenerationOptions] | None = None
            self.options = options
            self._rng = np.random.default_rng(options.seed)
        else:
            self.per_row = list(options)
            if len(self.per_row) != rows:
                raise InputError(f"got {len(self.per_row)} generation options for {rows} prompts")
            self._rngs = [np.random.default_rng(o.seed) for o in self.per_row]

    def max_new_tokens(self, row: int) -> int:
        return self._of(row).max_new_tokens

    def stops_at_eos(self, row: int) -> bool:
        return not self._of(row).ignore_eos

    def _of(self, row: int) -> GenerationOptions:
        return self.options if self.per_row is None else self.per_row[row]

    def choose(self, logits: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """logits [len(rows), vocab] of the batch rows ``rows`` -> their next token ids."""
        if self.per_row is None:
            return next_tokens(logits, self.options, self._rng)
        tokens = np.argmax(logits, axis=-1).astype(np.int64)
        for index, row in enumerate(rows):
            options = self.per_row[row]
            if not options.greedy:
                tokens[index] = next_tokens(logits[index:index + 1], options, self._rngs[row])[0]
        return tokens
