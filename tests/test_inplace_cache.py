"""The decoder's KV cache: grown by copying (the default) or written in place (--kv-cache inplace).

Token parity with transformers for both kinds (both families, left-padded batches, Gemma 2's sliding
window) and for the in-place one at the real checkpoints' 224, 448 and 896 px; the graph's structure
(each present is its own past written by a TensorScatter); the ONNX Runtime backend's buffers (one per
past, written where it lies); the manifest's record of the kind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import paligemma_edge
from paligemma_edge.runtime.bundle.manifest import (
    GROWING, INPLACE, MANIFEST_NAME, WRITE_INDICES, past_names, present_names, read_manifest,
)
from paligemma_edge.runtime.errors import BundleError
from paligemma_edge.runtime.generation.loop import decode_step, prefill
from paligemma_edge.runtime.generation.sampling import GenerationOptions

from .conftest import Reference, model_id, run_cli

NEW_TOKENS = 10
# Different lengths (a left-padded batch); the long one passes the tiny Gemma 2's sliding window (8).
PROMPTS = ["caption en", "answer en what is the quick brown fox doing on the table today"]
INPLACE_MODELS = [(1, 28), (2, 42)]
# (family, image size): as the real checkpoints, 256 / 1,024 / 4,096 image tokens
LARGE_MODELS = [(1, 224), (2, 448), (1, 896)]


@pytest.fixture(scope="session")
def inplace_bundles(kv_bundle) -> dict[tuple[int, int], Path]:
    return {model: kv_bundle(model, INPLACE) for model in INPLACE_MODELS}


Generated = list[tuple[list[int], str]]  # per row: token ids (no eos) and why it ended


def _generate(bundle: Path, images: list, prompts: list[str]) -> Generated:
    with paligemma_edge.load(bundle) as runtime:
        results = runtime.generate_batch(images, prompts, GenerationOptions(max_new_tokens=NEW_TOKENS))
    return [(list(result.token_ids), result.finish_reason) for result in results]


def _expected(reference: Reference, images: list, prompts: list[str]) -> Generated:
    """transformers' rows as the runtime reports them: the eos that ended a row is its finish reason."""
    rows = reference.generate(images, prompts, NEW_TOKENS)
    assert len({t for row in rows for t in row}) > 2, "degenerate reference: a wrong token would not show"
    return [(row[:-1], "eos") if row and row[-1] in reference.eos_ids else (row, "length") for row in rows]


def _producers(path: Path) -> dict[str, onnx.NodeProto]:
    model = onnx.load(str(path), load_external_data=False)
    return {output: node for node in model.graph.node for output in node.output}


def test_inplace_decoder_writes_each_past_with_a_tensor_scatter(inplace_bundles):
    bundle = inplace_bundles[(2, 42)]
    manifest = read_manifest(bundle)
    assert manifest.decoder.kv_cache == INPLACE
    model = onnx.load(str(bundle / manifest.decoder_graph.file), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] == 24
    producers = _producers(bundle / manifest.decoder_graph.file)
    for layer in range(manifest.decoder.num_layers):
        for past, present in zip(past_names(layer), present_names(layer)):
            node = producers[present]
            assert (node.op_type, list(node.input)) == ("TensorScatter", [past, node.input[1], WRITE_INDICES])
    graph = manifest.decoder_graph
    shapes = {t.name: t.shape for t in (*graph.inputs, *graph.outputs)}
    assert shapes["past_key_0"] == shapes["present_key_0"] == ("batch", manifest.decoder.num_kv_heads, "cache",
                                                               manifest.decoder.head_dim)
    assert shapes["attention_mask"] == ("batch", 1, "seq", "cache") and shapes[WRITE_INDICES] == ("batch",)


def test_growing_decoder_appends_with_a_concat(bundles):
    bundle = bundles[(2, 42)]
    manifest = read_manifest(bundle)
    assert manifest.decoder.kv_cache == GROWING and WRITE_INDICES not in manifest.decoder_graph.input_names()
    producers = _producers(bundle / manifest.decoder_graph.file)
    node = producers[present_names(0)[0]]
    assert (node.op_type, node.input[0]) == ("Concat", past_names(0)[0])


@pytest.mark.parametrize("model", INPLACE_MODELS, ids=model_id)
def test_both_cache_kinds_match_transformers_on_a_left_padded_batch(model, bundles, inplace_bundles, references,
                                                                   images):
    expected = _expected(references[model], [images[0]] * 2, PROMPTS)
    assert _generate(bundles[model], [images[0]], PROMPTS) == expected
    assert _generate(inplace_bundles[model], [images[0]], PROMPTS) == expected


