"""What the exported bundle holds, and the manifest contract."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from paligemma_edge import BundleError
from paligemma_edge.runtime.bundle.manifest import MANIFEST_NAME, SCHEMA_VERSION, read_manifest, sha256_file

from .conftest import MAX_SEQ_LEN, MODELS, model_id


@pytest.mark.parametrize("model", MODELS, ids=model_id)
def test_manifest_describes_the_model(model, bundles, references):
    manifest = read_manifest(bundles[model])
    hf = references[model].model
    text = hf.config.text_config
    tokenizer = references[model].processor.tokenizer
    assert manifest.schema_version == SCHEMA_VERSION
    assert manifest.family == model[0] and manifest.precision == "fp32"
    assert (manifest.image.height, manifest.image.width) == (model[1], model[1])
    assert manifest.image.num_tokens == (model[1] // 14) ** 2 == references[model].processor.image_seq_length
    assert manifest.tokens.image == hf.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert manifest.tokens.bos == tokenizer.bos_token_id and manifest.tokens.pad == tokenizer.pad_token_id
    configured_eos = hf.generation_config.eos_token_id
    assert list(manifest.tokens.eos) == (configured_eos if isinstance(configured_eos, list) else [configured_eos])
    if model[0] == 2:
        assert len(manifest.tokens.eos) == 2
        assert manifest.decoder.sliding_window == text.sliding_window
        assert "sliding_attention" in manifest.decoder.layer_types
    else:
        assert manifest.decoder.sliding_window is None
    decoder = manifest.decoder
    assert (decoder.num_layers, decoder.num_heads, decoder.num_kv_heads, decoder.head_dim, decoder.vocab_size) == (
        text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, text.head_dim, text.vocab_size)
    assert decoder.max_seq_len == MAX_SEQ_LEN
    assert manifest.validation["passed"] and manifest.validation["max_abs_logit_diff"] < 1e-3
    assert {"torch", "transformers", "onnxruntime", "onnx"} <= set(manifest.versions)


@pytest.mark.parametrize("model", [(1, 28), (2, 42)], ids=model_id)
def test_every_file_is_listed_with_its_sha256(model, bundles):
    bundle = bundles[model]
    manifest = read_manifest(bundle)
    on_disk = {p.name for p in bundle.iterdir()} - {MANIFEST_NAME}
    assert set(manifest.files) == on_disk
    for name, digest in manifest.files.items():
        assert sha256_file(bundle / name) == digest


@pytest.mark.parametrize("model", [(1, 28), (2, 42)], ids=model_id)
def test_tied_embedding_is_stored_once(model, bundles, references):
    bundle = bundles[model]
    manifest = read_manifest(bundle)
    table = references[model].model.model.language_model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(np.load(bundle / manifest.embedding.file), table)
    for graph in (manifest.vision_graph, manifest.decoder_graph):
        proto = onnx.load(str(bundle / graph.file))
        shapes = [tuple(init.dims) for init in proto.graph.initializer]
        assert table.shape not in shapes and table.shape[::-1] not in shapes, graph.file
    decoder = onnx.load(str(bundle / manifest.decoder_graph.file), load_external_data=False)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in decoder.graph.input}
    assert inputs["embedding"] == list(table.shape)
    assert inputs["past_key_0"][0] == "batch" and inputs["past_key_0"][2] == "past"
    assert inputs["attention_mask"] == ["batch", 1, "seq", "total"]
    assert [i.name for i in decoder.graph.input] == manifest.decoder_graph.input_names()


def test_manifest_rejects_unknown_keys_and_other_schema_versions(bundles, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles[(1, 28)], bundle)
    data = json.loads((bundle / MANIFEST_NAME).read_text())

    (bundle / MANIFEST_NAME).write_text(json.dumps(data | {"surprise": 1}))
    with pytest.raises(BundleError, match="unknown key"):
        read_manifest(bundle)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data | {"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(BundleError, match="schema version"):
        read_manifest(bundle)
    broken = dict(data)
    del broken["tokens"]
    (bundle / MANIFEST_NAME).write_text(json.dumps(broken))
    with pytest.raises(BundleError, match="missing 'tokens'"):
        read_manifest(bundle)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data | {"embedding": data["embedding"] | {"block_size": 64}}))
    with pytest.raises(BundleError, match="names no scale_file"):
        read_manifest(bundle)
    # schema 1 differs only in the int8 table's layout: a float table reads, an old int8 table is refused
    old = {k: v for k, v in data["embedding"].items() if k != "block_size"}
    (bundle / MANIFEST_NAME).write_text(json.dumps(data | {"schema_version": 1, "embedding": old | {"transposed": False}}))
    assert read_manifest(bundle).embedding.block_size == 0
    (bundle / MANIFEST_NAME).write_text(json.dumps(data | {"schema_version": 1, "embedding": old | {"transposed": True}}))
    with pytest.raises(BundleError, match="old layout"):
        read_manifest(bundle)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    assert read_manifest(bundle).tokens.eos == tuple(data["tokens"]["eos"])


def test_staged_bundle_files_get_ordinary_modes(tmp_path):
    """onnx writes external weight files owner-only (0600); a finished bundle's files are readable by all."""
    import os

    from paligemma_edge.runtime.bundle.writer import staged_bundle

    output = tmp_path / "bundle"
    with staged_bundle(output, overwrite=False) as staging:
        private = staging / "decoder.onnx.data"
        private.write_bytes(b"weights")
        private.chmod(0o600)
    umask = os.umask(0)
    os.umask(umask)
    assert (output / "decoder.onnx.data").stat().st_mode & 0o777 == 0o644 & ~umask
