"""Weight quantization of one graph: int8 dynamic (DynamicQuantizeMatMul) and weight-only (Q/DQ), rewritten in
place; int8 static (Q/DQ, calibrated) and int4 blocks with onnxruntime's tools."""

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


def _weight_matmuls(model: onnx.ModelProto, exclude: list[str]):
    """(node, weight initializer) for each MatMul whose B is a 2-D fp32 initializer only it reads."""
    initializers = {t.name: t for t in model.graph.initializer}
    users: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    for node in list(model.graph.node):
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or node.name in exclude or weight not in initializers or users[weight] != 1:
            continue
        tensor = initializers[weight]
        if len(tensor.dims) == 2 and tensor.data_type == onnx.TensorProto.FLOAT:
            yield node, tensor


def _swap_in_int8(model: onnx.ModelProto, tensor: onnx.TensorProto) -> tuple[str, str]:
    """Replace an fp32 weight [K, N] by symmetric int8 with one scale per output column; returns their names."""
    from onnx import numpy_helper

    array = numpy_helper.to_array(tensor)
    scale = np.abs(array).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(array / scale), -127, 127).astype(np.int8)
    names = f"{tensor.name}_int8", f"{tensor.name}_scale"
    model.graph.initializer.remove(tensor)
    model.graph.initializer.extend([numpy_helper.from_array(q, names[0]), numpy_helper.from_array(scale, names[1])])
    return names


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for opset in model.opset_import:
        if opset.domain == domain or (domain == "" and opset.domain == "ai.onnx"):
            opset.version = max(opset.version, version)
            return
    model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def int8_dynamic(model: onnx.ModelProto, exclude: list[str]) -> tuple[onnx.ModelProto, dict]:
    """Per-channel int8 weights, activations quantized on the fly: ONNX Runtime's DynamicQuantizeMatMul.

    Rewritten in place on the loaded graph (the fp32 weights stay in memory until the graph is
    freed, so the peak is about fp32 + int8): on the PaliGemma 2 3B decoder this peaked at 14.7 GB,
    where onnxruntime's quantize_dynamic (which works on a copy of the graph) reached 21.8 GB and
    was killed on a 24 GB machine."""
    quantized = 0
    for node, tensor in list(_weight_matmuls(model, exclude)):
        weight, scale = _swap_in_int8(model, tensor)
        node.CopyFrom(onnx.helper.make_node(
            "DynamicQuantizeMatMul", [node.input[0], weight, scale], list(node.output),
            name=f"{node.name or tensor.name}/int8", domain="com.microsoft"))
        quantized += 1
    ensure_opset(model, "com.microsoft", 1)
    params = {"method": "int8-dynamic", "weight_type": "int8", "per_channel": True, "symmetric": True,
              "op": "DynamicQuantizeMatMul", "matmuls": quantized}
    return model, params


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
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    params = {
        "method": "int8-static-qdq", "weight_type": "int8", "activation_type": "int8", "per_channel": True,
        "calibration": "minmax", "calibration_feeds": len(feeds), "op_types": ["MatMul"],
    }
    # The calibrator's own session runs an in-place cache's TensorScatter without shared buffers, which
    # copies and warns once per call: expected there, so its warnings are off while it runs.
    ort.set_default_logger_severity(3)
    try:
        quantized = _with_files(model, lambda src, dst: quantize_static(
            src, dst, _Feeds(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
            nodes_to_exclude=exclude, calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        ))
    finally:
        ort.set_default_logger_severity(2)  # ONNX Runtime's default: warnings
    return quantized, params


# MatMulNBits' accuracy_level 4: activations quantized to int8 per block inside the kernel, so the
# product runs on integer dot products. ONNX Runtime's default (0, fp32 compute) dequantizes the
# weights to floats first; on a 2304 x 9216 product at one token that measured 3.9x slower here.
INT4_ACCURACY_LEVEL = 4


def int4_blocks(model: onnx.ModelProto, block_size: int, exclude: list[str]) -> tuple[onnx.ModelProto, dict]:
    """Weight-only int4 in blocks along the input dimension (MatMulNBits), symmetric, int8 compute."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, nodes_to_exclude=exclude,
                                     accuracy_level=INT4_ACCURACY_LEVEL)
    quantizer.process()
    params = {"method": "int4-matmulnbits", "bits": 4, "block_size": block_size, "symmetric": True,
              "accuracy_level": INT4_ACCURACY_LEVEL}
    return quantizer.model.model, params


def int8_weight_only(model: onnx.ModelProto, exclude: list[str]) -> tuple[onnx.ModelProto, dict]:
    """int8 weights with a scale per output channel as DequantizeLinear -> MatMul; activations untouched.
    TensorRT runs these as weight-only int8 GEMMs (decode is bound by weight bytes, not arithmetic)."""
    quantized = 0
    for node, tensor in list(_weight_matmuls(model, exclude)):
        dequantized = f"{tensor.name}_dequantized"
        weight, scale = _swap_in_int8(model, tensor)
        model.graph.node.insert(list(model.graph.node).index(node), onnx.helper.make_node(
            "DequantizeLinear", [weight, scale], [dequantized], axis=1, name=f"{node.name}/dequantize"))
        node.input[1] = dequantized
        quantized += 1
    ensure_opset(model, "", 21)  # fp16 scales for DequantizeLinear need opset 19 or later
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
