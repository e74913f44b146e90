"""``make gpu-check``: one run on a machine with an NVIDIA GPU that says what works there.

    python -m paligemma_edge.benchmarks.gpu_check [--workdir build/gpu-check] [--json OUT] [--scenes 20]

Steps, each timed, with a progress line: (1) what the machine has (nvidia-smi, which backends
import, versions); (2) the tiny bundle (a random checkpoint from fixtures/tiny.py, exported) and
the shapes bundle (the committed models/paligemma-shapes checkpoint, exported: no training);
(3) ``build-engines`` for each bundle with each TensorRT flavour that imports; (4) the GPU tests
(tests/test_tensorrt_backend.py, tests/test_engines.py); (5) for every backend: the tiny bundle's
token ids on fixed prompts against the CPU ``onnxruntime`` backend, ``eval --dataset shapes``
and decode tok/s (benchmarks/worker.py); for each TensorRT flavour also the decode tok/s of the
shapes model exported with an in-place KV cache, with the decode step's CUDA graph off and on
(``PALIGEMMA_EDGE_CUDA_GRAPHS``; that bundle is exported only where a GPU is); (6) one markdown
table, written with the JSON under the workdir.

What is decided here:

- Every model run is a subprocess of the package's own commands, with a timeout, so a backend
  that crashes or hangs costs its row, not the check. A time budget (``--budget``, default 450 s,
  under 8 minutes) bounds the whole run: each command gets at most what is left, and what no
  longer fits says so in its row.
- The GPU tests build their own fixtures on the CPU (exports, quantized variants), so they start
  in the background with step 2 and are waited for before step 5: the measurements run on a
  quiet machine.
- A backend passes when its token ids on the tiny fp32 bundle are those of ONNX Runtime on the
  CPU for every prompt, no shapes metric is more than ``ACCURACY_SLACK`` below the CPU's, and the
  worker measured its decode speed. A backend whose package is missing is "absent", not failed.
- Exit 0: every present backend (and the GPU tests) passed; 1: something present failed; 2: no
  NVIDIA GPU at all (said in one line after step 1; the CPU reference row still runs).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..runtime.backends.base import BACKENDS
from ..runtime.backends.tensorrt import CUDA_GRAPHS_ENV
from ..runtime.engines.common import FLAVOURS

Progress = Callable[[str], None]

REFERENCE = "onnxruntime"
GPU_BACKENDS = ("onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "tensorrt-rtx")
PROMPTS = ("caption en", "answer en what is the quick brown fox doing on the table today", "ocr")
NEW_TOKENS = 12
ACCURACY_SLACK = 0.05  # a shapes metric this far below the CPU's fails the backend
TESTS = ("tests/test_tensorrt_backend.py", "tests/test_engines.py")
MEASURE_RESERVE_S = 150  # of the budget, kept for step 5 when the GPU tests run long
REPO = Path(__file__).resolve().parents[1]
SHAPES_CHECKPOINT = REPO / "models" / "paligemma-shapes"
NO_GPU = "no NVIDIA GPU here (nvidia-smi finds none): only the CPU reference runs; exit 2"


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: str
    driver: str
    compute_capability: str


@dataclass(frozen=True)
class BackendProbe:
    """Whether a backend's packages import here; ``detail``: the version, or what to install."""

    name: str
    present: bool
    detail: str


@dataclass(frozen=True)
class Machine:
    gpu: Gpu | None
    gpu_note: str  # why there is none, when there is none
    backends: tuple[BackendProbe, ...]
    flavours: tuple[str, ...]  # TensorRT flavours that import (build-engines can use them)
    versions: dict[str, str]

    def probe(self, name: str) -> BackendProbe:
        return next(b for b in self.backends if b.name == name)


@dataclass(frozen=True)
class Outcome:
    """One command: whether it exited 0 (False also when it timed out or was not run), output and time."""

    ok: bool
    seconds: float
    stdout: str
    why: str  # one line: what went wrong, empty when ok


@dataclass(frozen=True)
class TokenMatch:
    prompts: int
    identical_prompts: int
    tokens: int
    identical_tokens: int

    @property
    def exact(self) -> bool:
        return self.prompts > 0 and self.identical_prompts == self.prompts

    def text(self) -> str:
        return f"{self.identical_prompts}/{self.prompts} prompts identical ({self.identical_tokens}/{self.tokens} tokens)"


