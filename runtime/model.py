"""``paligemma_edge.load(bundle)``: a loaded bundle with a generation API."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .backends.base import create_backend
from .errors import BundleError, InputError
from .generate import generate_steps
from .manifest import Manifest, read_manifest, verify_files
from .preprocess import ImageInput, load_image, preprocess
from .prompt import PromptTokenizer
from .sampling import GenerationOptions


@dataclass(frozen=True)
class Timings:
    vision_ms: float
    prefill_ms: float
    decode_ms: float
    decode_tokens_per_s: float

    @property
    def time_to_first_token_ms(self) -> float:
        return self.vision_ms + self.prefill_ms


@dataclass(frozen=True)
class Generation:
    """One prompt's answer. ``token_ids`` are the generated ids, without prompt and eos."""

    prompt: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "eos", "length" (max_new_tokens) or "max_seq_len" (bundle limit)
    timings: Timings

    def to_dict(self) -> dict:
        return asdict(self) | {"token_ids": list(self.token_ids)}


@dataclass(frozen=True)
class TokenChunk:
    """A streamed token and the text it completes (empty while a character is incomplete)."""

    token_id: int
    text: str


class PaliGemma:
    """A bundle loaded on a backend. Use :func:`load` to create one."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend, tokenizer: PromptTokenizer):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer

    def __enter__(self) -> "PaliGemma":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.backend.close()

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Images -> image embeddings [batch, tokens, hidden] via the vision graph."""
        pixels = preprocess([load_image(i) for i in images], self.manifest.image)
        return self.backend.encode_images(pixels)

    def _pair(self, images: Sequence[ImageInput], prompts: Sequence[str]) -> list[int]:
        if not prompts:
            raise InputError("at least one prompt is needed")
        if len(images) == 1:
            return [0] * len(prompts)
        if len(images) != len(prompts):
            raise InputError(f"got {len(images)} images for {len(prompts)} prompts: give one image, or one per prompt")
        return list(range(len(prompts)))

    def _steps(self, images, prompts, options):
        """Start a generation: returns (vision ms, prompt batch, step iterator)."""
        image_index = self._pair(images, prompts)
        batch = self.tokenizer.batch(list(prompts))  # checks lengths before any model work
        start = time.perf_counter()
        image_embeds = self.encode_images(images)[image_index]
        vision_ms = (time.perf_counter() - start) * 1000
        tokens = self.manifest.tokens
        steps = generate_steps(
            self.backend, self.manifest.decoder, batch, image_embeds, options, tokens.eos, tokens.pad
        )
        return vision_ms, batch, steps

    def generate_batch(
        self, images: Sequence[ImageInput], prompts: Sequence[str], options: GenerationOptions | None = None
    ) -> list[Generation]:
        """Several prompts in one left-padded batch, on one shared image or one image each."""
        options = options or GenerationOptions()
        vision_ms, batch, steps = self._steps(images, prompts, options)
        rows = len(prompts)
        generated: list[list[int]] = [[] for _ in range(rows)]
        reasons = ["length"] * rows
        start = time.perf_counter()
        first_token_at = None
        count = 0
        for step in steps:
            first_token_at = first_token_at or time.perf_counter()
            count += 1
            for row in np.flatnonzero(step.active):
                if step.reached_eos[row]:
                    reasons[row] = "eos"
                else:
                    generated[row].append(int(step.tokens[row]))
        end = time.perf_counter()
        first_token_at = first_token_at or end
        budget_cut = count < options.max_new_tokens
        decode_s = end - first_token_at
        timings = Timings(
            vision_ms=vision_ms, prefill_ms=(first_token_at - start) * 1000, decode_ms=decode_s * 1000,
            decode_tokens_per_s=(count - 1) / decode_s if count > 1 and decode_s > 0 else 0.0,
        )
        return [
            Generation(
                prompt=prompt, text=self.tokenizer.decode(ids), token_ids=tuple(ids),
                finish_reason="max_seq_len" if reason == "length" and budget_cut else reason, timings=timings,
            )
            for prompt, ids, reason in zip(prompts, generated, reasons)
        ]

    def generate(self, image: ImageInput, prompt: str, options: GenerationOptions | None = None) -> Generation:
        return self.generate_batch([image], [prompt], options)[0]

    def stream(self, image: ImageInput, prompt: str, options: GenerationOptions | None = None) -> Iterator[TokenChunk]:
        """Yield tokens as they are generated (eos excluded), each with its new text."""
        _, _, steps = self._steps([image], [prompt], options or GenerationOptions())
        ids: list[int] = []
        emitted = ""
        for step in steps:
            if step.reached_eos[0]:
                return
            ids.append(int(step.tokens[0]))
            text = self.tokenizer.decode(ids)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                yield TokenChunk(ids[-1], "")
                continue
            yield TokenChunk(ids[-1], text[len(emitted):])
            emitted = text


def load(bundle: str | Path, backend: str = "onnxruntime", verify: bool = True, threads: int | None = None) -> PaliGemma:
    """Load a bundle directory. ``verify`` checks every file's sha256 against the manifest."""
    bundle_dir = Path(bundle)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle directory")
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest, checksums=verify)
    tokenizer = PromptTokenizer(bundle_dir / manifest.tokenizer, manifest)
    return PaliGemma(bundle_dir, manifest, create_backend(backend, bundle_dir, manifest, threads), tokenizer)
