"""fp16 activations on a PaliGemma 2 whose residual stream carries massive activations (tests/outlier_model.py),
executed faithfully in fp16 by onnx's reference evaluator (ONNX Runtime's CPU kernels hide fp16 overflow).

Reference: the same checkpoint's fp32 bundle on ONNX Runtime. Control: the same model without outliers."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import onnx
import pytest
from PIL import Image

import paligemma_edge
from paligemma_edge.quantize.bundle import QuantizeOptions, quantize_bundle
from paligemma_edge.quantize.calibration import DECODE_STEPS, DEFAULT_PROMPTS
from paligemma_edge.quantize.compare import _DeltaStats, _teacher_forced
from paligemma_edge.quantize.reference import ReferenceBackend, load_reference, run_graph
from paligemma_edge.runtime.bundle.manifest import read_manifest
from paligemma_edge.runtime.generation.sampling import GenerationOptions

from .conftest import run_cli
from .outlier_model import residual_maxima, save_outlier_checkpoint

MAX_SEQ_LEN = 48
PROMPTS = ["caption en", "answer en what is in the image", "detect cat"]
STEPS = 8
VARIANTS = {  # quantize's options (in-process: the CLI's own tests start it as a command)
    "fp16": QuantizeOptions("fp16"),
    "int8-trt": QuantizeOptions("int8", target="tensorrt"),  # int8 weight-only, fp16 activations and table
    "int4-trt": QuantizeOptions("int4", target="tensorrt"),  # int4 Q/DQ, fp16 activations and table
    "int4-fp16": QuantizeOptions("int4", int4_activations="fp16"),  # MatMulNBits on fp16, int8 table head
}
WEIGHT_QUANTIZED = ["int8-trt", "int4-trt", "int4-fp16"]


@pytest.fixture(scope="module")
def outlier_bundles(tmp_path_factory):
    """(kind, variant) -> bundle, kind 'outliers' or 'plain'; (kind, 'checkpoint') -> the checkpoint."""
    root = tmp_path_factory.mktemp("outliers")
    out = {}
    for kind in ("outliers", "plain"):
        checkpoint = save_outlier_checkpoint(root / f"{kind}-checkpoint", family=2, outliers=kind == "outliers")
        out[kind, "checkpoint"] = checkpoint
        out[kind, "fp32"] = root / f"{kind}-fp32"
        run_cli("export", str(checkpoint), "--output", str(out[kind, "fp32"]), "--max-seq-len", str(MAX_SEQ_LEN),
                check=True)
        for name, options in VARIANTS.items():
            out[kind, name] = root / f"{kind}-{name}"
            quantize_bundle(out[kind, "fp32"], out[kind, name], options)
    return out


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(11)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(2)]


def faithful_agreement(reference, candidate, pictures):
    """Candidate on the reference evaluator against the fp32 reference on ONNX Runtime: (teacher-forced
    top-1 agreement, whether every case's greedy tokens match, whether every decoder output was finite)."""
    hits = total = 0
    same = []
    with paligemma_edge.load(reference, verify=False) as ref, load_reference(candidate) as cand:
        for picture in pictures:
            for prompt in PROMPTS:
                case_hits, steps = _teacher_forced(ref, cand, picture, prompt, STEPS, _DeltaStats())
                hits, total = hits + case_hits, total + steps
                options = GenerationOptions(max_new_tokens=STEPS)
                same.append(ref.generate_batch([picture], [prompt], options)[0].token_ids
                            == cand.generate_batch([picture], [prompt], options)[0].token_ids)
        backend = cand.backend
        assert isinstance(backend, ReferenceBackend)
        finite = all(all(call.values()) for call in backend.outputs_seen)
    return hits / total, all(same), finite


def test_the_outlier_model_carries_massive_activations(outlier_bundles, pictures):
    """transformers' own fp32 model: values in the thousands at <bos> in the residual stream, whose square
    (RMSNorm's first op) is far beyond fp16's 65504; the control stays small."""
    seen = residual_maxima(outlier_bundles["outliers", "checkpoint"], pictures[0])
    assert min(seen["max_abs_per_layer"][1:-1]) > 1000  # after layer 0, carried to the last layer's input
    assert seen["token"] == seen["bos"] and seen["max_square"] > 100 * 65504
    plain = residual_maxima(outlier_bundles["plain", "checkpoint"], pictures[0])
    assert max(plain["max_abs_per_layer"]) < 50 and plain["max_square"] < 65504


def test_fp16_bundle_gives_the_fp32_greedy_tokens_executed_in_fp16(outlier_bundles, pictures):
    top1, same, finite = faithful_agreement(outlier_bundles["outliers", "fp32"], outlier_bundles["outliers", "fp16"],
                                            pictures)
    assert same and top1 == 1.0 and finite


def test_without_the_fp32_nodes_fp16_loses_the_tokens(outlier_bundles, pictures, tmp_path, monkeypatch):
    """The control: with nothing kept in fp32 the same conversion, executed faithfully, gives other tokens."""
    from paligemma_edge.quantize import fp16

    monkeypatch.setattr(fp16, "SAFE_MAX", float("inf"))
    quantize_bundle(outlier_bundles["outliers", "fp32"], tmp_path / "fp16", QuantizeOptions(precision="fp16"))
    assert read_manifest(tmp_path / "fp16").decoder_graph.fp32_nodes() == ()
    top1, same, _ = faithful_agreement(outlier_bundles["outliers", "fp32"], tmp_path / "fp16", pictures)
    assert not same and top1 < 0.95


@pytest.mark.parametrize("name", WEIGHT_QUANTIZED)
def test_weight_quantized_fp16_bundles_agree_as_without_outliers(outlier_bundles, pictures, name):
    with_outliers = faithful_agreement(outlier_bundles["outliers", "fp32"], outlier_bundles["outliers", name], pictures)
    without = faithful_agreement(outlier_bundles["plain", "fp32"], outlier_bundles["plain", name], pictures)
    assert with_outliers[2] and without[2]  # finite logits everywhere
    assert with_outliers[0] >= without[0] - 0.05, (with_outliers, without)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_manifest_lists_what_stays_fp32(outlier_bundles, name):
    manifest = read_manifest(outlier_bundles["outliers", name])
    ranges = manifest.decoder_graph.quantization["ranges"]
    # measured on prefill and decode steps: 4 synthetic pictures x the task prefixes x (1 + decode steps)
    assert ranges["feeds"] == 4 * len(DEFAULT_PROMPTS) * (1 + DECODE_STEPS)
    assert ranges["max_abs_activation"] > 1000 and ranges["measured_out_of_range"] > 0
    graph = onnx.load(str(outlier_bundles["outliers", name] / manifest.decoder_graph.file), load_external_data=False)
    nodes = {n.name: n for n in graph.graph.node}
    reductions = [n for n in graph.graph.node if n.op_type == "ReduceMean"]
    kept = set(manifest.decoder_graph.fp32_nodes())
    assert ranges["rms_norm_reductions_fp32"] == len(reductions) > 0 and {n.name for n in reductions} <= kept
    producers = {out: n for n in graph.graph.node for out in n.output}
    for reduction in reductions:  # the squares reach the mean in fp32: no cast through fp16 between them
        assert producers[reduction.input[0]].op_type == "Pow" and producers[reduction.input[0]].name in kept
    assert kept <= set(nodes)
    plain = read_manifest(outlier_bundles["plain", name]).decoder_graph.quantization["ranges"]
    assert plain["rms_norm_reductions_fp32"] == 0 and "Pow" not in plain["kept_ops"]


needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None,
                               reason="TensorRT for RTX not installed")