@dataclass
class Row:
    backend: str
    ran: bool = False
    passed: bool = False
    why: str = ""  # why it did not run or did not pass: one line
    tokens: list[list[int]] | None = None
    token_match: TokenMatch | None = None
    accuracy: dict[str, float] | None = None
    answer_agreement: float | None = None  # shapes answers identical to the CPU's
    decode_tokens_per_s: float | None = None
    present: bool = True
    graph_decode_tokens_per_s: dict[str, float] | None = None  # in-place bundle, CUDA graph "off" / "on"
    graph_note: str = ""  # what the graph cell says besides the speeds: how "on" ran, or why nothing was measured


@dataclass
class Report:
    machine: Machine
    steps: list[tuple[str, float, str]] = field(default_factory=list)  # (step, seconds, outcome)
    rows: list[Row] = field(default_factory=list)
    tests: dict[str, int] | None = None
    tests_ok: bool | None = None  # None: not run (no GPU)
    scenes: int = 0
    seconds: float = 0.0
    budget_s: float = 0.0

    def exit_code(self) -> int:
        if self.machine.gpu is None:
            return 2
        rows_ok = all(row.passed for row in self.rows if row.present)
        return 0 if rows_ok and self.tests_ok is not False else 1

    def to_dict(self) -> dict:
        return {**asdict(self), "exit_code": self.exit_code(), "table": markdown(self)}


def _last_line(text: str, limit: int | None = 200) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


def _json_lines(text: str) -> list[dict] | None:
    """The JSON objects a command printed, one a line; None if a line that looks like one is not."""
    try:
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    except json.JSONDecodeError:
        return None


def _nvidia_smi() -> tuple[Gpu | None, str]:
    query = "--query-gpu=name,memory.total,driver_version,compute_cap"
    try:
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return None, "nvidia-smi not found"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"nvidia-smi failed ({exc})"
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    fields = [part.strip() for part in line.split(",")]
    if len(fields) != 4:
        return None, f"nvidia-smi lists no GPU ({_last_line(out.stderr or out.stdout) or 'no output'})"
    return Gpu(*fields), ""


def _version(module: str, distribution: str | None = None) -> str:
    """'DISTRIBUTION VERSION' of what provides ``module`` (``distribution`` first where given)."""
    distributions = importlib.metadata.packages_distributions().get(module.split(".")[0], [])
    for name in ([distribution] if distribution else []) + sorted(distributions):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"{module} (version unknown)"


def _imports(module: str) -> str | None:
    """None if ``module`` imports, else why not (one line)."""
    try:
        importlib.import_module(module)
    except (ImportError, OSError) as exc:
        return f"{module} does not import ({exc})"
    return None


def probe_machine() -> Machine:
    """nvidia-smi, and which backends' packages import (nothing is loaded on the GPU)."""
    gpu, note = _nvidia_smi()
    versions: dict[str, str] = {"python": f"python {sys.version.split()[0]}"}
    providers: list[str] = []
    if _imports("onnxruntime") is None:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        versions["onnxruntime"] = f"{_version('onnxruntime')} ({', '.join(providers)})"
    has_cuda_python = importlib.util.find_spec("cuda") is not None
    if has_cuda_python:
        versions["cuda-python"] = _version("cuda", "cuda-python")
    flavours = []
    for flavour, (module, _) in FLAVOURS.items():
        if _imports(module) is None:
            flavours.append(flavour)
            versions[flavour] = _version(module)
    probes = [BackendProbe(REFERENCE, bool(providers), versions.get("onnxruntime", BACKENDS[REFERENCE][2]))]
    for name, provider in (("onnxruntime-cuda", "CUDAExecutionProvider"),
                           ("onnxruntime-tensorrt", "TensorrtExecutionProvider")):
        present = provider in providers
        probes.append(BackendProbe(name, present, provider if present else f"no {provider}: {BACKENDS[name][2]}"))
    for flavour in FLAVOURS:
        present = flavour in flavours and has_cuda_python
        detail = versions[flavour] if present else BACKENDS[flavour][2]
        probes.append(BackendProbe(flavour, present, detail))
    return Machine(gpu, note, tuple(probes), tuple(flavours), versions)


