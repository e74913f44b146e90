"""``paligemma-edge bench``: latency, throughput, memory and size per backend x precision, against transformers.

Every row runs in a process of its own (benchmarks/worker.py), after a warm-up, and reports
medians. In the same run: host memory read bandwidth (a large array summed on every thread), so
decode speed can be read as a fraction of its physical ceiling (weight bytes read per token /
bandwidth), and the transformers baseline on the same image and prompt, with the ratios to it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..runtime.errors import BundleError, InputError, PaliGemmaEdgeError
from ..runtime.bundle.manifest import read_manifest
from .models import MODELS, build_model

PRECISIONS = ("fp32", "fp16", "int8", "int4")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    """Either ``model`` (built or found, exported, quantized to ``precisions``, with the transformers
    baseline) or ``bundles`` (existing bundles, e.g. on a device without torch: runtime rows only)."""

    model: str | None = None
    bundles: tuple[Path, ...] = ()
    precisions: tuple[str, ...] = ("fp32", "int8", "int4")
    backends: tuple[str, ...] = ("onnxruntime",)
    baseline: str | None = "transformers"
    runs: int = 3
    new_tokens: int = 32
    threads: int | None = None
    workdir: Path = Path("build/bench")
    reuse: bool = False  # keep quantized bundles already in workdir (their quantize times are then not reported)

    def __post_init__(self):
        from ..runtime.backends.base import BACKENDS

        if (self.model is None) == (not self.bundles):
            raise InputError("give --model (built, exported and quantized here) or --bundles (existing bundles)")
        if self.model is not None and self.model not in MODELS and not (Path(self.model) / "config.json").is_file():
            raise InputError(f"--model {self.model}: not one of {', '.join(MODELS)} nor a checkpoint directory")
        if self.bundles and self.reuse:
            raise InputError("--reuse applies to --model (bundles it quantized before); --bundles are used as they are")
        for bundle in self.bundles:
            if not (Path(bundle) / "manifest.json").is_file():
                raise InputError(f"--bundles {bundle}: not a bundle directory (no manifest.json)")
        if self.bundles and self.baseline:
            raise InputError("the transformers baseline needs the checkpoint: use --model, or --baseline none")
        for backend in self.backends:
            if backend not in BACKENDS:
                raise InputError(f"unknown backend '{backend}'; choose from: {', '.join(sorted(BACKENDS))}")
        unknown = set(self.precisions) - set(PRECISIONS)
        if unknown:
            raise InputError(f"unknown precision(s) {', '.join(sorted(unknown))}; choose from {', '.join(PRECISIONS)}")
        if self.baseline not in (None, "transformers"):
            raise InputError(f"unknown baseline '{self.baseline}'; the baseline is transformers (or none)")
        if self.runs < 1 or self.new_tokens < 2:
            raise InputError("--runs must be >= 1 and --new-tokens >= 2")


def memory_bandwidth_gbs(threads: int, megabytes: int = 1024, repeats: int = 5) -> float:
    """Host memory read bandwidth: a large array summed in ``threads`` slices at once, best of ``repeats``.

    Decoding reads every weight once per token with all the backend's threads, so this is the
    ceiling decode speed is held to; a one-thread copy is not (24.7 GB/s against this 33.5 GB/s
    on the 2-core machine the README's tables come from)."""
    from concurrent.futures import ThreadPoolExecutor

    array = np.ones(megabytes * (1 << 20) // 4, dtype=np.float32)
    slices = np.array_split(array, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL inside the reduction
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.add.reduce, slices))
            best = min(best, time.perf_counter() - start)
    return array.nbytes / best / 1e9


def machine_info(bandwidth: float) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory, 1) if memory else None,
        "platform": platform.platform(), "python": platform.python_version(),
        "memory_read_bandwidth_gbs": round(bandwidth, 2),
    }


