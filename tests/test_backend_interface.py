"""One backend interface: what callers may use of a backend, and only that.

- No module of the package or of the tests outside runtime/backends/ reads a backend's private
  attributes or assigns to a backend's attributes (an AST check, shown first to find such accesses).
- Every registered backend class has the members runtime/backends/base.py's ``Backend`` declares.
- A backend is a context manager that frees its sessions, once; a load that fails half-way frees
  what it had made before the error propagates. (The TensorRT backend's device memory and stream:
  tests/test_tensorrt_backend.py, on its emulated engines.)
"""

from __future__ import annotations

import ast
import gc
import importlib
import importlib.util
import inspect
import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from paligemma_edge.runtime.backends.base import BACKENDS, Backend, SessionHooks, create_backend
from paligemma_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend, OrtCache
from paligemma_edge.runtime.bundle.manifest import read_manifest
from paligemma_edge.runtime.errors import BundleError, InputError

# The folders of the package (paligemma_edge.<name>) besides its own; runtime/backends/ is exempt.
SUBPACKAGES = ("runtime", "export", "quantize", "evaluation", "finetune", "apps", "shapes", "benchmarks", "fixtures")
BACKEND_FACTORY = "create_backend"


def _is_backend(node: ast.expr, aliases: set[str]) -> bool:
    """Whether an expression is (by its spelling) a backend: ``backend``, ``x.backend``, a name bound
    to one, ``create_backend(...)`` or ``SomethingBackend(...)``."""
    if isinstance(node, ast.Name):
        return node.id == "backend" or node.id in aliases
    if isinstance(node, ast.Attribute):
        return node.attr == "backend"
    if isinstance(node, ast.Call):
        func = node.func
        called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        return called == BACKEND_FACTORY or called.endswith("Backend")
    return False


def _aliases(tree: ast.AST) -> set[str]:
    """Names bound to a backend anywhere in the module (``x = model.backend``, ``a, x = ..., backend``,
    ``with create_backend(...) as x``), to a fixed point."""
    aliases: set[str] = set()
    while True:
        found = set(aliases)
        for node in ast.walk(tree):
            pairs: list[tuple[ast.expr, ast.expr]] = []
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        pairs += list(zip(target.elts, node.value.elts))
                    else:
                        pairs.append((target, node.value))
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                pairs += [(item.optional_vars, item.context_expr) for item in node.items if item.optional_vars]
            for target, value in pairs:
                if isinstance(target, ast.Name) and _is_backend(value, found):
                    found.add(target.id)
        if found == aliases:
            return aliases
        aliases = found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def backend_intrusions(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: what`` for each read of a backend's private attribute and each assignment to (or
    deletion of) a backend's attribute, including ``setattr``/``getattr`` with a private name."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_backend(node.value, aliases):
            if not isinstance(node.ctx, ast.Load):
                found.append(f"{filename}:{node.lineno}: assigns {ast.unparse(node)}")
            elif _private(node.attr):
                found.append(f"{filename}:{node.lineno}: reads {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "delattr") and len(node.args) >= 2
              and _is_backend(node.args[0], aliases) and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _private(node.args[1].value)):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


INTRUSIONS = [
    "model.backend._banks",
    "backend._constant_inputs['embedding']",
    "engines = model.backend\nprint(engines._banks)",
    "device, engines, manifest = a, model.backend, b\nengines._phase_contexts['decode'] = 1",
    "backend.decoder = None",
    "model.backend.decoder = wrap(model.backend.decoder)",
    "with create_backend('onnxruntime', b, m) as mine:\n    mine._buffers",
    "inner = OnnxRuntimeBackend(b, m)\nouter = inner\nouter._hooks",
    "del backend.vision",
    "setattr(runtime.backend, '_owner', None)",
]
ALLOWED = [
    "model.backend.max_batch",
    "backend.step(embeds, masks, positions, cache)",
    "model.backend = counter",
    "self._banks",
    "backend.__class__",
    "getattr(model.backend, 'max_batch', None)",
    "trt_backend.max_shapes(record)",
]


@pytest.mark.parametrize("source", INTRUSIONS)
def test_the_check_finds_intrusions(source):
    assert len(backend_intrusions(source)) == 1, source


@pytest.mark.parametrize("source", ALLOWED)
def test_the_check_allows_the_public_interface(source):
    assert backend_intrusions(source) == []


def _sources() -> list[Path]:
    package = importlib.util.find_spec("paligemma_edge")
    assert package is not None and package.submodule_search_locations
    roots = [Path(next(iter(package.submodule_search_locations)))]
    for name in SUBPACKAGES:
        spec = importlib.util.find_spec(f"paligemma_edge.{name}")
        assert spec is not None and spec.submodule_search_locations, name
        roots.append(Path(next(iter(spec.submodule_search_locations))))
    roots.append(Path(__file__).parent)
    exempt = roots[SUBPACKAGES.index("runtime") + 1].resolve() / "backends"
    files = {path.resolve() for root in roots for path in root.rglob("*.py")}
    return sorted(path for path in files if exempt not in path.parents)


def test_no_module_outside_the_backends_touches_their_insides():
    sources = _sources()
    assert any(path.name == "calibration.py" for path in sources) and any(path.name == "profile.py" for path in sources)
    found = [hit for path in sources for hit in backend_intrusions(path.read_text(), str(path))]
    assert found == []


