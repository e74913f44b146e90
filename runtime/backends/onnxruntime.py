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
        embedding_path = Path(bundle_dir) / manifest.embedding.file
        try:
            self.embedding = np.load(embedding_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise BundleError(f"{embedding_path}: unreadable embedding ({exc})") from None
        if self.embedding.shape != tuple(manifest.embedding.shape):
            raise BundleError(f"{embedding_path}: shape {self.embedding.shape} differs from the manifest")
        self._embedding_value = ort.OrtValue.ortvalue_from_numpy(self.embedding)
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
        return self.vision.run(None, {"pixel_values": pixel_values})[0]

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.embedding[token_ids], dtype=np.float32) * self._scale

    def new_cache(self, batch: int) -> OrtCache:
        spec = self.decoder_spec
        empty = np.zeros((batch, spec.num_kv_heads, 0, spec.head_dim), dtype=np.float32)
        cache = OrtCache()
        for layer in range(spec.num_layers):
            for name in past_names(layer):
                cache.values[name] = ort.OrtValue.ortvalue_from_numpy(empty)
        return cache

    def step(self, inputs_embeds, masks, position_ids, cache: OrtCache) -> np.ndarray:
        feed = {
            "inputs_embeds": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(inputs_embeds, dtype=np.float32)),
            "position_ids": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(position_ids, dtype=np.int64)),
            "embedding": self._embedding_value,
        }
        for name, mask in masks.items():
            feed[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(mask))
        feed.update(cache.values)
        outputs = self.decoder.run_with_ort_values(self._decoder_outputs, feed)
        for output_index, past in self._cache_routes:
            cache.values[past] = outputs[output_index]
        return outputs[0].numpy()

    def close(self) -> None:
        self.vision = self.decoder = None
        self._embedding_value = None
