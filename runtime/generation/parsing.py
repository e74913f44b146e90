"""Pure parsers from PaliGemma's detection and segmentation answers to typed results.

An answer holds objects separated by ``" ; "``; each is four ``<locNNNN>`` tokens (y_min,
x_min, y_max, x_max as bins 0..1023 of the squashed image), for segmentation sixteen
``<segNNN>`` codebook indices, then the label. Bins map to the ORIGINAL image with
big_vision's convention, bin / 1023 of the side. Malformed entries are dropped one by one:
they never raise and never take the valid entries down with them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

LOC_BINS = 1024
SEG_CODES = 128
SEG_TOKENS = 16

_LOC = re.compile(r"<loc(\d{4})>")
_SEG = re.compile(r"<seg(\d{3})>")
_ENTRY = re.compile(r"^\s*((?:<loc\d{4}>){4})\s*((?:<seg\d{3}>)*)\s*(.*?)\s*$", re.DOTALL)

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Detection:
    label: str
    box: Box  # (x0, y0, x1, y1) in pixels of the original image


@dataclass(frozen=True)
class Segmentation:
    label: str
    box: Box  # (x0, y0, x1, y1) in pixels of the original image
    mask: np.ndarray = field(compare=False, repr=False)  # bool [height, width] of the original image


def _entries(text: str):
    """(loc bins, seg codes, label) for each well-formed entry with a valid box."""
    for chunk in text.split(";"):
        match = _ENTRY.match(chunk)
        if not match:
            continue
        y0, x0, y1, x1 = (int(v) for v in _LOC.findall(match.group(1)))
        if max(y0, x0, y1, x1) >= LOC_BINS or y1 <= y0 or x1 <= x0:
            continue
        label = match.group(3)
        if _LOC.search(label) or _SEG.search(label):  # stray location tokens: not a clean entry
            continue
        segs = [int(v) for v in _SEG.findall(match.group(2))]
        yield (y0, x0, y1, x1), segs, label


def _to_pixels(bins: tuple[int, int, int, int], width: int, height: int) -> Box:
    y0, x0, y1, x1 = bins
    scale = LOC_BINS - 1
    return (x0 / scale * width, y0 / scale * height, x1 / scale * width, y1 / scale * height)


def parse_detections(text: str, width: int, height: int) -> list[Detection]:
    """``"<loc..>x4 label ; ..."`` -> detections with boxes in pixels of a width x height image."""
    return [Detection(label, _to_pixels(bins, width, height)) for bins, _, label in _entries(text)]


def paste_mask(logits: np.ndarray, box: Box, width: int, height: int) -> np.ndarray:
    """Resize a 64x64 mask-logit map bilinearly onto the box and threshold at 0 -> bool [height, width].

    Box corners are truncated to whole pixels, as big_vision's segmentation evaluator does."""
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, x1 = max(0, min(x0, width - 1)), max(1, min(x1, width))
    y0, y1 = max(0, min(y0, height - 1)), max(1, min(y1, height))
    mask = np.zeros((height, width), dtype=bool)
    if x1 <= x0 or y1 <= y0:
        return mask
    resized = Image.fromarray(np.asarray(logits, dtype=np.float32), mode="F").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    mask[y0:y1, x0:x1] = np.asarray(resized) > 0
    return mask


def parse_segmentations(
    text: str, width: int, height: int, mask_decoder: Callable[[np.ndarray], np.ndarray]
) -> list[Segmentation]:
    """``"<loc..>x4<seg..>x16 label ; ..."`` -> segmentations with full-image boolean masks.

    ``mask_decoder`` maps seg indices [n, 16] to 64x64 mask logits [n, 64, 64] (see MaskDecoder).
    Entries without exactly 16 seg tokens in 0..127 are dropped.
    """
    entries = [(bins, segs, label) for bins, segs, label in _entries(text)
               if len(segs) == SEG_TOKENS and max(segs) < SEG_CODES]
    if not entries:
        return []
    logits = mask_decoder(np.array([segs for _, segs, _ in entries], dtype=np.int64))
    results = []
    for (bins, _, label), mask_logits in zip(entries, logits):
        box = _to_pixels(bins, width, height)
        results.append(Segmentation(label, box, paste_mask(mask_logits, box, width, height)))
    return results