# -- the protocol ------------------------------------------------------------------------

MEMBERS = {"name", "max_batch", "max_seq_len", "can_drop_rows", "encode_images", "embed", "new_cache", "step",
           "keep_rows", "close", "__enter__", "__exit__"}


def _protocol_members() -> set[str]:
    methods = {name for name, value in vars(Backend).items()
               if inspect.isfunction(value) and (not name.startswith("_") or name in ("__enter__", "__exit__"))}
    return set(Backend.__annotations__) | methods


def _backend_class(name: str) -> Any:
    module_name, class_name, _ = BACKENDS[name]
    return getattr(importlib.import_module(module_name), class_name)


def test_the_protocol_declares_what_callers_use():
    assert _protocol_members() == MEMBERS


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_class_has_the_protocols_members(name):
    cls = _backend_class(name)
    assert cls.name == name
    for member in MEMBERS:
        assert hasattr(cls, member), member
        expected = vars(Backend).get(member)
        if inspect.isfunction(expected):
            theirs = inspect.signature(getattr(cls, member)).parameters
            assert list(theirs) == list(inspect.signature(expected).parameters), member
    rows_droppable = name.startswith("onnxruntime")  # the TensorRT banks keep the batch they began with
    assert cls.can_drop_rows is rows_droppable


def _typed(backend: OnnxRuntimeBackend) -> Backend[OrtCache]:
    return backend  # mypy (make lint) checks the ONNX Runtime backend against the protocol here


def _live_sessions(before: weakref.WeakSet) -> list:
    gc.collect()
    return [o for o in gc.get_objects() if issubclass(type(o), ort.InferenceSession) and o not in before]


def _sessions_now() -> weakref.WeakSet:
    gc.collect()
    return weakref.WeakSet(o for o in gc.get_objects() if issubclass(type(o), ort.InferenceSession))


def test_a_backend_is_a_context_manager_that_frees_its_sessions_once(bundles):
    bundle = bundles[(2, 28)]
    manifest = read_manifest(bundle)
    before = _sessions_now()
    with OnnxRuntimeBackend(bundle, manifest) as backend:
        assert isinstance(backend, Backend) and isinstance(_typed(backend), Backend)
        assert len(_live_sessions(before)) == 2  # vision and decoder
        assert backend.max_batch is None and backend.max_seq_len is None
        cache = backend.new_cache(2, 3)
        logits = backend.step(np.zeros((2, 3, manifest.decoder.hidden_size), np.float32),
                              {t.name: np.ones((2, 1, 3, 3), bool) for t in manifest.decoder_graph.inputs
                               if "mask" in t.name}, np.arange(3)[None].repeat(2, 0), cache)
        assert logits.shape == (2, manifest.embedding.shape[0])
        kept = backend.keep_rows(cache, np.array([1]))
        assert all(value.shape()[0] == 1 for value in kept.values.values())
        with pytest.raises(InputError, match="not being profiled"):
            backend.end_profiling()
    assert _live_sessions(before) == []
    backend.close()  # a second close is harmless


def test_a_load_that_fails_half_way_frees_the_first_session(bundles, tmp_path):
    """The decoder session loads first; when the vision graph cannot load, the decoder is freed before the
    error propagates (while the error, which holds the constructor's frames, is still alive)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles[(2, 28)], bundle)
    manifest = read_manifest(bundle)
    (bundle / manifest.vision_graph.file).write_bytes(b"not a graph")
    before = _sessions_now()
    with pytest.raises(BundleError, match="ONNX Runtime cannot load the graph") as failure:
        create_backend("onnxruntime", bundle, manifest)
    assert failure.value.__traceback__ is not None
    assert _live_sessions(before) == []


def test_feed_observers_and_profilers_are_onnxruntimes(bundles):
    """The TensorRT backends refuse hooks that ask for something, before looking for TensorRT or a GPU."""
    bundle = bundles[(2, 28)]
    manifest = read_manifest(bundle)
    for name in ("tensorrt", "tensorrt-rtx"):
        with pytest.raises(InputError, match=f"the {name} backend has no feed observer or profiler"):
            create_backend(name, bundle, manifest, hooks=SessionHooks(observer=lambda graph, feeds: None))
        with pytest.raises(InputError, match="ONNX Runtime's"):
            create_backend(name, bundle, manifest, hooks=SessionHooks(profile_prefix=Path("profile")))


def test_the_observer_sees_every_input_of_every_run(bundles, images):
    import paligemma_edge
    from paligemma_edge.runtime.generation.loop import prefill

    bundle = bundles[(2, 28)]
    manifest = read_manifest(bundle)
    runs: list[tuple[str, list[str]]] = []
    with paligemma_edge.load(bundle) as model:
        pixels = np.zeros((1, 3, manifest.image.height, manifest.image.width), np.float32)
        batch = model.tokenizer.batch(["caption en"])
    hooks = SessionHooks(observer=lambda graph, feeds: runs.append((graph, list(feeds))))
    with create_backend("onnxruntime", bundle, manifest, hooks=hooks) as backend:
        prefill(backend, manifest.decoder, batch, backend.encode_images(pixels))
    assert [graph for graph, _ in runs] == ["vision", "decoder"]
    assert runs[0][1] == manifest.vision_graph.input_names()
    assert sorted(runs[1][1]) == sorted(manifest.decoder_graph.input_names())  # the table and the cache too
