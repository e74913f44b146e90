"""TensorRT backend: the bundle's engines (``paligemma-edge build-engines``) on an NVIDIA GPU.

One code path for TensorRT (``tensorrt``, JetPack and x86) and TensorRT for RTX (``tensorrt-rtx``);
only the module differs. Engines are deserialized once. Every device buffer is allocated at load
for the engines' max batch and sequence, so a step allocates nothing. The KV cache never leaves
the GPU. An in-place decoder (``decoder.kv_cache: inplace``) has one bank per layer's keys and
values, [max batch, kv heads, max sequence, head dim], zeroed for each generation and bound as both
past and present: the engine's KV-cache update layer writes the new positions at ``write_indices``
(uploaded per step) and its output is its input's memory. Its cache dim is fixed at the engines' max
sequence (TensorRT needs it static), so the loop's masks, as wide as the generation's capacity, are
padded with masked slots to it. A growing decoder's present key/values of step n are written into
the second of two banks and bound as the past of step n+1 (the graph appends new positions to the
past, so one bank cannot be both). Per step only the new tokens' embeddings, positions, masks (and
write indices) go up and the last position's logits come back. A decoder engine with prefill and
decode optimization profiles runs in two execution contexts, one per profile; one with a single
profile in one context.

An in-place decoder's decode step runs as a CUDA graph: it has the same shapes and addresses for
every step of every generation of a batch size (the banks and input buffers are the backend's, the
masks as wide as the banks), and only the contents of its inputs change, which the uploads write
before each launch. On TensorRT the backend captures it: the first decode step of a batch size runs
as usual (TensorRT sets itself up for new shapes on an ordinary run; a capture must not allocate),
then is recorded once, where the context says it can be (``is_stream_capturable``, where TensorRT
has it); every later one launches the recording, so the GPU gets one launch per token instead of one
per kernel. TensorRT for RTX allows a stream capture only of engines built to use the application's
memory alone, and compiles shape-specialized kernels after its first runs of a shape, so there the
decode context is created with its own whole-graph capture (``IRuntimeConfig.cuda_graph_strategy``),
which captures once those kernels are in. A growing decoder's past grows every step, so it runs
without a graph. ``PALIGEMMA_EDGE_CUDA_GRAPHS=0`` (or off, false, no) turns graphs off; a capture that
fails warns once and the backend runs uncaptured from then on (``decode_graphs`` says which). Memory
goes through cuda-python, so the device needs no torch.

What is decided here:

- A load that fails half-way (an engine TensorRT cannot deserialize, a profile it refuses, a
  failed allocation) frees every buffer allocated so far, drops the engines and destroys the
  stream before the error propagates.
- Rows cannot leave a cache (``can_drop_rows`` is False): the banks stay at the batch they began with.
- Engines built for the other cache kind than the bundle's decoder (``EngineSet.kv_cache``) are refused.
- Zeroed, not left as cudaMalloc hands it out: masked slots get zero weight, and 0 * NaN is NaN.
- No session hooks: a feed observer or a profiler is refused (they are ONNX Runtime's).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import BackendBase, SessionHooks, refuse_hooks, released_on_failure
from .cuda import Cuda, CudaError
from ..engines.common import CollectingLogger, device_tag, gpu_description, import_tensorrt, select_engines
from ..errors import BundleError, InputError, first_line
from ..bundle.manifest import WRITE_INDICES, EngineSet, EngineSpec, Manifest, past_names, present_names
from .embedding import HostEmbedding


@dataclass
class TensorRTCache:
    """The cache of one generation: its rows, the positions it may hold and holds, which bank holds the
    past (a growing cache; an in-place one has one bank)."""

    batch: int
    capacity: int
    length: int = 0
    bank: int = 0


def max_shapes(spec: EngineSpec) -> dict[str, tuple[int, ...]]:
    """The largest shape of every input over all of the engine's optimization profiles."""
    shapes: dict[str, tuple[int, ...]] = {}
    for profile in spec.profiles.values():
        for name, ranges in profile.items():
            largest = tuple(ranges["max"])
            shapes[name] = tuple(max(a, b) for a, b in zip(shapes.get(name, largest), largest))
    return shapes


CUDA_GRAPHS_ENV = "PALIGEMMA_EDGE_CUDA_GRAPHS"  # "0", "off", "false" or "no": no CUDA graph for the decode step
GRAPHS_CAPTURED = "captured by the backend"  # decode_graphs: each batch size's after its first decode step
GRAPHS_BUILT_IN = "TensorRT for RTX's own (whole-graph capture)"


def cuda_graphs_wanted() -> bool:
    return os.environ.get(CUDA_GRAPHS_ENV, "1").strip().lower() not in {"0", "off", "false", "no"}


