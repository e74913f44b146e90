"""Calibration inputs: real images and prompts run through the source bundle, with every graph feed recorded.

The recorded feeds drive fp16 range measurement and static int8 calibration: the graphs see
exactly what they see at run time (prefill with an empty past, then KV-cached decode steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..runtime.errors import InputError
from ..runtime.images import load_image
from ..runtime.model import load
from ..runtime.sampling import GenerationOptions

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_PROMPTS = ["caption en", "describe en", "ocr", "answer en what is in the image", "detect object"]
# Decode feeds carry the whole KV cache: a few steps per prompt keep a 3B model's feeds bounded.
DECODE_STEPS = 2


@dataclass
class CalibrationSet:
    """Recorded inputs of the vision and decoder graphs."""

    vision: list[dict[str, np.ndarray]] = field(default_factory=list)
    decoder: list[dict[str, np.ndarray]] = field(default_factory=list)


def images_in(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: no such calibration directory")
    images = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(f"{directory}: no images in the calibration directory ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def prompts_in(directory: Path | None) -> list[str]:
    """``prompts.txt`` in the calibration directory (one per line), else PaliGemma's task prefixes."""
    path = Path(directory) / "prompts.txt" if directory else None
    if path and path.is_file():
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if prompts:
            return prompts
    return DEFAULT_PROMPTS


def synthetic_images(count: int = 4, size: int = 224) -> list[Image.Image]:
    """Deterministic pictures (gradients, shapes, noise) for range measurement without a calibration set."""
    from PIL import ImageDraw

    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if index % 2 else np.full((size, size, 3), 235, np.uint8)
        image = Image.fromarray(base)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = rng.integers(0, size - 40, 2)
            draw.ellipse((int(x), int(y), int(x) + 40, int(y) + 40), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        images.append(image)
    return images


# Inputs that are the same on every call (the tied embedding); recorded feeds leave them out.
CONSTANT_INPUTS = ("embedding",)


class _Recorder:
    """Wraps an ONNX Runtime session and keeps a numpy copy of every feed it runs (constants aside)."""

    def __init__(self, session, sink: list):
        self._session = session
        self._sink = sink

    def run(self, names, feed, *rest):
        self._sink.append({k: np.array(v) for k, v in feed.items() if k not in CONSTANT_INPUTS})
        return self._session.run(names, feed, *rest)

    def io_binding(self):
        """The backend binds its decoder inputs: note each as it is bound, keep them when the run starts."""
        binding, bound = self._session.io_binding(), {}
        bind = binding.bind_ortvalue_input

        def record(name, value):
            if name not in CONSTANT_INPUTS:
                # a copy: an OrtValue made from a numpy array wraps that array's memory, which the
                # backend frees after the step (a view would read whatever is allocated there next)
                bound[name] = np.array(value.numpy(), copy=True)
            bind(name, value)

        binding.bind_ortvalue_input = record
        binding.recorded = bound
        return binding

    def run_with_iobinding(self, binding, *rest):
        self._sink.append(dict(binding.recorded))
        return self._session.run_with_iobinding(binding, *rest)

    def __getattr__(self, name):
        return getattr(self._session, name)


def record(bundle: Path, images: list, prompts: list[str], decode_steps: int = DECODE_STEPS) -> CalibrationSet:
    """Run every image with every prompt through the bundle (greedy), recording the graphs' feeds."""
    recorded = CalibrationSet()
    with load(bundle, verify=False) as model:
        model.feature_cache.max_entries = 0  # every image through the vision graph
        backend = model.backend
        backend.vision = _Recorder(backend.vision, recorded.vision)
        backend.decoder = _Recorder(backend.decoder, recorded.decoder)
        options = GenerationOptions(max_new_tokens=decode_steps + 1)
        for image in images:
            picture = load_image(image)  # the runtime's loader (upright, RGB), once per picture
            for prompt in prompts:  # one at a time: a batch would multiply each feed's KV cache
                model.generate_batch([picture], [prompt], options)
    return recorded
