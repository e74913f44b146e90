"""``compare``: a candidate bundle (say int4) against a reference bundle (say fp32) on the same inputs.

Free-running greedy generation gives the exact-match rate and the first divergence step; teacher
forcing (both bundles fed the reference's tokens) gives top-1 agreement per step and the logit
deltas. Sizes on disk and peak memory come from separate per-bundle runs. Runtime only: no torch.
"""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..runtime.errors import InputError
from ..runtime.manifest import read_manifest
from ..runtime.generate import decode_step, prefill
from ..runtime.memory import peak_rss_mb, reset_peak_rss
from ..runtime.model import PaliGemma, load
from ..runtime.images import load_image
from ..runtime.sampling import GenerationOptions
from .calibration import DEFAULT_PROMPTS, images_in

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
    task_metrics: dict[str, dict[str, float]] | None = None

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
            tasks = ["", "| task metric (held-out shapes) | reference | candidate |", "|---|---|---|"]
            tasks += [f"| {name} | {ref_m[name]:.3f} | {cand_m[name]:.3f} |" for name in ref_m]
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
        states.append((model, *prefill(model.backend, model.manifest.decoder, batch, embeds)))
    (ref_model, ref_logits, ref_state), (cand_model, cand_logits, cand_state) = states
    eos = set(ref_model.manifest.tokens.eos)
    budget = min(steps, ref_model.manifest.decoder.max_seq_len - ref_state.key_valid.shape[1])
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


def _shapes_pictures(count: int = 8) -> list:
    from ..shapes import scenes

    return [scenes.render(scenes.scene("heldout", index)) for index in range(count)]


def compare_bundles(reference: str | Path, candidate: str | Path, images_dir: str | Path | None = None,
                    prompts_file: str | Path | None = None, max_new_tokens: int = 32,
                    dataset: str | None = None, dataset_n: int = 100) -> Comparison:
    """Token agreement on ``images_dir`` (or a dataset's first held-out pictures); with ``dataset``
    ("shapes"), also each bundle's task metrics on its first ``dataset_n`` held-out scenes."""
    reference, candidate = Path(reference), Path(candidate)
    manifests = [read_manifest(b) if b.is_dir() else None for b in (reference, candidate)]
    if None in manifests:
        raise InputError(f"{reference if manifests[0] is None else candidate}: no such bundle directory")
    if manifests[0].decoder.vocab_size != manifests[1].decoder.vocab_size:
        raise InputError("the two bundles have different vocabularies: not the same model")
    if images_dir is None and dataset is None:
        raise InputError("give --images DIR or --dataset shapes")
    pictures = [load_image(p) for p in images_in(Path(images_dir))] if images_dir else _shapes_pictures()
    cases = read_cases(Path(prompts_file) if prompts_file else None)
    inputs = [(image, case) for image in pictures for case in cases]
    options = GenerationOptions(max_new_tokens=max_new_tokens)

    ref_tokens, ref_stats = _free_run(reference, inputs, options)
    cand_tokens, cand_stats = _free_run(candidate, inputs, options)
    divergence = []
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
        task_metrics=None if dataset is None else {
            "reference": _shapes_metrics(reference, dataset_n),
            "candidate": _shapes_metrics(candidate, dataset_n),
        },
    )


def write_report(comparison: Comparison, json_path: str | Path) -> None:
    path = Path(json_path)
    try:
        path.write_text(json.dumps(comparison.to_dict(), indent=2) + "\n")
        path.with_suffix(".md").write_text(comparison.markdown())
    except OSError as exc:
        raise InputError(f"{path}: cannot write the report ({exc.strerror})") from None
