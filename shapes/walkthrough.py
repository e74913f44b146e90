"""The table of the README's fine-tuning walkthrough, from the ``eval --json`` files ``make walkthrough`` wrote.

    python -m paligemma_edge.shapes.walkthrough build/walkthrough

For each bundle: the added shape's detection (recall@0.5, mAP@0.5) and colour VQA on the test split
of the generated dataset (``eval-NAME-star.json``), and the old tasks on the held-out shapes
benchmark (``eval-NAME-shapes.json``). Then the walkthrough's goals, each checked against the
figures: the new shape's recall@0.5 and VQA at least ``NEW_GOAL``; after fine-tuning every old task
within ``TOLERANCE`` of the committed model; every quantized bundle within ``TOLERANCE`` of the
fine-tuned fp32 bundle on every figure. Needs no model: it reads JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BASE, TUNED = "base-fp32", "star-fp32"
QUANTIZED = ("star-int8", "star-int4", "star-int8-trt", "star-int4-trt")
NEW_GOAL, TOLERANCE = 0.85, 0.03
NEW_FIGURES = {"detect/recall_50": "star recall@0.5", "detect/map_50": "star mAP@0.5", "answer/vqa_exact_match": "star colour VQA"}
OLD_FIGURES = {"caption_exact_match": "caption", "vqa_accuracy": "VQA", "ocr_exact_match": "OCR",
               "detection_recall": "detect recall", "segmentation_miou": "segment mIoU"}


def figures(folder: Path, name: str) -> dict[str, float] | None:
    """Every figure of one bundle (None when its eval files are not there)."""
    star, shapes = folder / f"eval-{name}-star.json", folder / f"eval-{name}-shapes.json"
    if not (star.is_file() and shapes.is_file()):
        return None
    report = json.loads(star.read_text())
    flat = {f"{k['kind']}/{metric}": value for k in report["kinds"] for metric, value in k["metrics"].items()}
    old = json.loads(shapes.read_text())
    return {**{key: flat[key] for key in NEW_FIGURES}, **{key: old[key] for key in OLD_FIGURES}}


def goals(results: dict[str, dict[str, float]]) -> list[tuple[str, bool]]:
    """(goal, met) for every goal the figures at hand can decide."""
    checks = []
    tuned, base = results.get(TUNED), results.get(BASE)
    if tuned:
        for key in ("detect/recall_50", "answer/vqa_exact_match"):
            checks.append((f"{NEW_FIGURES[key]} >= {NEW_GOAL} after fine-tuning ({tuned[key]:.3f})", tuned[key] >= NEW_GOAL))
    if tuned and base:
        for key, label in OLD_FIGURES.items():
            delta = tuned[key] - base[key]
            checks.append((f"{label} within {TOLERANCE} of the committed model ({delta:+.3f})", delta >= -TOLERANCE))
    for name in QUANTIZED:
        if tuned and name in results:
            worst = min(results[name][k] - tuned[k] for k in tuned)
            checks.append((f"{name} within {TOLERANCE} of {TUNED} on every figure (worst {worst:+.3f})", worst >= -TOLERANCE))
    return checks


def table(folder: Path) -> str:
    results = {name: found for name in (BASE, TUNED, *QUANTIZED) if (found := figures(folder, name)) is not None}
    if not results:
        raise SystemExit(f"{folder}: no eval-NAME-star.json / eval-NAME-shapes.json files (run make walkthrough)")
    labels = {**NEW_FIGURES, **OLD_FIGURES}
    rows = ["| bundle | " + " | ".join(labels.values()) + " |", "|---|" + "---:|" * len(labels)]
    rows += [f"| {name} | " + " | ".join(f"{values[k]:.3f}" for k in labels) + " |" for name, values in results.items()]
    rows += ["", "| goal | met |", "|---|---|"]
    rows += [f"| {text} | {'yes' if met else '**no**'} |" for text, met in goals(results)]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m paligemma_edge.shapes.walkthrough WALKTHROUGH_DIR", file=sys.stderr)
        return 2
    print(table(Path(args[0])), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