def compare_tokens(reference: list[list[int]], candidate: list[list[int]]) -> TokenMatch:
    """Prompt by prompt: identical id lists, and identical ids position by position (over the longer)."""
    pairs = list(zip(reference, candidate))
    tokens = sum(max(len(r), len(c)) for r, c in pairs) + sum(len(r) for r in reference[len(pairs):])
    same = sum(a == b for r, c in pairs for a, b in zip(r, c))
    return TokenMatch(len(reference), sum(r == c for r, c in pairs), tokens, same)


def accuracy_drop(reference: dict[str, float], candidate: dict[str, float]) -> tuple[str, float]:
    """The metric that fell most below the reference's, and by how much (negative: it fell)."""
    deltas = {name: candidate.get(name, 0.0) - value for name, value in reference.items()}
    worst = min(deltas, key=lambda name: deltas[name])
    return worst, deltas[worst]


def _accuracy_cell(row: Row, reference: Row | None, scenes: int) -> str:
    if row.accuracy is None:
        return "-"
    mean = sum(row.accuracy.values()) / len(row.accuracy)
    text = f"mean {mean:.3f} of {len(row.accuracy)} metrics, {scenes} scenes"
    if reference is not None and reference is not row and reference.accuracy is not None:
        worst, delta = accuracy_drop(reference.accuracy, row.accuracy)
        text += f"; worst {worst} {delta:+.3f}"
        if row.answer_agreement is not None:
            text += f"; answers {row.answer_agreement:.0%} = CPU"
    return text


def _graph_cell(row: Row) -> str:
    speeds = row.graph_decode_tokens_per_s or {}
    if set(speeds) != {"off", "on"}:
        return row.graph_note or "-"
    cell = f"{speeds['off']:.1f} / {speeds['on']:.1f} ({speeds['on'] / speeds['off']:.2f}x)"
    return f"{cell}; {row.graph_note}" if row.graph_note else cell


def markdown(report: Report) -> str:
    """The backends table, then the steps (what ran and how long), then the verdict."""
    reference = next((row for row in report.rows if row.backend == REFERENCE), None)
    lines = ["| backend | ran? | tokens vs ONNX Runtime CPU | shapes accuracy | decode tok/s "
             "| in-place decode tok/s, CUDA graph off / on |", "|---|---|---|---|---|---|"]
    for row in report.rows:
        ran = ("yes" if row.passed else f"yes, FAILED: {row.why}") if row.ran else f"no: {row.why}"
        tokens = (f"reference ({len(row.tokens)} prompts, {sum(map(len, row.tokens))} tokens)"
                  if row is reference and row.tokens is not None else
                  row.token_match.text() if row.token_match is not None else "-")
        speed = f"{row.decode_tokens_per_s:.1f}" if row.decode_tokens_per_s is not None else "-"
        lines.append(f"| {row.backend} | {ran} | {tokens} | {_accuracy_cell(row, reference, report.scenes)} | {speed} "
                     f"| {_graph_cell(row)} |")
    lines += ["", "| step | seconds | outcome |", "|---|---|---|"]
    lines += [f"| {step} | {seconds:.1f} | {outcome} |" for step, seconds, outcome in report.steps]
    gpu = report.machine.gpu
    where = f"{gpu.name}, {gpu.memory}, driver {gpu.driver}" if gpu else report.machine.gpu_note
    lines += ["", f"machine: {where}; {'; '.join(report.machine.versions.values())}",
              f"total {report.seconds:.0f} s (budget {report.budget_s:.0f} s); exit {report.exit_code()}"]
    return "\n".join(lines) + "\n"


def _pytest_counts(output: str) -> dict[str, int]:
    summary = _last_line(output)
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary)}


class _Checker:
    """Runs the package's commands under one deadline, noting each step's time and outcome."""

    def __init__(self, report: Report, workdir: Path, deadline: float, progress: Progress):
        self.report, self.workdir, self.deadline, self.progress = report, workdir, deadline, progress

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def command(self, step: str, args: list[str], cap: float, env: dict[str, str] | None = None) -> Outcome:
        timeout = min(cap, self.left())
        if timeout < 5:
            outcome = Outcome(False, 0.0, "", "not run: time budget spent")
        else:
            self.progress(f"{step} (up to {timeout:.0f} s)")
            started = time.perf_counter()
            try:
                done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                                      cwd=REPO, env={**os.environ, **(env or {})})
                why = "" if done.returncode == 0 else f"exit {done.returncode}: {_last_line(done.stderr)}"
                outcome = Outcome(done.returncode == 0, time.perf_counter() - started, done.stdout, why)
            except subprocess.TimeoutExpired:
                outcome = Outcome(False, time.perf_counter() - started, "", f"timed out after {timeout:.0f} s")
        self.note(step, outcome.seconds, "ok" if outcome.ok else outcome.why)
        return outcome

    def note(self, step: str, seconds: float, outcome: str) -> None:
        self.report.steps.append((step, seconds, outcome))
        self.progress(f"{step}: {outcome} ({seconds:.1f} s)")


