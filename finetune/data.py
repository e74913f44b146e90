"""Training examples and batches: which lines each step sees, and the tensors the model takes.

What is decided here:

- The order is a pure function of (seed, step): example ``i`` of the run is line ``perm_e[i % n]``
  of epoch ``e = i // n``, each epoch's permutation drawn from ``default_rng([seed, e])``. A resumed
  run therefore needs no sampler state, and sees exactly the lines an uninterrupted one would.
- Batches are built by transformers' PaliGemma processor with ``suffix=``: it lays out
  ``<image>... <bos> prefix \\n suffix <eos>``, sets ``token_type_ids`` 1 on the suffix (the
  prefix-LM mask: bidirectional over image and prefix, causal over the suffix) and labels -100
  everywhere but the suffix and its eos, so the loss is on the answer only. Rows are padded on the
  right: PaliGemma numbers positions 1..n from the first token whatever the attention mask says, so
  left padding would shift every real token's position during training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..evaluation.datasets import Record
from ..runtime.images import ImageInput, load_image

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Example:
    """One training pair: a picture (a path or a PIL image), the prefix, the answer, the task kind."""

    image: ImageInput
    prefix: str
    suffix: str
    kind: str = "other"

    @classmethod
    def from_record(cls, record: Record) -> "Example":
        return cls(record.image, record.prefix, record.suffix, record.kind)


def example_indices(step: int, batch_size: int, grad_accum: int, lines: int, seed: int) -> list[list[int]]:
    """Line indices of each micro-batch of optimizer step ``step``: epoch-wise permutations of the lines."""
    first = step * grad_accum * batch_size
    positions = range(first, first + grad_accum * batch_size)
    permutations: dict[int, np.ndarray] = {}
    flat = []
    for position in positions:
        epoch, offset = divmod(position, lines)
        if epoch not in permutations:
            permutations[epoch] = np.random.default_rng([seed, epoch]).permutation(lines)
        flat.append(int(permutations[epoch][offset]))
    return [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]


def dataset_source(examples: Sequence[Example], batch_size: int, grad_accum: int, seed: int
                   ) -> Callable[[int], list[list[Example]]]:
    """The micro-batches of each step drawn from a fixed list of examples (see :func:`example_indices`)."""
    def source(step: int) -> list[list[Example]]:
        return [[examples[i] for i in micro]
                for micro in example_indices(step, batch_size, grad_accum, len(examples), seed)]
    return source


class Collator:
    """Examples -> the model's inputs and labels, through the checkpoint's own processor (``suffix=``)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, examples: Sequence[Example]) -> dict:
        pictures = [load_image(e.image) for e in examples]
        batch = self.processor(
            text=[IMAGE_TOKEN + e.prefix for e in examples], images=pictures, suffix=[e.suffix for e in examples],
            return_tensors="pt", padding="longest", padding_side="right",
        )
        return dict(batch)

    def prompt(self, image, prefix: str) -> dict:
        """The inputs of one prompt for generation (no suffix, no labels)."""
        batch = self.processor(text=[IMAGE_TOKEN + prefix], images=[load_image(image)], return_tensors="pt")
        return {k: v for k, v in batch.items() if k != "labels"}
