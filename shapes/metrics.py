"""Task metrics: exact match, detection precision/recall at an IoU threshold, mask IoU (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import numpy as np

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1)
ItemT = TypeVar("ItemT")  # what is matched: a box, or a mask


def normalize_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


def box_iou(a: Box, b: Box) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def match(predicted: Sequence[tuple[str, ItemT]], truth: Sequence[tuple[str, ItemT]],
          iou: Callable[[ItemT, ItemT], float]) -> list[float]:
    """Greedy one-to-one matching of same-label pairs by decreasing IoU: each truth item's IoU
    with its match (0 where none)."""
    pairs = sorted(
        ((iou(p, t), i, j) for i, (pl, p) in enumerate(predicted) for j, (tl, t) in enumerate(truth) if pl == tl),
        reverse=True,
    )
    used_p, best = set(), [0.0] * len(truth)
    for value, i, j in pairs:
        if i in used_p or best[j] > 0 or value <= 0:
            continue
        used_p.add(i)
        best[j] = value
    return best


@dataclass
class DetectionCounts:
    """True positives at the IoU threshold, over all queries."""

    threshold: float = 0.5
    true_positives: int = 0
    predicted: int = 0
    truth: int = 0

    def add(self, predicted: Sequence[tuple[str, Box]], truth: Sequence[tuple[str, Box]]) -> None:
        ious = match(predicted, truth, box_iou)
        self.true_positives += sum(v >= self.threshold for v in ious)
        self.predicted += len(predicted)
        self.truth += len(truth)

    @property
    def precision(self) -> float:
        return self.true_positives / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.truth if self.truth else 0.0