def _bundle(checker: _Checker, name: str, given: Path | None, export: Callable[[Path], list[list[str]]]) -> Path | None:
    """A fresh bundle under the workdir: a copy of ``given`` (engines are added to it), or exported."""
    target = checker.workdir / name
    shutil.rmtree(target, ignore_errors=True)
    if given is not None:
        started = time.perf_counter()
        shutil.copytree(given, target)
        checker.note(f"2. {name}: copy of {given}", time.perf_counter() - started, "ok")
        return target
    if export in (_shapes_commands, _inplace_commands) and not (SHAPES_CHECKPOINT / "config.json").is_file():
        checker.note(f"2. {name}: export", 0.0, f"not run: {SHAPES_CHECKPOINT} not found (a checkout has it; or give "
                     "--shapes-bundle)")
        return None
    for step, args in zip(("checkpoint", "export"), export(target)):
        if not args:
            continue
        if not checker.command(f"2. {name}: {step}", args, cap=300).ok:
            return None
    return target


def _tiny_commands(target: Path) -> list[list[str]]:
    checkpoint = target.parent / "tiny-checkpoint"
    return [["-m", "paligemma_edge.fixtures.tiny", str(checkpoint)],
            ["-m", "paligemma_edge", "export", str(checkpoint), "-o", str(target), "--max-seq-len", "64", "--force"]]


def _shapes_commands(target: Path) -> list[list[str]]:
    return [[], ["-m", "paligemma_edge", "export", str(SHAPES_CHECKPOINT), "-o", str(target), "--max-seq-len", "160",
                 "--mask-decoder", str(SHAPES_CHECKPOINT / "vae-oid.npz"), "--force"]]


def _inplace_commands(target: Path) -> list[list[str]]:
    return [[], ["-m", "paligemma_edge", "export", str(SHAPES_CHECKPOINT), "-o", str(target), "--max-seq-len", "160",
                 "--kv-cache", "inplace", "--force"]]


def _worker_row(checker: _Checker, step: str, bundle: Path, backend: str, env: dict[str, str] | None = None
                ) -> tuple[dict | None, str]:
    """The worker's row (2 runs, 32 tokens) for ``bundle`` on ``backend``; else None and why."""
    out = checker.command(step, ["-m", "paligemma_edge.benchmarks.worker", "runtime", str(bundle), "--backend", backend,
                                 "--runs", "2", "--new-tokens", "32"], cap=180, env=env)
    measured = _json_lines(out.stdout) if out.ok else None
    if measured:
        return measured[-1], ""
    return None, out.why or f"no JSON from the worker: {_last_line(out.stdout)}"


def _decode_speed(checker: _Checker, step: str, bundle: Path, backend: str) -> tuple[float | None, str]:
    row, why = _worker_row(checker, step, bundle, backend)
    return (float(row["decode_tokens_per_s"]), "") if row else (None, why)


def _measure_graphs(checker: _Checker, row: Row, inplace: Path) -> None:
    """The in-place bundle's decode speed on a TensorRT flavour, its decode step's CUDA graph off, then on.
    An extra measurement: what stops it goes in its cell, not the row's verdict (the GPU tests check graphs)."""
    speeds = {}
    for setting, value in (("off", "0"), ("on", "1")):
        measured, why = _worker_row(checker, f"5. {row.backend}: in-place decode tok/s, CUDA graph {setting}", inplace,
                                    row.backend, env={CUDA_GRAPHS_ENV: value})
        if measured is None:
            row.graph_note = f"graph {setting} not measured: {why}"
            return
        speeds[setting] = float(measured["decode_tokens_per_s"])
        if setting == "on":
            row.graph_note = f"on: {measured.get('decode_graphs', 'not reported')}"
    row.graph_decode_tokens_per_s = speeds