@pytest.mark.parametrize("model", LARGE_MODELS, ids=model_id)
def test_inplace_cache_matches_transformers_at_real_resolutions(model, workdir, images):
    from paligemma_edge.fixtures.tiny import TinySpec, build_checkpoint

    family, size = model
    checkpoint = build_checkpoint(workdir / f"{model_id(model)}-checkpoint", TinySpec(family=family, image_size=size))
    bundle = workdir / f"{model_id(model)}-bundle"
    tokens = (size // 14) ** 2
    run_cli("export", str(checkpoint), "--output", str(bundle), "--max-seq-len", str(tokens + 256),
            "--kv-cache", INPLACE, check=True)
    assert _generate(bundle, images[:2], PROMPTS) == _expected(Reference(checkpoint), images[:2], PROMPTS)


def test_onnxruntime_writes_new_positions_into_the_buffer_bound_as_past(inplace_bundles):
    """One zeroed buffer per past for the generation's capacity: prefill and each decode step write their
    positions into it where it lies (the OrtValue bound as past is the one bound as present)."""
    bundle = inplace_bundles[(1, 28)]
    with paligemma_edge.load(bundle) as runtime:
        backend, spec = runtime.backend, runtime.manifest.decoder
        batch = runtime.tokenizer.batch(PROMPTS)
        rows, width = batch.input_ids.shape
        embeds = np.zeros((rows, runtime.manifest.image.num_tokens, spec.hidden_size), np.float32)
        _, state = prefill(backend, spec, batch, embeds, new_tokens=3)
        name = past_names(0)[0]
        buffer = state.cache.values[name]
        address = buffer.data_ptr()
        assert buffer.shape() == [rows, spec.num_kv_heads, width + 3, spec.head_dim]
        held = buffer.numpy()
        assert np.abs(held[:, :, :width]).sum() > 0 and not held[:, :, width:].any()
        decode_step(backend, spec, state, np.array([5, 6]))
        assert state.cache.values[name] is buffer and buffer.data_ptr() == address
        assert buffer.numpy()[:, :, width].any() and not buffer.numpy()[:, :, width + 1:].any()
        assert state.key_valid.shape == (rows, width + 3) and state.key_valid[:, width].all()


def test_the_memory_budget_counts_the_cache_onnxruntime_allocates(inplace_bundles):
    """benchmarks/memory_budget.py's KV cache count against the buffers of a cache at the bundle's max sequence."""
    from paligemma_edge.benchmarks.memory_budget import kv_cache_bytes
    from paligemma_edge.fixtures.tiny import TinySpec

    with paligemma_edge.load(inplace_bundles[(2, 42)]) as runtime:
        backend, spec = runtime.backend, runtime.manifest.decoder
        batch = runtime.tokenizer.batch(PROMPTS[:1])
        embeds = np.zeros((1, runtime.manifest.image.num_tokens, spec.hidden_size), np.float32)
        _, state = prefill(backend, spec, batch, embeds, new_tokens=spec.max_seq_len)
        held = sum(value.numpy().nbytes for value in state.cache.values.values())
    assert held == kv_cache_bytes(TinySpec(family=2, image_size=42), spec.max_seq_len, 4)


def test_a_full_inplace_cache_is_refused(inplace_bundles):
    with paligemma_edge.load(inplace_bundles[(2, 42)]) as runtime:
        backend, spec = runtime.backend, runtime.manifest.decoder
        batch = runtime.tokenizer.batch(PROMPTS[:1])
        embeds = np.zeros((1, runtime.manifest.image.num_tokens, spec.hidden_size), np.float32)
        _, state = prefill(backend, spec, batch, embeds, new_tokens=1)
        decode_step(backend, spec, state, np.array([5]))
        with pytest.raises(paligemma_edge.InputError, match="full"):
            decode_step(backend, spec, state, np.array([5]))


def test_schema_3_manifests_read_as_growing_and_unknown_kinds_are_refused(bundles, tmp_path):
    source = bundles[(2, 28)]
    data = json.loads((source / MANIFEST_NAME).read_text())
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    decoder = {k: v for k, v in data["decoder"].items() if k != "kv_cache"}
    (bundle / MANIFEST_NAME).write_text(json.dumps(data | {"schema_version": 3, "decoder": decoder}))
    assert read_manifest(bundle).decoder.kv_cache == GROWING
    inplace = decoder | {"kv_cache": INPLACE}
    (bundle / MANIFEST_NAME).write_text(json.dumps(data | {"schema_version": 3, "decoder": inplace}))
    with pytest.raises(BundleError, match="schema 3 decoder grows its cache"):
        read_manifest(bundle)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data | {"decoder": data["decoder"] | {"kv_cache": "paged"}}))
    with pytest.raises(BundleError, match="kv_cache must be one of"):
        read_manifest(bundle)


def test_export_refuses_an_unknown_cache_kind(checkpoints, tmp_path):
    result = run_cli("export", str(checkpoints[(2, 28)]), "--output", str(tmp_path / "b"), "--kv-cache", "paged")
    assert result.returncode == 2 and "--kv-cache" in result.stderr and not (tmp_path / "b").exists()
