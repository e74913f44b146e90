"""``compare``: a candidate bundle (say int4) against a reference bundle (say fp32) on the same inputs.

Free-running greedy generation gives the exact-match rate and the first divergence step; teacher
forcing (both bundles fed the reference's tokens) gives top-1 agreement per step and the logit
deltas. Sizes on disk and peak memory come from separate per-bundle runs. Runtime only: no torch.

What is decided here:

- ``dataset`` is ``"shapes"`` (the generated held-out scenes) or a PaliGemma JSONL dataset
  ``PATH[:split]``, read as ``eval`` reads it (its test split, else valid...) and refused whole, before
  any bundle loads, when a line has a problem. The word ``shapes`` means the scenes: write
  ``./shapes`` for a folder of that name.
- With a JSONL dataset the task metrics are each bundle's ``eval`` metrics (flat ``kind/metric``) on
  the first ``dataset_n`` lines (all when None), shown side by side with candidate - reference.
- The token-agreement inputs are ``images_dir`` x the prompts when given; else the dataset's own
  (image, prefix) lines, the first ``agreement_lines`` (32) of the lines scored: agreement is
  measured step by step with both bundles in memory, and settles on far fewer cases than a task
  metric needs. The shapes set gives its first 8 held-out pictures x the prompts, as before.
"""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..runtime.errors import InputError
from ..runtime.bundle.manifest import read_manifest
from ..runtime.generation.loop import decode_step, prefill
from ..runtime.memory import peak_rss_mb, reset_peak_rss
from ..runtime.model import PaliGemma, load
from ..runtime.images import load_image
from ..runtime.generation.sampling import GenerationOptions
from .calibration import DEFAULT_PROMPTS, images_in

SHAPES = "shapes"
AGREEMENT_LINES = 32  # dataset lines run for token agreement (see the module's notes)
SHAPES_PICTURES = 8

@dataclass(frozen=True)
class Case:
    prompt: str
    expected: str | None = None  # a known answer, for task accuracy


@dataclass(frozen=True)
class BundleStats:
    path: str
    precision: str
    size_bytes: int
    weight_bytes: int
    peak_rss_mb: float | None
    accuracy: float | None  # exact-match rate against known answers, where the prompts file has them


@dataclass(frozen=True)
class Comparison:
    reference: BundleStats
    candidate: BundleStats
    cases: int
    exact_match_rate: float
    first_divergence_steps: list[int | None]  # per case; None where the tokens match
    top1_agreement: float  # teacher-forced, over all steps of all cases
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    max_new_tokens: int
    # with a dataset: its task metrics for each bundle, {"reference": {...}, "candidate": {...}}
    task_metrics: dict[str, dict[str, float | None]] | None = None
    dataset: str | None = None  # what the task metrics were measured on

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        ref, cand = self.reference, self.candidate
        mb = lambda b: f"{b / 1e6:.2f}"
        peak = lambda s: "n/a" if s.peak_rss_mb is None else f"{s.peak_rss_mb:.0f}"
        accuracy = lambda s: "n/a" if s.accuracy is None else f"{s.accuracy:.1%}"
        rows = [
            "| | reference | candidate |", "|---|---|---|",
            f"| bundle | `{ref.path}` | `{cand.path}` |",
            f"| precision | {ref.precision} | {cand.precision} |",
            f"| weights on disk (MB) | {mb(ref.weight_bytes)} | {mb(cand.weight_bytes)} ({cand.weight_bytes / ref.weight_bytes:.1%}) |",
            f"| bundle on disk (MB) | {mb(ref.size_bytes)} | {mb(cand.size_bytes)} |",
            f"| peak RSS (MB) | {peak(ref)} | {peak(cand)} |",
            f"| task accuracy | {accuracy(ref)} | {accuracy(cand)} |",
        ]
        diverged = [d for d in self.first_divergence_steps if d is not None]
        summary = [
            "", f"| {self.cases} cases, up to {self.max_new_tokens} new tokens | value |", "|---|---|",
            f"| exact match of generated tokens | {self.exact_match_rate:.1%} |",
            f"| first divergence step (diverged cases) | {', '.join(map(str, diverged)) or '-'} |",
            f"| top-1 agreement under teacher forcing | {self.top1_agreement:.1%} |",
            f"| max / mean abs logit difference | {self.max_abs_logit_diff:.4g} / {self.mean_abs_logit_diff:.4g} |",
        ]
        tasks = []
        if self.task_metrics:
            ref_m, cand_m = self.task_metrics["reference"], self.task_metrics["candidate"]
            shown = lambda v: "n/a" if v is None else f"{v:.3f}"
            delta = lambda a, b: "n/a" if a is None or b is None else f"{b - a:+.3f}"
            tasks = ["", f"| task metric (`{self.dataset}`) | reference | candidate | delta |", "|---|---|---|---|"]
            for name, ref_value in ref_m.items():
                cand_value = cand_m.get(name)
                tasks.append(f"| {name} | {shown(ref_value)} | {shown(cand_value)} | {delta(ref_value, cand_value)} |")
        return "\n".join(rows + summary + tasks) + "\n"


