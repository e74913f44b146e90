"""``eval BUNDLE --dataset PATH[:split]``: a loaded bundle's accuracy on a PaliGemma JSONL dataset.

Each line is prompted with its prefix and scored by its task kind (evaluation/metrics.py). What is
decided here:

- Every prompt is checked against the bundle (tokenizer length, a mask decoder for segment lines)
  before the first generation, so a dataset the bundle cannot run stops at once, not an hour in.
- Lines are grouped by picture and run as left-padded batches of up to ``batch_size`` prompts on
  that one image (``generate_batch``): the picture is decoded and encoded once. Greedy decoding.
- The truth of a detect / segment line is its suffix parsed by the runtime's own parsers, masks
  decoded by the bundle's mask decoder: a model that writes exactly the suffix scores 1.
- A miss is a line whose answer is not right: text not matching (the kind's exact match), or
  objects not all found at IoU 0.5 with nothing extra. The misses file has one JSON line each.
- Without ``PATH:split`` the test split is evaluated, else valid / validation / val, else the only one.

``evaluate_dataset`` is ``generate_answers`` then ``score_answers``; callers that score the same answers
over several subsets of lines (evaluation/prefix_variants.py) use the two halves.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..runtime.errors import InputError
from ..runtime.images import load_image
from ..runtime.model import PaliGemma
from ..runtime.generation.parsing import parse_detections, parse_segmentations
from ..runtime.generation.sampling import GenerationOptions
from . import metrics
from .datasets import KINDS, Dataset, DatasetSpec, Record, load_dataset

EVAL_SPLITS = ("test", "valid", "validation", "val")
TEXT_EXACT = {"ocr": metrics.ocr_exact, "answer": metrics.vqa_exact, "caption": metrics.caption_exact,
              "describe": metrics.caption_exact, "other": metrics.caption_exact}


@dataclass(frozen=True)
class EvalOptions:
    max_new_tokens: int = 256  # room for ~35 boxes or ~12 masks; a well-behaved model stops at eos first
    batch_size: int = 8  # prompts on one picture run together
    limit: int | None = None  # evaluate the first N lines only

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise InputError("max_new_tokens, batch_size and limit must be at least 1")


@dataclass(frozen=True)
class Miss:
    """One line the model got wrong, for the misses file."""

    file: str
    line: int
    image: str
    kind: str
    prefix: str
    expected: str
    answer: str
    score: float  # the line's own measure: 0/1 for text, CER for ocr, the truth objects' mean IoU


@dataclass(frozen=True)
class KindReport:
    kind: str
    examples: int
    metrics: Mapping[str, float | None]


@dataclass(frozen=True)
class DatasetReport:
    dataset: str
    bundle: str
    precision: str
    examples: int
    seconds: float
    kinds: tuple[KindReport, ...]
    misses: tuple[Miss, ...] = field(repr=False)

    def metrics(self) -> dict[str, float | None]:
        """Flat ``kind/metric`` -> value, for comparing bundles."""
        return {f"{k.kind}/{name}": value for k in self.kinds for name, value in k.metrics.items()}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["misses"] = len(self.misses)
        return data

    def table(self) -> str:
        """Markdown: one row per task kind with its metrics (chrF 0..100, CER 0 and up, the rest 0..1)."""
        rows = [f"`{self.dataset}` on `{self.bundle}` ({self.precision}): {self.examples} examples, "
                f"{len(self.misses)} missed, {self.seconds:.1f} s", "",
                "| kind | examples | missed | metrics |", "|---|---:|---:|---|"]
        for report in self.kinds:
            missed = sum(m.kind == report.kind for m in self.misses)
            shown = ", ".join(f"{name} {_shown(name, value)}" for name, value in report.metrics.items())
            rows.append(f"| {report.kind} | {report.examples} | {missed} | {shown} |")
        return "\n".join(rows) + "\n"


def _shown(name: str, value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}" if name == "chrf" else f"{value:.3f}"


def load_eval_dataset(spec: str | Path | DatasetSpec) -> Dataset:
    """The split to evaluate: the one named, else test, valid, validation, val, or the only one."""
    return load_dataset(spec, prefer=EVAL_SPLITS)


@dataclass
class _Outcome:
    record: Record
    answer: str
    objects: metrics.ObjectsExample | None = None


def _objects(model: PaliGemma, record: Record, answer: str) -> metrics.ObjectsExample:
    w, h = record.width, record.height
    parse: Callable[[str], list[tuple]]
    if record.kind == "detect":
        parse = lambda text: [(d.label, d.box) for d in parse_detections(text, w, h)]
    else:
        parse = lambda text: [(s.label, s.box, s.mask) for s in parse_segmentations(text, w, h, model.mask_decoder())]
    return metrics.ObjectsExample(w, h, tuple(parse(record.suffix)), tuple(parse(answer)))


def check_runnable(model: PaliGemma, records: Sequence[Record]) -> None:
    """Fail before the first generation when the bundle cannot run or score a line (``file:line: ...``)."""
    metrics.require_libraries({r.kind for r in records})
    model.check_can_parse([r.prefix for r in records])
    for record in records:
        try:
            model.tokenizer.encode(record.prefix)
        except InputError as exc:
            raise InputError(f"{record.where}: {exc}") from None


def _batches(records: Sequence[Record], size: int) -> list[list[int]]:
    """Indices of ``records`` grouped by picture, in chunks of at most ``size``."""
    by_image: dict[Path, list[int]] = {}
    for index, record in enumerate(records):
        by_image.setdefault(record.image, []).append(index)
    return [group[i:i + size] for group in by_image.values() for i in range(0, len(group), size)]


def generate_answers(model: PaliGemma, records: Sequence[Record], options: EvalOptions = EvalOptions(),
                     progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Each line's greedy answer to its prefix, lines on one picture batched (``options.limit`` not applied)."""
    check_runnable(model, records)
    generation = GenerationOptions(max_new_tokens=options.max_new_tokens)
    answers: dict[int, str] = {}
    for batch in _batches(records, options.batch_size):
        picture = load_image(records[batch[0]].image)
        generated = model.generate_batch([picture], [records[i].prefix for i in batch], generation)
        answers.update({index: answer.text for index, answer in zip(batch, generated)})
        if progress is not None:
            progress(len(answers), len(records))
    return [answers[i] for i in range(len(records))]


