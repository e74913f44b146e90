"""The interface every runtime backend implements, and the registry that picks one by name.

What is decided here:

- :class:`Backend` names every member a caller may use: ``name``, the limits ``max_batch`` and
  ``max_seq_len`` (None: no limit of the backend's own, the graph's), ``can_drop_rows`` with
  ``keep_rows``, the graph calls, ``close`` and the context-manager methods. The KV cache is the
  backend's own object (the type parameter), opaque to callers, who hand it back to the backend
  that made it. Anything else on a backend object is the backend's business: no other module
  reads its private attributes or assigns to its attributes (tests/test_backend_interface.py).
- :class:`BackendBase` is what backends inherit: the defaults (no limits, rows cannot be dropped),
  an idempotent ``close`` over the backend's ``release``, and the context manager.
- A constructor that fails half-way frees what it had allocated before the error propagates
  (:func:`released_on_failure`): ``release`` must cope with a backend that is only partly built.
- Watching the graphs is one public hook, :class:`SessionHooks`, given at construction: a feed
  observer and ONNX Runtime's decoder profiler. The ONNX Runtime backends implement it; the
  TensorRT backends refuse hooks that ask for something (an InputError).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Iterator, Mapping, Protocol, TypeVar, runtime_checkable

import numpy as np

from ..errors import BackendUnavailableError, InputError
from ..bundle.manifest import Manifest

CacheT = TypeVar("CacheT")
SelfT = TypeVar("SelfT", bound="BackendBase")

# (graph, feeds): "vision" or "decoder", and every input of that run by name, as numpy arrays
FeedObserver = Callable[[str, Mapping[str, np.ndarray]], None]


@dataclass(frozen=True)
class SessionHooks:
    """What a caller that watches the graphs asks of a backend at construction.

    ``observer`` is called before every vision and decoder run with the graph's name and all of the
    run's inputs (the constant table included). The arrays are valid during the call only: on the
    CPU they are the very buffers bound to the run, so an observer copies what it keeps.
    ``profile_prefix``: ONNX Runtime profiles the decoder session (and only it), writing its JSON
    under this path prefix; the backend's ``end_profiling()`` returns the file."""

    observer: FeedObserver | None = None
    profile_prefix: Path | None = None

    @property
    def wanted(self) -> bool:
        return self.observer is not None or self.profile_prefix is not None


@runtime_checkable
class Backend(Protocol[CacheT]):
    """Runs a bundle's graphs. The KV cache is the backend's own object and stays on its device."""

    name: str
    max_batch: int | None  # rows a cache may hold; None: no limit of the backend's own
    max_seq_len: int | None  # positions a cache may hold; None: the decoder graph's (the manifest's)
    can_drop_rows: bool  # whether keep_rows works

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [batch, 3, H, W] -> image embeddings [batch, tokens, hidden]."""
        ...

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """token ids [batch, seq] -> scaled token embeddings [batch, seq, hidden]."""
        ...

    def new_cache(self, batch: int, capacity: int) -> CacheT:
        """An empty KV cache for ``batch`` rows and up to ``capacity`` positions (an in-place cache is
        allocated at that size once; a growing one grows to it)."""
        ...

    def step(self, inputs_embeds: np.ndarray, masks: dict[str, np.ndarray], position_ids: np.ndarray,
             cache: CacheT) -> np.ndarray:
        """Run the decoder on new positions, written into ``cache`` after the positions it holds;
        returns last-position logits [batch, vocab]. The masks cover the slots the decoder reads: the
        positions held and the new ones (growing cache) or every slot of the buffer (in-place cache)."""
        ...

    def keep_rows(self, cache: CacheT, rows: np.ndarray) -> CacheT:
        """The cache of ``rows`` (indices) only, so rows that finished stop costing decode work.
        Only where ``can_drop_rows``."""
        ...

    def close(self) -> None:
        """Release sessions and buffers; closing twice is harmless."""
        ...

    def __enter__(self) -> "Backend[CacheT]":
        ...

    def __exit__(self, *exc: object) -> None:
        ...


class BackendBase(Generic[CacheT]):
    """The defaults and the lifecycle a backend inherits: it overrides ``release`` to free what it holds."""

    name = "backend"
    max_batch: int | None = None
    max_seq_len: int | None = None
    can_drop_rows = False
    _closed = False

    def keep_rows(self, cache: CacheT, rows: np.ndarray) -> CacheT:
        raise NotImplementedError(f"the {self.name} backend cannot drop rows from a cache (can_drop_rows is False)")

    def release(self) -> None:
        """Free sessions and device memory. Runs once, also on a backend whose constructor failed half-way."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.release()

    def __enter__(self: SelfT) -> SelfT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def released_on_failure(backend: BackendBase) -> Iterator[None]:
    """Wrap a constructor's body: if it raises, what the backend had allocated is freed first."""
    try:
        yield
    except BaseException:
        backend.close()
        raise


def refuse_hooks(name: str, hooks: SessionHooks | None) -> None:
    """For backends without ONNX Runtime sessions: hooks that ask for something are an error."""
    if hooks is not None and hooks.wanted:
        raise InputError(f"the {name} backend has no feed observer or profiler: those are ONNX Runtime's "
                         "(use an onnxruntime backend)")


# name -> (module, class, what to install when the import fails)
BACKENDS = {
    "onnxruntime": ("paligemma_edge.runtime.backends.onnxruntime", "OnnxRuntimeBackend", "pip install onnxruntime"),
    "onnxruntime-cuda": ("paligemma_edge.runtime.backends.onnxruntime", "OnnxRuntimeCudaBackend",
                         "pip install onnxruntime-gpu"),
    "onnxruntime-tensorrt": ("paligemma_edge.runtime.backends.onnxruntime", "OnnxRuntimeTensorRTBackend",
                             "pip install onnxruntime-gpu"),
    "tensorrt": ("paligemma_edge.runtime.backends.tensorrt", "TensorRTBackend",
                 "pip install 'paligemma-edge[gpu]' (cuda-python); TensorRT comes with JetPack"),
    "tensorrt-rtx": ("paligemma_edge.runtime.backends.tensorrt", "TensorRTRtxBackend",
                     "pip install 'paligemma-edge[gpu,tensorrt-rtx]'"),
}


def create_backend(name: str, bundle_dir: Path, manifest: Manifest, threads: int | None = None,
                   hooks: SessionHooks | None = None) -> Backend:
    """The backend called ``name`` on a bundle; ``hooks``: see :class:`SessionHooks`."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend '{name}'; choose from: {', '.join(sorted(BACKENDS))}")
    module_name, class_name, install = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(f"backend '{name}' is not available ({exc.name} missing): {install}") from None
    backend: Backend = getattr(module, class_name)(bundle_dir, manifest, threads=threads, hooks=hooks)
    return backend
