"""A CPU stand-in for TensorRT's runtime and CUDA memory, to check the TensorRT backend's bookkeeping.

Running an engine needs a GPU. What the backend itself decides (which buffer each tensor is bound
to, the shapes it declares per optimization profile, the KV-cache banks, what crosses between
host and device) can be checked without one: this module plays TensorRT's part the way TensorRT
documents it and the CUDA runtime's part with host memory.

- :class:`EmulatedCuda` replaces ``runtime.cuda.Cuda``: allocations are host byte arrays at made-up
  addresses; every allocation, copy and memset is counted, and whether the backend closed it (freed
  every buffer and destroyed the stream). A CUDA graph capture records each engine execution with the
  shapes and addresses set at that moment and runs nothing; a launch runs the recordings with those,
  whatever the context holds by then, as a real graph does. A copy or memset while capturing fails
  (the backend's copies are from pageable host memory, which a capture cannot record), and so does a
  launch of a graph after :meth:`EmulatedCuda.destroy_graphs`.
- :class:`EmulatedTensorRT` replaces the ``tensorrt`` module. ``deserialize_cuda_engine`` accepts
  only the engine files a bundle's manifest records (built for real by TensorRT for RTX) and runs
  each with ONNX Runtime on its source graph. An execution context holds its profile, the input
  shapes and the tensor addresses set on it, as TensorRT's does; ``set_input_shape`` refuses a
  shape outside the profile's min..max (False, as TensorRT returns); ``execute_async_v3`` reads the
  inputs at their addresses with the declared shapes, writes the outputs at theirs, and fails on an
  input without a shape or address, on a tensor that does not fit the allocation it points into,
  or on an output that overlaps an input or another output (on a GPU, silent corruption). One overlap
  is the rule, not a mistake: an output the graph's TensorScatter makes from a past input (an
  in-place KV cache, TensorRT's KV-cache update layer) must lie at that past's address with its
  shape, since the layer writes only the new positions into its input's memory; every other
  overlap, and such an output anywhere else, fails. A context records the runtime config it was created
  with (TensorRT for RTX's CUDA graph strategy: ``graph_strategy``); the graph TensorRT for RTX would
  capture itself is not modelled, its context runs each step as an ordinary one.

:class:`Faults` makes the emulated GPU misbehave on purpose (memory handed out twice, a profile
selection that does not take, memory that runs out, memory that holds NaNs until written), to show
the emulation catches what follows and the backend cleans up after a load that fails half-way.

Not modelled: the numbers are ONNX Runtime's, not TensorRT's (only the GPU tests measure engine
numerics); copies and execution are synchronous, so a missing stream synchronization cannot show;
the profiles and tensor types are the manifest's record of the engine, so a manifest that
disagrees with its engine goes unnoticed here (test_engines checks the record against the
network TensorRT parsed).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from paligemma_edge.runtime.backends.cuda import CudaError
from paligemma_edge.runtime.bundle.manifest import EngineSpec, read_manifest


class EmulationError(AssertionError):
    """The backend did something a real GPU run would go wrong on."""


@dataclass
class Faults:
    """Misbehaviour to emulate; all off by default. Set them before the backend loads."""

    reused_sizes: bool = False  # cudaMalloc hands a request of a size it served before that same block again
    profiles_ignored: bool = False  # set_optimization_profile_async succeeds and leaves the context on profile 0
    mallocs_before_oom: int | None = None  # cudaMalloc fails (out of memory) after this many allocations
    dirty_memory: bool = False  # cudaMalloc hands out bytes 0xFF (NaN in float16 and float32), not zeros
    capture_fails: bool = False  # cudaStreamBeginCapture fails (a driver without graph support)
    not_capturable: bool = False  # IExecutionContext.is_stream_capturable answers False


class EmulatedCuda:
    """Device memory as host byte arrays; counts allocations and the bytes copied each way."""

    stream_handle = 1

    def __init__(self, faults: Faults | None = None):
        self.faults = faults or Faults()
        self._starts: list[int] = []
        self._memory: dict[int, np.ndarray] = {}
        self._by_size: dict[int, int] = {}
        self._next = 1 << 20
        self.mallocs = 0
        self.closed = False  # every buffer freed and the stream destroyed
        self.uploads: list[tuple[int, int]] = []  # (address, bytes)
        self.downloads: list[tuple[int, int]] = []
        self.zeroed: list[tuple[int, int]] = []
        self._recording: list | None = None  # while capturing: the executions recorded so far
        self.graphs: list[list] = []  # each captured graph: its recorded executions
        self.graphs_destroyed = 0  # graphs destroyed so far (their launches fail)
        self.launches = 0

    def malloc(self, nbytes: int) -> int:
        if self.faults.mallocs_before_oom is not None and self.mallocs >= self.faults.mallocs_before_oom:
            raise CudaError(f"cudaMalloc({nbytes} bytes) failed: cudaErrorMemoryAllocation")
        if self.faults.reused_sizes and nbytes in self._by_size:
            self.mallocs += 1
            return self._by_size[nbytes]
        address = self._next
        self._memory[address] = np.full(max(1, nbytes), 0xFF if self.faults.dirty_memory else 0, np.uint8)
        bisect.insort(self._starts, address)
        self._by_size.setdefault(nbytes, address)
        self._next += max(1, nbytes) + 4096
        self.mallocs += 1
        return address

    def allocations(self) -> dict[int, int]:
        """Address -> bytes of every allocation not freed."""
        return {address: block.nbytes for address, block in self._memory.items()}

    def allocation(self, address: int) -> int:
        """The start of the allocation that holds ``address``."""
        index = bisect.bisect_right(self._starts, address) - 1
        if index < 0 or address >= self._starts[index] + self._memory[self._starts[index]].nbytes:
            raise EmulationError(f"address {address:#x} is not in any allocation")
        return self._starts[index]

    def region(self, address: int, nbytes: int) -> np.ndarray:
        """The bytes [address, address + nbytes), which must lie inside one allocation."""
        start = self.allocation(address)
        block = self._memory[start]
        offset = address - start
        if offset + nbytes > block.nbytes:
            raise EmulationError(f"{nbytes} bytes at {address:#x} overrun its {block.nbytes}-byte allocation")
        return block[offset:offset + nbytes]

    @property
    def capturing(self) -> bool:
        return self._recording is not None

    def record(self, execution) -> None:
        assert self._recording is not None
        self._recording.append(execution)

    def _not_capturing(self, what: str) -> None:
        if self.capturing:
            raise EmulationError(f"a {what} from pageable host memory while the stream is being captured")

    def capture(self, enqueue) -> int:
        if self.faults.capture_fails:
            raise CudaError("cudaStreamBeginCapture failed: cudaErrorStreamCaptureUnsupported")
        self._recording = []
        try:
            enqueue()
            self.graphs.append(self._recording)
        finally:
            self._recording = None
        return len(self.graphs) - 1

    def launch(self, graph: int) -> None:
        self._not_capturing("graph launch")
        if graph < self.graphs_destroyed:
            raise EmulationError(f"graph {graph} was launched after it was destroyed")
        for execution in self.graphs[graph]:
            execution()
        self.launches += 1

    def upload(self, pointer: int, array: np.ndarray) -> None:
        self._not_capturing("copy")
        array = np.ascontiguousarray(array)
        self.region(pointer, array.nbytes)[:] = array.reshape(-1).view(np.uint8)
        self.uploads.append((pointer, array.nbytes))

    def zero(self, pointer: int, nbytes: int) -> None:
        self._not_capturing("memset")
        self.region(pointer, nbytes)[:] = 0
        self.zeroed.append((pointer, nbytes))

    def download(self, array: np.ndarray, pointer: int) -> np.ndarray:
        self._not_capturing("copy")
        array.reshape(-1).view(np.uint8)[:] = self.region(pointer, array.nbytes)
        self.downloads.append((pointer, array.nbytes))
        return array

    def synchronize(self) -> None:
        pass

    def destroy_graphs(self) -> None:
        self.graphs_destroyed = len(self.graphs)

    def close(self) -> None:
        self.destroy_graphs()
        self._memory.clear()
        self._starts.clear()
        self._by_size.clear()
        self.closed = True


class _Severity:
    ERROR = 1


class _ILogger:
    Severity = _Severity

    def __init__(self):
        pass


class CudaGraphStrategy:
    DISABLED = "DISABLED"
    WHOLE_GRAPH_CAPTURE = "WHOLE_GRAPH_CAPTURE"


class _RuntimeConfig:
    def __init__(self):
        self.cuda_graph_strategy = CudaGraphStrategy.DISABLED


class _Context:
    def __init__(self, engine: "_EmulatedEngine", runtime_config: _RuntimeConfig | None = None):
        self.engine = engine
        self.graph_strategy = (runtime_config or _RuntimeConfig()).cuda_graph_strategy
        self.profile = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        if not 0 <= index < len(self.engine.profiles):
            return False
        if not self.engine.cuda.faults.profiles_ignored:
            self.profile, self.shapes = index, {}
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        ranges = self.engine.profiles[self.profile].get(name)
        shape = tuple(int(d) for d in shape)
        if ranges is None or len(shape) != len(ranges["min"]) or not all(
                low <= d <= high for low, d, high in zip(ranges["min"], shape, ranges["max"])):
            self.engine.logger.log(_Severity.ERROR, f"set_input_shape: {name} {shape} outside profile "
                                   f"{self.profile} ({ranges})")
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.dtypes:
            return False
        self.addresses[name] = int(address)
        return True

    def is_stream_capturable(self, stream: int) -> bool:
        return not self.engine.cuda.faults.not_capturable

    def execute_async_v3(self, stream: int) -> bool:
        engine, cuda = self.engine, self.engine.cuda
        for name in engine.input_names:
            if name not in self.shapes or name not in self.addresses:
                missing = "a shape" if name not in self.shapes else "an address"
                raise EmulationError(f"{name}: executed without {missing}")
        shapes, addresses = dict(self.shapes), dict(self.addresses)
        if cuda.capturing:  # recorded with what is set now; runs at each launch
            cuda.record(lambda: self._run(shapes, addresses))
        else:
            self._run(shapes, addresses)
        return True

    def _run(self, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int]) -> None:
        engine, cuda = self.engine, self.engine.cuda
        feeds = {}
        for name in engine.input_names:
            dtype, shape = engine.dtypes[name], shapes[name]
            nbytes = int(np.prod(shape)) * dtype.itemsize
            feeds[name] = cuda.region(addresses[name], nbytes).view(dtype).reshape(shape).copy()
        outputs = engine.session.run(engine.output_names, feeds)
        used = [(addresses[name], feed.nbytes, f"input {name}") for name, feed in feeds.items()]
        for name, value in zip(engine.output_names, outputs):
            if name not in addresses:
                raise EmulationError(f"{name}: executed without an address for this output")
            value = np.ascontiguousarray(value, dtype=engine.dtypes[name])
            start = addresses[name]
            target = cuda.region(start, value.nbytes)
            cache = engine.in_place.get(name)  # the past input this output is written into, if any
            for other, nbytes, what in used:  # the engine reads inputs while it writes outputs
                if what == f"input {cache}":
                    continue  # the update layer writes its own input, as TensorRT's does (checked below)
                if nbytes and value.nbytes and start < other + nbytes and other < start + value.nbytes:
                    raise EmulationError(f"output {name} overlaps {what} in device memory")
            if cache is not None and (addresses[cache] != start or shapes[cache] != value.shape):
                raise EmulationError(f"output {name} of a KV-cache update must be its input {cache}'s memory "
                                     f"(at {addresses[cache]:#x}, {shapes[cache]}), not {start:#x}, "
                                     f"{value.shape}")
            target[:] = value.reshape(-1).view(np.uint8)
            used.append((start, value.nbytes, f"output {name}"))


def kv_cache_updates(graph: Path) -> dict[str, str]:
    """Graph output -> the graph input it updates in place: the outputs TensorScatter writes into a past
    (what TensorRT parses into a KV-cache update layer, whose output is its input's memory)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    inputs, outputs = {v.name for v in model.graph.input}, {v.name for v in model.graph.output}
    return {node.output[0]: node.input[0] for node in model.graph.node
            if node.op_type == "TensorScatter" and node.input[0] in inputs and node.output[0] in outputs}


class _EmulatedEngine:
    def __init__(self, graph: Path, spec: EngineSpec, logger, cuda: EmulatedCuda):
        self.session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        self.in_place = kv_cache_updates(graph)
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]
        self.dtypes = {t.name: np.dtype(t.dtype) for t in (*spec.inputs, *spec.outputs)}
        self.profiles = list(spec.profiles.values())
        self.logger = logger
        self.cuda = cuda

    @property
    def num_io_tensors(self) -> int:
        return len(self.dtypes)

    def get_tensor_name(self, index: int) -> str:
        return [*self.input_names, *self.output_names][index]

    def get_tensor_dtype(self, name: str) -> np.dtype:
        return self.dtypes[name]

    def create_runtime_config(self) -> _RuntimeConfig:
        return _RuntimeConfig()

    def create_execution_context(self, runtime_config: _RuntimeConfig | None = None) -> _Context:
        return _Context(self, runtime_config)