def _subprocess(module: str, args: list[str]) -> tuple[str, float]:
    """Run ``python -m module args``; returns its stdout and wall seconds, or fails with its last error line."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}, no message"])[-1]
        raise PaliGemmaEdgeError(f"{module} {' '.join(args[:2])} failed: {last}")
    return result.stdout, time.perf_counter() - start


def _worker(args: list[str]) -> dict:
    stdout, _ = _subprocess("paligemma_edge.benchmarks.worker", args)
    return json.loads(stdout.strip().splitlines()[-1])


def _cli(args: list[str]) -> float:
    """Run a paligemma-edge command (export, quantize), returning its wall time in seconds."""
    return _subprocess("paligemma_edge", args)[1]


def _bundle_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.iterdir() if p.is_file())


def _bytes_read_per_token(bundle: Path) -> int:
    """Decoder graph, its external data and the embedding table: what each decode step reads."""
    manifest = read_manifest(bundle)
    return sum((bundle / name).stat().st_size for name in manifest.weight_files(include_vision=False))


@dataclass
class _Prepared:
    name: str
    description: str
    checkpoint: Path | None
    bundles: dict[str, Path]  # row label (the precision) -> bundle
    timings: dict[str, dict[str, float]]


def _prepare_model(options: BenchOptions, workdir: Path, progress: Progress) -> _Prepared:
    """Build or find the checkpoint, export it once (kept in ``workdir``), quantize to each precision."""
    assert options.model is not None  # BenchOptions takes --model or --bundles; this is the --model path
    progress(f"building or finding model {options.model}")
    checkpoint = build_model(options.model, workdir)
    name = options.model if options.model in MODELS else checkpoint.name
    fp32 = workdir / f"{name}-fp32"
    timings = {}
    if not _is_bundle_of(fp32, "fp32"):  # missing, or in a format this version no longer reads
        progress(f"exporting {checkpoint} -> {fp32}")
        timings["fp32"] = {"export_s": _cli(["export", str(checkpoint), "-o", str(fp32), "--force"])}
    bundles = {"fp32": fp32}
    for precision in options.precisions:
        if precision == "fp32":
            continue
        bundles[precision] = workdir / f"{name}-{precision}"
        if options.reuse and "fp32" not in timings and _is_bundle_of(bundles[precision], precision):
            progress(f"reusing {bundles[precision]}")
            continue
        progress(f"quantizing to {precision}")
        seconds = _cli(["quantize", str(fp32), "--precision", precision, "-o", str(bundles[precision]), "--force"])
        timings[precision] = {"quantize_s": seconds}
    bundles = {p: bundles[p] for p in options.precisions}
    description = MODELS[name].description if name in MODELS else str(checkpoint)
    return _Prepared(name, description, checkpoint, bundles, timings)


def _is_bundle_of(path: Path, precision: str) -> bool:
    """A finished bundle at ``precision`` that this version reads (an older format is quantized again)."""
    try:
        return read_manifest(path).precision == precision
    except BundleError:
        return False


def _existing_bundles(options: BenchOptions) -> _Prepared:
    """Rows for bundles made elsewhere (one model), labelled by their precision (and directory where two share one)."""
    manifests = [(Path(b), read_manifest(Path(b))) for b in options.bundles]
    models = {m.model_name for _, m in manifests}
    if len(models) > 1:
        raise InputError(f"--bundles are of different models ({', '.join(sorted(models))}): one model per report")
    if len({p.resolve() for p, _ in manifests}) < len(manifests):
        raise InputError("--bundles names a bundle twice")
    precisions = [m.precision for _, m in manifests]
    names = [p.name for p, _ in manifests]
    bundles = {}
    for path, manifest in manifests:
        if precisions.count(manifest.precision) == 1:
            label = manifest.precision
        else:  # the directory tells them apart, or its whole path where two share a name
            label = f"{manifest.precision} ({path.name if names.count(path.name) == 1 else path})"
        bundles[label] = path
    model_name = manifests[0][1].model_name
    return _Prepared(f"{model_name}-bundles", f"existing bundles of {model_name}", None, bundles, {})


def run_benchmark(options: BenchOptions, progress: Progress = lambda message: None) -> dict:
    workdir = Path(options.workdir)
    threads = options.threads or os.cpu_count() or 1
    prepared = _existing_bundles(options) if options.bundles else None  # bad bundles fail before any work
    progress(f"measuring memory read bandwidth ({threads} threads)")
    bandwidth = memory_bandwidth_gbs(threads)
    if prepared is None:
        workdir.mkdir(parents=True, exist_ok=True)
        prepared = _prepare_model(options, workdir, progress)

    thread_args = ["--threads", str(options.threads)] if options.threads else []
    common = ["--runs", str(options.runs), "--new-tokens", str(options.new_tokens), *thread_args]
    results = []
    baseline = None
    if options.baseline:
        progress("running the transformers baseline")
        checkpoint = prepared.checkpoint
        assert checkpoint is not None  # BenchOptions refuses the baseline with --bundles (no checkpoint)
        baseline = _worker(["transformers", str(checkpoint), *common])
        weights = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
        baseline.update(backend="transformers", precision="fp32", bundle_mb=weights / 1e6)
        results.append(baseline)
    for backend in options.backends:
        for precision, bundle in prepared.bundles.items():
            progress(f"running {backend} {precision}")
            row = _worker(["runtime", str(bundle), "--backend", backend, *common])
            per_token = _bytes_read_per_token(bundle)
            ceiling = bandwidth * 1e9 / per_token
            row.update(
                backend=backend, precision=precision, bundle=str(bundle), bundle_mb=_bundle_bytes(bundle) / 1e6,
                weight_bytes_per_token=per_token, bandwidth_ceiling_tokens_per_s=ceiling,
                percent_of_bandwidth_ceiling=100 * row["decode_tokens_per_s"] / ceiling,
                **prepared.timings.get(precision, {}),
            )
            if baseline:
                row["vs_transformers"] = {
                    "decode_speedup": row["decode_tokens_per_s"] / baseline["decode_tokens_per_s"],
                    "ttft_ratio": row["ttft_ms"] / baseline["ttft_ms"],
                    "peak_rss_ratio": row["peak_rss_mb"] / baseline["peak_rss_mb"],
                }
            results.append(row)
    return {
        "model": prepared.name, "description": prepared.description,
        "machine": machine_info(bandwidth), "runs": options.runs, "new_tokens": options.new_tokens,
        "threads": threads, "date": time.strftime("%Y-%m-%d"), "results": results,
    }


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"**{report['model']}** ({report['description']}) on {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['memory_gib']} GiB, {machine['memory_read_bandwidth_gbs']} GB/s read bandwidth; {report['threads']} threads, "
        f"medians of {report['runs']} runs, {report['new_tokens']} new tokens, {report['date']}.",
        "",
        "| backend | precision | vision ms | prefill ms | TTFT ms | decode tok/s | x transformers | % of bw ceiling | peak RSS MB | size MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        ratio = row.get("vs_transformers", {}).get("decode_speedup")
        ceiling = row.get("percent_of_bandwidth_ceiling")
        lines.append(
            f"| {row['backend']} | {row['precision']} | {row['vision_ms']:.1f} | {row['prefill_ms']:.1f} | "
            f"{row['ttft_ms']:.1f} | {row['decode_tokens_per_s']:.1f} | {'-' if ratio is None else f'{ratio:.2f}x'} | "
            f"{'-' if ceiling is None else f'{ceiling:.0f}%'} | {row['peak_rss_mb']:.0f} | {row['bundle_mb']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> Path | None:
    """A bar chart of decode tokens/s and TTFT per row (PNG); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [f"{r['backend']}\n{r['precision']}" for r in report["results"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.bar(labels, [r["decode_tokens_per_s"] for r in report["results"]], color="#2b6cb0")
    left.set_title("decode tokens/s (higher is better)")
    right.bar(labels, [r["ttft_ms"] for r in report["results"]], color="#c05621")
    right.set_title("time to first token, ms (lower is better)")
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=8)
    figure.suptitle(f"{report['model']} on {report['machine']['cpu']} ({report['threads']} threads)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_reports(report: dict, out_dir: Path, json_path: Path | None = None) -> list[Path]:
    stem = out_dir / f"{report['model']}"
    written = [json_path or stem.with_suffix(".json"), stem.with_suffix(".md")]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written[0].write_text(json.dumps(report, indent=2) + "\n")
        written[1].write_text(markdown(report))
        png = chart(report, stem.with_suffix(".png"))
    except OSError as exc:
        raise InputError(f"cannot write the benchmark report ({exc})") from None
    return written + ([png] if png else [])
