"""One benchmark row, measured in a process of its own so that its peak memory is its own.

    python -m paligemma_edge.benchmarks.worker runtime BUNDLE --backend onnxruntime [--runs 3] [--new-tokens 32]
    python -m paligemma_edge.benchmarks.worker transformers CHECKPOINT [--runs 3] [--new-tokens 32]

Prints one JSON object: vision_ms, prefill_ms, ttft_ms, decode_tokens_per_s (medians after a
warm-up run), prompt_tokens, new_tokens, peak_rss_mb, and on the TensorRT backends decode_graphs
(whether decode steps ran as a CUDA graph, and whose). End-of-sequence ids are ignored so every run
decodes exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, TypeVar

from ..fixtures.tiny import scene_image
from ..runtime.memory import peak_rss_mb

PROMPT = "caption en"
T = TypeVar("T")


class _TokenClock:
    """A generate() streamer that notes when each put arrives: first the prompt, then each new token."""

    def __init__(self):
        self.started = time.perf_counter()
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _timed(function: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    value = function()
    return (time.perf_counter() - start) * 1000, value


def measure_runtime(bundle: str, backend: str, runs: int, new_tokens: int, threads: int | None) -> dict:
    import numpy as np

    from ..runtime.generation.loop import prefill
    from ..runtime.model import load
    from ..runtime.preprocess import preprocess
    from ..runtime.generation.sampling import GenerationOptions

    image = scene_image()
    with load(bundle, backend=backend, verify=False, threads=threads) as model:
        model.feature_cache.max_entries = 0  # every run encodes the image
        pixels = preprocess([image], model.manifest.image)
        batch = model.tokenizer.batch([PROMPT])
        options = GenerationOptions(max_new_tokens=new_tokens, ignore_eos=True)  # every run decodes new_tokens
        vision, prefills, ttfts, decode = [], [], [], []
        for run in range(runs + 1):  # the first run warms up
            vision_ms, embeds = _timed(lambda: model.backend.encode_images(pixels))
            prefill_ms, _ = _timed(lambda: prefill(model.backend, model.manifest.decoder, batch, embeds, new_tokens))
            result = model.generate_batch([image], [PROMPT], options)[0]
            if run:
                vision.append(vision_ms)
                prefills.append(prefill_ms)
                ttfts.append(result.timings.time_to_first_token_ms)
                decode.append(result.timings.decode_tokens_per_s)
        generated = len(result.token_ids)
        prompt_tokens = int(np.sum(batch.valid))
        graphs = getattr(model.backend, "decode_graphs", None)  # the TensorRT backends: how decode steps ran
    return {
        "vision_ms": statistics.median(vision), "prefill_ms": statistics.median(prefills),
        "ttft_ms": statistics.median(ttfts), "decode_tokens_per_s": statistics.median(decode),
        "prompt_tokens": prompt_tokens, "new_tokens": generated, "peak_rss_mb": peak_rss_mb(),
        **({"decode_graphs": graphs} if graphs is not None else {}),
    }


def measure_transformers(checkpoint: str, runs: int, new_tokens: int, threads: int | None) -> dict:
    import torch
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    if threads:
        torch.set_num_threads(threads)
    processor = AutoProcessor.from_pretrained(checkpoint, backend="pil")
    model = PaliGemmaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    inputs = processor(images=[scene_image()], text=[f"<image>{PROMPT}"], return_tensors="pt")
    inputs.pop("labels", None)
    generate = dict(do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)  # min_new_tokens holds eos off
    vision, ttfts, decode = [], [], []
    with torch.inference_mode():
        for run in range(runs + 1):
            vision_ms, _ = _timed(lambda: model.model.get_image_features(inputs["pixel_values"]))
            clock = _TokenClock()
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock,
                                 **generate)
            if run:  # one call gives both figures: a second, shorter call made decode time noisy (even < 0)
                vision.append(vision_ms)
                ttfts.append((clock.times[1] - clock.started) * 1000)
                decode.append((new_tokens - 1) / max(1e-9, clock.times[-1] - clock.times[1]))
    return {
        "vision_ms": statistics.median(vision), "prefill_ms": statistics.median(ttfts) - statistics.median(vision),
        "ttft_ms": statistics.median(ttfts), "decode_tokens_per_s": statistics.median(decode),
        "prompt_tokens": int(inputs["input_ids"].shape[1]), "new_tokens": int(out.shape[1] - inputs["input_ids"].shape[1]),
        "peak_rss_mb": peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("runtime", "transformers"))
    parser.add_argument("path")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.kind == "runtime":
        row = measure_runtime(args.path, args.backend, args.runs, args.new_tokens, args.threads)
    else:
        row = measure_transformers(args.path, args.runs, args.new_tokens, args.threads)
    json.dump(row, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
