"""Greedy tokens of the fp32 ONNX Runtime path equal transformers' generate, token for token."""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping

import numpy as np
import pytest

import paligemma_edge
from paligemma_edge import GenerationOptions
from paligemma_edge.runtime.backends.base import SessionHooks
from paligemma_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend
from paligemma_edge.runtime.generation.results import Generation

from .conftest import MODELS, model_id, run_cli

NEW_TOKENS = 12
# Different lengths, so the batch is left-padded; the long one exceeds the tiny Gemma 2's
# sliding window (8) in the prompt alone, and decoding goes further past it.
PROMPTS = ["caption en", "answer en what is the quick brown fox doing on the table today", "ocr"]


def text_generation(result: object) -> Generation:
    """generate()'s result for a text prompt, which is a plain Generation."""
    assert isinstance(result, Generation), type(result)
    return result


@pytest.mark.parametrize("model", MODELS, ids=model_id)
def test_batch_of_one_matches_transformers(model, bundles, references, images):
    with paligemma_edge.load(bundles[model]) as runtime:
        result = text_generation(runtime.generate(images[0], PROMPTS[1], GenerationOptions(max_new_tokens=NEW_TOKENS)))
    expected = references[model].generate([images[0]], [PROMPTS[1]], NEW_TOKENS)[0]
    assert list(result.token_ids) == expected
    assert result.finish_reason == "length"
    assert len(set(expected)) > 1, "degenerate reference: the test would not see a wrong token"


