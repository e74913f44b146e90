"""Memory budget of a bundle per Jetson module at 224, 448 and 896 px (issue 18), computed from the model's sizes.

    python -m paligemma_edge.benchmarks.memory_budget [--model paligemma2-3b-224] [--sizes 224,448,896]
        [--measured benchmarks/results/paligemma2-3b-224.json] [--check benchmarks/results/kv_cache.json]
        [--check-model benchmarks/results/kv_cache-paligemma2-3b.json] [--out benchmarks/results/memory_budget]

What is decided here: what a generation holds besides the program, and how each part is counted.

- weights: the bundle's size at each precision, read from a ``bench`` report of the model (measured; the
  weights do not depend on the resolution but for the vision position table, a few MB).
- KV cache: layers x 2 x kv heads x head dim x positions, in float32 (ONNX Runtime bundles) and float16
  (``--fp16-io``, what TensorRT runs); positions = image tokens + export's default 512 of text.
- activations: the largest set alive at once while the prompt runs, counted in float32 (an fp16 engine
  holds half): per decoder layer the attention scores and their softmax for one chunk of ``--attention-chunk``
  queries ([heads, chunk, positions] twice) or the MLP's gate and up projections ([positions, intermediate]
  twice), whichever is larger; the vision tower's the same way over its tokens. The two run one after the
  other, so the larger counts.

``--check`` compares the same count against a ``benchmarks.kv_cache`` run of mid: for each size, the measured
peak RSS over the 224 px one, against the computed KV cache and activations over the 224 px ones. The count
falls short of it at 896 px (more tensors are alive at once than the two counted, and the arenas round
up), so each total is also given with its growth over 224 px scaled by mid's measured / computed
ratio at that size: an extrapolation from a 175M model, stated as such. ``--check-model`` compares the
whole count (weights at the run's precision, KV cache in float32, activations) with the peak RSS of a
``benchmarks.kv_cache`` run of the model itself (the 3B at 448 px, which this machine can run); what is left
is the process (Python, ONNX Runtime, the tokenizer) and what the count misses. A missing report leaves
that table out.
Not counted: the CUDA context and TensorRT's workspace on a device (not measured here), and the OS.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..export.attention import default_query_chunk  # export --attention-chunk's default
from ..export.bundle import DEFAULT_TEXT_TOKENS
from ..fixtures.tiny import TinySpec
from .models import MODELS

MB = 1024 * 1024
# Jetson Orin modules' memory (CPU and GPU share it), GB: Orin Nano 4GB; Orin Nano 8GB and Orin NX 8GB; Orin NX
# 16GB; AGX Orin 32GB and 64GB (NVIDIA's module data sheets)
JETSON_MEMORY_GB = (4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Budget:
    size: int
    positions: int
    kv_fp32_mb: float
    kv_fp16_mb: float
    activations_mb: float  # with attention in chunks
    activations_unchunked_mb: float
    query_chunk: int  # the decoder's (export's default for the positions, unless given)


def kv_cache_bytes(spec: TinySpec, positions: int, itemsize: int) -> int:
    """Every layer's keys and values for ``positions`` positions of one row."""
    return spec.text_layers * 2 * spec.kv_heads * spec.head_dim * positions * itemsize