def read_cases(prompts_file: Path | None) -> list[Case]:
    """One prompt a line, optionally ``prompt<TAB>expected answer``; default: PaliGemma's task prefixes."""
    if prompts_file is None:
        return [Case(p) for p in DEFAULT_PROMPTS]
    try:
        lines = [line for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{prompts_file}: unreadable prompts file ({exc})") from None
    if not lines:
        raise InputError(f"{prompts_file}: no prompts in the file")
    cases = []
    for line in lines:
        prompt, _, expected = line.partition("\t")
        cases.append(Case(prompt.strip(), expected.strip() or None))
    return cases


def _sizes(bundle: Path, manifest) -> tuple[int, int]:
    """Bytes of all files, and of the model weights (not the tokenizer or the optional mask decoder)."""
    total = sum(p.stat().st_size for p in bundle.iterdir() if p.is_file())
    return total, sum((bundle / name).stat().st_size for name in manifest.weight_files())


def _free_run(bundle: Path, inputs, options) -> tuple[list[tuple[int, ...]], BundleStats]:
    """Greedy generation on every (image, case) with this bundle alone, measuring its peak memory."""
    gc.collect()
    measured = reset_peak_rss()
    with load(bundle) as model:
        results = [model.generate_batch([image], [case.prompt], options)[0] for image, case in inputs]
        manifest = model.manifest
    peak = peak_rss_mb() if measured else None
    known = [(r.text.strip(), c.expected) for r, (_, c) in zip(results, inputs) if c.expected is not None]
    accuracy = sum(text == want for text, want in known) / len(known) if known else None
    size, weights = _sizes(bundle, manifest)
    return [r.token_ids for r in results], BundleStats(str(bundle), manifest.precision, size, weights, peak, accuracy)


@dataclass
class _DeltaStats:
    """Running statistics of |delta logit| (no per-step arrays kept)."""

    maximum: float = 0.0
    total: float = 0.0
    count: int = 0

    def add(self, delta: np.ndarray) -> None:
        self.maximum = max(self.maximum, float(delta.max()))
        self.total += float(delta.sum(dtype=np.float64))
        self.count += delta.size

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


def _teacher_forced(reference: PaliGemma, candidate: PaliGemma, image, prompt: str, steps: int,
                    deltas: _DeltaStats) -> tuple[int, int]:
    """Both bundles fed the reference's greedy tokens: (top-1 hits, steps); |delta logit| into ``deltas``."""
    hits = count = 0
    states = []
    for model in (reference, candidate):
        batch = model.tokenizer.batch([prompt])
        embeds = model.encode_images([image])
        states.append((model, *prefill(model.backend, model.manifest.decoder, batch, embeds, new_tokens=steps)))
    (ref_model, ref_logits, ref_state), (cand_model, cand_logits, cand_state) = states
    eos = set(ref_model.manifest.tokens.eos)
    budget = min(steps, ref_model.manifest.decoder.max_seq_len - ref_state.length)
    for index in range(budget):
        token = int(np.argmax(ref_logits[0]))
        hits += int(np.argmax(cand_logits[0]) == token)
        count += 1
        deltas.add(np.abs(ref_logits[0] - cand_logits[0]))
        if token in eos or index == budget - 1:
            break
        ref_logits = decode_step(ref_model.backend, ref_model.manifest.decoder, ref_state, np.array([token]))
        cand_logits = decode_step(cand_model.backend, cand_model.manifest.decoder, cand_state, np.array([token]))
    return hits, count


def _shapes_metrics(bundle: Path, n: int) -> dict[str, float]:
    from ..shapes.evaluate import evaluate_shapes

    with load(bundle, verify=False) as model:
        return evaluate_shapes(model, n=n).metrics()


def _shapes_pictures(count: int = SHAPES_PICTURES) -> list:
    from ..shapes import scenes

    return [scenes.render(scenes.scene("heldout", index)) for index in range(count)]


def _dataset_metrics(bundle: Path, dataset, lines: int | None) -> dict[str, float | None]:
    from ..evaluation.evaluate import EvalOptions, evaluate_dataset

    with load(bundle, verify=False) as model:
        return evaluate_dataset(model, dataset, EvalOptions(limit=lines)).metrics()


def _dataset_cases(dataset, count: int) -> list[tuple[object, Case]]:
    """(picture, case) for the first ``count`` lines, each picture decoded once."""
    pictures: dict[Path, object] = {}
    inputs = []
    for record in dataset.records[:count]:
        if record.image not in pictures:
            pictures[record.image] = load_image(record.image)
        inputs.append((pictures[record.image], Case(record.prefix)))
    return inputs


def _agreement_inputs(images_dir, prompts_file, jsonl, count: int) -> list[tuple[object, Case]]:
    """The token-agreement cases: the images x the prompts, else the dataset's first lines, else shapes pictures."""
    if images_dir is None and jsonl is not None:
        return _dataset_cases(jsonl, count)
    cases = read_cases(Path(prompts_file) if prompts_file else None)
    pictures = [load_image(p) for p in images_in(Path(images_dir))] if images_dir else _shapes_pictures()
    return [(image, case) for image in pictures for case in cases]


def _task_metrics(reference: Path, candidate: Path, dataset: str | None, jsonl, dataset_n: int | None):
    """({"reference": metrics, "candidate": metrics}, what they were measured on), or (None, None)."""
    if jsonl is not None:
        measured = {"reference": _dataset_metrics(reference, jsonl, dataset_n),
                    "candidate": _dataset_metrics(candidate, jsonl, dataset_n)}
        return measured, f"{jsonl}" + (f", first {dataset_n} lines" if dataset_n else "")
    if dataset is not None:
        n = dataset_n or 100
        return ({"reference": _shapes_metrics(reference, n), "candidate": _shapes_metrics(candidate, n)},
                f"held-out shapes, {n} scenes")
    return None, None


def compare_bundles(reference: str | Path, candidate: str | Path, images_dir: str | Path | None = None,
                    prompts_file: str | Path | None = None, max_new_tokens: int = 32,
                    dataset: str | None = None, dataset_n: int | None = None,
                    agreement_lines: int = AGREEMENT_LINES) -> Comparison:
    """Token agreement on ``images_dir`` x the prompts, or on a dataset's inputs (module notes); with
    ``dataset`` ("shapes" or a JSONL ``PATH[:split]``), also each bundle's task metrics on its first
    ``dataset_n`` scenes (default 100) or lines (default all)."""
    reference, candidate = Path(reference), Path(candidate)
    ref_manifest, cand_manifest = (read_manifest(b) if b.is_dir() else None for b in (reference, candidate))
    if ref_manifest is None or cand_manifest is None:
        raise InputError(f"{reference if ref_manifest is None else candidate}: no such bundle directory")
    if ref_manifest.decoder.vocab_size != cand_manifest.decoder.vocab_size:
        raise InputError("the two bundles have different vocabularies: not the same model")
    if images_dir is None and dataset is None:
        raise InputError("give --images DIR or --dataset shapes|PATH[:split]")
    if agreement_lines < 1 or (dataset_n is not None and dataset_n < 1):
        raise InputError("the numbers of lines to compare on must be at least 1")
    jsonl = None
    if dataset is not None and dataset != SHAPES:
        if images_dir is None and prompts_file is not None:
            raise InputError("--prompts goes with --images: a dataset's lines are prompted with their own prefixes")
        from ..evaluation.evaluate import load_eval_dataset

        jsonl = load_eval_dataset(dataset)  # a dataset with problems is refused here, before a bundle loads
    inputs = _agreement_inputs(images_dir, prompts_file, jsonl, min(agreement_lines, dataset_n or agreement_lines))
    # task metrics first: eval's checks (each prompt against each bundle, file:line) run before the long part
    task_metrics, measured_on = _task_metrics(reference, candidate, dataset, jsonl, dataset_n)

    options = GenerationOptions(max_new_tokens=max_new_tokens)
    ref_tokens, ref_stats = _free_run(reference, inputs, options)
    cand_tokens, cand_stats = _free_run(candidate, inputs, options)
    divergence: list[int | None] = []
    for ours, theirs in zip(ref_tokens, cand_tokens):
        if ours == theirs:
            divergence.append(None)
        else:
            divergence.append(next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs))))

    hits = total = 0
    deltas = _DeltaStats()
    with load(reference, verify=False) as ref_model, load(candidate, verify=False) as cand_model:
        for image, case in inputs:
            case_hits, case_steps = _teacher_forced(ref_model, cand_model, image, case.prompt, max_new_tokens, deltas)
            hits, total = hits + case_hits, total + case_steps
    return Comparison(
        reference=ref_stats, candidate=cand_stats, cases=len(inputs),
        exact_match_rate=sum(d is None for d in divergence) / len(inputs), first_divergence_steps=divergence,
        top1_agreement=hits / total if total else 1.0, max_abs_logit_diff=deltas.maximum,
        mean_abs_logit_diff=deltas.mean, max_new_tokens=max_new_tokens,
        task_metrics=task_metrics, dataset=measured_on,
    )


def write_report(comparison: Comparison, json_path: str | Path) -> None:
    path = Path(json_path)
    try:
        path.write_text(json.dumps(comparison.to_dict(), indent=2) + "\n")
        path.with_suffix(".md").write_text(comparison.markdown())
    except OSError as exc:
        raise InputError(f"{path}: cannot write the report ({exc.strerror})") from None
