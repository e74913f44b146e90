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
