"""What building TensorRT engines and running them share: the TensorRT flavours and their import,
the device tag engines are recorded under, TensorRT's logger, and picking a bundle's engines.

What is decided here: engines are keyed by flavour, TensorRT version and GPU name, and only run where
that key matches (``select_engines`` says to rebuild otherwise).
"""

from __future__ import annotations

import importlib
import re
import subprocess
from typing import Any

from ..bundle.manifest import EngineSet, Manifest
from ..errors import BackendUnavailableError, BundleError

# flavour -> (module, what to install)
FLAVOURS = {
    "tensorrt": ("tensorrt", "TensorRT 10 (JetPack 6/7 ships it; on x86: pip install tensorrt)"),
    "tensorrt-rtx": ("tensorrt_rtx_bindings", "pip install 'paligemma-edge[tensorrt-rtx]'"),
}

def import_tensorrt(flavour: str):
    module, install = FLAVOURS[flavour]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackendUnavailableError(f"{flavour} is not installed ({module} missing): {install}") from None


def gpu_description() -> str:
    """'NAME sm XY' of the first GPU (nvidia-smi), or 'no-gpu'."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "no-gpu"
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    if not line:
        return "no-gpu"
    name, _, capability = line.partition(",")
    return f"{name.strip()} sm{capability.strip().replace('.', '')}"


def device_tag(flavour: str, version: str, gpu: str) -> str:
    """The key engines are recorded under: flavour, TensorRT version and GPU, as one slug."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", f"{flavour}-{version}-{gpu}").strip("-").lower()


class CollectingLogger:
    """A TensorRT logger that keeps error messages for our one-line report."""

    def __init__(self, trt):
        self.errors: list[str] = []
        base: Any = trt.ILogger  # the flavour's module, imported at run time: no static type to name

        class Collecting(base):  # TensorRT needs an ILogger subclass
            def __init__(inner):
                base.__init__(inner)

            def log(inner, severity, message):
                if severity <= trt.ILogger.Severity.ERROR:
                    self.errors.append(str(message).strip())

        self.logger = Collecting()

    def last(self, count: int = 2) -> str:
        """The last ``count`` errors TensorRT logged, as one line."""
        return "; ".join(self.errors[-count:]) or "no message"


def select_engines(manifest: Manifest, tag: str) -> EngineSet:
    """The engines built for this device and TensorRT, or an error that says to rebuild."""
    if tag in manifest.engines:
        return manifest.engines[tag]
    built = ", ".join(manifest.engines) or "none"
    raise BundleError(
        f"this bundle has no engines for {tag} (built: {built}); engines only run where they were built: "
        "run 'paligemma-edge build-engines BUNDLE' on this machine"
    )
