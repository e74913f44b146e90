"""fp16 graphs with the parts that leave fp16's range, as measured, kept in fp32.

Every float tensor of the fp32 graph is observed on calibration feeds; a node whose inputs or
outputs reach beyond ``SAFE_MAX`` (half of fp16's 65504, for headroom) stays fp32, and
onnxruntime's float16 converter casts around it. Gemma's embedding scale, RMSNorm's squares and
large post-norm weights are where this happens on real checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

FP16_MAX = 65504.0
SAFE_MAX = FP16_MAX / 2


@dataclass(frozen=True)
class RangeReport:
    """What the measurement saw and which nodes it keeps in fp32."""

    max_abs_activation: float
    kept_nodes: tuple[str, ...]
    kept_ops: dict[str, int]
    threshold: float

    def to_dict(self) -> dict:
        return {
            "max_abs_activation": self.max_abs_activation, "threshold": self.threshold,
            "kept_in_fp32": len(self.kept_nodes), "kept_ops": self.kept_ops, "kept_nodes": list(self.kept_nodes),
        }


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    return {v.name for v in values if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}


def measure_ranges(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Max |value| of every float tensor over the feeds (all intermediate tensors made outputs)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    floats = _float_tensors(model)
    existing = {o.name for o in probe.graph.output}
    produced = [out for node in probe.graph.node for out in node.output if out and out in floats]
    for name in produced:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    input_names = {i.name for i in session.get_inputs()}
    maxima: dict[str, float] = {name: 0.0 for name in floats}
    seen_inputs: set[int] = set()
    for feed in feeds:
        for name, value in feed.items():
            # The same array object in every feed (the embedding table) is measured once.
            if name in maxima and value.dtype == np.float32 and value.size and id(value) not in seen_inputs:
                seen_inputs.add(id(value))
                maxima[name] = max(maxima[name], float(np.abs(value).max()))
        for name, value in zip(names, session.run(names, {k: v for k, v in feed.items() if k in input_names})):
            if name in maxima and np.issubdtype(value.dtype, np.floating) and value.size:
                magnitudes = np.abs(value[~np.isnan(value)])  # NaN says nothing about range; inf counts
                if magnitudes.size:
                    maxima[name] = max(maxima[name], float(magnitudes.max()))
    return maxima


def nodes_out_of_range(model: onnx.ModelProto, maxima: dict[str, float], threshold: float | None = None) -> RangeReport:
    threshold = SAFE_MAX if threshold is None else threshold
    kept = [
        node for node in model.graph.node
        if any(maxima.get(name, 0.0) > threshold for name in (*node.input, *node.output) if name)
    ]
    ops: dict[str, int] = {}
    for node in kept:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return RangeReport(
        max_abs_activation=max(maxima.values(), default=0.0), kept_nodes=tuple(n.name for n in kept),
        kept_ops=ops, threshold=threshold,
    )


def convert(model: onnx.ModelProto, keep_io: list[str], node_block_list: list[str]) -> onnx.ModelProto:
    """fp16 weights and activations, except the blocked nodes; graph I/O named in ``keep_io`` stays fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(
        model, keep_io_types=keep_io, node_block_list=node_block_list, disable_shape_infer=False,
    )
