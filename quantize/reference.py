"""A bundle's graphs executed as written, in each node's declared dtype: onnx's reference evaluator.

ONNX Runtime's CPU provider runs many fp16 nodes through fp32 kernels, so an fp16 graph whose
activations overflow 65504 can look fine there and give inf/NaN (or a wrong token) on a GPU whose
fp16 kernels are fp16 (TensorRT). ``onnx.reference.ReferenceEvaluator`` computes every node with
numpy in the node's own dtype: an fp16 Pow of 3000 is inf, as on the GPU (numpy's fp16 matmul
accumulates in fp32 and rounds the result to fp16, as GPU fp16 GEMMs do). This module makes a
runtime backend of it (the runtime's tokenizer, picture preprocessing, embedding lookup and
generation loop drive it), with faithful implementations of the com.microsoft operators the
quantized bundles use: ``MatMulNBits`` (int4 / int8 blocks) and ``DynamicQuantizeMatMul``. It is
slow (numpy per node): for checking small models, not for serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from ..runtime.backends.base import BackendBase
from ..runtime.backends.embedding import HostEmbedding
from ..runtime.bundle.manifest import WRITE_INDICES, GraphSpec, Manifest, past_names, present_names, read_manifest
from ..runtime.model import PaliGemma
from ..runtime.generation.prompt import PromptTokenizer
from .fp16 import sort_nodes


class MatMulNBits(OpRun):
    """com.microsoft MatMulNBits: Y = A @ dequantize(B)^T in A's dtype (fp16 in, fp16 out).

    B is [N, blocks, block_size * bits / 8] uint8 (4 bits: low nibble first); scales [N * blocks] in
    A's dtype; zero points optional (packed like B), default 2^(bits-1). The weight is dequantized
    in the scales' dtype, as the GPU kernels do; accuracy_level only changes CPU kernels' speed."""

    op_domain = "com.microsoft"

    def _run(self, a, b, scales, zero_points=None, g_idx=None, bias=None, K=None, N=None, bits=None,
             block_size=None, accuracy_level=None):
        bits = bits or 4
        if bits not in (4, 8) or g_idx is not None:
            raise NotImplementedError(f"MatMulNBits with {bits} bits{' and g_idx' if g_idx is not None else ''}")
        n, blocks = b.shape[0], b.shape[1]
        q = _unpack(b.reshape(n, -1), bits)[:, : blocks * block_size].reshape(n, blocks, block_size)
        if zero_points is None:
            zero = np.full((n, blocks), 2 ** (bits - 1), np.int32)
        elif zero_points.dtype == np.uint8:
            zero = _unpack(zero_points.reshape(n, -1), bits)[:, :blocks].astype(np.int32)
        else:
            raise NotImplementedError("MatMulNBits with float zero points")
        scale = scales.reshape(n, blocks).astype(a.dtype)
        weight = ((q.astype(np.int32) - zero[..., None]).astype(a.dtype) * scale[..., None]).reshape(n, -1)[:, :K]
        y = np.matmul(a, weight.T).astype(a.dtype)
        if bias is not None:
            y = (y + bias).astype(a.dtype)
        return (y,)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 rows -> one value per element (4 bits: low nibble first)."""
    if bits == 8:
        return packed
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    out[:, 0::2], out[:, 1::2] = packed & 0x0F, packed >> 4
    return out


class DynamicQuantizeMatMul(OpRun):
    """com.microsoft DynamicQuantizeMatMul: A (fp32) quantized to uint8 per tensor (asymmetric, as
    DynamicQuantizeLinear), an integer product with the int8 weight, scaled back to fp32."""

    op_domain = "com.microsoft"

    def _run(self, a, b, b_scale, b_zero_point=None, bias=None):
        low, high = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
        a_scale = np.float32((high - low) / 255.0) or np.float32(1.0)
        a_zero = np.clip(np.rint(-low / a_scale), 0, 255)
        qa = np.clip(np.rint(a / a_scale) + a_zero, 0, 255).astype(np.int64) - int(a_zero)
        qb = b.astype(np.int64) - (0 if b_zero_point is None else b_zero_point.astype(np.int64))
        y = np.matmul(qa, qb).astype(np.float32) * (a_scale * b_scale.astype(np.float32))
        if bias is not None:
            y = y + bias
        return (y.astype(np.float32),)


CUSTOM_OPS = [MatMulNBits, DynamicQuantizeMatMul]


