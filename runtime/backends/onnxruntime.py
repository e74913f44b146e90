"""ONNX Runtime backends: the vision and decoder graphs on the CPU, or on an NVIDIA GPU through
ONNX Runtime's CUDA or TensorRT execution providers (``onnxruntime-gpu``).

The KV cache lives in buffers on the providers' device, bound through an IO binding, so neither
Python nor the host sees it; only the logits are bound to host memory. An in-place decoder
(``kv_cache: inplace``) gets one zeroed buffer per layer's keys and values for the generation's
capacity, bound as both past and present: its TensorScatter writes the new positions into it and
nothing is copied. A growing decoder's present key/values of one step (ORT-owned) are bound as the
next step's past. The tied embedding is one memory-mapped array serving
the token lookup and, placed on the device once, the decoder's LM head input (a float table; an
int8 table is the LM head's own initializer, read by ONNX Runtime from the same files).

What is decided here:

- The decoder session is made first (its load peak is the larger); if the vision session then
  fails, the decoder is released before the error propagates.
- The vision encode and the prefill give the host arena's free memory back when they end
  (:func:`release_arena_after_run`); decode steps keep theirs, which they reuse.
- The hooks (base.SessionHooks): the observer sees each run's inputs as numpy arrays (on the CPU,
  views of the very buffers bound: the cache values and the table as they go in); the profiler is
  switched on for the decoder session alone, which is made once with it (never a second decoder
  session in memory).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import BackendUnavailableError, BundleError, InputError, first_line
from ..bundle.manifest import WRITE_INDICES, GraphSpec, Manifest, past_names, present_names
from .base import BackendBase, SessionHooks, released_on_failure
from .embedding import HostEmbedding

GPU_INSTALL = ("pip install onnxruntime-gpu (on a Jetson: the JetPack build of onnxruntime-gpu, see the README's "
               "Jetson section)")


@dataclass
class OrtCache:
    """Past key/values per layer as OrtValues on the cache device, in decoder input order.

    ``length``: positions written; ``capacity``: the buffers' slots (in place) or the most positions
    the generation asked for (growing)."""

    capacity: int
    values: dict[str, ort.OrtValue] = field(default_factory=dict)
    length: int = 0


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """The options every session of a bundle is made with: all graph optimizations, warnings quiet."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return options


def disabled_optimizers(graph: GraphSpec) -> list[str]:
    """ONNX Runtime graph optimizations a graph must be loaded without.

    Q/DQ propagation copies QuantizeLinear nodes across Reshape and Transpose; in an opset 24 graph
    (an in-place cache's decoder) the copies carry an int8 output_dtype that the later int8 -> uint8
    zero-point rewrite (QDQS8ToU8, x86) does not update, and ONNX Runtime 1.32 then refuses its own
    graph. Without the propagation the pairs stay where the quantizer put them."""
    return ["QDQPropagationTransformer"] if graph.quantization.get("method") == "int8-static-qdq" else []


INT8_HEAD_MIN_VERSION = (1, 23)  # 8-bit MatMulNBits on x86-64 and ARM64


