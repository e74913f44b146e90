"""Calibration inputs: real images and prompts run through the source bundle, with every graph feed recorded.

The recorded feeds drive fp16 range measurement and static int8 calibration: the graphs see
exactly what they see at run time (prefill with an empty past, then KV-cached decode steps).

What is decided here:

- ``--calibration PATH`` is a PaliGemma JSONL dataset when PATH ends in ``:split``, is a ``.jsonl``
  file, or is a folder evaluation/datasets.py reads as one (``_annotations.<split>.jsonl``, in it
  or in its ``dataset/`` folder, or ``annotations.jsonl`` in it or in its sub-folders). Any other
  folder is a directory of images, with an optional ``prompts.txt``, as before.
- A directory of images runs every image with every prompt (``prompts.txt``, else PaliGemma's task
  prefixes). A dataset runs each line's own prefix on its own image: its train split, or the split
  named (``PATH:split``), refused whole if any line has a problem (the dataset reader's rules).
- A dataset gives at most ``DATASET_PAIRS`` (image, prefix) pairs, spread over distinct images: the
  images (in file order) are thinned to evenly spaced ones when there are more than the cap, then
  taken in rounds, one line of each image a round, each image starting at a different one of its
  lines so the task kinds mix. The cap bounds the recorded feeds, which are all held in memory
  (each decode feed holds the KV cache: 32 pairs are about 4 GB for PaliGemma 2 3B at 224 px).
- The feeds are recorded through the ONNX Runtime backend's feed observer (runtime/backends/base.py
  SessionHooks): a copy of every input of every vision and decoder run, the tied table aside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
from PIL import Image

from ..runtime.backends.base import SessionHooks
from ..runtime.errors import InputError
from ..runtime.generation.sampling import GenerationOptions
from ..runtime.images import load_image
from ..runtime.model import load

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_PROMPTS = ["caption en", "describe en", "ocr", "answer en what is in the image", "detect object"]
# Decode feeds carry the whole KV cache: a few steps per prompt keep a 3B model's feeds bounded.
DECODE_STEPS = 2
DATASET_PAIRS = 32  # (image, prefix) pairs taken from a dataset (see the module's notes)
CALIBRATION_SPLITS = ("train",)  # a dataset's split to calibrate on unless PATH:split names one

Picture = Union[Path, Image.Image]


@dataclass
class CalibrationSet:
    """Recorded inputs of the vision and decoder graphs."""

    vision: list[dict[str, np.ndarray]] = field(default_factory=list)
    decoder: list[dict[str, np.ndarray]] = field(default_factory=list)

    def observe(self, graph: str, feeds: Mapping[str, np.ndarray]) -> None:
        """A backend's feed observer: keep a copy of the run's inputs (the backend reuses their memory)."""
        runs = self.vision if graph == "vision" else self.decoder
        runs.append({name: np.array(value, copy=True) for name, value in feeds.items() if name not in CONSTANT_INPUTS})


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


@dataclass(frozen=True)
class CalibrationInputs:
    """What ``record`` runs: (picture, prompt) pairs, and where they came from."""

    pairs: tuple[tuple[Picture, str], ...]
    origin: str  # the directory, the dataset and split, or "synthetic images"
    kind: str  # "images" (every image x every prompt), "dataset" (each line's own prefix) or "synthetic"

    @property
    def images(self) -> int:
        return len({_key(picture) for picture, _ in self.pairs})

    @property
    def prompts(self) -> int:
        return len({prompt for _, prompt in self.pairs})

    def describe(self) -> str:
        if self.kind == "dataset":
            return f"{len(self.pairs)} (image, prefix) pair(s) over {self.images} image(s) from {self.origin}"
        return f"{self.images} image(s) x {self.prompts} prompt(s) from {self.origin}"

    def report(self) -> dict:
        return {"source": self.origin, "kind": self.kind, "images": self.images, "prompts": self.prompts,
                "pairs": len(self.pairs)}


def _key(picture: Picture):
    return picture if isinstance(picture, Path) else id(picture)


def is_dataset(path: str | Path) -> bool:
    """Whether ``--calibration PATH`` names a JSONL dataset rather than a directory of images (module notes)."""
    from ..evaluation.datasets import find_splits, parse_spec

    spec = parse_spec(str(path))
    if spec.split is not None or spec.path.suffix.lower() == ".jsonl":
        return True
    if not spec.path.is_dir():
        return False
    try:
        find_splits(spec.path)
    except InputError:
        return False
    return True


def spread_pairs(lines: Sequence[tuple[Path, str]], limit: int = DATASET_PAIRS) -> list[tuple[Path, str]]:
    """At most ``limit`` (image, prefix) lines spread over distinct images (see the module's notes),
    grouped by image in the images' order."""
    by_image: dict[Path, list[str]] = {}
    for image, prefix in lines:
        by_image.setdefault(image, []).append(prefix)
    images = list(by_image)
    if len(images) > limit:
        images = [images[round(i * (len(images) - 1) / (limit - 1))] if limit > 1 else images[0] for i in range(limit)]
    chosen: dict[Path, list[str]] = {image: [] for image in images}
    taken = 0
    for turn in range(max(len(by_image[image]) for image in images)):
        for offset, image in enumerate(images):
            prefixes = by_image[image]
            if turn < len(prefixes) and taken < limit:
                chosen[image].append(prefixes[(offset + turn) % len(prefixes)])
                taken += 1
    return [(image, prefix) for image, prefixes in chosen.items() for prefix in prefixes]  # grouped by image


def calibration_inputs(path: str | Path | None, limit: int = DATASET_PAIRS) -> CalibrationInputs:
    """The pairs to record for ``--calibration PATH``: a dataset's lines, a directory's images x prompts, or
    without PATH synthetic pictures x the task prefixes. Bad input raises before any bundle loads."""
    if path is None:
        pictures = synthetic_images()
        return CalibrationInputs(tuple((p, q) for p in pictures for q in DEFAULT_PROMPTS), "synthetic images", "synthetic")
    if is_dataset(path):
        from ..evaluation.datasets import load_dataset, parse_spec

        spec = parse_spec(str(path))
        dataset = load_dataset(spec, prefer=CALIBRATION_SPLITS)
        pairs = spread_pairs([(r.image, r.prefix) for r in dataset.records], limit)
        return CalibrationInputs(tuple(pairs), str(dataset), "dataset")
    directory = Path(path)
    images, prompts = images_in(directory), prompts_in(directory)
    return CalibrationInputs(tuple((image, prompt) for image in images for prompt in prompts), str(directory), "images")


# Inputs that are the same on every call (the tied embedding); recorded feeds leave them out.
CONSTANT_INPUTS = ("embedding",)


def record(bundle: Path, pairs: Sequence[tuple[Picture, str]], decode_steps: int = DECODE_STEPS) -> CalibrationSet:
    """Run each (picture, prompt) pair through the bundle (greedy), recording the graphs' feeds;
    consecutive pairs on one picture load it once."""
    recorded = CalibrationSet()
    with load(bundle, verify=False, hooks=SessionHooks(observer=recorded.observe)) as model:
        model.feature_cache.max_entries = 0  # every pair's image through the vision graph
        options = GenerationOptions(max_new_tokens=decode_steps + 1)
        loaded: dict = {}
        for picture, prompt in pairs:  # one at a time: a batch would multiply each feed's KV cache
            key = _key(picture)
            if key not in loaded:  # the runtime's loader (upright, RGB), once per picture
                loaded = {key: load_image(picture)}  # pairs come grouped by picture: keep the current one
            model.generate_batch([loaded[key]], [prompt], options)
    return recorded