def budget(spec: TinySpec, size: int) -> Budget:
    """The counts at ``size``, attention in export's default query chunks for each graph's length."""
    tokens = (size // 14) ** 2
    positions = tokens + DEFAULT_TEXT_TOKENS
    text_chunk, vision_chunk = default_query_chunk(positions), default_query_chunk(tokens)

    def peak(heads: int, rows: int, intermediate: int, query_chunk: int) -> float:
        scores = 2 * heads * min(query_chunk, rows) * rows  # scores and softmax of one chunk
        mlp = 2 * rows * intermediate  # gate and up projections
        return 4 * max(scores, mlp) / MB

    def activations(text_rows: int, vision_rows: int) -> float:
        text = spec.text_intermediate or 2 * spec.text_hidden  # TinySpec's defaults
        vision = spec.vision_intermediate or 2 * spec.vision_hidden
        return max(peak(spec.heads, positions, text, text_rows), peak(spec.vision_heads, tokens, vision, vision_rows))

    return Budget(size=size, positions=positions, kv_fp32_mb=kv_cache_bytes(spec, positions, 4) / MB,
                  kv_fp16_mb=kv_cache_bytes(spec, positions, 2) / MB, activations_mb=activations(text_chunk, vision_chunk),
                  activations_unchunked_mb=activations(positions, tokens), query_chunk=text_chunk)


def measured_weights(report: Path) -> dict[str, float]:
    """precision -> bundle MB of the onnxruntime rows of a ``bench`` report."""
    rows = json.loads(report.read_text())["results"]
    return {row["precision"]: row["bundle_mb"] for row in rows if row["backend"] == "onnxruntime" and row.get("bundle_mb")}


def growth_factors(report: dict, spec: TinySpec) -> dict[int, float]:
    """size -> measured peak RSS growth over 224 px / computed (KV fp32 + activations) growth, for the in-place
    chunked rows of a kv_cache report: how far the count falls short of what ONNX Runtime really held."""
    rows = {row["size"]: row for row in report["rows"] if row["variant"] == "inplace"}
    base, at_224 = rows[224]["peak_rss_mb"], budget(spec, 224)
    factors = {}
    for size, row in rows.items():
        computed = _grown(budget(spec, size), at_224, chunked=True)
        if computed > 0:
            factors[size] = (row["peak_rss_mb"] - base) / computed
    return factors


def _grown(b: Budget, at_224: Budget, chunked: bool, kv: str = "kv_fp32_mb") -> float:
    """KV cache and activations at ``b`` over those at 224 px."""
    acts = (b.activations_mb - at_224.activations_mb) if chunked else (b.activations_unchunked_mb
                                                                       - at_224.activations_unchunked_mb)
    return getattr(b, kv) - getattr(at_224, kv) + acts


def markdown(model: str, budgets: list[Budget], weights: dict[str, float], factors: dict[int, float]) -> str:
    """One row per size and precision: the parts, the total, the total with the growth over 224 px scaled as
    measured on mid (``factors``), and what a module of each size has left of that."""
    at_224 = next(b for b in budgets if b.size == 224)
    chunks = ", ".join(f"{b.query_chunk} at {b.size} px" for b in budgets)
    lines = [f"{model}: weights = the measured bundles; KV cache (fp16) and activations (attention in export's "
             f"default chunks of query rows: {chunks}; unchunked in brackets) computed by benchmarks/memory_budget.py; 'as on mid': the "
             "growth over 224 px times what mid's measured growth was of its computed one. MB left on each "
             "module's memory is for the OS, the CUDA context, TensorRT's workspace and the program, none counted.",
             "", "| size | precision | positions | weights MB | KV fp16 MB | activations MB | total MB | "
             "total as on mid MB | " + " | ".join(f"left of {gb} GB" for gb in JETSON_MEMORY_GB) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(JETSON_MEMORY_GB)]
    for b in budgets:
        for precision, weight_mb in weights.items():
            total = weight_mb + b.kv_fp16_mb + b.activations_mb
            base = weight_mb + at_224.kv_fp16_mb + at_224.activations_mb
            scaled = base + _grown(b, at_224, True, "kv_fp16_mb") * factors.get(b.size, 1.0)
            lines.append(f"| {b.size} px | {precision} | {b.positions:,} | {weight_mb:,.0f} | {b.kv_fp16_mb:,.0f} | "
                         f"{b.activations_mb:,.0f} ({b.activations_unchunked_mb:,.0f}) | {total:,.0f} | {scaled:,.0f} | "
                         + " | ".join(f"{gb * 1024 - scaled:,.0f}" for gb in JETSON_MEMORY_GB) + " |")
    return "\n".join(lines) + "\n"


def _chunked(row: dict) -> bool:
    """Whether a kv_cache row's bundle has attention in chunks (its variant is not an -unchunked one)."""
    return not row["variant"].endswith("-unchunked")


def check(report: dict, spec: TinySpec) -> str:
    """Measured peak RSS growth over 224 px (kv_cache benchmark rows) against the computed growth."""
    lines = [f"{report['model']}, measured by benchmarks.kv_cache against this count:", "",
             "| size | decoder | measured peak RSS MB | measured - 224 px | computed KV fp32 + activations - 224 px |",
             "|---|---|---|---|---|"]
    rows = report["rows"]
    base = {row["variant"]: row for row in rows if row["size"] == 224}
    at_224 = budget(spec, 224)
    for row in rows:
        grown = _grown(budget(spec, row["size"]), at_224, chunked=_chunked(row))
        measured = row["peak_rss_mb"] - base[row["variant"]]["peak_rss_mb"]
        lines.append(f"| {row['size']} px | {row['variant']} | {row['peak_rss_mb']:,.0f} | {measured:,.0f} | {grown:,.0f} |")
    return "\n".join(lines) + "\n"


def check_whole(report: dict, spec: TinySpec, weight_mb: float) -> str:
    """Measured peak RSS (kv_cache rows of the model itself) against the whole count: weights, KV fp32, activations."""
    lines = [f"{report['model']} {report['precision']}, measured by benchmarks.kv_cache against the whole count "
             f"(weights {weight_mb:,.0f} MB, the measured bundle):", "",
             "| size | decoder | measured peak RSS MB | computed weights + KV fp32 + activations MB | measured - computed MB |",
             "|---|---|---|---|---|"]
    for row in report["rows"]:
        b = budget(spec, row["size"])
        acts = b.activations_mb if _chunked(row) else b.activations_unchunked_mb
        computed = weight_mb + b.kv_fp32_mb + acts
        lines.append(f"| {row['size']} px | {row['variant']} | {row['peak_rss_mb']:,.0f} | {computed:,.0f} | "
                     f"{row['peak_rss_mb'] - computed:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="paligemma2-3b-224", choices=sorted(MODELS))
    parser.add_argument("--sizes", default="224,448,896")
    parser.add_argument("--measured", default="benchmarks/results/paligemma2-3b-224.json",
                        help="a bench report of --model, for the bundles' sizes")
    parser.add_argument("--check", default="benchmarks/results/kv_cache.json",
                        help="a benchmarks.kv_cache report (of mid): the count is compared with it and scaled by it")
    parser.add_argument("--check-model", default="benchmarks/results/kv_cache-paligemma2-3b.json",
                        help="a benchmarks.kv_cache report of --model itself, compared with the whole count")
    parser.add_argument("--out", default="benchmarks/results/memory_budget")
    args = parser.parse_args(argv)
    spec = MODELS[args.model].spec
    weights = {p: mb for p, mb in measured_weights(Path(args.measured)).items() if p in ("int8", "int4")}
    if not weights:
        print(f"memory_budget: no int8 or int4 onnxruntime rows in {args.measured}", file=sys.stderr)
        return 2
    report = json.loads(Path(args.check).read_text())
    measured_spec = MODELS[report["model"]].spec
    sizes = sorted({224, *(int(s) for s in args.sizes.split(","))})
    text = markdown(args.model, [budget(spec, size) for size in sizes], weights, growth_factors(report, measured_spec))
    text += "\n" + check(report, measured_spec)
    own = Path(args.check_model)
    if own.is_file():
        own_report = json.loads(own.read_text())
        if own_report["precision"] not in weights:
            print(f"memory_budget: no {own_report['precision']} onnxruntime row in {args.measured}", file=sys.stderr)
            return 2
        text += "\n" + check_whole(own_report, spec, weights[own_report["precision"]])
    else:
        print(f"memory_budget: {own} not found; the table of {args.model}'s own measured peaks is left out",
              file=sys.stderr)
    out = Path(args.out).with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