def score_answers(model: PaliGemma, records: Sequence[Record], answers: Sequence[str]
                  ) -> tuple[tuple[KindReport, ...], tuple[Miss, ...]]:
    """Score given answers against the lines' truth by task kind: per-kind metrics and the misses."""
    outcomes = []
    for record, answer in zip(records, answers, strict=True):
        objects = _objects(model, record, answer) if record.kind in ("detect", "segment") else None
        outcomes.append(_Outcome(record, answer, objects))
    return _score(outcomes)


def evaluate_dataset(model: PaliGemma, dataset: Dataset, options: EvalOptions = EvalOptions(),
                     progress: Callable[[int, int], None] | None = None) -> DatasetReport:
    """Run every line of ``dataset`` (its first ``options.limit``) and score it by its task kind."""
    records = list(dataset.records)[: options.limit]
    if not records:
        raise InputError(f"{dataset}: no lines to evaluate")
    started = time.perf_counter()
    answers = generate_answers(model, records, options, progress)
    kinds, misses = score_answers(model, records, answers)
    return DatasetReport(str(dataset), str(model.bundle_dir), model.manifest.precision, len(records),
                         round(time.perf_counter() - started, 2), kinds, misses)


def _score(outcomes: Sequence[_Outcome]) -> tuple[tuple[KindReport, ...], tuple[Miss, ...]]:
    reports, judged = [], {}
    for kind in KINDS:
        group = [(i, o) for i, o in enumerate(outcomes) if o.record.kind == kind]
        if not group:
            continue
        values, lines = _kind_metrics(kind, [o for _, o in group])
        reports.append(KindReport(kind, len(group), values))
        judged.update({i: line for (i, _), line in zip(group, lines)})
    misses = tuple(_miss(outcomes[i], score) for i, (score, hit) in sorted(judged.items()) if not hit)
    return tuple(reports), misses