def _measure(checker: _Checker, row: Row, tiny: Path | None, shapes: Path | None, image: Path, scenes: int) -> None:
    """Step 5 for one backend: tokens on the tiny bundle, eval on shapes, decode speed on shapes."""
    name, failures = row.backend, []
    if tiny is None:
        failures.append("no tiny bundle")
    else:
        prompts = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
        out = checker.command(f"5. {name}: tokens on the tiny bundle", [
            "-m", "paligemma_edge", "run", str(tiny), "--image", str(image), *prompts,
            "--max-new-tokens", str(NEW_TOKENS), "--json", "--backend", name], cap=180)
        answers = _json_lines(out.stdout) if out.ok else None
        if answers is not None and len(answers) == len(PROMPTS):
            row.tokens = [answer["token_ids"] for answer in answers]
        else:
            failures.append(f"tokens: {out.why or f'expected {len(PROMPTS)} JSON lines, got: {_last_line(out.stdout)}'}")
    if shapes is None:
        failures.append("no shapes bundle")
    else:
        report_path = checker.workdir / f"eval-{name}.json"
        out = checker.command(f"5. {name}: eval --dataset shapes --n {scenes}", [
            "-m", "paligemma_edge", "eval", str(shapes), "--dataset", "shapes", "--n", str(scenes),
            "--backend", name, "--json", str(report_path)], cap=300)
        if out.ok:
            evaluated = json.loads(report_path.read_text())
            row.accuracy = {key: evaluated[key] for key in ("caption_exact_match", "vqa_accuracy", "ocr_exact_match",
                            "detection_precision", "detection_recall", "segmentation_miou")}
        else:
            failures.append(f"eval: {out.why}")
        row.decode_tokens_per_s, why = _decode_speed(checker, f"5. {name}: decode tok/s (worker, shapes)", shapes, name)
        if row.decode_tokens_per_s is None:
            failures.append(f"tok/s: {why}")
    row.ran = row.tokens is not None or row.accuracy is not None or row.decode_tokens_per_s is not None
    row.why = "; ".join(failures)


def _answers(path: Path) -> list[str]:
    return [example["answer"] for example in json.loads(path.read_text()).get("examples", [])] if path.is_file() else []


def _judge(row: Row, reference: Row, workdir: Path) -> None:
    """Against the CPU reference: identical tokens, accuracy within the slack, a measured speed."""
    problems = [row.why] if row.why else []
    if row.tokens is not None and reference.tokens is not None:
        row.token_match = compare_tokens(reference.tokens, row.tokens)
        if not row.token_match.exact:
            problems.append(f"tokens differ from the CPU's ({row.token_match.text()})")
    elif row.tokens is not None:
        problems.append("no CPU tokens to compare with")
    if row.accuracy is not None and reference.accuracy is not None:
        worst, delta = accuracy_drop(reference.accuracy, row.accuracy)
        if delta < -ACCURACY_SLACK:
            problems.append(f"{worst} {delta:+.3f} below the CPU's")
        ours, theirs = _answers(workdir / f"eval-{row.backend}.json"), _answers(workdir / f"eval-{REFERENCE}.json")
        if ours and len(ours) == len(theirs):
            row.answer_agreement = sum(a == b for a, b in zip(ours, theirs)) / len(ours)
    row.why = "; ".join(problems)
    row.passed = row.ran and not problems


