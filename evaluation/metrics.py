"""Accuracy per task kind, each with the field's reference implementation where there is one.

- detect: COCO box mAP@[.5:.95], mAP@.5 and recall@.5 from pycocotools' COCOeval (maxDets 100,
  all areas), the numbers every detection paper and Roboflow report;
- segment: COCO mask mAP from the same COCOeval (``iouType="segm"``), masks as COCO RLE written by
  runtime/generation/coco_rle.py (pycocotools' own ``mask.encode`` is its test reference), and mean IoU: each
  true object's mask IoU with its same-label match (greedy by IoU, 0 where none), as shapes/ does;
- ocr: exact match (surrounding whitespace ignored) and the character error rate, corpus-level as
  jiwer and the OCR papers define it: total Levenshtein edits / total reference characters, from
  rapidfuzz's Levenshtein (C++, the library jiwer itself uses);
- answer: VQA normalized exact match, the VQA challenge's answer processing (below) on both sides;
- caption, describe, other: exact match (case and whitespace ignored) and corpus chrF from
  sacrebleu. chrF rather than BLEU or CIDEr: it is character n-gram based, so it needs no word
  tokenizer for PaliGemma's 35 languages (zh, ja, th have no spaces), it is stable on a few
  examples where BLEU collapses to 0, and sacrebleu is the maintained reference implementation.
  CIDEr's implementation (pycocoevalcap) is unmaintained since 2020 and its IDF depends on the
  evaluated set itself.

PaliGemma gives no confidence per object, so every predicted box or mask scores 1.0 and COCOeval
keeps them in answer order (its sorts are stable): AP then measures the answers' precision at the
recall they reach, with no ranking to exploit. Each dataset line is its own COCO image: the truth
of ``detect cat`` on a picture is that line's suffix only. A metric with no truth to measure
(no true object of any class) is None, not 0.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..runtime.generation import coco_rle
from ..shapes.metrics import box_iou, mask_iou, match, normalize_text

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels
# the library each kind's metrics import (the 'eval' extra); answer needs none
LIBRARIES = {"detect": "pycocotools", "segment": "pycocotools", "ocr": "rapidfuzz", "caption": "sacrebleu",
             "describe": "sacrebleu", "other": "sacrebleu"}


def require_libraries(kinds) -> None:
    """Import the libraries these task kinds are scored with, so a missing one stops an evaluation before
    it starts (ModuleNotFoundError, which the CLI turns into the 'eval' extra's install line)."""
    for library in sorted({LIBRARIES[k] for k in kinds if k in LIBRARIES}):
        importlib.import_module(library)


@dataclass(frozen=True)
class ObjectsExample:
    """One detect or segment line: the picture's size, the true and the predicted objects.

    An object is ``(label, box)``, or ``(label, box, mask)`` with a boolean [height, width] mask."""

    width: int
    height: int
    truth: tuple[tuple, ...]
    predicted: tuple[tuple, ...]


@dataclass(frozen=True)
class DetectionScores:
    map_50_95: float | None
    map_50: float | None
    recall_50: float | None
    truth_objects: int
    predicted_objects: int


@dataclass(frozen=True)
class SegmentationScores:
    mask_map_50_95: float | None
    mask_map_50: float | None
    mean_iou: float | None
    truth_objects: int
    predicted_objects: int


def _coco_inputs(examples: Sequence[ObjectsExample], segm: bool) -> tuple[dict, list[dict]]:
    labels = sorted({o[0] for e in examples for o in (*e.truth, *e.predicted)})
    category = {label: index + 1 for index, label in enumerate(labels)}

    def annotation(image_id: int, obj: tuple, example: ObjectsExample) -> dict:
        x0, y0, x1, y1 = (float(v) for v in obj[1])
        entry = {"image_id": image_id, "category_id": category[obj[0]], "bbox": [x0, y0, x1 - x0, y1 - y0],
                 "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "score": 1.0}
        if segm:
            mask = np.asarray(obj[2], dtype=bool)
            if mask.shape != (example.height, example.width):
                raise ValueError(f"a mask of shape {mask.shape} for a {example.width}x{example.height} image")
            entry["segmentation"] = coco_rle.encode(mask)
            entry["area"] = float(mask.sum())
        return entry

    truth = {
        "images": [{"id": i + 1, "width": e.width, "height": e.height} for i, e in enumerate(examples)],
        "categories": [{"id": index, "name": label} for label, index in category.items()],
        "annotations": [],
    }
    predictions = []
    for i, example in enumerate(examples):
        for obj in example.truth:
            truth["annotations"].append(annotation(i + 1, obj, example) | {"id": len(truth["annotations"]) + 1})
        predictions += [annotation(i + 1, obj, example) for obj in example.predicted]
    return truth, predictions


def _coco_eval(examples: Sequence[ObjectsExample], iou_type: str) -> tuple[float | None, float | None, float | None]:
    """(mAP@[.5:.95], mAP@.5, recall@.5) from COCOeval; None where there is no truth."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth, predictions = _coco_inputs(examples, segm=iou_type == "segm")
    if not truth["annotations"]:
        return None, None, None
    if not predictions:  # COCO.loadRes cannot take an empty list; nothing found is 0 everywhere
        return 0.0, 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        coco_truth = COCO()
        coco_truth.dataset = truth
        coco_truth.createIndex()
        evaluation = COCOeval(coco_truth, coco_truth.loadRes(predictions), iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    recall = evaluation.eval["recall"][0, :, 0, -1]  # IoU 0.5, every category, all areas, maxDets 100
    recall = recall[recall > -1]
    undefined = lambda value: None if value < 0 else float(value)
    return (undefined(evaluation.stats[0]), undefined(evaluation.stats[1]),
            float(recall.mean()) if recall.size else None)


def detection_scores(examples: Sequence[ObjectsExample]) -> DetectionScores:
    map_50_95, map_50, recall_50 = _coco_eval(examples, "bbox")
    return DetectionScores(map_50_95, map_50, recall_50, sum(len(e.truth) for e in examples),
                           sum(len(e.predicted) for e in examples))


def object_ious(example: ObjectsExample, masks: bool) -> list[float]:
    """Each true object's IoU (box, or mask) with its same-label prediction, greedily matched; 0 where none."""
    part, iou = (2, mask_iou) if masks else (1, box_iou)
    return match([(o[0], o[part]) for o in example.predicted], [(o[0], o[part]) for o in example.truth], iou)


def segmentation_scores(examples: Sequence[ObjectsExample]) -> SegmentationScores:
    map_50_95, map_50, _ = _coco_eval(examples, "segm")
    ious = [v for e in examples for v in object_ious(e, masks=True)]
    return SegmentationScores(map_50_95, map_50, float(np.mean(ious)) if ious else None,
                              sum(len(e.truth) for e in examples), sum(len(e.predicted) for e in examples))


def perfect_objects(example: ObjectsExample, masks: bool, threshold: float = 0.5) -> bool:
    """Every true object found at IoU >= threshold and nothing else predicted: not a miss."""
    return len(example.predicted) == len(example.truth) and all(
        v >= threshold for v in object_ious(example, masks))


# -- text ----------------------------------------------------------------------------------------

def ocr_exact(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def character_error_rate(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """Total Levenshtein edits / total reference characters (surrounding whitespace ignored); None
    without reference characters."""
    from rapidfuzz.distance import Levenshtein

    characters = sum(len(r.strip()) for r in references)
    if not characters:  # no reference text: a rate of nothing
        return None
    edits = sum(Levenshtein.distance(p.strip(), r.strip()) for p, r in zip(predictions, references, strict=True))
    return edits / characters


# The VQA challenge's answer processing, from its evaluation page: lowercase; periods removed except
# in decimals; number words to digits; articles removed; missing apostrophes of contractions put back;
# other punctuation except ' and : replaced by a space, a comma between digits dropped (100,978 -> 100978).
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"  # VQA counts "none" as the number 0
_ARTICLES = frozenset({"a", "an", "the"})
_CONTRACTIONS = {w.replace("'", ""): w for w in (
    "ain't aren't can't couldn't couldn't've didn't doesn't don't hadn't hasn't haven't he'd he'll he's "
    "how'd how'll how's i'd i'll i'm i've isn't it'd it'll let's ma'am mightn't might've mustn't must've "
    "needn't o'clock shan't she'd she'll shouldn't should've that's there's they'd they'll they're they've "
    "wasn't we'd we'll we're we've weren't what's where's who'd who'll who's won't wouldn't would've "
    "y'all you'd you'll you're you've").split()}
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_PUNCTUATION = re.compile(r"[^\w\s':.]")  # the periods left are decimals


def vqa_normalize(answer: str) -> str:
    text = answer.lower().replace("\n", " ").replace("\t", " ")
    text = _DIGIT_COMMA.sub("", text)
    text = _NON_DECIMAL_PERIOD.sub("", text)
    text = _PUNCTUATION.sub(" ", text)
    words = [_CONTRACTIONS.get(w, _NUMBER_WORDS.get(w, w)) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_exact(prediction: str, reference: str) -> bool:
    return vqa_normalize(prediction) == vqa_normalize(reference)


def caption_exact(prediction: str, reference: str) -> bool:
    return normalize_text(prediction) == normalize_text(reference)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """sacrebleu's corpus chrF (0..100), one reference per prediction."""
    if not references:
        return None
    from sacrebleu.metrics import CHRF

    return float(CHRF().corpus_score(list(predictions), [list(references)]).score)


def mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None
