"""Prompts as PaliGemma reads them: ``<image> x N, <bos>, prefix, "\\n"``, batched with left padding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BundleError, InputError
from ..bundle.manifest import Manifest
from .attention_masks import position_ids


@dataclass(frozen=True)
class PromptBatch:
    """A left-padded batch of prompts; every prompt token belongs to the prefix block."""

    input_ids: np.ndarray  # [batch, seq] int64
    valid: np.ndarray  # [batch, seq] bool, False on left padding
    position_ids: np.ndarray  # [batch, seq] int64, 1-indexed, skipping pads
    image_positions: np.ndarray  # [batch, seq] bool, True on <image> tokens


class PromptTokenizer:
    """The bundle's tokenizer.json plus the prompt layout and the bundle's token ids."""

    def __init__(self, tokenizer_path: Path, manifest: Manifest):
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise BundleError(f"{tokenizer_path}: unreadable tokenizer ({exc})") from None
        # A tokenizer.json may carry a truncation (BERT-style files: 512) or padding. A prompt is
        # never cut or padded here: a cut would drop image tokens, which the model then refuses.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.tokens = manifest.tokens
        self.num_image_tokens = manifest.image.num_tokens
        self.max_seq_len = manifest.decoder.max_seq_len
        image_token = self._tokenizer.id_to_token(self.tokens.image)
        bos_token = self._tokenizer.id_to_token(self.tokens.bos)
        if image_token is None or bos_token is None:
            raise BundleError(f"{tokenizer_path}: has no token for the manifest's image or bos id; re-export")
        self._prompt_start = image_token * self.num_image_tokens + bos_token

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one prompt, image placeholders included.

        As PaliGemmaProcessor does: ``"<image>" x N + "<bos>" + prompt + "\n"`` tokenized as ONE
        string with the tokenizer's special tokens, so a pre-tokenizer that prefixes the first
        section (SentencePiece's dummy prefix) or a post-processor sees what it sees there."""
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        ids = self._tokenizer.encode(self._prompt_start + prompt + "\n").ids
        if ids.count(self.tokens.image) != self.num_image_tokens:
            raise InputError("a prompt cannot contain the image token; the image goes in --image")
        if len(ids) >= self.max_seq_len:
            raise InputError(
                f"prompt is {len(ids)} tokens ({self.num_image_tokens} of them image tokens) but the bundle's max "
                f"sequence is {self.max_seq_len}; shorten it or re-export with a larger --max-seq-len"
            )
        return ids

    def batch(self, prompts: list[str]) -> PromptBatch:
        encoded = [self.encode(p) for p in prompts]
        width = max(len(ids) for ids in encoded)
        input_ids = np.full((len(encoded), width), self.tokens.pad, dtype=np.int64)
        valid = np.zeros((len(encoded), width), dtype=bool)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):] = ids
            valid[row, width - len(ids):] = True
        return PromptBatch(
            input_ids=input_ids, valid=valid, position_ids=position_ids(valid),
            image_positions=valid & (input_ids == self.tokens.image),
        )

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)