def run_check(workdir: Path, scenes: int = 20, budget_s: float = 450.0, tiny_bundle: Path | None = None,
              shapes_bundle: Path | None = None, progress: Progress = print) -> Report:
    """The whole check; see the module docstring."""
    started = time.perf_counter()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    machine = probe_machine()
    report = Report(machine, scenes=scenes, budget_s=budget_s)
    checker = _Checker(report, workdir, started + budget_s, progress)
    gpu = machine.gpu
    checker.note("1. machine", time.perf_counter() - started,
                 f"{gpu.name} {gpu.memory} driver {gpu.driver}" if gpu else machine.gpu_note)
    for probe in machine.backends:
        progress(f"  {probe.name}: {'present' if probe.present else 'absent'} ({probe.detail})")
    if gpu is None:
        progress(NO_GPU)

    tests: subprocess.Popen | None = None
    tests_started = time.perf_counter()
    tests_log = workdir / "gpu-tests.log"
    if gpu is not None and all((REPO / test).is_file() for test in TESTS):
        progress("4. GPU tests started in the background (waited for before step 5)")
        with tests_log.open("w") as log:
            tests = subprocess.Popen([sys.executable, "-m", "pytest", *TESTS, "-q", "-p", "no:cacheprovider"],
                                     cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)

    image = workdir / "sample.png"
    from ..fixtures.tiny import scene_image

    scene_image().save(image)
    tiny = _bundle(checker, "tiny", tiny_bundle, _tiny_commands)
    shapes = _bundle(checker, "shapes", shapes_bundle, _shapes_commands)
    inplace = _bundle(checker, "shapes-inplace", None, _inplace_commands) if gpu and machine.flavours else None

    built: dict[str, bool] = {}  # flavour -> engines built for the tiny and shapes bundles
    inplace_built: dict[str, bool] = {}  # flavour -> engines built for the in-place shapes bundle
    for flavour in machine.flavours:
        for bundle, batch, done in ((tiny, 3, built), (shapes, 1, built), (inplace, 1, inplace_built)):
            if bundle is None:
                done[flavour] = False
                continue
            out = checker.command(f"3. build-engines {bundle.name} --backend {flavour}", [
                "-m", "paligemma_edge", "build-engines", str(bundle), "--backend", flavour,
                "--max-batch", str(batch)], cap=300)
            done[flavour] = done.get(flavour, True) and out.ok

    if tests is not None:
        wait = max(checker.left() - MEASURE_RESERVE_S, 1.0)
        try:
            tests.wait(timeout=wait)
            output = tests_log.read_text()
            report.tests = _pytest_counts(output)
            report.tests_ok = tests.returncode == 0
            outcome = f"exit {tests.returncode}: {_last_line(output)}"
        except subprocess.TimeoutExpired:
            tests.kill()
            tests.wait()
            report.tests_ok = False
            outcome = f"timed out ({wait:.0f} s left for them)"
        checker.note("4. GPU tests", time.perf_counter() - tests_started, outcome)
    else:
        checker.note("4. GPU tests", 0.0, "not run: no NVIDIA GPU (the GPU-only tests would skip)" if gpu is None
                     else "not run: tests/ not found next to the package")

    for probe in machine.backends:
        row = Row(probe.name, present=probe.present)
        report.rows.append(row)
        if not probe.present:
            row.why = f"absent: {probe.detail}"
        elif probe.name != REFERENCE and gpu is None:
            row.why = "no NVIDIA GPU"
        elif probe.name in FLAVOURS and not built.get(probe.name):
            row.why = "build-engines failed (see the steps)"
        else:
            _measure(checker, row, tiny, shapes, image, scenes)
            if inplace is not None and inplace_built.get(probe.name):
                _measure_graphs(checker, row, inplace)
    reference = report.rows[0]
    reference.passed = reference.ran and not reference.why
    for row in report.rows[1:]:
        if row.ran:
            _judge(row, reference, workdir)
    report.seconds = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("build/gpu-check"), help="bundles, logs and reports")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--scenes", type=int, default=20, help="held-out shapes scenes per backend (default 20)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    parser.add_argument("--tiny-bundle", type=Path, help="use (a copy of) this tiny fp32 bundle instead of exporting")
    parser.add_argument("--shapes-bundle", type=Path, help="use (a copy of) this paligemma-shapes fp32 bundle")
    args = parser.parse_args(argv)
    for given in (args.tiny_bundle, args.shapes_bundle):
        if given is not None and not (given / "manifest.json").is_file():
            parser.error(f"{given}: not a bundle directory (no manifest.json)")
    if args.scenes < 1 or args.budget <= 0:
        parser.error("--scenes must be >= 1 and --budget > 0")
    workdir = args.workdir.resolve()
    report = run_check(workdir, args.scenes, args.budget, args.tiny_bundle, args.shapes_bundle,
                       progress=lambda message: print(f"[gpu-check] {message}", flush=True))
    table = markdown(report)
    print(table, end="")
    for path in (workdir / "gpu-check.md", workdir / "gpu-check.json", args.json):
        if path is not None:
            path.write_text(table if path.suffix == ".md" else json.dumps(report.to_dict(), indent=2) + "\n")
    if report.machine.gpu is None:
        print(NO_GPU)
    return report.exit_code()


if __name__ == "__main__":
    raise SystemExit(main())