def release_arena_after_run() -> ort.RunOptions:
    """Run options that hand the host memory arena's free blocks back at the end of the run: for the
    vision encode and the prefill, whose attention needs far more than a decode step, so that the
    vision's peak is gone before the prefill's and the prefill's before decoding (each session keeps an
    arena of its own, and without this each keeps its own peak)."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def check_int8_head_support(manifest: Manifest) -> None:
    """An int8 table in blocks is read by an 8-bit MatMulNBits LM head, which older ONNX Runtimes cannot run."""
    installed = tuple(int(part) for part in re.findall(r"\d+", ort.__version__)[:2])
    if manifest.embedding.block_size and installed < INT8_HEAD_MIN_VERSION:
        need = ".".join(map(str, INT8_HEAD_MIN_VERSION))
        raise BackendUnavailableError(
            f"this {manifest.precision} bundle's LM head is an 8-bit MatMulNBits, which needs onnxruntime >= {need} "
            f"(installed: {ort.__version__}); upgrade onnxruntime (or onnxruntime-gpu)"
        )


class OnnxRuntimeBackend(BackendBase[OrtCache]):
    name = "onnxruntime"
    device = "cpu"  # where the cache, the table and the decoder's other inputs live
    can_drop_rows = True

    def __init__(self, bundle_dir: Path, manifest: Manifest, threads: int | None = None,
                 hooks: SessionHooks | None = None):
        self.manifest = manifest
        self.decoder_spec = manifest.decoder
        self._bundle_dir = Path(bundle_dir)
        self._hooks = hooks or SessionHooks()
        with released_on_failure(self):
            self._load(threads)

    def _load(self, threads: int | None) -> None:
        manifest = self.manifest
        check_int8_head_support(manifest)
        options = session_options(threads)
        decoder_options = options
        if self._hooks.profile_prefix is not None:
            decoder_options = session_options(threads)
            decoder_options.enable_profiling = True
            decoder_options.profile_file_prefix = str(self._hooks.profile_prefix)
        providers = self.providers()
        # The decoder first: its load peak (ONNX Runtime reads each weight, then pre-packs a copy) is the larger
        self.decoder = self._session(manifest.decoder_graph, decoder_options, providers)
        self.vision = self._session(manifest.vision_graph, options, providers)
        self._decoder_outputs = manifest.decoder_graph.output_names()
        self._release_after = release_arena_after_run()
        # Which output becomes which past input on the next step.
        self._cache_routes = [
            (present, past)
            for layer in range(manifest.decoder.num_layers)
            for past, present in zip(past_names(layer), present_names(layer))
        ]
        self._input_dtypes = {
            t.name: np.dtype(t.dtype) for graph in (manifest.vision_graph, manifest.decoder_graph) for t in graph.inputs
        }
        self.host_embedding = HostEmbedding(self._bundle_dir, manifest, self._input_dtypes)
        self.embedding = self.host_embedding.table
        self._constant_inputs = {name: self._on_device(array) for name, array in self.host_embedding.decoder_inputs().items()}

    def providers(self) -> list:
        """Execution providers in priority order."""
        return ["CPUExecutionProvider"]

    def _on_device(self, array: np.ndarray) -> ort.OrtValue:
        if self.device == "cpu":
            return ort.OrtValue.ortvalue_from_numpy(array)  # wraps the array: no copy
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def _session(self, graph: GraphSpec, options, providers) -> ort.InferenceSession:
        path = self._bundle_dir / graph.file
        failure = None
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers,
                                           disabled_optimizers=disabled_optimizers(graph))
        except Exception as exc:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
            failure = first_line(exc)
        if failure is not None:  # raised outside the handler: the error holds no half-made session
            raise BundleError(f"{path}: ONNX Runtime cannot load the graph ({failure}); re-export the bundle")
        names = [i.name for i in session.get_inputs()]
        if names != graph.input_names():
            raise BundleError(f"{path}: graph inputs {names} differ from the manifest; re-export the bundle")
        return session

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        feed = {"pixel_values": pixel_values.astype(self._input_dtypes["pixel_values"], copy=False)}
        if self._hooks.observer is not None:
            self._hooks.observer("vision", feed)
        return self.vision.run(None, feed, self._release_after)[0].astype(np.float32, copy=False)

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        return self.host_embedding.lookup(token_ids)

    def new_cache(self, batch: int, capacity: int) -> OrtCache:
        spec = self.decoder_spec
        if capacity > spec.max_seq_len:
            raise InputError(f"a cache of {capacity} positions exceeds the bundle's max sequence {spec.max_seq_len}")
        dtype = self._input_dtypes[past_names(0)[0]]
        # zeros, not uninitialised memory: masked slots get zero weight, and 0 * NaN would still be NaN
        slots = capacity if spec.cache_in_place else 0
        cache = OrtCache(capacity)
        for layer in range(spec.num_layers):
            for name in past_names(layer):
                cache.values[name] = self._on_device(np.zeros((batch, spec.num_kv_heads, slots, spec.head_dim), dtype))
        return cache

    def keep_rows(self, cache: OrtCache, rows: np.ndarray) -> OrtCache:
        """The cache of ``rows`` only: one copy of what they hold, so later steps skip the rows dropped."""
        kept = OrtCache(cache.capacity, length=cache.length)
        for name, value in cache.values.items():
            kept.values[name] = self._on_device(np.ascontiguousarray(value.numpy()[rows]))
        return kept

    def step(self, inputs_embeds: np.ndarray, masks: dict[str, np.ndarray], position_ids: np.ndarray,
             cache: OrtCache) -> np.ndarray:
        embeds_dtype = self._input_dtypes["inputs_embeds"]
        rows, seq = inputs_embeds.shape[:2]
        in_place = self.decoder_spec.cache_in_place
        if cache.length + seq > cache.capacity:
            raise InputError(f"{cache.length + seq} positions exceed the cache's {cache.capacity}")
        feed = {
            "inputs_embeds": np.ascontiguousarray(inputs_embeds, dtype=embeds_dtype),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
            **{name: np.ascontiguousarray(mask) for name, mask in masks.items()},
        }
        if in_place:
            feed[WRITE_INDICES] = np.full(rows, cache.length, dtype=np.int64)
        bound = {name: self._on_device(array) for name, array in feed.items()}
        bound.update(self._constant_inputs)
        bound.update(cache.values)
        if self._hooks.observer is not None:
            self._hooks.observer("decoder", {name: value.numpy() for name, value in bound.items()})
        binding = self.decoder.io_binding()
        for name, value in bound.items():
            binding.bind_ortvalue_input(name, value)
        logits_name = self._decoder_outputs[0]
        binding.bind_output(logits_name, "cpu")  # only the logits come back to the host
        for present, past in self._cache_routes:
            if in_place:  # the past's own buffer: TensorScatter writes into it
                binding.bind_ortvalue_output(present, cache.values[past])
            else:
                binding.bind_output(present, self.device)
        self.decoder.run_with_iobinding(binding, self._release_after if seq > 1 else None)
        cache.length += seq
        # get_outputs() follows the order of the bind_output calls
        outputs = dict(zip([logits_name] + [present for present, _ in self._cache_routes], binding.get_outputs()))
        if not in_place:
            for present, past in self._cache_routes:
                cache.values[past] = outputs[present]
        return outputs[logits_name].numpy().astype(np.float32, copy=False)

    def end_profiling(self) -> Path:
        """Stop the decoder session's profiler (SessionHooks.profile_prefix); returns its JSON file."""
        if self._hooks.profile_prefix is None:
            raise InputError("the decoder is not being profiled: create the backend with SessionHooks(profile_prefix=...)")
        return Path(self.decoder.end_profiling())

    def release(self) -> None:
        self.vision = self.decoder = None
        self._constant_inputs = {}


