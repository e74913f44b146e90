"""The tied embedding / LM head of int8 and int4 bundles: one int8 table in blocks, serving lookup and head.

The table is stored as ONNX Runtime's 8-bit ``MatMulNBits`` weight: ``[vocab, blocks, block]`` uint8
(zero point 128) with a float32 scale per block of each token's row. The decoder's LM head is that
``MatMulNBits`` with the table and scales as constant initializers whose external data *is* the
bundle's ``embedding.npy`` / ``embedding_scale.npy`` (at the .npy data offset): one copy on disk,
ONNX Runtime pre-packs it for its int8 kernels, and the host lookup memory-maps the same files and
reads one contiguous row per token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..runtime.backends.embedding import LM_HEAD_NODE, ZERO_POINT
from ..runtime.errors import PaliGemmaEdgeError
from .methods import ensure_opset

TABLE_FILE, SCALE_FILE = "embedding.npy", "embedding_scale.npy"
HEAD_BLOCK_SIZE = 128  # per-block scales along hidden; 128 reads ~3% extra (the scales) and measured fastest
HEAD_ACCURACY_LEVEL = 4  # int8 compute: the hidden state is quantized per block inside the kernel


def head_block_size(hidden: int) -> int:
    """HEAD_BLOCK_SIZE, or the largest power of two (>= 16, MatMulNBits' least) dividing a smaller hidden size,
    so that the table is not padded (the real models' 2048 and 2304 take 128)."""
    block = HEAD_BLOCK_SIZE
    while block > 16 and hidden % block:
        block //= 2
    return block


def quantize_blocks(table: np.ndarray, block_size: int, rows_per_chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per block of each row: [vocab, hidden] -> uint8 [vocab, blocks, block] and float32
    scales [vocab, blocks]; a hidden size that is not a multiple of the block is padded with zeros.
    Works through the rows in chunks, so a memory-mapped 3B table needs no float copy of itself."""
    vocab, hidden = table.shape
    blocks = -(-hidden // block_size)
    quantized = np.empty((vocab, blocks, block_size), np.uint8)
    scales = np.empty((vocab, blocks), np.float32)
    for start in range(0, vocab, rows_per_chunk):
        stop = min(start + rows_per_chunk, vocab)
        padded = np.zeros((stop - start, blocks * block_size), np.float32)
        padded[:, :hidden] = table[start:stop]
        padded = padded.reshape(stop - start, blocks, block_size)
        scale = np.abs(padded).max(axis=2) / np.float32(127.0)
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        quantized[start:stop] = np.clip(np.rint(padded / scale[..., None]), -127, 127) + ZERO_POINT
        scales[start:stop] = scale
    return quantized, scales


def lm_head_node(model: onnx.ModelProto) -> onnx.NodeProto:
    heads = [n for n in model.graph.node if n.op_type == "MatMul" and n.input and n.input[0] == "embedding"]
    if len(heads) != 1:
        raise PaliGemmaEdgeError("decoder graph: expected one LM-head MatMul on the 'embedding' input")
    return heads[0]


def _file_initializer(name: str, data_type: int, dims: list[int], npy_path: Path) -> onnx.TensorProto:
    """An initializer whose bytes are the data of an existing .npy file in the graph's directory."""
    array = np.load(npy_path, mmap_mode="r")
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", npy_path.name), ("offset", str(array.offset)), ("length", str(array.nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def blocked_int8_lm_head(model: onnx.ModelProto, directory: Path, head_name: str) -> str:
    """Replace the float LM head ``head_name`` (``MatMul(embedding, hidden^T)``, its inputs perhaps cast by an
    fp16 conversion) with an 8-bit MatMulNBits reading the blocked table in ``directory``; the 'embedding'
    graph input and any casts of it go. Returns a description of the head."""
    head = next(n for n in model.graph.node if n.name == head_name)
    hidden_t, logits_t = head.input[1], head.output[0]  # [hidden, batch] -> [vocab, batch]
    table = np.load(Path(directory) / TABLE_FILE, mmap_mode="r")
    vocab, blocks, block = table.shape
    embedding = next(i for i in model.graph.input if i.name == "embedding")
    hidden = embedding.type.tensor_type.shape.dim[1].dim_value
    if vocab != embedding.type.tensor_type.shape.dim[0].dim_value or blocks != -(-hidden // block):
        raise PaliGemmaEdgeError(f"{directory / TABLE_FILE}: {table.shape} does not fit the decoder's table")
    position = list(model.graph.node).index(head)
    model.graph.node.remove(head)
    new_nodes = [
        helper.make_node("Transpose", [hidden_t], ["lm_head/h"], perm=[1, 0], name="lm_head_int8/transpose_in"),
        helper.make_node("MatMulNBits", ["lm_head/h", "lm_head/table", "lm_head/scales"], ["lm_head/logits"],
                         name=LM_HEAD_NODE, domain="com.microsoft", K=hidden, N=vocab, bits=8,
                         block_size=block, accuracy_level=HEAD_ACCURACY_LEVEL),
        helper.make_node("Transpose", ["lm_head/logits"], [logits_t], perm=[1, 0], name="lm_head_int8/transpose_out"),
    ]
    for offset, node in enumerate(new_nodes):
        model.graph.node.insert(position + offset, node)
    _drop_unused_casts(model)
    if any("embedding" in n.input for n in model.graph.node):
        raise PaliGemmaEdgeError("decoder graph: 'embedding' is used beyond the LM head")
    model.graph.input.remove(embedding)
    model.graph.initializer.extend([
        _file_initializer("lm_head/table", TensorProto.UINT8, [vocab, blocks, block], Path(directory) / TABLE_FILE),
        _file_initializer("lm_head/scales", TensorProto.FLOAT, [vocab * blocks], Path(directory) / SCALE_FILE),
    ])
    ensure_opset(model, "com.microsoft", 1)
    return f"int8 table in blocks of {block} (MatMulNBits, accuracy level {HEAD_ACCURACY_LEVEL}), read from {TABLE_FILE}"


def _drop_unused_casts(model: onnx.ModelProto) -> None:
    """Remove Cast nodes whose outputs nothing reads (those an fp16 conversion put on the old head's table)."""
    while True:
        used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
        unused = [n for n in model.graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not unused:
            return
        for node in unused:
            model.graph.node.remove(node)


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
