"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python (no torch on the device).

cuda-python 12.6 and later name the module ``cuda.bindings.runtime``; older releases ``cuda.cudart``.
Every call returns ``(error, *values)``; :func:`_check` turns an error into one readable line.

CUDA graphs: :meth:`Cuda.capture` records what a function puts on the stream (nothing runs) and
instantiates it; :meth:`Cuda.launch` runs that recording again, with the addresses and shapes it was
recorded with. The capture mode is thread-local: only this thread's unsafe calls (an allocation in
the middle of it) break the capture, not another thread's.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import numpy as np

from ..errors import BackendUnavailableError, PaliGemmaEdgeError

INSTALL = "pip install 'paligemma-edge[gpu]' (cuda-python; on JetPack 6 pin cuda-python<13)"


class CudaError(PaliGemmaEdgeError):
    """A CUDA runtime call failed."""


def _import_runtime():
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BackendUnavailableError(f"cuda-python is not installed: {INSTALL}")


class Cuda:
    """One stream on device 0, device allocations and host<->device copies on it."""

    def __init__(self):
        self.rt = _import_runtime()
        error, count = self.rt.cudaGetDeviceCount()
        if self._failed(error) or count == 0:
            reason = self._describe(error) if self._failed(error) else "no device"
            raise BackendUnavailableError(f"no CUDA GPU is usable here ({reason})")
        self._check(self.rt.cudaSetDevice(0), "cudaSetDevice")
        self.stream = self._check(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        self._allocations: list[int] = []
        self._graphs: list[Any] = []  # instantiated CUDA graphs (cudaGraphExec_t), destroyed by close()

    def _failed(self, error) -> bool:
        return int(error) != int(self.rt.cudaError_t.cudaSuccess)

    def _describe(self, error) -> str:
        _, name = self.rt.cudaGetErrorName(error)
        return name.decode() if isinstance(name, bytes) else str(name)

    def _check(self, result, call: str):
        error, *values = result if isinstance(result, tuple) else (result,)
        if self._failed(error):
            raise CudaError(f"{call} failed: {self._describe(error)}")
        return values[0] if len(values) == 1 else tuple(values) if values else None

    def malloc(self, nbytes: int) -> int:
        pointer = int(self._check(self.rt.cudaMalloc(max(1, nbytes)), f"cudaMalloc({nbytes} bytes)"))
        self._allocations.append(pointer)
        return pointer

    def zero(self, pointer: int, nbytes: int) -> None:
        """Set ``nbytes`` at ``pointer`` to zero bytes (on the stream)."""
        self._check(self.rt.cudaMemsetAsync(pointer, 0, nbytes, self.stream), f"cudaMemsetAsync({nbytes} bytes)")

    def upload(self, pointer: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self._check(self.rt.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream), "upload")
        # pageable host memory: the copy is staged before cudaMemcpyAsync returns, so array may go

    def download(self, array: np.ndarray, pointer: int) -> np.ndarray:
        self._check(self.rt.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream), "download")
        self.synchronize()
        return array

    def capture(self, enqueue: Callable[[], None]) -> Any:
        """Record the work ``enqueue`` puts on the stream as a CUDA graph (not run) and instantiate it; the
        handle for :meth:`launch`. A capture that fails is ended and dropped, and the error propagates."""
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check(self.rt.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        try:
            enqueue()
        except BaseException:
            error, graph = self.rt.cudaStreamEndCapture(self.stream)  # ends the capture; its recording is dropped
            if not self._failed(error):
                self.rt.cudaGraphDestroy(graph)
            self.rt.cudaGetLastError()  # an invalidated capture leaves its error behind: clear it for the next run
            raise
        try:
            graph = self._check(self.rt.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
            try:
                executable = self._check(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            finally:
                self.rt.cudaGraphDestroy(graph)  # the executable keeps what it needs
        except CudaError:
            self.rt.cudaGetLastError()
            raise
        self._graphs.append(executable)
        return executable

    def launch(self, graph: Any) -> None:
        """Run a graph from :meth:`capture` on the stream."""
        self._check(self.rt.cudaGraphLaunch(graph, self.stream), "cudaGraphLaunch")

    def synchronize(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def destroy_graphs(self) -> None:
        """Destroy every graph :meth:`capture` made (before the engines and memory they use go)."""
        for graph in self._graphs:
            self.rt.cudaGraphExecDestroy(graph)
        self._graphs = []

    def close(self) -> None:
        self.destroy_graphs()
        for pointer in self._allocations:
            self.rt.cudaFree(pointer)
        self._allocations = []
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None
