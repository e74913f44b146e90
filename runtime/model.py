"""``paligemma_edge.load(bundle)``: a loaded bundle with a generation API in the mlx-lm manner.

What is decided here:
- ``generate(image, prompt)`` returns a result; ``stream(image, prompt)`` yields :class:`TokenChunk`
  and, read to its end, holds the same result as ``.result`` (a :class:`~.generation.streams.Stream`).
  Both are one path: ``generate`` is ``stream`` drained, and a single answer is a batch of one.
- ``detect ...`` / ``segment ...`` prompts come back parsed (``structure``), also from free prompts.
- The task methods (caption, describe, ocr, answer, detect, segment) are ``generate`` on the task's
  exact prompt (``build_prompt``) and return that task's result type; a task streams as
  ``model.stream(image, build_prompt(task, ...))``.
- ``generate_batch`` is ``stream_batch`` drained; ``stream_batch`` yields per-row events and lets
  the caller end rows (``stop``) or the whole batch (``close``) after the current step.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Generator, Iterable, Iterator, Sequence, TypeVar, Union

import numpy as np
from PIL import Image

from .backends.base import Backend, SessionHooks, create_backend
from .errors import BundleError, InputError
from .feature_cache import FeatureCache
from .generation.loop import Step, generate_steps
from .images import ImageInput, load_image
from .bundle.manifest import Manifest, read_manifest, verify_files
from .generation.mask_decoder import MaskDecoder
from .generation.parsing import parse_detections, parse_segmentations
from .preprocess import preprocess
from .generation.prompt import PromptTokenizer
from .generation.results import DetectionResult, Generation, SegmentationResult, Timings, TokenChunk
from .generation.sampling import GenerationOptions
from .generation.streams import Stream
from .generation.tasks import build_prompt, result_kind

TaskResult = Union[Generation, DetectionResult, SegmentationResult]
RowOptions = Union[GenerationOptions, Sequence[GenerationOptions], None]  # one for the batch, or one per prompt
R = TypeVar("R", Generation, DetectionResult, SegmentationResult)


class PaliGemma:
    """A bundle loaded on a backend. Use :func:`load` to create one."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: Backend, tokenizer: PromptTokenizer,
                 feature_cache: FeatureCache | None = None):
        self.bundle_dir = bundle_dir
        limit = backend.max_seq_len  # engines may be built for fewer positions than the graph
        if limit is not None and limit < manifest.decoder.max_seq_len:
            manifest = replace(manifest, decoder=replace(manifest.decoder, max_seq_len=limit))
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        self.feature_cache = feature_cache if feature_cache is not None else FeatureCache()
        self._mask_decoder: MaskDecoder | None = None

    def __enter__(self) -> "PaliGemma":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.backend.close()

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Images -> image embeddings [batch, tokens, hidden] via the vision graph."""
        pixels = preprocess([load_image(i) for i in images], self.manifest.image)
        return self.feature_cache.encode(pixels, self.backend.encode_images)

    def _pair(self, images: Sequence[ImageInput], prompts: Sequence[str]) -> list[int]:
        if not prompts:
            raise InputError("at least one prompt is needed")
        if len(images) == 1:
            return [0] * len(prompts)
        if len(images) != len(prompts):
            raise InputError(f"got {len(images)} images for {len(prompts)} prompts: give one image, or one per prompt")
        return list(range(len(prompts)))

    def _steps(self, images: Sequence[ImageInput], prompts: Sequence[str],
               options: GenerationOptions | Sequence[GenerationOptions], stop: Callable[[], Iterable[int]] | None
               ) -> tuple[float, Iterator[Step]]:
        """Start a generation: returns (vision ms, step iterator)."""
        image_index = self._pair(images, prompts)
        batch = self.tokenizer.batch(list(prompts))  # checks lengths before any model work
        start = time.perf_counter()
        image_embeds = self.encode_images(images)[image_index]
        vision_ms = (time.perf_counter() - start) * 1000
        tokens = self.manifest.tokens
        steps = generate_steps(
            self.backend, self.manifest.decoder, batch, image_embeds, options, tokens.eos, tokens.pad, stop
        )
        return vision_ms, steps

    def generate_batch(
        self, images: Sequence[ImageInput], prompts: Sequence[str], options: RowOptions = None
    ) -> list[Generation]:
        """Several prompts in one left-padded batch, on one shared image or one image each.

        ``options``: one for the batch, or one per prompt (each prompt then decodes exactly as it does
        alone, sampling included: see :class:`~.sampling.Sampler`). :meth:`stream_batch`, drained."""
        return self.stream_batch(images, prompts, options).drain()

    def stream_batch(
        self, images: Sequence[ImageInput], prompts: Sequence[str], options: RowOptions = None,
        stop: Callable[[], Iterable[int]] | None = None,
    ) -> Stream[tuple[int, TokenChunk | Generation], list[Generation]]:
        """:meth:`generate_batch`, streamed: yields ``(row, TokenChunk)`` as each row's tokens come and
        ``(row, Generation)`` as soon as a row is done (the rest of the batch may go on); its
        ``result`` is every row's :class:`Generation`. ``stop`` is asked after each step which rows
        to end now (those get no Generation event; their Generations in ``result`` hold what they
        had). Closing the stream stops generation after the current step."""
        return Stream(self._batch_steps(images, prompts, options, stop))

    def _batch_steps(
        self, images: Sequence[ImageInput], prompts: Sequence[str], options: RowOptions,
        stop: Callable[[], Iterable[int]] | None,
    ) -> Generator[tuple[int, TokenChunk | Generation], None, list[Generation]]:
        options = options or GenerationOptions()
        per_row = [options] * len(prompts) if isinstance(options, GenerationOptions) else list(options)
        vision_ms, steps = self._steps(images, prompts, options, stop)
        texts = [_TextStream(self.tokenizer) for _ in prompts]
        reasons = ["length"] * len(prompts)
        results: dict[int, Generation] = {}
        clock = _StepClock(vision_ms)
        for step in steps:
            clock.tick()
            for row in np.flatnonzero(step.active).tolist():
                if step.reached_eos[row]:
                    reasons[row] = "eos"
                else:
                    for chunk in texts[row].add(int(step.tokens[row])):
                        yield row, chunk
                if step.finished[row]:
                    for chunk in texts[row].finish():
                        yield row, chunk
                    results[row] = self._generation(prompts[row], texts[row].ids, reasons[row], per_row[row],
                                                    clock.timings())
                    yield row, results[row]
        for row, text in enumerate(texts):  # rows stopped by the caller, or cut by the bundle's max sequence
            if row not in results:
                for chunk in text.finish():
                    yield row, chunk
                results[row] = self._generation(prompts[row], text.ids, reasons[row], per_row[row], clock.timings())
        return [results[row] for row in range(len(prompts))]

    def _generation(self, prompt: str, ids: list[int], reason: str, options: GenerationOptions,
                    timings: Timings) -> Generation:
        budget_cut = len(ids) < options.max_new_tokens  # stopped by the bundle's max sequence, not by the caller
        return Generation(
            prompt=prompt, text=self.tokenizer.decode(ids), token_ids=tuple(ids),
            finish_reason="max_seq_len" if reason == "length" and budget_cut else reason, timings=timings,
        )

    # -- tasks -------------------------------------------------------------------------------

    def mask_decoder(self) -> MaskDecoder:
        """The bundle's mask decoder, loaded on first use."""
        if self.manifest.mask_decoder is None:
            raise InputError(
                "this bundle has no mask decoder, so it cannot segment: re-export with --mask-decoder vae-oid.npz"
            )
        if self._mask_decoder is None:
            self._mask_decoder = MaskDecoder.from_npz(self.bundle_dir / self.manifest.mask_decoder.file)
        return self._mask_decoder

    def check_can_parse(self, prompts: Sequence[str]) -> None:
        """Fail before generating when a segment answer could not be decoded (no mask decoder)."""
        if any(result_kind(p) == "segmentations" for p in prompts):
            self.mask_decoder()

    def structure(self, generation: Generation, width: int, height: int) -> TaskResult:
        """Wrap a detect/segment answer with its parsed objects; other answers pass through."""
        kind = result_kind(generation.prompt)
        if kind == "text":
            return generation
        if kind == "detections":
            return DetectionResult(generation, tuple(parse_detections(generation.text, width, height)))
        return SegmentationResult(
            generation, tuple(parse_segmentations(generation.text, width, height, self.mask_decoder()))
        )

    def stream(self, image: ImageInput, prompt: str, options: GenerationOptions | None = None
               ) -> Stream[TokenChunk, TaskResult]:
        """Yield each generated token (eos excluded) with the text it completes; once read to its
        end, the stream's ``result`` is what :meth:`generate` returns (parsed for detect/segment).
        Closing it (or leaving ``with model.stream(...) as stream:``) stops generation after the
        current step. A task streams through its prompt: ``model.stream(image, build_prompt("caption"))``.

        A token that ends inside a multi-byte character is held back until the character is
        complete (or generation ends), so the chunks' texts always join to the full answer.
        The image is read and a segment prompt checked here; generation starts at the first chunk.
        """
        picture = load_image(image)
        self.check_can_parse([prompt])
        return Stream(self._one_answer(picture, prompt, options))

    def _one_answer(self, picture: Image.Image, prompt: str, options: GenerationOptions | None
                    ) -> Generator[TokenChunk, None, TaskResult]:
        with self.stream_batch([picture], [prompt], options) as rows:
            for _, item in rows:
                if isinstance(item, TokenChunk):
                    yield item
            return self.structure(rows.result[0], *picture.size)

    def generate(self, image: ImageInput, prompt: str, options: GenerationOptions | None = None) -> TaskResult:
        """The answer to any prompt: a :class:`Generation`, or for ``detect ...`` / ``segment ...``
        prompts a :class:`DetectionResult` / :class:`SegmentationResult`. :meth:`stream`, drained."""
        return self.stream(image, prompt, options).drain()

    # Each task method is generate() on the task's prompt (tasks.build_prompt); to stream a task,
    # stream that prompt: model.stream(image, build_prompt("detect", objects=["cat"])).

    def caption(self, image: ImageInput, lang: str | None = None, options: GenerationOptions | None = None
                ) -> Generation:
        return self._task(image, build_prompt("caption", lang=lang), options, Generation)

    def describe(self, image: ImageInput, lang: str | None = None, options: GenerationOptions | None = None
                 ) -> Generation:
        return self._task(image, build_prompt("describe", lang=lang), options, Generation)

    def ocr(self, image: ImageInput, options: GenerationOptions | None = None) -> Generation:
        return self._task(image, build_prompt("ocr"), options, Generation)

    def answer(self, image: ImageInput, question: str, lang: str | None = None,
               options: GenerationOptions | None = None) -> Generation:
        return self._task(image, build_prompt("answer", lang=lang, question=question), options, Generation)

    def detect(self, image: ImageInput, objects: Sequence[str], options: GenerationOptions | None = None
               ) -> DetectionResult:
        return self._task(image, build_prompt("detect", objects=objects), options, DetectionResult)

    def segment(self, image: ImageInput, objects: Sequence[str], options: GenerationOptions | None = None
                ) -> SegmentationResult:
        return self._task(image, build_prompt("segment", objects=objects), options, SegmentationResult)

    def _task(self, image: ImageInput, prompt: str, options: GenerationOptions | None, kind: type[R]) -> R:
        result = self.generate(image, prompt, options)
        assert isinstance(result, kind)  # cannot fail: build_prompt's prefix decides the kind (tasks.result_kind)
        return result


