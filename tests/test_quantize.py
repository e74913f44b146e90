"""fp16 / int8 / int4 bundles from the tiny fp32 bundles, and the compare report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import paligemma_edge
from paligemma_edge import GenerationOptions
from paligemma_edge.quantize.calibration import DEFAULT_PROMPTS
from paligemma_edge.runtime.errors import BundleError
from paligemma_edge.runtime.bundle.manifest import read_manifest

from .conftest import QUANTIZED_MODELS as MODELS
from .conftest import VARIANTS, model_id, run_cli

PROMPTS = ["caption en", "answer en what is the quick brown fox doing on the table today", "ocr"]
WEIGHT_SUFFIXES = (".onnx", ".data", ".npy")

def weight_bytes(bundle) -> int:
    return sum(p.stat().st_size for p in bundle.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))


def tokens(bundle, images, options=GenerationOptions(max_new_tokens=10)):
    with paligemma_edge.load(bundle) as model:
        return [r.token_ids for r in model.generate_batch([images[0]], PROMPTS, options)]


@pytest.mark.parametrize("model", MODELS, ids=model_id)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_loads_and_generates(model, name, quantized, images):
    bundle = quantized[model, name]
    manifest = read_manifest(bundle)
    with paligemma_edge.load(bundle) as runtime:
        results = runtime.generate_batch([images[0]], PROMPTS, GenerationOptions(max_new_tokens=6))
    assert all(len(r.token_ids) > 0 or r.finish_reason == "eos" for r in results)
    precision = VARIANTS[name][1]
    assert manifest.precision == precision
    for graph in (manifest.vision_graph, manifest.decoder_graph):
        assert graph.precision == precision and graph.quantization["method"]


@pytest.mark.parametrize("model", MODELS, ids=model_id)
def test_fp16_keeps_the_fp32_tokens(model, bundles, quantized, images):
    reference = tokens(bundles[model], images)
    assert tokens(quantized[model, "fp16"], images) == reference
    assert tokens(quantized[model, "fp16-io"], images) == reference


@pytest.mark.parametrize("model", MODELS, ids=model_id)
def test_quantized_weights_are_smaller(model, bundles, quantized):
    fp32 = weight_bytes(bundles[model])
    assert weight_bytes(quantized[model, "int8"]) <= 0.45 * fp32
    assert weight_bytes(quantized[model, "int4"]) <= 0.35 * fp32
    assert weight_bytes(quantized[model, "fp16"]) <= 0.6 * fp32
    assert weight_bytes(quantized[model, "int8-keep"]) > weight_bytes(quantized[model, "int8"])


def test_manifest_records_methods_and_parameters(quantized):
    int4 = read_manifest(quantized[(2, 28), "int4"])
    assert int4.decoder_graph.quantization["block_size"] == 32 and int4.decoder_graph.quantization["bits"] == 4
    assert int4.embedding.dtype == "uint8" and int4.embedding.block_size == 64 and int4.embedding.scale_file
    assert "embedding" not in int4.decoder_graph.input_names()  # the LM head reads the table itself
    # int8 compute in the int4 kernels (accuracy_level 4): the fp32-compute default is several times slower
    graph = onnx.load(str(quantized[(2, 28), "int4"] / "decoder.onnx"), load_external_data=False).graph
    levels = [onnx.helper.get_node_attr_value(n, "accuracy_level") for n in graph.node if n.op_type == "MatMulNBits"]
    assert levels and set(levels) == {4} and int4.decoder_graph.quantization["accuracy_level"] == 4
    static = read_manifest(quantized[(2, 28), "int8-static"])
    assert static.decoder_graph.quantization["method"] == "int8-static-qdq"
    assert static.quantization["calibration"]["images"] == 3 and static.quantization["calibration"]["prompts"] == 2
    int8 = read_manifest(quantized[(2, 28), "int8"])
    assert int8.decoder_graph.quantization["method"] == "int8-dynamic"
    graph = onnx.load(str(quantized[(2, 28), "int8"] / "decoder.onnx"), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    dynamic = [n for n in graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert len(dynamic) == int8.decoder_graph.quantization["matmuls"] > 0
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and set(n.input) & weights]  # no fp32 weight left
    fp16 = read_manifest(quantized[(2, 28), "fp16"])
    ranges = fp16.decoder_graph.quantization["ranges"]
    assert {"max_abs_activation", "kept_in_fp32", "kept_ops", "threshold"} <= set(ranges)
    assert fp16.embedding.dtype == "float16"
    io = {t.name: t.dtype for t in fp16.decoder_graph.inputs}
    assert io["inputs_embeds"] == "float32" and io["embedding"] == "float16"
    io16 = {t.name: t.dtype for t in read_manifest(quantized[(2, 28), "fp16-io"]).decoder_graph.inputs}
    assert io16["inputs_embeds"] == "float16" and io16["past_key_0"] == "float16"
    keep = read_manifest(quantized[(2, 28), "int8-keep"])
    assert keep.embedding.dtype == "float32" and keep.embedding.scale_file is None


@pytest.mark.parametrize("name, method", [("int8-trt", "int8-weight-only-qdq"), ("int4-trt", "int4-qdq")])
def test_tensorrt_target_writes_what_the_parser_takes(quantized, name, method):
    """Weight-only Q/DQ on fp16 activations, the fp16 table feeding an fp16 head; no integer-only ops."""
    import onnx

    manifest = read_manifest(quantized[(2, 28), name])
    decoder = onnx.load(str(quantized[(2, 28), name] / manifest.decoder_graph.file))
    ops = {n.op_type for n in decoder.graph.node}
    onnxruntime_only = {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulNBits", "QuantizeLinear"}
    assert "DequantizeLinear" in ops and not ops & onnxruntime_only
    assert manifest.decoder_graph.quantization["method"] == method
    assert manifest.decoder_graph.quantization["target"] == "tensorrt"
    assert manifest.embedding.dtype == "float16" and manifest.embedding.scale_file is None
    io = {t.name: t.dtype for t in manifest.decoder_graph.inputs}
    assert io["embedding"] == "float16" and io["inputs_embeds"] == "float32" and io["past_key_0"] == "float32"


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8", "--target", "tensorrt", "--int8-method", "dynamic"], "TensorRT has no dynamic int8"),
    (["--precision", "int4", "--target", "tensorrt", "--int4-activations", "fp32"], "need fp16 activations"),
])
def test_tensorrt_target_refuses_formats_tensorrt_cannot_take(bundles, tmp_path, args, message):
    result = run_cli("quantize", str(bundles[(2, 28)]), "-o", str(tmp_path / "out"), *args)
    assert result.returncode == 2 and message in result.stderr and not (tmp_path / "out").exists()


def test_int8_table_reconstructs_the_embedding(bundles, quantized):
    from paligemma_edge.runtime.backends.embedding import HostEmbedding, dequantize_rows

    source = np.load(bundles[(1, 28)] / "embedding.npy")
    bundle = quantized[(1, 28), "int8"]
    table, scales = np.load(bundle / "embedding.npy"), np.load(bundle / "embedding_scale.npy")
    assert table.dtype == np.uint8 and table.shape == (source.shape[0], 1, 64)  # the tiny hidden size: one block
    restored = dequantize_rows(table, scales, np.arange(source.shape[0]), source.shape[1])
    assert np.all(np.abs(restored - source) <= scales / 2 + 1e-7)  # within half a step of each row's scale
    manifest = read_manifest(bundle)
    lookup = HostEmbedding(bundle, manifest, {}).lookup(np.array([[3, 7, 7]]))
    assert np.allclose(lookup, restored[[3, 7, 7]][None] * manifest.decoder.embedding_scale)
    with pytest.raises(BundleError, match="takes it as an input"):  # a graph that still wants the table
        HostEmbedding(bundle, manifest, {"embedding": np.dtype("uint8")})


def test_blocked_lm_head_computes_what_the_lookup_reads(tmp_path):
    """The 8-bit MatMulNBits head on a padded table (hidden 200: 13 blocks of 16) gives the logits of the
    rows dequantize_rows reads, to int8-activation accuracy."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from paligemma_edge.quantize import embedding
    from paligemma_edge.runtime.backends.embedding import dequantize_rows

    vocab, hidden, batch = 300, 200, 2
    rng = np.random.default_rng(0)
    table = rng.standard_normal((vocab, hidden)).astype(np.float32)
    block = embedding.head_block_size(hidden)
    blocks, scales = embedding.quantize_blocks(table, block, rows_per_chunk=64)
    assert block == 16 and blocks.shape == (vocab, 13, 16)
    np.save(tmp_path / "embedding.npy", blocks)
    np.save(tmp_path / "embedding_scale.npy", scales)
    head = helper.make_node("MatMul", ["embedding", "hidden_t"], ["logits_t"], name="head")
    graph = helper.make_graph(
        [head, helper.make_node("Transpose", ["logits_t"], ["logits"], perm=[1, 0])], "head",
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [vocab, hidden]),
         helper.make_tensor_value_info("hidden_t", TensorProto.FLOAT, [hidden, batch])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, vocab])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    embedding.blocked_int8_lm_head(model, tmp_path, head_name="head")
    onnx.save_model(model, str(tmp_path / "head.onnx"))
    session = ort.InferenceSession(str(tmp_path / "head.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["hidden_t"]
    hidden_t = rng.standard_normal((hidden, batch)).astype(np.float32)
    logits = session.run(None, {"hidden_t": hidden_t})[0]
    expected = hidden_t.T @ dequantize_rows(blocks, scales, np.arange(vocab), hidden).T
    assert np.abs(logits - expected).max() < 0.02 * np.abs(expected).max()
    assert np.abs(logits - hidden_t.T @ table.T).max() < 0.03 * np.abs(expected).max()


def test_int8_head_needs_a_recent_onnxruntime(quantized, monkeypatch):
    from paligemma_edge.runtime.backends import onnxruntime as backend
    from paligemma_edge.runtime.errors import BackendUnavailableError

    monkeypatch.setattr(backend.ort, "__version__", "1.22.1")
    with pytest.raises(BackendUnavailableError, match=r"needs onnxruntime >= 1.23 \(installed: 1.22.1\)"):
        paligemma_edge.load(quantized[(2, 28), "int4"])
    with paligemma_edge.load(quantized[(2, 28), "int8-keep"]):  # a float table: no such head
        pass


def test_int8_head_survives_the_external_data_save(bundles, tmp_path, monkeypatch, images):
    """With every graph saved as external data, the head's initializers still point at the table files."""
    from paligemma_edge.quantize import bundle as quantize_module
    from paligemma_edge.quantize.bundle import QuantizeOptions, quantize_bundle

    monkeypatch.setattr(quantize_module, "EXTERNAL_DATA_THRESHOLD", 0)
    manifest = quantize_bundle(bundles[(2, 28)], tmp_path / "int8", QuantizeOptions(precision="int8"))
    assert manifest.decoder_graph.external_data == ("decoder.onnx.data",)
    graph = onnx.load(str(tmp_path / "int8" / "decoder.onnx"), load_external_data=False).graph
    locations = {t.name: {e.key: e.value for e in t.external_data}.get("location") for t in graph.initializer}
    assert locations["lm_head/table"] == "embedding.npy" and locations["lm_head/scales"] == "embedding_scale.npy"
    assert len(tokens(tmp_path / "int8", images)[0]) > 0


@pytest.mark.parametrize("name", ["int8", "int4", "int8-static", "int4-fp16"])
def test_int8_lm_head_reads_the_bundles_table(quantized, name):
    """One copy on disk: the decoder's 8-bit MatMulNBits head takes its weights from embedding.npy and
    embedding_scale.npy themselves (external data at the .npy data offset), not from a copy."""
    bundle = quantized[(2, 28), name]
    graph = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False).graph
    heads = [n for n in graph.node if n.op_type == "MatMulNBits" and onnx.helper.get_node_attr_value(n, "bits") == 8]
    assert len(heads) == 1
    initializers = {t.name: t for t in graph.initializer}
    for name, file in zip(heads[0].input[1:3], ("embedding.npy", "embedding_scale.npy")):
        stored = np.load(bundle / file, mmap_mode="r")
        external = {entry.key: entry.value for entry in initializers[name].external_data}
        assert external == {"location": file, "offset": str(stored.offset), "length": str(stored.nbytes)}
    assert "embedding" not in [i.name for i in graph.input]


def test_fp16_keeps_nodes_that_leave_the_range(bundles, tmp_path, monkeypatch, images):
    """With the threshold lowered below the tiny model's activations, nodes are kept in fp32 and reported."""
    from paligemma_edge.quantize import fp16
    from paligemma_edge.quantize.bundle import QuantizeOptions, quantize_bundle

    monkeypatch.setattr(fp16, "SAFE_MAX", 1.0)
    manifest = quantize_bundle(bundles[(1, 28)], tmp_path / "fp16", QuantizeOptions(precision="fp16"))
    ranges = manifest.decoder_graph.quantization["ranges"]
    assert ranges["threshold"] == 1.0 and ranges["kept_in_fp32"] > 0 and ranges["kept_ops"]
    assert tokens(tmp_path / "fp16", images) == tokens(bundles[(1, 28)], images)


def test_compare_a_bundle_with_itself(bundles, workdir, calibration_dir, tmp_path):
    out = tmp_path / "report.json"
    bundle = str(bundles[(2, 28)])
    result = run_cli("compare", bundle, bundle, "--images", str(calibration_dir), "--max-new-tokens", "6",
                     "--json", str(out), check=True)
    report = json.loads(out.read_text())
    assert report["exact_match_rate"] == 1.0 and report["top1_agreement"] == 1.0
    assert report["max_abs_logit_diff"] == 0.0 and report["mean_abs_logit_diff"] == 0.0
    assert report["cases"] == 3 * len(DEFAULT_PROMPTS)  # no --prompts: PaliGemma's task prefixes
    assert report["first_divergence_steps"] == [None] * report["cases"]
    assert report["reference"]["weight_bytes"] == report["candidate"]["weight_bytes"] > 0
    assert "| exact match of generated tokens | 100.0% |" in result.stdout
    assert (tmp_path / "report.md").read_text() == result.stdout


def test_compare_quantized_against_fp32(bundles, quantized, calibration_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("caption en\tno such answer\nocr\n")
    out = tmp_path / "int4.json"
    run_cli("compare", str(bundles[(2, 28)]), str(quantized[(2, 28), "int4"]), "--images", str(calibration_dir),
            "--prompts", str(prompts), "--max-new-tokens", "6", "--json", str(out), check=True)
    report = json.loads(out.read_text())
    assert 0.0 <= report["exact_match_rate"] <= 1.0 and 0.0 <= report["top1_agreement"] <= 1.0
    assert report["max_abs_logit_diff"] > 0 and report["mean_abs_logit_diff"] <= report["max_abs_logit_diff"]
    assert report["reference"]["precision"] == "fp32" and report["candidate"]["precision"] == "int4"
    assert report["candidate"]["weight_bytes"] < report["reference"]["weight_bytes"]
    assert report["reference"]["accuracy"] == 0.0  # the one known answer is not what a random model says
    diverged = [d for d in report["first_divergence_steps"] if d is not None]
    assert all(0 <= d < 6 for d in diverged)


def test_bad_quantize_input(bundles, quantized, tmp_path, images):
    fp32 = str(bundles[(1, 28)])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    cases = [
        (["quantize", fp32, "--precision", "int3", "-o", str(tmp_path / "a")], "invalid choice"),
        (["quantize", str(quantized[(1, 28), "int8"]), "--precision", "fp16", "-o", str(tmp_path / "b")],
         "already int8"),
        (["quantize", str(quantized[(1, 28), "int8"]), "--precision", "int4", "-o", str(tmp_path / "c")],
         "already int8"),
        (["quantize", fp32, "--precision", "int8", "--int8-method", "static", "--calibration", str(empty),
          "-o", str(tmp_path / "d")], "no images"),
        (["quantize", fp32, "--precision", "int8", "--int8-method", "static", "-o", str(tmp_path / "e")],
         "needs --calibration"),
        (["quantize", fp32, "--precision", "int4", "--block-size", "24", "-o", str(tmp_path / "f")], "power of two"),
        (["quantize", fp32, "--precision", "int8", "-o", fp32], "must differ from the source"),
        (["compare", fp32, fp32, "--images", str(empty)], "no images"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and message in last and "Traceback" not in result.stderr, (args, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.parametrize("extra", [["--keep-embeddings"], ["--fp16-io"]])
def test_int4_fp16_activations_with_other_options(extra, bundles, tmp_path, images):
    target = tmp_path / "bundle"
    run_cli("quantize", str(bundles[(2, 28)]), "--precision", "int4", "--int4-activations", "fp16", *extra,
            "-o", str(target), check=True)
    manifest = read_manifest(target)
    io = {t.name: t.dtype for t in manifest.decoder_graph.inputs}
    if manifest.embedding.block_size:  # an int8 table: the head reads it, the graph takes no table
        assert "embedding" not in io and extra == ["--fp16-io"]
    else:
        assert io["embedding"] == manifest.embedding.dtype
    assert len(tokens(target, images)[0]) > 0


def test_fp16_head_reads_the_fp16_table_without_a_cast(quantized):
    import onnx

    decoder = onnx.load(str(quantized[(1, 28), "fp16"] / "decoder.onnx"))
    assert not [n for n in decoder.graph.node if n.op_type == "Cast" and "embedding" in n.input]


def test_quantize_leaves_the_source_alone_however_it_is_spelled(bundles, tmp_path):
    source = bundles[(1, 28)]
    result = run_cli("quantize", str(source), "--precision", "int8", "-o", f"{source}/../{source.name}", "--force")
    assert result.returncode == 2 and "must differ from the source" in result.stderr
    assert (source / "manifest.json").is_file()
