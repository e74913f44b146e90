"""``paligemma-edge triton-repo``: a Triton Inference Server model repository for a bundle.

The repository holds one Python-backend model::

    REPO/<name>/config.pbtxt   dynamic batching, instance groups, inputs, outputs, parameters
    REPO/<name>/1/model.py     imports paligemma_edge.apps.triton_model.TritonPythonModel

Decided here:

- model.py is one import: the model's code is a module of the installed package, so it always
  matches the runtime it calls. The server's Python (Triton's Python-backend stub) must have
  paligemma_edge installed; ``deploy/triton-venv.sh`` builds such an environment.
- The bundle is not copied: config.pbtxt names it (``bundle`` parameter) by the path it has on the
  server, by default BUNDLE's absolute path here; ``bundle_path`` overrides it (a container's mount).
- ``max_batch`` is Triton's max_batch_size and its preferred batch size; ``instances`` is the
  instance_group count, KIND_CPU for the onnxruntime backend and KIND_GPU for the others.
- ``stream`` makes the model decoupled (one response per token, then the result).
- The repository is written into a temporary folder beside REPO, then renamed into place; an
  existing REPO is refused unless ``force``, and then replaced only once the new one is complete.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..runtime.backends.base import BACKENDS
from ..runtime.errors import InputError
from ..runtime.bundle.manifest import read_manifest
from .triton_io import IMAGE, OPTION_FIELDS, OUTPUTS, TEXT_FIELDS, ServingLimits

CPU_BACKENDS = frozenset({"onnxruntime"})
MODEL_PY = '''"""Triton Python-backend model written by paligemma-edge triton-repo: the bundle in config.pbtxt."""

from paligemma_edge.apps.triton_model import TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class TritonRepoOptions:
    backend: str = "onnxruntime"
    max_batch: int = 8
    instances: int = 1
    stream: bool = False
    name: str = "paligemma"
    bundle_path: str | None = None  # the bundle's path on the server (default: its absolute path here)
    max_queue_delay_us: int = 10_000  # how long Triton holds a request to fill a batch
    threads: int | None = None  # runtime threads per instance (default: the backend's)
    verify: bool = False  # checksum every bundle file at each instance's load
    limits: ServingLimits = ServingLimits()
    force: bool = False

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise InputError(f"unknown backend '{self.backend}'; choose from: {', '.join(sorted(BACKENDS))}")
        for value, flag in ((self.max_batch, "--max-batch"), (self.instances, "--instances")):
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{flag} must be at least 1, got {value}")
        if self.max_queue_delay_us < 0:
            raise InputError(f"the queue delay must be >= 0 microseconds, got {self.max_queue_delay_us}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be at least 1, got {self.threads}")
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name) or self.name.startswith("."):
            raise InputError(f"model name '{self.name}': use letters, digits, '-', '_' and '.'")

    @property
    def kind(self) -> str:
        return "KIND_CPU" if self.backend in CPU_BACKENDS else "KIND_GPU"


def _input(name: str, data_type: str, optional: bool) -> str:
    return (f'  {{ name: "{name}" data_type: {data_type} dims: [ 1 ]'
            f'{" optional: true" if optional else ""} }}')


def _parameter(key: str, value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'parameters: {{ key: "{key}" value: {{ string_value: "{escaped}" }} }}'


def render_config(bundle_path: str, options: TritonRepoOptions) -> str:
    """config.pbtxt's text (protobuf text format, as Triton reads it)."""
    inputs = [_input(IMAGE, "TYPE_STRING", False)]
    inputs += [_input(name, "TYPE_STRING", True) for name in TEXT_FIELDS]
    inputs += [_input(name, data_type, True) for name, (data_type, _) in OPTION_FIELDS.items()]
    outputs = [f'  {{ name: "{name}" data_type: {data_type} dims: [ {dims} ] }}'
               for name, (data_type, dims) in OUTPUTS.items()]
    parameters = {
        "bundle": bundle_path, "backend": options.backend, "verify": "true" if options.verify else "false",
        "threads": "" if options.threads is None else str(options.threads), **options.limits.parameters(),
    }
    lines = [
        f'name: "{options.name}"',
        'backend: "python"',
        f"max_batch_size: {options.max_batch}",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {options.max_batch} ]",
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
        "}",
        "input [", ",\n".join(inputs), "]",
        "output [", ",\n".join(outputs), "]",
        f"instance_group [ {{ count: {options.instances} kind: {options.kind} }} ]",
    ]
    if options.stream:
        lines.append("model_transaction_policy { decoupled: true }")
    lines += [_parameter(key, value) for key, value in parameters.items()]
    return "\n".join(lines) + "\n"


def write_triton_repository(bundle: str | Path, out: str | Path, options: TritonRepoOptions = TritonRepoOptions()
                            ) -> Path:
    """Write the model repository for ``bundle`` at ``out``; returns the model's folder."""
    bundle_dir = Path(bundle)
    if not bundle_dir.is_dir():
        raise InputError(f"{bundle_dir}: no such bundle directory")
    read_manifest(bundle_dir)  # a bundle this runtime can load, or its one-line BundleError now
    target = Path(out)
    if target.exists() and not options.force:
        raise InputError(f"{target} exists; pass --force to replace it")
    if target.exists() and not target.is_dir():
        raise InputError(f"{target} is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model_dir = staging / options.name
        (model_dir / "1").mkdir(parents=True)
        bundle_path = options.bundle_path or str(bundle_dir.resolve())
        (model_dir / "config.pbtxt").write_text(render_config(bundle_path, options))
        (model_dir / "1" / "model.py").write_text(MODEL_PY)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the repository from a server run as another user
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / options.name
