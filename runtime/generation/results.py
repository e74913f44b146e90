"""Typed results of generation and tasks, and their JSON form."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import coco_rle
from .parsing import Detection, Segmentation


@dataclass(frozen=True)
class Timings:
    vision_ms: float
    prefill_ms: float
    decode_ms: float
    decode_tokens_per_s: float

    @property
    def time_to_first_token_ms(self) -> float:
        return self.vision_ms + self.prefill_ms


@dataclass(frozen=True)
class Generation:
    """One prompt's answer: the text result of every task. ``token_ids`` exclude prompt and eos."""

    prompt: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "eos", "length" (max_new_tokens) or "max_seq_len" (bundle limit)
    timings: Timings

    def to_dict(self) -> dict:
        return asdict(self) | {"token_ids": list(self.token_ids)}


@dataclass(frozen=True)
class TokenChunk:
    """A streamed token and the text it completes (empty while a character is incomplete)."""

    token_id: int
    text: str


@dataclass(frozen=True)
class _ParsedAnswer:
    """A detect or segment answer: the generation and the objects parsed from it."""

    generation: Generation

    @property
    def text(self) -> str:
        return self.generation.text


@dataclass(frozen=True)
class DetectionResult(_ParsedAnswer):
    detections: tuple[Detection, ...]

    @property
    def objects(self) -> tuple[Detection, ...]:
        return self.detections

    def to_dict(self) -> dict:
        return self.generation.to_dict() | {"detections": [detection_to_dict(d) for d in self.detections]}


@dataclass(frozen=True)
class SegmentationResult(_ParsedAnswer):
    segmentations: tuple[Segmentation, ...]

    @property
    def objects(self) -> tuple[Segmentation, ...]:
        return self.segmentations

    def to_dict(self) -> dict:
        return self.generation.to_dict() | {"segmentations": [segmentation_to_dict(s) for s in self.segmentations]}


def _box_list(box) -> list[float]:
    return [round(float(v), 2) for v in box]


def detection_to_dict(detection: Detection) -> dict:
    return {"label": detection.label, "box": _box_list(detection.box)}


def segmentation_to_dict(segmentation: Segmentation) -> dict:
    return {"label": segmentation.label, "box": _box_list(segmentation.box), "mask": mask_to_rle(segmentation.mask)}


def mask_to_rle(mask: np.ndarray) -> dict:
    """A boolean [height, width] mask as COCO RLE: ``{"size": [h, w], "counts": "<compressed string>"}``."""
    return coco_rle.encode(mask)


def rle_to_mask(rle: dict) -> np.ndarray:
    """A result's ``mask`` (COCO RLE, compressed or not) back to a boolean [height, width] numpy array."""
    return coco_rle.decode(rle)