class _Engine:
    """A deserialized engine with an execution context per optimization profile."""

    def __init__(self, trt, runtime, logger: CollectingLogger, path: Path, spec: EngineSpec, cuda: Cuda,
                 graph_profile: str | None = None):
        """``graph_profile``: the profile whose context TensorRT for RTX runs as a CUDA graph of its own."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"{path}: cannot read the engine ({exc.strerror}); run build-engines again") from None
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BundleError(f"{path}: TensorRT cannot load the engine ({logger.last()}); "
                              "rebuild it with 'paligemma-edge build-engines' on this device")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.dtypes = {name: np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))) for name in names}
        expected = [t.name for t in (*spec.inputs, *spec.outputs)]
        if sorted(names) != sorted(expected):
            raise BundleError(f"{path}: engine tensors {names} differ from the manifest's {expected}; rebuild it")
        self.contexts: dict[str, Any] = {}  # profile name -> TensorRT's IExecutionContext
        for index, profile in enumerate(spec.profiles):
            if profile == graph_profile:
                config = self.engine.create_runtime_config()
                config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
                context = self.engine.create_execution_context(runtime_config=config)
            else:
                context = self.engine.create_execution_context()
            if len(spec.profiles) > 1 and not context.set_optimization_profile_async(index, cuda.stream_handle):
                raise BundleError(f"{path}: TensorRT cannot select optimization profile {index} ({profile}): "
                                  f"{logger.last()}; rebuild the engines")
            self.contexts[profile] = context

    def release(self) -> None:
        """Drop the execution contexts, then the engine (TensorRT frees them in that order)."""
        self.contexts = {}
        self.engine = None


class TensorRTBackend(BackendBase[TensorRTCache]):
    name = "tensorrt"
    flavour = "tensorrt"
    graphs_built_in = False  # True: the flavour runs the decode context as a CUDA graph itself (TensorRT for RTX)

    def __init__(self, bundle_dir: Path, manifest: Manifest, threads: int | None = None,
                 hooks: SessionHooks | None = None):
        del threads  # the GPU does the work
        refuse_hooks(self.name, hooks)
        trt = import_tensorrt(self.flavour)
        record = select_engines(manifest, device_tag(self.flavour, trt.__version__, gpu_description()))
        self._engines: list[_Engine] = []  # what release() drops, as they load
        self.cuda = Cuda()  # the stream; every buffer is allocated through it, and freed by its close()
        with released_on_failure(self):
            self._load(trt, record, Path(bundle_dir), manifest)

    def _engine(self, trt, path: Path, spec: EngineSpec, graph_profile: str | None = None) -> _Engine:
        engine = _Engine(trt, self._runtime, self._logger, path, spec, self.cuda, graph_profile)
        self._engines.append(engine)
        return engine

    def _load(self, trt, record: EngineSet, bundle_dir: Path, manifest: Manifest) -> None:
        self.max_batch, self.max_seq_len = record.max_batch, record.max_seq_len
        self._batch_limit = max_batch = record.max_batch  # the same numbers, as ints for the methods
        self._position_limit = max_seq_len = record.max_seq_len
        self.decoder_spec = manifest.decoder
        if record.kv_cache != manifest.decoder.kv_cache:
            raise BundleError(f"the {record.device} engines were built for a {record.kv_cache} KV cache and the bundle's "
                              f"decoder keeps an {manifest.decoder.kv_cache} one: run 'paligemma-edge build-engines' again")
        self._in_place = manifest.decoder.cache_in_place
        self.decode_graphs = self._graphs_setting(trt)
        self._decode_graphs: dict[int, Any] = {}  # batch rows -> the decode step the backend captured
        self._logger = CollectingLogger(trt)
        self._runtime = trt.Runtime(self._logger.logger)
        self.vision = self._engine(trt, bundle_dir / record.vision.file, record.vision)
        profiles = record.decoder.profiles  # the decode steps' context: its own profile's, or the only one
        decode_profile = "decode" if "decode" in profiles else next(iter(profiles))
        self.decoder = self._engine(trt, bundle_dir / record.decoder.file, record.decoder,
                                    decode_profile if self.decode_graphs == GRAPHS_BUILT_IN else None)
        input_dtypes = {n: d for engine in (self.vision, self.decoder) for n, d in engine.dtypes.items()}
        self.host_embedding = HostEmbedding(bundle_dir, manifest, input_dtypes)

        self._vision_io = (record.vision.inputs[0].name, record.vision.outputs[0].name)
        self._vision_out_shape = (max_batch, manifest.image.num_tokens, manifest.decoder.hidden_size)
        self._buffers: dict[str, int] = {}
        for name, shape in max_shapes(record.vision).items():
            self._buffers[name] = self._malloc(name, shape)
        self._buffers[self._vision_io[1]] = self._malloc(self._vision_io[1], self._vision_out_shape)

        layers = range(manifest.decoder.num_layers)
        self._routes = [(past, present) for layer in layers for past, present in zip(past_names(layer), present_names(layer))]
        pasts = {past for past, _ in self._routes}
        decoder_max = max_shapes(record.decoder)
        constants = self.host_embedding.decoder_inputs()
        for name, shape in decoder_max.items():
            if name not in pasts and name not in constants:
                self._buffers[name] = self._malloc(name, shape)
        # banks of the whole cache, each at [max batch, kv heads, max sequence, head dim]: one in place, else two
        kv_shape = (max_batch, manifest.decoder.num_kv_heads, max_seq_len, manifest.decoder.head_dim)
        self._banks = [{past: self._malloc(past, kv_shape) for past in pasts} for _ in range(1 if self._in_place else 2)]
        self._past_itemsize = self.decoder.dtypes[past_names(0)[0]].itemsize
        contexts = self.decoder.contexts
        self._phase_contexts = {phase: contexts.get(phase, next(iter(contexts.values())))
                                for phase in ("prefill", "decode")}  # a one-profile engine: one context for both
        self._logits_name = record.decoder.outputs[0].name
        vocab = record.decoder.outputs[0].shape[-1]
        self._logits_shape = (max_batch, vocab if isinstance(vocab, int) else manifest.embedding.shape[0])
        self._buffers[self._logits_name] = self._malloc(self._logits_name, self._logits_shape)
        for name, array in constants.items():  # the table goes up once and stays
            self._buffers[name] = self._malloc(name, array.shape)
            self.cuda.upload(self._buffers[name], array)
            for context in self.decoder.contexts.values():
                self._bind(context, name, array.shape, self._buffers[name])
        self.cuda.synchronize()
        self._owner: TensorRTCache | None = None

    def _graphs_setting(self, trt) -> str:
        """How decode steps run (``decode_graphs``): as a CUDA graph (whose) or not (why)."""
        if not self._in_place:
            return "off (a growing cache changes shape every step)"
        if not cuda_graphs_wanted():
            return f"off ({CUDA_GRAPHS_ENV}={os.environ[CUDA_GRAPHS_ENV]})"
        if not self.graphs_built_in:
            return GRAPHS_CAPTURED
        if not hasattr(trt, "CudaGraphStrategy"):
            return f"off (TensorRT for RTX {trt.__version__} has no CUDA graph strategy; 1.2 and later do)"
        return GRAPHS_BUILT_IN

    def _malloc(self, name: str, shape: tuple[int, ...]) -> int:
        engine = self.decoder if name in self.decoder.dtypes else self.vision
        return self.cuda.malloc(int(np.prod(shape)) * engine.dtypes[name].itemsize)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        name_in, name_out = self._vision_io
        context = next(iter(self.vision.contexts.values()))
        chunks = []
        for start in range(0, len(pixel_values), self._batch_limit):
            pixels = pixel_values[start:start + self._batch_limit].astype(self.vision.dtypes[name_in], copy=False)
            self.cuda.upload(self._buffers[name_in], pixels)
            self._bind(context, name_in, pixels.shape, self._buffers[name_in])
            self._bind(context, name_out, None, self._buffers[name_out])
            self._execute(context, "vision")
            out = np.empty((len(pixels), *self._vision_out_shape[1:]), dtype=self.vision.dtypes[name_out])
            chunks.append(self.cuda.download(out, self._buffers[name_out]).astype(np.float32, copy=False))
        return np.concatenate(chunks)

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        return self.host_embedding.lookup(token_ids)

    def new_cache(self, batch: int, capacity: int) -> TensorRTCache:
        if batch > self._batch_limit:
            raise InputError(f"a batch of {batch} exceeds the engines' max batch {self._batch_limit}: "
                             "rebuild with 'paligemma-edge build-engines --max-batch N'")
        if capacity > self._position_limit:
            raise InputError(f"a cache of {capacity} positions exceeds the engines' max sequence {self._position_limit}: "
                             "rebuild with 'paligemma-edge build-engines --max-seq-len N'")
        if self._in_place:  # the rows' part of each bank, as the engine reads it: [batch, kv, max sequence, d]
            spec = self.decoder_spec
            nbytes = batch * spec.num_kv_heads * self._position_limit * spec.head_dim * self._past_itemsize
            for address in self._banks[0].values():
                self.cuda.zero(address, nbytes)
        self._owner = TensorRTCache(batch, capacity)  # one cache at a time: the banks are the backend's
        return self._owner

    def step(self, inputs_embeds: np.ndarray, masks: dict[str, np.ndarray], position_ids: np.ndarray,
             cache: TensorRTCache) -> np.ndarray:
        if cache is not self._owner:
            raise InputError("the TensorRT backend runs one generation at a time; this cache was replaced")
        rows, seq = inputs_embeds.shape[:2]
        past, total = cache.length, cache.length + seq
        if total > self._position_limit:
            raise InputError(f"{total} positions exceed the engines' max sequence {self._position_limit}: "
                             "rebuild with 'paligemma-edge build-engines --max-seq-len N'")
        if total > cache.capacity:
            raise InputError(f"{total} positions exceed the cache's {cache.capacity}")
        if past and seq != 1:
            raise InputError("after the prompt the decoder takes one token per step")
        context = self._phase_contexts["decode" if past else "prefill"]
        feeds = {"inputs_embeds": inputs_embeds, "position_ids": position_ids, **masks}
        if self._in_place:
            feeds |= {name: self._padded(mask) for name, mask in masks.items()}
            feeds[WRITE_INDICES] = np.full(rows, past, dtype=np.int64)  # every row writes at the same slot
        for name, array in feeds.items():
            array = np.ascontiguousarray(array, dtype=self.decoder.dtypes[name])
            self.cuda.upload(self._buffers[name], array)
            self._bind(context, name, array.shape, self._buffers[name])
        spec = self.decoder_spec
        slots = self._position_limit if self._in_place else past  # the past as the engine reads it
        source = self._banks[cache.bank]
        target = source if self._in_place else self._banks[1 - cache.bank]  # in place: present is past's memory
        for past_name, present_name in self._routes:
            self._bind(context, past_name, (rows, spec.num_kv_heads, slots, spec.head_dim), source[past_name])
            self._bind(context, present_name, None, target[past_name])
        self._bind(context, self._logits_name, None, self._buffers[self._logits_name])
        if past and self.decode_graphs == GRAPHS_CAPTURED:
            self._run_captured(context, rows)
        else:
            self._execute(context, "decoder")
        logits = np.empty((rows, self._logits_shape[1]), dtype=self.decoder.dtypes[self._logits_name])
        self.cuda.download(logits, self._buffers[self._logits_name])
        cache.length = total
        if not self._in_place:
            cache.bank = 1 - cache.bank
        return logits.astype(np.float32, copy=False)

    def _run_captured(self, context, rows: int) -> None:
        """A decode step of ``rows`` rows through its CUDA graph, recorded after its first ordinary run."""
        graph = self._decode_graphs.get(rows)
        if graph is not None:
            self.cuda.launch(graph)
            return
        self._execute(context, "decoder")
        self.cuda.synchronize()  # the capture starts on an idle stream
        capturable = getattr(context, "is_stream_capturable", None)  # not in every TensorRT
        if capturable is not None and not capturable(self.cuda.stream_handle):
            self._graphs_off("TensorRT says this engine's decode step cannot be captured on its stream")
            return
        try:
            self._decode_graphs[rows] = self.cuda.capture(lambda: self._execute(context, "decoder (being captured)"))
        except CudaError as exc:
            self._graphs_off(f"the capture failed: {first_line(exc)}")

    def _graphs_off(self, why: str) -> None:
        self.decode_graphs = f"off ({why})"
        warnings.warn(f"TensorRT decode steps run without a CUDA graph: {why}", RuntimeWarning, stacklevel=3)

    def _padded(self, mask: np.ndarray) -> np.ndarray:
        """An in-place decoder's mask [rows, 1, seq, capacity] widened to the engine's cache slots, the added
        slots masked (the cache never writes them in this generation)."""
        slots = self._position_limit
        if mask.shape[-1] > slots:
            raise InputError(f"a mask over {mask.shape[-1]} cache slots exceeds the engines' {slots}")
        padded = np.zeros((*mask.shape[:-1], slots), dtype=bool)
        padded[..., :mask.shape[-1]] = mask
        return padded

    def _bind(self, context, name: str, shape: tuple[int, ...] | None, address: int) -> None:
        """Where a tensor lies, and for an input its shape this step (TensorRT refuses one outside the profile)."""
        if shape is not None and not context.set_input_shape(name, tuple(shape)):
            raise BundleError(f"the engine does not take {name} of shape {tuple(shape)}: "
                              f"{self._logger.last()}")
        if not context.set_tensor_address(name, address):
            raise BundleError(f"TensorRT refused the address of {name}: {self._logger.last()}")

    def _execute(self, context, what: str) -> None:
        if not context.execute_async_v3(self.cuda.stream_handle):
            raise CudaError(f"TensorRT could not run the {what} engine: {self._logger.last()}")

    def release(self) -> None:
        self.cuda.destroy_graphs()  # before the engines whose kernels they launch
        self._decode_graphs = {}
        for engine in self._engines:
            engine.release()
        self._engines = []
        self.cuda.close()


class TensorRTRtxBackend(TensorRTBackend):
    """The same backend on TensorRT for RTX (``tensorrt_rtx_bindings``)."""

    name = "tensorrt-rtx"
    flavour = "tensorrt-rtx"
    graphs_built_in = True
