"""``eval BUNDLE --dataset PATH --prefix-variants FILE``: which phrasing of a dataset's prefixes works best.

FILE holds rewrite rules, one a line::

    # plural object names
    detect {x} -> detect {x}s
    caption en -> describe en

Each rule is run over the dataset's lines it matches and the variants, the original phrasing
included, are ranked per task kind. What is decided here:

- A rule is ``PATTERN -> REWRITE``, both sides stripped. The pattern must match a line's whole
  prefix; ``{x}`` in it (at most once) captures one or more characters, and each ``{x}`` in the
  rewrite puts them back. No other ``{...}``, and one ``->`` a line. Blank lines and lines starting
  with ``#`` are skipped. Every bad line is reported as ``FILE:LINE: what is wrong`` and nothing runs.
- A variant is scored only on the lines its pattern matches; the others are left out of its score
  and counted. The original phrasing runs once on every line, and each variant is also shown with
  the original's score on the same lines (its answers rescored, not run again), so a rule that
  matches some lines only is compared like with like.
- A rewritten line keeps its task kind, its truth and so its metrics: a rewrite changes how the
  model is asked, not what counts as right. For a detect or segment line whose rewritten prefix is
  still a detect / segment query naming as many objects, the answer's labels are mapped back to the
  dataset's names (asked ``detect cats``, an answer labelled ``cats`` counts as ``cat``): the rule is
  judged by the objects it finds, not by how it names them.
- Each task kind is ranked by one headline metric (``HEADLINES``): detect mAP@0.5, segment mask
  mAP@0.5 (both count wrong extra objects, unlike recall or mean IoU), ocr CER (lower is better),
  answer VQA exact match, caption / describe / other chrF (graded, where exact match is rarely hit).
  The order is by the change against the original on the same lines (best first), then by the
  value, then the file's order; the original is the row with change 0. A variant with no value for
  a kind (no line of it matched, or no truth to measure) is not ranked for it.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..runtime.errors import InputError
from ..runtime.model import PaliGemma
from .datasets import KINDS, Dataset, Record, clean_prefix, task_kind
from .evaluate import EvalOptions, check_runnable, generate_answers, score_answers, write_texts

SEPARATOR = "->"
CAPTURE = "{x}"
ORIGINAL = "original"
# kind -> (headline metric, higher is better)
HEADLINES = {"detect": ("map_50", True), "segment": ("mask_map_50", True), "ocr": ("cer", False),
             "answer": ("vqa_exact_match", True), "caption": ("chrf", True), "describe": ("chrf", True),
             "other": ("chrf", True)}

_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
_ENTRY_LABEL = re.compile(r"^(\s*(?:<loc\d{4}>){4}\s*(?:<seg\d{3}>)*\s*)(.*?)(\s*)$", re.DOTALL)


@dataclass(frozen=True)
class Rule:
    """``PATTERN -> REWRITE`` from FILE:LINE."""

    pattern: str
    rewrite: str
    where: str

    def __str__(self) -> str:
        return f"{self.pattern} {SEPARATOR} {self.rewrite}"

    def apply(self, prefix: str) -> str | None:
        """The rewritten prefix, or None when the pattern does not match the whole prefix."""
        match = _regex(self.pattern).fullmatch(prefix)
        if match is None:
            return None
        captured = match.group("x") if CAPTURE in self.pattern else ""
        return clean_prefix(self.rewrite.replace(CAPTURE, captured)) or None


@lru_cache(maxsize=None)
def _regex(pattern: str) -> re.Pattern:
    head, capture, tail = pattern.partition(CAPTURE)
    return re.compile(re.escape(head) + ("(?P<x>.+)" if capture else "") + re.escape(tail), re.DOTALL)


def _rule_problem(pattern: str, rewrite: str) -> str | None:
    if not pattern:
        return f"no pattern before '{SEPARATOR}'"
    if not rewrite:
        return f"no rewrite after '{SEPARATOR}'"
    if SEPARATOR in rewrite:
        return f"more than one '{SEPARATOR}' (one rule a line)"
    for side, text in (("pattern", pattern), ("rewrite", rewrite)):
        unknown = [p for p in _PLACEHOLDER.findall(text) if p != CAPTURE]
        if unknown:
            return f"unknown placeholder {unknown[0]} in the {side}: only {CAPTURE} captures"
    if pattern.count(CAPTURE) > 1:
        return f"{CAPTURE} may appear once in the pattern"
    if CAPTURE in rewrite and CAPTURE not in pattern:
        return f"the rewrite uses {CAPTURE} but the pattern captures nothing"
    if pattern == rewrite:
        return "the rewrite is the pattern itself"
    return None


def parse_rules(text: str, file: str | Path) -> tuple[Rule, ...]:
    """The rules of a FILE's text; InputError listing every bad line as ``FILE:LINE: what is wrong``."""
    rules: list[Rule] = []
    problems: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{file}:{number}"
        pattern, separator, rewrite = (part.strip() for part in stripped.partition(SEPARATOR))
        problem = (f"expected 'PATTERN {SEPARATOR} REWRITE', e.g. 'detect {CAPTURE} {SEPARATOR} detect {CAPTURE}s'"
                   if not separator else _rule_problem(pattern, rewrite))
        if problem is None and (pattern, rewrite) in seen:
            problem = f"the same rule as line {seen[pattern, rewrite]}"
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        seen[pattern, rewrite] = number
        rules.append(Rule(pattern, rewrite, where))
    if len(problems) == 1:
        raise InputError(problems[0])
    if problems:
        raise InputError(f"{file}: {len(problems)} bad rules:\n" + "\n".join(f"  {p}" for p in problems))
    if not rules:
        raise InputError(f"{file}: no rules (one 'PATTERN {SEPARATOR} REWRITE' a line)")
    return tuple(rules)


