"""fp16 activations with the parts that leave fp16's range, as measured, kept in fp32.

Every float tensor of the fp32 graph is observed on calibration feeds (prefill and KV-cached
decode steps); a node whose inputs or outputs reach beyond ``SAFE_MAX`` (half of fp16's 65504, for
headroom) stays fp32, and onnxruntime's float16 converter casts around it. Gemma's embedding
scale, the attention mask's fill value, RMSNorm's squares and large post-norm weights are where
this happens on real checkpoints, and the "massive activations" (values in the thousands in a few
residual channels at the first positions) that real LLMs carry: x^2 passes 65504 once |x| > 256.

One structural rule decides what to do with a measured hazard in an RMSNorm: its reduction
(Pow -> ReduceMean -> Add eps -> Sqrt -> Reciprocal) is computed in fp32 as one piece, in every
RMSNorm of the graph, once any of them is measured out of range. Massive activations ride the
residual stream through every layer, and a calibration set sees only some of the inputs that
trigger them; the reductions are a few small ops per layer.

The converter casts the output of every fp32 node back to fp16, even when the next node is fp32
too (Pow in fp32, Cast to fp16 = inf, Cast back, ReduceMean in fp32 of inf): :func:`convert`
removes those round trips, so a tensor between two fp32 nodes stays fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from ..runtime.errors import PaliGemmaEdgeError

FP16_MAX = 65504.0
SAFE_MAX = FP16_MAX / 2
RMS_NORM_REDUCTION = ("Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal")


@dataclass(frozen=True)
class RangeReport:
    """What the measurement saw and which nodes it keeps in fp32."""

    max_abs_activation: float
    kept_nodes: tuple[str, ...]  # measured beyond the threshold, plus what the RMSNorm rule adds
    kept_ops: dict[str, int]
    threshold: float
    measured_nodes: tuple[str, ...] = ()  # beyond the threshold on the calibration feeds
    rms_norm_reductions: int = 0  # RMSNorm reductions kept whole in fp32 by the rule (0: rule not triggered)
    feeds: int = 0  # calibration feeds the ranges were measured on

    def to_dict(self) -> dict:
        return {
            "max_abs_activation": self.max_abs_activation, "threshold": self.threshold, "feeds": self.feeds,
            "kept_in_fp32": len(self.kept_nodes), "kept_ops": self.kept_ops, "kept_nodes": list(self.kept_nodes),
            "measured_out_of_range": len(self.measured_nodes), "rms_norm_reductions_fp32": self.rms_norm_reductions,
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
    options.log_severity_level = 3  # an in-place cache's TensorScatter copies here (run() binds no buffers): expected
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


def rms_norm_reductions(model: onnx.ModelProto) -> list[tuple[str, ...]]:
    """The node names of each RMSNorm reduction in the graph: Pow(x, 2) -> ReduceMean -> Add -> Sqrt ->
    Reciprocal, each read only by the next (the chain the exporter writes for Gemma's RMSNorm)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    chains = []
    for node in model.graph.node:
        if node.op_type != RMS_NORM_REDUCTION[0]:
            continue
        chain, current = [node], node
        for op in RMS_NORM_REDUCTION[1:]:
            following = consumers.get(current.output[0], [])
            if len(following) != 1 or following[0].op_type != op:
                break
            current = following[0]
            chain.append(current)
        if len(chain) == len(RMS_NORM_REDUCTION):
            chains.append(tuple(n.name for n in chain))
    return chains


def nodes_out_of_range(model: onnx.ModelProto, maxima: dict[str, float], threshold: float | None = None,
                       feeds: int = 0) -> RangeReport:
    """The nodes measured beyond ``threshold`` and, when one of them is in an RMSNorm reduction, every
    RMSNorm reduction of the graph (see the module doc)."""
    threshold = SAFE_MAX if threshold is None else threshold
    measured = [
        node.name for node in model.graph.node
        if any(maxima.get(name, 0.0) > threshold for name in (*node.input, *node.output) if name)
    ]
    reductions = rms_norm_reductions(model)
    hazard = set(measured) & {name for chain in reductions for name in chain}
    kept_names = set(measured) | ({name for chain in reductions for name in chain} if hazard else set())
    kept = [node for node in model.graph.node if node.name in kept_names]
    ops: dict[str, int] = {}
    for node in kept:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return RangeReport(
        max_abs_activation=max(maxima.values(), default=0.0), kept_nodes=tuple(n.name for n in kept),
        kept_ops=ops, threshold=threshold, measured_nodes=tuple(measured),
        rms_norm_reductions=len(reductions) if hazard else 0, feeds=feeds,
    )


def convert(model: onnx.ModelProto, keep_io: list[str], node_block_list: list[str]) -> onnx.ModelProto:
    """fp16 weights and activations, except the blocked nodes; graph I/O named in ``keep_io`` stays fp32.
    Tensors between two blocked nodes stay fp32 (no round trip through fp16)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(
        model, keep_io_types=keep_io, node_block_list=node_block_list, disable_shape_infer=False,
    )
    drop_fp16_round_trips(converted)
    sort_nodes(converted)  # the converter appends its casts at the end; ONNX wants producers first
    return converted


def sort_nodes(model: onnx.ModelProto) -> None:
    """Reorder the graph's nodes in place so that each follows the producers of its inputs (Kahn's
    algorithm, ties in the original order)."""
    import heapq

    graph = model.graph
    nodes = list(graph.node)
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    waiting: dict[str, list[int]] = {}
    missing = []
    for index, node in enumerate(nodes):
        needed = {name for name in node.input if name not in available}
        missing.append(len(needed))
        for name in needed:
            waiting.setdefault(name, []).append(index)
    ready = [index for index, count in enumerate(missing) if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        index = heapq.heappop(ready)
        ordered.append(index)
        for name in nodes[index].output:
            for follower in waiting.pop(name, []):
                missing[follower] -= 1
                if missing[follower] == 0:
                    heapq.heappush(ready, follower)
    if len(ordered) != len(nodes):
        stuck = next(n for i, n in enumerate(nodes) if missing[i])
        raise PaliGemmaEdgeError(f"graph {graph.name}: {len(nodes) - len(ordered)} node(s) read tensors nothing "
                                 f"produces (first: {stuck.name} reads {list(stuck.input)})")
    if ordered == list(range(len(nodes))):
        return
    copies = []
    for index in ordered:
        copy = onnx.NodeProto()
        copy.CopyFrom(nodes[index])
        copies.append(copy)
    del graph.node[:]
    graph.node.extend(copies)


def _float32_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors: graph inputs, initializers, inferred values and Cast(to=FLOAT) outputs."""
    names = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            names.add(value.name)
    for node in model.graph.node:
        if node.op_type == "Cast" and onnx.helper.get_node_attr_value(node, "to") == onnx.TensorProto.FLOAT:
            names.add(node.output[0])
    return names


def drop_fp16_round_trips(model: onnx.ModelProto) -> int:
    """Cast(fp32 -> fp16) followed by Cast(fp16 -> fp32): readers of the second read the fp32 original
    instead, and casts nobody reads go. Only ever raises precision. Returns how many were bypassed."""
    graph = model.graph
    float32 = _float32_tensors(model)
    casts = {n.output[0]: n for n in graph.node if n.op_type == "Cast"}
    outputs = {o.name for o in graph.output}
    replace: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Cast" or onnx.helper.get_node_attr_value(node, "to") != onnx.TensorProto.FLOAT:
            continue
        down = casts.get(node.input[0])
        if (down is None or onnx.helper.get_node_attr_value(down, "to") != onnx.TensorProto.FLOAT16
                or down.input[0] not in float32):
            continue
        if node.output[0] in outputs:  # a graph output keeps its name: an Identity of the fp32 original
            node.op_type, node.input[0] = "Identity", down.input[0]
            del node.attribute[:]
        replace[node.output[0]] = down.input[0]
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in replace:
                node.input[index] = replace[name]
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        unused = [n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not unused:
            return len(replace)
        for node in unused:
            graph.node.remove(node)
