"""The optional extras: which command needs which, and the one line that says what to install.

The base install (numpy, pillow, tokenizers, onnxruntime) is what a device runs: ``run``, ``verify``,
``inspect``, ``pack``, ``compare``, ``eval --dataset shapes``, ``dataset check``, ``triton-repo`` and
``bench --bundles``. The other commands need an extra of
pyproject's ``[project.optional-dependencies]``. The CLI checks a command's modules before it imports
the command's code (:func:`require`), and a module of an extra found missing later, anywhere under the
command (a partial or broken install), gives the same line (:func:`explain`). A missing module of
paligemma_edge itself, or of a package no extra provides, is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Sequence

from .runtime.errors import InputError

# extra -> the top-level modules its packages provide (a test keeps this equal to pyproject's extras)
EXTRA_MODULES = {
    "export": ("torch", "transformers", "onnx", "onnxscript", "onnx_ir"),
    "apps": ("fastapi", "uvicorn", "multipart", "python_multipart", "cv2"),
    "bench": ("matplotlib",),
    "eval": ("pycocotools", "rapidfuzz", "sacrebleu"),
    "finetune": ("peft",),
    "tensorrt-rtx": ("tensorrt_rtx_bindings", "tensorrt_rtx_libs", "onnx"),
    "gpu": ("cuda", "onnx"),
}


class MissingExtraError(InputError):
    """A command needs an optional extra that is not installed."""


@dataclass(frozen=True)
class Need:
    """What a command imports from an extra, checked before the command's own modules are imported."""

    extra: str
    modules: tuple[str, ...]
    note: str = ""  # said after the install line

    def __post_init__(self):
        unknown = set(self.modules) - set(EXTRA_MODULES.get(self.extra, ()))
        if unknown:
            raise ValueError(f"the '{self.extra}' extra does not provide {', '.join(sorted(unknown))}")


# said after the install line when the module is missing
_NOTES = {"cv2": "on a Jetson, JetPack's python3-opencv, which opens GStreamer pipelines"}

# command -> its need; bench needs the export extra only to build, export and quantize --model
COMMAND_NEEDS = {
    "export": Need("export", EXTRA_MODULES["export"]),
    "quantize": Need("export", ("onnx", "onnx_ir")),  # onnxruntime.quantization imports onnx_ir
    "bench": Need("export", EXTRA_MODULES["export"], "bench --bundles measures existing bundles without it"),
    "serve": Need("apps", ("fastapi", "uvicorn", "python_multipart")),  # python-multipart >= 0.0.13
    "camera": Need("apps", ("cv2",), _NOTES["cv2"]),
    "finetune": Need("finetune", ("peft",), "it also needs the 'export' extra: torch, transformers"),
}


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ValueError:  # imported already, without a spec: present
        return False


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (found without importing them)."""
    return [module for module in modules if _absent(module)]


def extra_of(module: str) -> str | None:
    """The extra whose packages provide ``module`` (a dotted name counts by its top-level package)."""
    top = module.partition(".")[0]
    return next((extra for extra, modules in EXTRA_MODULES.items() if top in modules), None)


def message(command: str, extra: str, missing: Sequence[str], note: str = "") -> str:
    verb = "is" if len(missing) == 1 else "are"
    line = f"{command} needs the '{extra}' extra ({', '.join(missing)} {verb} missing): pip install 'paligemma-edge[{extra}]'"
    return f"{line} ({note})" if note else line


def require(command: str, need: Need | None) -> None:
    """Raise :class:`MissingExtraError` when a module ``need`` names is not installed."""
    if need is None:
        return
    missing = missing_modules(need.modules)
    if missing:
        raise MissingExtraError(message(command, need.extra, missing, need.note))


def explain(command: str, error: ModuleNotFoundError) -> MissingExtraError | None:
    """The one-line error for a module of an extra found missing while ``command`` ran, or None for any
    other missing module (one of paligemma_edge's own, or of no extra: a bug, to keep its traceback)."""
    name = error.name or ""
    extra = extra_of(name)
    if extra is None:
        return None
    return MissingExtraError(message(command, extra, [name], _NOTES.get(name.partition(".")[0], "")))
