"""Weight quantization of one graph with onnxruntime's tools: int8 dynamic, int8 static (Q/DQ), int4 blocks."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx


def _with_files(model: onnx.ModelProto, run) -> onnx.ModelProto:
    """onnxruntime.quantization works on paths: round-trip through a temporary directory."""
    with tempfile.TemporaryDirectory() as scratch:
        source, target = Path(scratch) / "in.onnx", Path(scratch) / "out.onnx"
        onnx.save_model(model, str(source), save_as_external_data=True, location="in.onnx.data")
        run(str(source), str(target))
        return onnx.load(str(target))


def int8_dynamic(model: onnx.ModelProto, exclude: list[str]) -> tuple[onnx.ModelProto, dict]:
    """Per-channel int8 weights, activations quantized on the fly (ONNX Runtime on CPU)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    params = {"method": "int8-dynamic", "weight_type": "int8", "per_channel": True, "op_types": ["MatMul"]}
    quantized = _with_files(model, lambda src, dst: quantize_dynamic(
        src, dst, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
        nodes_to_exclude=exclude, use_external_data_format=True,
    ))
    return quantized, params


class _Feeds:
    """onnxruntime's CalibrationDataReader protocol over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = feeds
        self._next = 0

    def get_next(self):
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def rewind(self):  # some onnxruntime versions call it between calibration passes
        self._next = 0


def int8_static(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], exclude: list[str]
                ) -> tuple[onnx.ModelProto, dict]:
    """Q/DQ int8 (per-channel weights, calibrated activations): TensorRT's explicit quantization format."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    params = {
        "method": "int8-static-qdq", "weight_type": "int8", "activation_type": "int8", "per_channel": True,
        "calibration": "minmax", "calibration_feeds": len(feeds), "op_types": ["MatMul"],
    }
    quantized = _with_files(model, lambda src, dst: quantize_static(
        src, dst, _Feeds(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
        nodes_to_exclude=exclude, calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    ))
    return quantized, params


def int4_blocks(model: onnx.ModelProto, block_size: int, exclude: list[str]) -> tuple[onnx.ModelProto, dict]:
    """Weight-only int4 in blocks along the input dimension (MatMulNBits), symmetric."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, nodes_to_exclude=exclude)
    quantizer.process()
    params = {"method": "int4-matmulnbits", "bits": 4, "block_size": block_size, "symmetric": True}
    return quantizer.model.model, params


def int8_weight_only(model: onnx.ModelProto, exclude: list[str]) -> tuple[onnx.ModelProto, dict]:
    """int8 weights with a scale per output channel as DequantizeLinear -> MatMul; activations untouched.
    TensorRT runs these as weight-only int8 GEMMs (decode is bound by weight bytes, not arithmetic)."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    users: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    quantized = 0
    for node in list(model.graph.node):
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if node.name in exclude or weight not in initializers or users[weight] != 1:
            continue
        array = numpy_helper.to_array(initializers[weight])
        if array.ndim != 2 or array.dtype != np.float32:
            continue
        scale = np.abs(array).max(axis=0) / 127.0  # [K, N]: one scale per output column
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(array / scale), -127, 127).astype(np.int8)
        model.graph.initializer.remove(initializers[weight])
        model.graph.initializer.extend([numpy_helper.from_array(q, f"{weight}_int8"),
                                        numpy_helper.from_array(scale, f"{weight}_scale")])
        dequantized = f"{weight}_dequantized"
        model.graph.node.insert(list(model.graph.node).index(node), onnx.helper.make_node(
            "DequantizeLinear", [f"{weight}_int8", f"{weight}_scale"], [dequantized], axis=1, name=f"{node.name}/dequantize"))
        node.input[1] = dequantized
        quantized += 1
    for opset in model.opset_import:  # fp16 scales for DequantizeLinear need opset 19 or later
        if opset.domain in ("", "ai.onnx") and opset.version < 21:
            opset.version = 21
    params = {"method": "int8-weight-only-qdq", "weight_type": "int8", "per_channel": True, "symmetric": True,
              "matmuls": quantized}
    return model, params


def int4_qdq(model: onnx.ModelProto, block_size: int, exclude: list[str]) -> tuple[onnx.ModelProto, dict]:
    """Weight-only int4 as blocked DequantizeLinear -> MatMul (opset 21): TensorRT's int4 weight format."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, nodes_to_exclude=exclude,
                                     quant_format=QuantFormat.QDQ)
    quantizer.process()
    params = {"method": "int4-qdq", "bits": 4, "block_size": block_size, "symmetric": True}
    return quantizer.model.model, params
