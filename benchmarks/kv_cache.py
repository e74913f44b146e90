"""Growing against in-place KV cache, with and without attention in chunks, at 224, 448 and 896 px (issue 18).

    python -m paligemma_edge.benchmarks.kv_cache [--model mid] [--sizes 224,448,896] [--precision int8]
        [--variants growing-unchunked,growing,inplace-unchunked,inplace] [--runs 2] [--new-tokens 32]
        [--workdir build/bench-kv] [--out benchmarks/results/kv_cache]

Four bundles per size, from ``export --kv-cache growing|inplace`` with ``--attention-chunk 0`` (every
layer's attention scores at once, as before issue 18) or its default (query chunks). The growing cache
without chunks is the baseline the ratios are taken against. For each size the preset (``mid`` -> ``mid``,
``mid-448``, ``mid-896``) is built once, exported as each variant and quantized to the precision; then
each bundle is measured by the benchmarks' worker in a process of its own (so its peak RSS is its own),
the sizes one after the other, the variants of a size back to back. ``--variants`` measures some of them
(the baseline always among them: a 3B model's four exports take hours here). Writes OUT.json and OUT.md
(per size and variant: vision / prefill / TTFT ms, decode tok/s, peak RSS MB, and the ratios to the
baseline). Bundles in ``--workdir`` are reused when their precision and cache kind match: delete them
after changing the export.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..runtime.bundle.manifest import GROWING, INPLACE, read_manifest
from ..runtime.errors import BundleError
from .harness import _cli, _worker, machine_info, memory_bandwidth_gbs
from .models import MODELS, build_model


@dataclass(frozen=True)
class Variant:
    name: str  # in the bundle's directory name and the tables
    kv_cache: str
    attention_chunk: int | None  # export --attention-chunk (None: its default)


BEFORE = Variant("growing-unchunked", GROWING, 0)
VARIANTS = (BEFORE, Variant("growing", GROWING, None), Variant("inplace-unchunked", INPLACE, 0),
            Variant("inplace", INPLACE, None))


def _preset(model: str, size: int) -> str:
    """The preset of ``model`` (a 224 px one) at ``size``: mid -> mid-448, paligemma2-3b-224 -> paligemma2-3b-448."""
    if size == MODELS[model].spec.image_size:
        return model
    name = model.removesuffix("-224") + f"-{size}"
    if name not in MODELS:
        raise SystemExit(f"kv_cache: no preset {name} in benchmarks/models.py")
    return name


def _ready(bundle: Path, precision: str, kind: str) -> bool:
    try:
        manifest = read_manifest(bundle)
    except BundleError:
        return False
    return manifest.precision == precision and manifest.decoder.kv_cache == kind


def chosen_variants(names: str) -> tuple[Variant, ...]:
    """The variants named in ``names`` (comma-separated), in VARIANTS' order; the baseline must be one."""
    by_name = {variant.name: variant for variant in VARIANTS}
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise ValueError(f"unknown variant {', '.join(unknown)} (choose from {', '.join(by_name)})")
    if BEFORE.name not in wanted:
        raise ValueError(f"--variants must include {BEFORE.name}, the baseline of the ratios")
    return tuple(variant for variant in VARIANTS if variant.name in wanted)


def prepare(preset: str, precision: str, variants: tuple[Variant, ...], workdir: Path, log) -> dict[Variant, Path]:
    """One bundle per variant at ``precision`` (kept in ``workdir`` and reused)."""
    checkpoint = build_model(preset, workdir)
    bundles = {}
    for variant in variants:
        fp32 = workdir / f"{preset}-fp32-{variant.name}"
        target = fp32 if precision == "fp32" else workdir / f"{preset}-{precision}-{variant.name}"
        if not _ready(fp32, "fp32", variant.kv_cache):
            log(f"exporting {preset} ({variant.name})")
            chunk = [] if variant.attention_chunk is None else ["--attention-chunk", str(variant.attention_chunk)]
            _cli(["export", str(checkpoint), "-o", str(fp32), "--kv-cache", variant.kv_cache, *chunk, "--force"])
        if not _ready(target, precision, variant.kv_cache):
            log(f"quantizing {preset} ({variant.name}) to {precision}")
            _cli(["quantize", str(fp32), "--precision", precision, "-o", str(target), "--force"])
        bundles[variant] = target
    return bundles


def markdown(report: dict) -> str:
    lines = [
        f"{report['model']} {report['precision']}, {report['runs']} runs, {report['new_tokens']} new tokens, "
        f"{report['machine']['cpu']} ({report['machine']['cores']} cores)", "",
        "| size | decoder | positions | vision ms | prefill ms | TTFT ms | decode tok/s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['size']} px | {row['variant']} | {row['prompt_tokens']:,} | {row['vision_ms']:,.0f} | "
                     f"{row['prefill_ms']:,.0f} | {row['ttft_ms']:,.0f} | {row['decode_tokens_per_s']:.1f} | "
                     f"{row['peak_rss_mb']:,.0f} |")
    lines += ["", f"| size | decoder | decode / {BEFORE.name} | peak RSS / {BEFORE.name} | prefill / {BEFORE.name} |",
              "|---|---|---|---|---|"]
    for size, variants in report["ratios"].items():
        for name, ratio in variants.items():
            lines.append(f"| {size} px | {name} | {ratio['decode']:.2f}x | {ratio['peak_rss']:.2f}x | "
                         f"{ratio['prefill']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mid", choices=[n for n, m in MODELS.items() if m.spec.image_size == 224])
    parser.add_argument("--sizes", default="224,448,896")
    parser.add_argument("--precision", default="int8", choices=("fp32", "fp16", "int8", "int4"))
    parser.add_argument("--variants", default=",".join(variant.name for variant in VARIANTS))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--workdir", default="build/bench-kv")
    parser.add_argument("--out", default="benchmarks/results/kv_cache")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    try:
        variants = chosen_variants(args.variants)
    except ValueError as error:
        parser.error(str(error))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    prepared = {size: prepare(_preset(args.model, size), args.precision, variants, workdir, log) for size in sizes}
    threads = args.threads or os.cpu_count() or 1
    rows, ratios = [], {}
    for size, bundles in prepared.items():
        measured = {}
        for variant, bundle in bundles.items():
            log(f"measuring {bundle.name}")
            worker_args = ["runtime", str(bundle), "--runs", str(args.runs), "--new-tokens", str(args.new_tokens),
                           "--threads", str(threads)]
            measured[variant] = _worker(worker_args) | {"size": size, "variant": variant.name,
                                                        "kv_cache": variant.kv_cache, "bundle": str(bundle)}
            rows.append(measured[variant])
        before = measured[BEFORE]
        ratios[str(size)] = {
            variant.name: {"decode": row["decode_tokens_per_s"] / before["decode_tokens_per_s"],
                           "peak_rss": row["peak_rss_mb"] / before["peak_rss_mb"],
                           "prefill": row["prefill_ms"] / before["prefill_ms"]}
            for variant, row in measured.items() if variant != BEFORE
        }
    report = {"model": args.model, "precision": args.precision, "runs": args.runs, "new_tokens": args.new_tokens,
              "threads": threads, "machine": machine_info(memory_bandwidth_gbs(threads)), "rows": rows,
              "ratios": ratios}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