class EmulatedTensorRT:
    """Stands in for the ``tensorrt`` module, knowing the engines of one bundle.

    :meth:`Cuda` stands in for ``runtime.cuda.Cuda``; the engines run on the memory it made last.
    """

    ILogger = _ILogger
    CudaGraphStrategy = CudaGraphStrategy

    def __init__(self, bundle: Path, version: str):
        self.__version__ = version
        self.faults = Faults()
        self.device: EmulatedCuda | None = None
        manifest = read_manifest(bundle)
        self._engines: dict[bytes, tuple[Path, EngineSpec]] = {}
        for record in manifest.engines.values():
            for spec, graph in ((record.vision, manifest.vision_graph), (record.decoder, manifest.decoder_graph)):
                self._engines[(bundle / spec.file).read_bytes()] = (bundle / graph.file, spec)

    def Cuda(self) -> EmulatedCuda:  # noqa: N802 (the class it replaces)
        self.device = EmulatedCuda(self.faults)
        return self.device

    @staticmethod
    def nptype(dtype: np.dtype):
        return np.dtype(dtype).type

    def Runtime(self, logger):  # noqa: N802 (TensorRT's name)
        engines, emulated = self._engines, self

        class _Runtime:
            def deserialize_cuda_engine(self, data: bytes):
                if data not in engines:
                    logger.log(_Severity.ERROR, "deserializeCudaEngine: not an engine of this bundle")
                    return None
                graph, spec = engines[data]
                if emulated.device is None:
                    raise EmulationError("an engine was deserialized before any CUDA memory was set up")
                return _EmulatedEngine(graph, spec, logger, emulated.device)

        return _Runtime()