def sorted_topologically(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the graph with its nodes in an order where each node follows its inputs' producers
    (the reference evaluator runs nodes in file order)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    sort_nodes(result)
    return result


def evaluator(path: Path) -> ReferenceEvaluator:
    model = onnx.load(str(path))  # external data (also an int8 head's .npy files) is read beside the graph
    return ReferenceEvaluator(sorted_topologically(model), new_ops=CUSTOM_OPS)


@dataclass
class ReferenceCache:
    """Past key/values by input name, and the positions written."""

    values: dict[str, np.ndarray]
    length: int = 0


class ReferenceBackend(BackendBase[ReferenceCache]):
    """The runtime's backend interface over onnx's reference evaluator (CPU, numpy, slow)."""

    name = "onnx-reference"

    def __init__(self, bundle_dir: Path, manifest: Manifest):
        self.manifest = manifest
        bundle_dir = Path(bundle_dir)
        self.vision: ReferenceEvaluator | None = evaluator(bundle_dir / manifest.vision_graph.file)
        self.decoder: ReferenceEvaluator | None = evaluator(bundle_dir / manifest.decoder_graph.file)
        self._dtypes = {t.name: np.dtype(t.dtype)
                        for graph in (manifest.vision_graph, manifest.decoder_graph) for t in graph.inputs}
        self.host_embedding = HostEmbedding(bundle_dir, manifest, self._dtypes)
        self._constants = {k: np.asarray(v) for k, v in self.host_embedding.decoder_inputs().items()}
        self._routes = [(present, past) for layer in range(manifest.decoder.num_layers)
                        for past, present in zip(past_names(layer), present_names(layer))]
        self.outputs_seen: list[dict[str, bool]] = []  # per decoder call: output name -> all finite

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is what this backend is for: it shows in the values
            (embeds,) = run_graph(self._open(self.vision),
                                  {"pixel_values": pixel_values.astype(self._dtypes["pixel_values"])})
        return embeds.astype(np.float32)

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        return self.host_embedding.lookup(token_ids)

    def new_cache(self, batch: int, capacity: int) -> ReferenceCache:
        spec = self.manifest.decoder
        dtype = self._dtypes[past_names(0)[0]]
        empty = np.zeros((batch, spec.num_kv_heads, capacity if spec.cache_in_place else 0, spec.head_dim), dtype)
        return ReferenceCache({name: empty for layer in range(spec.num_layers) for name in past_names(layer)})

    def step(self, inputs_embeds, masks, position_ids, cache: ReferenceCache) -> np.ndarray:
        graph: GraphSpec = self.manifest.decoder_graph
        rows, seq = np.shape(inputs_embeds)[:2]
        feed = {"inputs_embeds": np.asarray(inputs_embeds, self._dtypes["inputs_embeds"]),
                "position_ids": np.asarray(position_ids, np.int64), **masks, **self._constants, **cache.values}
        if self.manifest.decoder.cache_in_place:
            feed[WRITE_INDICES] = np.full(rows, cache.length, np.int64)
        names = graph.output_names()
        with np.errstate(over="ignore", invalid="ignore"):
            outputs = dict(zip(names, run_graph(self._open(self.decoder), feed, names)))
        self.outputs_seen.append({name: bool(np.isfinite(value).all()) for name, value in outputs.items()})
        for present, past in self._routes:
            cache.values[past] = outputs[present]
        cache.length += seq
        return outputs[names[0]].astype(np.float32)

    def release(self) -> None:
        self.vision = self.decoder = None

    def _open(self, graph: ReferenceEvaluator | None) -> ReferenceEvaluator:
        if graph is None:
            raise RuntimeError(f"the {self.name} backend is closed")
        return graph


def run_graph(graph: ReferenceEvaluator, feed: dict[str, np.ndarray], names: list[str] | None = None
              ) -> list[np.ndarray]:
    """``graph``'s outputs (all, or ``names``) in order (``run`` answers a dict only for ``intermediate=True``)."""
    outputs = graph.run(names, feed)
    if not isinstance(outputs, list):
        raise TypeError(f"ReferenceEvaluator.run returned {type(outputs).__name__}, expected a list")
    return outputs


def load_reference(bundle: str | Path) -> PaliGemma:
    """A bundle on the reference evaluator, driven by the runtime's own model class."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    return PaliGemma(bundle, manifest, ReferenceBackend(bundle, manifest), PromptTokenizer(bundle / manifest.tokenizer, manifest))