@pytest.mark.parametrize("model", MODELS, ids=model_id)
def test_left_padded_batch_matches_transformers(model, bundles, references, images):
    with paligemma_edge.load(bundles[model]) as runtime:
        shared = runtime.generate_batch([images[0]], PROMPTS, GenerationOptions(max_new_tokens=NEW_TOKENS))
        paired = runtime.generate_batch(images, PROMPTS, GenerationOptions(max_new_tokens=NEW_TOKENS))
    reference = references[model]
    assert [list(r.token_ids) for r in shared] == reference.generate([images[0]] * 3, PROMPTS, NEW_TOKENS)
    assert [list(r.token_ids) for r in paired] == reference.generate(images, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("model", [(2, 28)], ids=model_id)
def test_stops_on_any_eos_id_like_transformers(model, bundles, references, images):
    """Declare ids the model actually produces as eos, so every row stops early, at different steps."""
    reference = references[model]
    free = reference.generate(images, PROMPTS, NEW_TOKENS)
    eos = [free[0][3], free[1][5]]
    expected = reference.generate(images, PROMPTS, NEW_TOKENS, eos=eos)
    with paligemma_edge.load(bundles[model]) as runtime:
        runtime.manifest = dataclasses.replace(
            runtime.manifest, tokens=dataclasses.replace(runtime.manifest.tokens, eos=tuple(eos))
        )
        results = runtime.generate_batch(images, PROMPTS, GenerationOptions(max_new_tokens=NEW_TOKENS))
    for result, want in zip(results, expected):
        ended = want[-1] in eos
        assert result.finish_reason == ("eos" if ended else "length")
        assert list(result.token_ids) + ([want[-1]] if ended else []) == want
    assert results[0].finish_reason == "eos" and len(results[0].token_ids) <= 3


@pytest.mark.parametrize("model", [(1, 28), (2, 42)], ids=model_id)
def test_runtime_runs_without_torch_or_transformers(model, bundles, references, images):
    """The CLI, with torch and transformers made unimportable, gives transformers' tokens."""
    blocker = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
        "from paligemma_edge.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    import subprocess
    import sys

    args = ["run", str(bundles[model]), "--image", str(images[1]), "--json", "--max-new-tokens", str(NEW_TOKENS)]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    result = subprocess.run([sys.executable, "-c", blocker, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["token_ids"] for r in rows] == references[model].generate([images[1]] * 3, PROMPTS, NEW_TOKENS)
    for row, prompt in zip(rows, PROMPTS):
        assert row["prompt"] == prompt
        assert row["finish_reason"] == "length"
        assert set(row["timings"]) >= {"vision_ms", "prefill_ms", "decode_tokens_per_s"}
        assert isinstance(row["text"], str) and row["text"]


def test_cli_pairs_images_with_prompts(bundles, images):
    bundle = str(bundles[(2, 28)])
    paired = run_cli("run", bundle, "--image", str(images[0]), "--image", str(images[1]),
                     "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--json", check=True)
    single = [run_cli("run", bundle, "--image", str(i), "--prompt", p, "--json", check=True)
              for i, p in zip(images, PROMPTS[:2])]
    assert [json.loads(line)["token_ids"] for line in paired.stdout.splitlines()] == [
        json.loads(s.stdout)["token_ids"] for s in single
    ]
    mismatch = run_cli("run", bundle, "--image", str(images[0]), "--image", str(images[1]),
                       "--prompt", "a", "--prompt", "b", "--prompt", "c")
    assert mismatch.returncode == 2 and "2 images for 3 prompts" in mismatch.stderr


def test_stream_yields_the_generated_tokens(bundles, images):
    with paligemma_edge.load(bundles[(1, 42)]) as runtime:
        options = GenerationOptions(max_new_tokens=NEW_TOKENS)
        chunks = list(runtime.stream(images[2], PROMPTS[0], options))
        result = text_generation(runtime.generate(images[2], PROMPTS[0], options))
    assert [c.token_id for c in chunks] == list(result.token_ids)
    assert "".join(c.text for c in chunks) == result.text


def test_generation_stops_at_the_bundles_max_sequence(bundles, images):
    with paligemma_edge.load(bundles[(1, 28)]) as runtime:
        prompt_len = len(runtime.tokenizer.encode(PROMPTS[0]))
        result = text_generation(runtime.generate(images[0], PROMPTS[0], GenerationOptions(max_new_tokens=500)))
    assert result.finish_reason == "max_seq_len"
    assert prompt_len + len(result.token_ids) == runtime.manifest.decoder.max_seq_len


def test_sampling_is_seeded(bundles, images):
    with paligemma_edge.load(bundles[(2, 28)]) as runtime:
        def sample(seed):
            options = GenerationOptions(max_new_tokens=10, temperature=1.5, top_k=50, top_p=0.95, seed=seed)
            return text_generation(runtime.generate(images[0], PROMPTS[0], options)).token_ids

        assert sample(1) == sample(1)
        assert len({sample(seed) for seed in range(5)}) > 1


def test_runtime_imports_no_torch(bundles, images):
    import subprocess
    import sys

    code = (
        "import sys, paligemma_edge\n"
        f"m = paligemma_edge.load({str(bundles[(2, 28)])!r})\n"
        f"m.generate({str(images[0])!r}, 'caption en')\n"
        "bad = [n for n in ('torch', 'transformers') if n in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_decode_step_feeds_ort_values_back_without_copies(bundles):
    """The cache that goes in on step n+1 is the very buffer ONNX Runtime returned on step n, and the
    table goes in as the memory-mapped array itself (the feed observer sees the buffers bound)."""
    from paligemma_edge.runtime.generation.loop import decode_step, prefill

    bundle = bundles[(2, 28)]
    bound: dict[str, int] = {}

    def observe(graph: str, feeds: Mapping[str, np.ndarray]) -> None:
        if graph == "decoder":
            bound.update({name: array.ctypes.data for name, array in feeds.items()})

    with paligemma_edge.load(bundle) as runtime:
        manifest = runtime.manifest
        batch = runtime.tokenizer.batch(["caption en"])
    with OnnxRuntimeBackend(bundle, manifest, hooks=SessionHooks(observer=observe)) as backend:
        embeds = np.zeros((1, manifest.image.num_tokens, manifest.decoder.hidden_size), np.float32)
        _, state = prefill(backend, manifest.decoder, batch, embeds)
        before = {name: value.data_ptr() for name, value in state.cache.values.items()}
        bound.clear()
        decode_step(backend, manifest.decoder, state, np.array([5]))
        assert before and {name: bound[name] for name in before} == before
        assert bound["embedding"] == backend.embedding.ctypes.data


def test_cli_streamed_text_equals_the_json_text(bundles, images):
    args = ["run", str(bundles[(2, 42)]), "--image", str(images[0]), "--prompt", PROMPTS[0]]
    streamed = run_cli(*args, check=True).stdout
    text = json.loads(run_cli(*args, "--json", check=True).stdout)["text"]
    # The subprocess pipe is read with universal newlines; the tiny vocabulary has a "\r" token.
    assert streamed == text.replace("\r\n", "\n").replace("\r", "\n") + "\n"