class _GpuProviders(OnnxRuntimeBackend):
    device = "cuda"
    required = ""  # the provider this backend cannot run without

    def __init__(self, bundle_dir: Path, manifest: Manifest, threads: int | None = None,
                 hooks: SessionHooks | None = None):
        available = ort.get_available_providers()
        if self.required not in available:
            raise BackendUnavailableError(
                f"backend '{self.name}' needs ONNX Runtime's {self.required}, and this onnxruntime has "
                f"{', '.join(available)}: {GPU_INSTALL}"
            )
        super().__init__(bundle_dir, manifest, threads, hooks)


class OnnxRuntimeCudaBackend(_GpuProviders):
    """The graphs on ONNX Runtime's CUDA execution provider."""

    name = "onnxruntime-cuda"
    required = "CUDAExecutionProvider"

    def providers(self) -> list:
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]


class OnnxRuntimeTensorRTBackend(_GpuProviders):
    """The graphs on ONNX Runtime's TensorRT execution provider (CUDA for what TensorRT does not take).

    TensorRT builds its engines on the first run of each shape range and keeps them in the user's
    cache (``$XDG_CACHE_HOME/paligemma-edge/ort-tensorrt/<decoder checksum>``, the bundle itself is
    never written), so later loads start in seconds."""

    name = "onnxruntime-tensorrt"
    required = "TensorrtExecutionProvider"

    def providers(self) -> list:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        cache = root / "paligemma-edge" / "ort-tensorrt" / self.manifest.files[self.manifest.decoder_graph.file][:16]
        cache.mkdir(parents=True, exist_ok=True)
        tensorrt = {
            "device_id": 0, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
            # fp32 bundles stay fp32 (token parity); lower-precision graphs may use fp16 kernels
            "trt_fp16_enable": self.manifest.precision != "fp32",
        }
        return [("TensorrtExecutionProvider", tensorrt), ("CUDAExecutionProvider", {"device_id": 0}),
                "CPUExecutionProvider"]