class _TextStream:
    """One row's tokens as text chunks: a token that ends inside a multi-byte character is held
    back until the character is complete (or generation ends), so the chunks join to the answer."""

    def __init__(self, tokenizer: PromptTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._pending: list[int] = []
        self._emitted = ""

    def add(self, token: int) -> list[TokenChunk]:
        self.ids.append(token)
        self._pending.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self._emitted):
            return []
        chunks = self._flush(text[len(self._emitted):])
        self._emitted = text
        return chunks

    def finish(self) -> list[TokenChunk]:
        if not self._pending:
            return []
        text = self.tokenizer.decode(self.ids)
        return self._flush(text[len(self._emitted):] if text.startswith(self._emitted) else "")

    def _flush(self, text: str) -> list[TokenChunk]:
        chunks = [TokenChunk(token, "") for token in self._pending[:-1]] + [TokenChunk(self._pending[-1], text)]
        self._pending = []
        return chunks


class _StepClock:
    """Times a generation: prefill ends at the first step, decode runs from there to the last."""

    def __init__(self, vision_ms: float):
        self.vision_ms = vision_ms
        self.start = time.perf_counter()
        self.first: float | None = None
        self.steps = 0

    def tick(self) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.steps += 1

    def timings(self) -> Timings:
        end = time.perf_counter()
        first = self.first or end
        decode_s = end - first
        return Timings(
            vision_ms=self.vision_ms, prefill_ms=(first - self.start) * 1000, decode_ms=decode_s * 1000,
            decode_tokens_per_s=(self.steps - 1) / decode_s if self.steps > 1 and decode_s > 0 else 0.0,
        )


def load(bundle: str | Path, backend: str = "onnxruntime", verify: bool = True, threads: int | None = None,
         hooks: SessionHooks | None = None) -> PaliGemma:
    """Load a bundle directory. ``verify`` checks every file's sha256 against the manifest; ``hooks``
    watch the backend's graphs (calibration, profiling: see :class:`~.backends.base.SessionHooks`)."""
    bundle_dir = Path(bundle)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle directory")
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest, checksums=verify)
    tokenizer = PromptTokenizer(bundle_dir / manifest.tokenizer, manifest)
    return PaliGemma(bundle_dir, manifest, create_backend(backend, bundle_dir, manifest, threads, hooks), tokenizer)
