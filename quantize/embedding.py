"""The tied embedding / LM head as int8: one table with a scale per token, serving lookup and head.

The int8 table is stored transposed, [hidden, vocab], so that the decoder's LM head is the
uint8 x int8 product ONNX Runtime's integer kernels are built for:
``DynamicQuantizeLinear(hidden) -> MatMulInteger(., table) -> Cast -> * token scale * hidden scale``,
with the int8 table used as is, never expanded to floats. The lookup reads columns of it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..runtime.errors import PaliGemmaEdgeError

SCALE_INPUT = "embedding_scale"


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per token: table [vocab, hidden] ~= (q.T * scale[:, None]); q is [hidden, vocab]."""
    table = np.asarray(table, dtype=np.float32)
    scale = np.abs(table).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q.T), scale


def lm_head_node(model: onnx.ModelProto) -> onnx.NodeProto:
    heads = [n for n in model.graph.node if n.op_type == "MatMul" and n.input and n.input[0] == "embedding"]
    if len(heads) != 1:
        raise PaliGemmaEdgeError("decoder graph: expected one LM-head MatMul on the 'embedding' input")
    return heads[0]


def int8_lm_head(model: onnx.ModelProto) -> list[str]:
    """Rewrite the float LM head of an fp32 decoder graph to the transposed int8 table; returns the new nodes."""
    head = lm_head_node(model)
    hidden_t, logits_t = head.input[1], head.output[0]  # [hidden, batch] -> [vocab, batch]
    steps = ("transpose_in", "quantize", "matmul", "cast", "scale", "mul", "transpose_out")
    names = [f"lm_head_int8/{step}" for step in steps]
    new_nodes = [
        helper.make_node("Transpose", [hidden_t], ["lm_head/h"], perm=[1, 0], name=names[0]),
        helper.make_node("DynamicQuantizeLinear", ["lm_head/h"], ["lm_head/hq", "lm_head/hs", "lm_head/hz"], name=names[1]),
        helper.make_node("MatMulInteger", ["lm_head/hq", "embedding", "lm_head/hz"], ["lm_head/acc"], name=names[2]),
        helper.make_node("Cast", ["lm_head/acc"], ["lm_head/accf"], to=TensorProto.FLOAT, name=names[3]),
        helper.make_node("Mul", [SCALE_INPUT, "lm_head/hs"], ["lm_head/scale"], name=names[4]),
        helper.make_node("Mul", ["lm_head/accf", "lm_head/scale"], ["lm_head/logits"], name=names[5]),
        helper.make_node("Transpose", ["lm_head/logits"], [logits_t], perm=[1, 0], name=names[6]),
    ]
    position = list(model.graph.node).index(head)
    model.graph.node.remove(head)
    for offset, node in enumerate(new_nodes):
        model.graph.node.insert(position + offset, node)

    inputs = list(model.graph.input)
    embedding = next(i for i in inputs if i.name == "embedding")
    dims = embedding.type.tensor_type.shape.dim
    vocab, hidden = dims[0].dim_value, dims[1].dim_value
    embedding.CopyFrom(helper.make_tensor_value_info("embedding", TensorProto.INT8, [hidden, vocab]))
    scale_input = helper.make_tensor_value_info(SCALE_INPUT, TensorProto.FLOAT, [vocab])
    model.graph.input.insert(inputs.index(embedding) + 1, scale_input)
    return names


def fp16_lm_head(model: onnx.ModelProto) -> list[str]:
    """Make the tied table an fp16 input of an otherwise float32 graph: the head casts the hidden state
    to fp16, multiplies by the fp16 table and casts the logits back. Returns the head's nodes."""
    head = lm_head_node(model)
    hidden_t, logits_t = head.input[1], head.output[0]
    names = ["lm_head_fp16/cast_in", head.name, "lm_head_fp16/cast_out"]
    position = list(model.graph.node).index(head)
    model.graph.node.remove(head)
    new_nodes = [
        helper.make_node("Cast", [hidden_t], ["lm_head/h16"], to=TensorProto.FLOAT16, name=names[0]),
        helper.make_node("MatMul", ["embedding", "lm_head/h16"], ["lm_head/logits16"], name=names[1]),
        helper.make_node("Cast", ["lm_head/logits16"], [logits_t], to=TensorProto.FLOAT, name=names[2]),
    ]
    for offset, node in enumerate(new_nodes):
        model.graph.node.insert(position + offset, node)
    embedding = next(i for i in model.graph.input if i.name == "embedding")
    embedding.type.tensor_type.elem_type = TensorProto.FLOAT16
    return names