def read_rules(path: str | Path) -> tuple[Rule, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable rules file ({exc})") from None
    return parse_rules(text, path)


def _object_names(prefix: str, kind: str) -> list[str] | None:
    if task_kind(prefix) != kind:
        return None
    return [name.strip() for name in prefix[len(kind):].split(";")]


def label_map(original: str, rewritten: str, kind: str) -> dict[str, str]:
    """Rewritten object name -> the dataset's, for a detect / segment line still naming as many objects."""
    if kind not in ("detect", "segment"):
        return {}
    old, new = _object_names(original, kind), _object_names(rewritten, kind)
    if old is None or new is None or len(old) != len(new) or len(set(new)) != len(new):
        return {}
    return {n: o for o, n in zip(old, new) if n != o}


def relabel(answer: str, mapping: Mapping[str, str]) -> str:
    """An answer's entry labels renamed by ``mapping`` (entries that do not parse are left as they are)."""
    if not mapping:
        return answer
    chunks = []
    for chunk in answer.split(";"):
        match = _ENTRY_LABEL.match(chunk)
        if match and match.group(2) in mapping:
            chunk = match.group(1) + mapping[match.group(2)] + match.group(3)
        chunks.append(chunk)
    return ";".join(chunks)


@dataclass(frozen=True)
class VariantReport:
    """One phrasing: the lines it ran on, its metrics there and the original phrasing's on the same lines."""

    name: str  # "original", or the rule as written
    where: str | None  # FILE:LINE of the rule
    lines: int  # lines matched and scored
    left_out: int  # lines the pattern did not match
    examples: Mapping[str, int]  # kind -> lines scored
    metrics: Mapping[str, float | None]  # flat kind/metric
    original: Mapping[str, float | None]  # the original phrasing on the same lines
    misses: int


@dataclass(frozen=True)
class Ranked:
    name: str
    lines: int
    value: float
    original: float | None
    change: float | None


@dataclass(frozen=True)
class KindRanking:
    kind: str
    metric: str
    higher_is_better: bool
    ranked: tuple[Ranked, ...]  # best first


@dataclass(frozen=True)
class PrefixVariantsReport:
    dataset: str
    bundle: str
    precision: str
    lines: int
    seconds: float
    variants: tuple[VariantReport, ...]  # the original first, then the rules in the file's order
    rankings: tuple[KindRanking, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        out = [f"Prefix variants on `{self.dataset}` with `{self.bundle}` ({self.precision}): {self.lines} lines, "
               f"{self.seconds:.1f} s", "", "| variant | rule | lines scored | left out | missed |",
               "|---|---|---:|---:|---:|"]
        out += [f"| {_name(v.name)} | {v.where or '-'} | {v.lines} | {v.left_out} | {v.misses} |" for v in self.variants]
        for ranking in self.rankings:
            better = "higher" if ranking.higher_is_better else "lower"
            out += ["", f"### {ranking.kind}: {ranking.metric} ({better} is better)", "",
                    f"| rank | variant | lines | {ranking.metric} | original on those lines | change |",
                    "|---:|---|---:|---:|---:|---:|"]
            out += [f"| {i} | {_name(r.name)} | {r.lines} | {_shown(ranking.metric, r.value)} | "
                    f"{_shown(ranking.metric, r.original)} | {_shown(ranking.metric, r.change, signed=True)} |"
                    for i, r in enumerate(ranking.ranked, start=1)]
        return "\n".join(out) + "\n"


def _name(name: str) -> str:
    return name if name == ORIGINAL else f"`{name.replace('|', '&#124;')}`"


def _shown(metric: str, value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:{'+' if signed else ''}.{2 if metric == 'chrf' else 3}f}"


def _variant(model: PaliGemma, name: str, where: str | None, total: int, originals: Sequence[Record],
             scored: Sequence[Record], answers: Sequence[str], original_answers: Sequence[str]) -> VariantReport:
    if not scored:
        return VariantReport(name, where, 0, total, {}, {}, {}, 0)
    kinds, misses = score_answers(model, scored, answers)
    baseline, _ = score_answers(model, originals, original_answers)
    flat = lambda reports: {f"{k.kind}/{m}": v for k in reports for m, v in k.metrics.items()}
    return VariantReport(name, where, len(scored), total - len(scored), {k.kind: k.examples for k in kinds},
                         flat(kinds), flat(baseline), len(misses))


def rank(variants: Sequence[VariantReport]) -> tuple[KindRanking, ...]:
    """Per task kind, the variants with a value for its headline metric, best first (module notes)."""
    rankings = []
    for kind in KINDS:
        metric, higher = HEADLINES[kind]
        key, sign = f"{kind}/{metric}", 1 if higher else -1
        entries = []
        for order, variant in enumerate(variants):
            value, original = variant.metrics.get(key), variant.original.get(key)
            if value is None:
                continue
            change = None if original is None else value - original
            entries.append((order, Ranked(variant.name, variant.examples[kind], value, original, change)))
        if not entries:
            continue
        entries.sort(key=lambda item: (item[1].change is None, -sign * (item[1].change or 0.0),
                                       -sign * item[1].value, item[0]))
        rankings.append(KindRanking(kind, metric, higher, tuple(r for _, r in entries)))
    return tuple(rankings)


def evaluate_prefix_variants(model: PaliGemma, dataset: Dataset, rules: Sequence[Rule],
                             options: EvalOptions = EvalOptions(),
                             progress: Callable[[str, int, int], None] | None = None) -> PrefixVariantsReport:
    """The original prefixes and each rule's rewrites of the first ``options.limit`` lines, scored and ranked."""
    records = list(dataset.records)[: options.limit]
    if not records:
        raise InputError(f"{dataset}: no lines to evaluate")
    check_runnable(model, records)
    matched = []  # per rule: (index into records, rewritten record)
    for rule in rules:
        lines = [(i, replace(r, prefix=new)) for i, r in enumerate(records) if (new := rule.apply(r.prefix)) is not None]
        try:
            check_runnable(model, [r for _, r in lines])  # every variant's prompts before the first generation
        except InputError as exc:
            raise InputError(f"{rule.where}: rule '{rule}': {exc}") from None
        matched.append(lines)
    started = time.perf_counter()
    step = lambda name: None if progress is None else (lambda done, total: progress(name, done, total))
    original = generate_answers(model, records, options, step(ORIGINAL))
    variants = [_variant(model, ORIGINAL, None, len(records), records, records, original, original)]
    for rule, lines in zip(rules, matched):
        rewritten = [r for _, r in lines]
        answers = generate_answers(model, rewritten, options, step(str(rule))) if lines else []
        answers = [relabel(a, label_map(records[i].prefix, r.prefix, r.kind)) for (i, r), a in zip(lines, answers)]
        variants.append(_variant(model, str(rule), rule.where, len(records), [records[i] for i, _ in lines],
                                 rewritten, answers, [original[i] for i, _ in lines]))
    return PrefixVariantsReport(str(dataset), str(model.bundle_dir), model.manifest.precision, len(records),
                                round(time.perf_counter() - started, 2), tuple(variants), rank(variants))


def write_outputs(report: PrefixVariantsReport, json_path: str | Path | None = None,
                  markdown_path: str | Path | None = None) -> list[Path]:
    """Write the report's JSON and its markdown tables; the paths written."""
    return write_texts([(json_path, lambda: json.dumps(report.to_dict(), indent=2) + "\n"),
                        (markdown_path, report.table)])
