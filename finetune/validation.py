"""The periodic check on the valid split: greedy answers of the model being trained, scored by task kind.

Kept cheap on purpose (the first ``eval_lines`` valid lines, one prompt at a time, torch's greedy
``generate``), and scored with evaluation/metrics.py's rules: text kinds by their exact match (chrF
for captions, CER for ocr), detect by box mAP@.5 and exact match. Segment lines are scored on their
boxes only: their masks need the mask decoder, which is the bundle's; ``eval`` on the exported bundle
gives the mask metrics. The full measure of a fine-tuned model is ``eval`` after export.
"""

from __future__ import annotations

from typing import Sequence

from ..evaluation import metrics
from ..evaluation.evaluate import TEXT_EXACT
from ..runtime.generation.parsing import parse_detections
from .data import Collator, Example


def greedy_answer(model, collate: Collator, image, prefix: str, max_new_tokens: int, device: str) -> str:
    """The model's greedy answer to one prompt, special tokens dropped (loc / seg tokens kept)."""
    import torch

    inputs = {k: v.to(device) for k, v in collate.prompt(image, prefix).items()}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    return collate.processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def _boxes(text: str) -> tuple:
    return tuple((d.label, d.box) for d in parse_detections(text, 1000, 1000))


def score(examples: Sequence[Example], answers: Sequence[str]) -> dict:
    """Metrics per task kind (``kind/metric``) and ``exact_match`` over all lines."""
    results: dict[str, float | None] = {}
    hits_all = []
    for kind in sorted({e.kind for e in examples}):
        group = [(e, a) for e, a in zip(examples, answers) if e.kind == kind]
        if kind in ("detect", "segment"):
            objects = [metrics.ObjectsExample(1000, 1000, _boxes(e.suffix), _boxes(a)) for e, a in group]
            hits = [metrics.perfect_objects(o, masks=False) for o in objects]
            if kind == "detect":
                results["detect/map_50"] = metrics.detection_scores(objects).map_50
        else:
            hits = [TEXT_EXACT[kind](a, e.suffix) for e, a in group]
            if kind == "ocr":
                results["ocr/cer"] = metrics.character_error_rate([a for _, a in group], [e.suffix for e, _ in group])
            elif kind != "answer":
                results[f"{kind}/chrf"] = metrics.chrf([a for _, a in group], [e.suffix for e, _ in group])
        results[f"{kind}/exact_match"] = metrics.mean(hits)
        hits_all += hits
    results["exact_match"] = metrics.mean(hits_all)
    return results


def make_evaluator(examples: Sequence[Example], collate: Collator, max_new_tokens: int, device: str):
    """``evaluate(model, step) -> metrics`` for the loop; the kinds' metric libraries are imported now,
    so a missing one stops the run before training, not at the first evaluation."""
    metrics.require_libraries({e.kind for e in examples})

    def evaluate(model, step: int) -> dict:
        answers = [greedy_answer(model, collate, e.image, e.prefix, max_new_tokens, device) for e in examples]
        return {"lines": len(examples), **score(examples, answers),
                "samples": [{"prefix": e.prefix, "expected": e.suffix, "answer": a}
                            for e, a in list(zip(examples, answers))[:3]]}
    return evaluate
