"""ONNX Runtime backend: the vision and decoder graphs on the CPU (or any ORT provider).

The KV cache lives in ORT-owned buffers: each step's present key/values go back in as the
next step's past as OrtValues, so Python never copies the cache. The tied embedding is one
memory-mapped array serving both the token lookup and the decoder's LM head input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import BundleError, first_line
from ..manifest import GraphSpec, Manifest, past_names, present_names


@dataclass
class OrtCache:
    """Past key/values per layer as OrtValues, in decoder input order."""

    values: dict[str, ort.OrtValue] = field(default_factory=dict)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, bundle_dir: Path, manifest: Manifest, threads: int | None = None,
                 providers: list[str] | None = None):
        self.manifest = manifest
        self.decoder_spec = manifest.decoder
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self._providers = providers or ["CPUExecutionProvider"]
        self.vision = self._session(bundle_dir, manifest.vision_graph, options)
        self.decoder = self._session(bundle_dir, manifest.decoder_graph, options)
        self._decoder_outputs = manifest.decoder_graph.output_names()
        # Which output becomes which past input on the next step.
        self._cache_routes = [
            (self._decoder_outputs.index(present), past)
            for layer in range(manifest.decoder.num_layers)
            for past, present in zip(past_names(layer), present_names(layer))
        ]
        self._input_dtypes = {
            t.name: np.dtype(t.dtype) for graph in (manifest.vision_graph, manifest.decoder_graph) for t in graph.inputs
        }
        spec = manifest.embedding
        self.embedding = _load_array(Path(bundle_dir) / spec.file, np.dtype(spec.dtype), spec.stored_shape)
        self._transposed = spec.transposed
        self._constant_inputs = {"embedding": ort.OrtValue.ortvalue_from_numpy(self.embedding)}
        self.row_scales = None
        if spec.scale_file:
            self.row_scales = _load_array(Path(bundle_dir) / spec.scale_file, np.dtype("float32"), (spec.shape[0],))
            self._constant_inputs["embedding_scale"] = ort.OrtValue.ortvalue_from_numpy(self.row_scales)
        for name, array in (("embedding", self.embedding), ("embedding_scale", self.row_scales)):
            if array is not None and self._input_dtypes.get(name) != array.dtype:
                raise BundleError(
                    f"{bundle_dir}: the decoder takes {name} as {self._input_dtypes.get(name)}, the bundle stores "
                    f"{array.dtype}; re-create the bundle"
                )
        self._scale = np.float32(self.decoder_spec.embedding_scale)

    def _session(self, bundle_dir: Path, graph: GraphSpec, options) -> ort.InferenceSession:
        path = Path(bundle_dir) / graph.file
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=self._providers)
        except Exception as exc:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
            raise BundleError(f"{path}: ONNX Runtime cannot load the graph ({first_line(exc)}); re-export the bundle") from None
        names = [i.name for i in session.get_inputs()]
        if names != graph.input_names():
            raise BundleError(f"{path}: graph inputs {names} differ from the manifest; re-export the bundle")
        return session

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        pixels = pixel_values.astype(self._input_dtypes["pixel_values"], copy=False)
        return self.vision.run(None, {"pixel_values": pixels})[0].astype(np.float32, copy=False)

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        if self._transposed:
            rows = np.moveaxis(np.asarray(self.embedding[:, token_ids], dtype=np.float32), 0, -1)
        else:
            rows = np.asarray(self.embedding[token_ids], dtype=np.float32)
        if self.row_scales is not None:
            rows *= self.row_scales[token_ids][..., None]
        return rows * self._scale

    def new_cache(self, batch: int) -> OrtCache:
        spec = self.decoder_spec
        dtype = self._input_dtypes[past_names(0)[0]]
        empty = np.zeros((batch, spec.num_kv_heads, 0, spec.head_dim), dtype=dtype)
        cache = OrtCache()
        for layer in range(spec.num_layers):
            for name in past_names(layer):
                cache.values[name] = ort.OrtValue.ortvalue_from_numpy(empty)
        return cache

    def step(self, inputs_embeds, masks, position_ids, cache: OrtCache) -> np.ndarray:
        embeds_dtype = self._input_dtypes["inputs_embeds"]
        feed = {
            "inputs_embeds": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(inputs_embeds, dtype=embeds_dtype)),
            "position_ids": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(position_ids, dtype=np.int64)),
            **self._constant_inputs,
        }
        for name, mask in masks.items():
            feed[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(mask))
        feed.update(cache.values)
        outputs = self.decoder.run_with_ort_values(self._decoder_outputs, feed)
        for output_index, past in self._cache_routes:
            cache.values[past] = outputs[output_index]
        return outputs[0].numpy().astype(np.float32, copy=False)

    def close(self) -> None:
        self.vision = self.decoder = None
        self._constant_inputs = {}


def _load_array(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Memory-map a .npy file and check it is what the manifest says."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable array ({exc})") from None
    if array.shape != shape or array.dtype != dtype:
        raise BundleError(f"{path}: {array.dtype} {array.shape} differs from the manifest's {dtype} {shape}")
    return array