def _line_cer(prediction: str, reference: str) -> float:
    rate = metrics.character_error_rate([prediction], [reference])
    return rate if rate is not None else float(bool(prediction.strip()))  # no reference text: any text is wrong


def _objects_score(example: metrics.ObjectsExample, masks: bool) -> float:
    """The truth objects' mean IoU with their matches; with no truth, 1 for predicting nothing, else 0."""
    ious = metrics.object_ious(example, masks)
    return float(sum(ious) / len(ious)) if ious else float(not example.predicted)


def _parsed_objects(outcome: _Outcome) -> metrics.ObjectsExample:
    """The objects :func:`score_answers` parsed for a detect or segment line."""
    if outcome.objects is None:
        raise ValueError(f"{outcome.record.kind} line scored without its parsed objects")
    return outcome.objects


def _kind_metrics(kind: str, group: Sequence[_Outcome]) -> tuple[dict, list[tuple[float, bool]]]:
    """The kind's metrics, and each line's (own score, right or not)."""
    if kind in ("detect", "segment"):
        masks = kind == "segment"
        examples = [_parsed_objects(o) for o in group]
        lines = [(_objects_score(e, masks), metrics.perfect_objects(e, masks)) for e in examples]
        if masks:
            seg = metrics.segmentation_scores(examples)
            values = {"mask_map_50_95": seg.mask_map_50_95, "mask_map_50": seg.mask_map_50, "mean_iou": seg.mean_iou}
        else:
            det = metrics.detection_scores(examples)
            values = {"map_50_95": det.map_50_95, "map_50": det.map_50, "recall_50": det.recall_50}
        return values | {"exact_match": metrics.mean([hit for _, hit in lines])}, lines
    predictions, references = [o.answer for o in group], [o.record.suffix for o in group]
    hits = [TEXT_EXACT[kind](p, r) for p, r in zip(predictions, references)]
    if kind == "ocr":
        values = {"exact_match": metrics.mean(hits), "cer": metrics.character_error_rate(predictions, references)}
        return values, [(_line_cer(p, r), hit) for p, r, hit in zip(predictions, references, hits)]
    if kind == "answer":
        return {"vqa_exact_match": metrics.mean(hits)}, [(float(hit), hit) for hit in hits]
    values = {"exact_match": metrics.mean(hits), "chrf": metrics.chrf(predictions, references)}
    return values, [(float(hit), hit) for hit in hits]


def _miss(outcome: _Outcome, score: float) -> Miss:
    r = outcome.record
    return Miss(str(r.file), r.line, str(r.image), r.kind, r.prefix, r.suffix, outcome.answer, round(float(score), 4))


def write_texts(outputs: Sequence[tuple[str | Path | None, Callable[[], str]]]) -> list[Path]:
    """Write each (path, text) whose path is given, making its folder; the paths written."""
    written = []
    for path, text in outputs:
        if path is None:
            continue
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text(), encoding="utf-8")
        except OSError as exc:
            raise InputError(f"{path}: cannot write ({exc})") from None
        written.append(path)
    return written


def write_outputs(report: DatasetReport, json_path: str | Path | None = None, markdown_path: str | Path | None = None,
                  misses_path: str | Path | None = None) -> list[Path]:
    """Write the report's JSON, its markdown table and the misses (one JSON line each); the paths written."""
    return write_texts([(json_path, lambda: json.dumps(report.to_dict(), indent=2) + "\n"),
                        (markdown_path, report.table),
                        (misses_path, lambda: "".join(json.dumps(asdict(m)) + "\n" for m in report.misses))])