@needs_rtx
def test_fp32_nodes_are_fp32_layers_of_the_tensorrt_network(outlier_bundles, tmp_path):
    import tensorrt_rtx_bindings as trt

    from paligemma_edge.runtime.engines.build import CollectingLogger, layer_dtypes

    bundle = tmp_path / "bundle"
    shutil.copytree(outlier_bundles["outliers", "int8-trt"], bundle)
    manifest = read_manifest(bundle)
    kept = manifest.decoder_graph.fp32_nodes()
    logger = CollectingLogger(trt).logger
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(network, logger).parse_from_file(str(bundle / manifest.decoder_graph.file))
    dtypes = layer_dtypes(network)
    assert all(dtypes[node] == ("float32",) for node in kept if node in dtypes)
    assert sum(node in dtypes for node in kept) >= len(kept) - 2  # Where/Softmax and the norms: one layer each
    assert sum(d == ("float16",) for d in dtypes.values()) > len(kept)  # the rest computes in fp16
    result = run_cli("build-engines", str(bundle), "--backend", "tensorrt-rtx", "--max-seq-len", "32", check=True)
    assert "keeps in fp32 are fp32 layers of the strongly typed network" in result.stderr


def test_a_bundle_with_non_finite_logits_is_not_written(tmp_path, capsys):
    """A PaliGemma 1 (no final softcap) whose final norm scale makes logits of ~1e5: measured, the head stays
    fp32, but --fp16-io hands the logits out in fp16 (inf). quantize says so in one line and writes nothing."""
    import torch

    from paligemma_edge.cli import main

    from .outlier_model import build_outlier_model

    model, processor = build_outlier_model(family=1, outliers=False)
    with torch.no_grad():
        model.model.language_model.norm.weight.mul_(0.0).add_(3e5)
    model.save_pretrained(tmp_path / "checkpoint")
    processor.save_pretrained(tmp_path / "checkpoint")
    fp32 = tmp_path / "fp32"
    run_cli("export", str(tmp_path / "checkpoint"), "--output", str(fp32), "--max-seq-len", str(MAX_SEQ_LEN),
            check=True)
    assert main(["quantize", str(fp32), "--precision", "fp16", "--fp16-io", "-o", str(tmp_path / "broken")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "decoder graph gives non-finite values" in err[-1] and "not written" in err[-1]
    assert "--fp16-io" in err[-1] and not (tmp_path / "broken").exists() and "Traceback" not in "\n".join(err)
    assert main(["quantize", str(fp32), "--precision", "fp16", "-o", str(tmp_path / "kept")]) == 0
    assert "MatMul" in read_manifest(tmp_path / "kept").decoder_graph.quantization["ranges"]["kept_ops"]


@pytest.mark.parametrize("bits, K, zero_points", [(4, 64, False), (4, 48, True), (8, 64, False), (8, 40, True)])
def test_reference_matmulnbits_computes_what_onnxruntime_does(bits, K, zero_points):
    """The reference evaluator's MatMulNBits against ONNX Runtime's kernel (fp32, accuracy level 0)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from paligemma_edge.quantize.reference import CUSTOM_OPS

    rng = np.random.default_rng(bits + K)
    N, block = 24, 16
    blocks = -(-K // block)
    packed = rng.integers(0, 256, (N, blocks, block * bits // 8), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, N * blocks).astype(np.float32)
    inputs = ["A", "B", "scales"]
    initializers = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")]
    if zero_points:
        per_row = -(-blocks * bits // 8)
        initializers.append(numpy_helper.from_array(rng.integers(0, 256, N * per_row, dtype=np.uint8), "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, N])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    a = rng.standard_normal((3, K)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    from onnx.reference import ReferenceEvaluator

    (got,) = run_graph(ReferenceEvaluator(model, new_ops=CUSTOM_OPS), {"A": a})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    (half,) = run_graph(ReferenceEvaluator(_as_fp16(model), new_ops=CUSTOM_OPS), {"A": a.astype(np.float16)})
    assert half.dtype == np.float16  # fp16 in, fp16 out, as the GPU kernels
    np.testing.assert_allclose(half.astype(np.float32), expected, rtol=2e-2, atol=2e-2)


def _as_fp16(model):
    from onnx import TensorProto, numpy_helper

    fp16 = onnx.ModelProto()
    fp16.CopyFrom(model)
    for value in (*fp16.graph.input, *fp16.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    for index, tensor in enumerate(fp16.graph.initializer):
        if tensor.data_type == TensorProto.FLOAT:
            fp16.graph.initializer[index].CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    return fp16


def test_reference_dynamic_quantize_matmul_computes_what_onnxruntime_does():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    from paligemma_edge.quantize.reference import CUSTOM_OPS

    rng = np.random.default_rng(5)
    # |w| <= 63: on x86 CPUs without VNNI, ONNX Runtime's u8 x s8 kernel sums pairs of products in int16,
    # which saturates for larger weights (2 x 255 x 127 > 32767); the operator's definition has no such cap
    weight = rng.integers(-63, 64, (32, 12), dtype=np.int8)
    scale = rng.uniform(0.001, 0.01, 12).astype(np.float32)
    node = helper.make_node("DynamicQuantizeMatMul", ["A", "W", "S"], ["Y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [4, 32])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 12])],
                              [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(scale, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    a = rng.standard_normal((4, 32)).astype(np.float32) * 3
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    (got,) = run_graph(ReferenceEvaluator(model, new_ops=CUSTOM_OPS), {"A": a})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_fp32_nodes_hand_each_other_fp32_tensors():
    """Two adjacent fp32 nodes (a square of 1000 and its mean) in an fp16 graph: onnxruntime's converter
    alone puts a Cast to fp16 between them (1e6 -> inf); after convert() the mean is 1e6, also as the
    graph's output (an fp32 node feeding an fp32 output)."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from paligemma_edge.quantize import fp16
    from paligemma_edge.quantize.reference import sorted_topologically

    nodes = [helper.make_node("Mul", ["x", "k"], ["big"], name="scale"),
             helper.make_node("Pow", ["big", "two"], ["square"], name="square"),
             helper.make_node("ReduceMean", ["square", "axes"], ["y"], name="mean", keepdims=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1])],
                              [numpy_helper.from_array(np.array(1000.0, np.float32), "k"),
                               numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                               numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.ones((2, 8), np.float32)
    blocked = ["square", "mean"]
    plain = convert_float_to_float16(model, keep_io_types=["x", "y"], node_block_list=blocked)
    with np.errstate(over="ignore"):
        assert not np.isfinite(run_graph(ReferenceEvaluator(sorted_topologically(plain)), {"x": x})[0]).all()
    converted = fp16.convert(model, keep_io=["x", "y"], node_block_list=blocked)
    (y,) = run_graph(ReferenceEvaluator(sorted_topologically(converted)), {"x": x})
    assert y.dtype == np.float32 and np.allclose(y, 1e6)
    assert [n.op_type for n in converted.graph.node if n.op_type == "Cast"] == ["Cast"] * 2  # x in, big out
