"""``make gpu-check`` (benchmarks/gpu_check.py) on a machine without a GPU: the CPU path for real.

The check runs as a user runs it (a subprocess): it exports the tiny bundle itself, builds the
engines of every TensorRT flavour that imports, runs the CPU reference row (tokens, eval on shapes,
decode speed), and ends with exit 2 and the one line that says there is no NVIDIA GPU. The token
ids it reports are checked against the library's own generation; the table and verdict logic are
checked on reports whose rows pass and fail.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import paligemma_edge
from paligemma_edge.benchmarks import gpu_check
from paligemma_edge.benchmarks.gpu_check import (NO_GPU, PROMPTS, BackendProbe, Gpu, Machine, Report, Row,
                                                 accuracy_drop, compare_tokens, markdown)
from paligemma_edge.runtime.generation.sampling import GenerationOptions

no_gpu_here = pytest.mark.skipif(shutil.which("nvidia-smi") is not None,
                                 reason="a GPU machine: make gpu-check runs the GPU path there")


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "paligemma_edge.benchmarks.gpu_check", *args],
                          capture_output=True, text=True, timeout=900)


def test_token_comparison_counts_prompts_and_positions():
    assert compare_tokens([[1, 2, 3], [4]], [[1, 2, 3], [4]]).exact
    match = compare_tokens([[1, 2, 3], [4, 5]], [[1, 9, 3], [4]])
    assert (match.identical_prompts, match.tokens, match.identical_tokens) == (0, 5, 3)
    assert not match.exact and match.text() == "0/2 prompts identical (3/5 tokens)"
    missing = compare_tokens([[1], [2, 3]], [[1]])  # a candidate that answered fewer prompts
    assert (missing.identical_prompts, missing.tokens, missing.identical_tokens) == (1, 3, 1)
    assert not compare_tokens([], []).exact


def test_accuracy_drop_names_the_worst_metric():
    assert accuracy_drop({"a": 0.9, "b": 0.8}, {"a": 0.95, "b": 0.7}) == ("b", pytest.approx(-0.1))


def _report(gpu: Gpu | None, rows: list[Row]) -> Report:
    probes = tuple(BackendProbe(row.backend, row.present, "") for row in rows)
    return Report(Machine(gpu, "" if gpu else "nvidia-smi not found", probes, (), {"python": "python 3"}), rows=rows,
                  scenes=4, budget_s=450)


def test_exit_code_and_table_follow_the_rows():
    h200 = Gpu("NVIDIA H200", "143771 MiB", "570.1", "9.0")
    reference = Row("onnxruntime", ran=True, passed=True, tokens=[[1, 2]], accuracy={"vqa": 1.0, "ocr": 0.5},
                    decode_tokens_per_s=100.0)
    good = Row("tensorrt", ran=True, passed=True, token_match=compare_tokens([[1, 2]], [[1, 2]]),
               accuracy={"vqa": 1.0, "ocr": 0.25}, answer_agreement=0.9, decode_tokens_per_s=900.0,
               graph_decode_tokens_per_s={"off": 800.0, "on": 1000.0}, graph_note="on: captured by the backend")
    absent = Row("onnxruntime-cuda", present=False, why="absent: pip install onnxruntime-gpu")
    assert _report(h200, [reference, good, absent]).exit_code() == 0
    assert _report(None, [reference, good, absent]).exit_code() == 2
    unmeasured = Row("tensorrt-rtx", ran=True, passed=True, graph_note="graph on not measured: timed out after 180 s")
    assert _report(h200, [reference, good, unmeasured]).exit_code() == 0  # an extra measurement, not the verdict
    assert "| tensorrt-rtx | yes | - | - | - | graph on not measured: timed out after 180 s |" in markdown(
        _report(h200, [reference, unmeasured]))
    bad = Row("tensorrt-rtx", ran=True, why="tokens differ from the CPU's")
    report = _report(h200, [reference, good, absent, bad])
    assert report.exit_code() == 1
    table = markdown(report)
    assert "| onnxruntime | yes | reference (1 prompts, 2 tokens) | mean 0.750 of 2 metrics, 4 scenes | 100.0 | - |" in table
    assert ("| tensorrt | yes | 1/1 prompts identical (2/2 tokens) | mean 0.625 of 2 metrics, 4 scenes; "
            "worst ocr -0.250; answers 90% = CPU | 900.0 | 800.0 / 1000.0 (1.25x); on: captured by the backend |") in table
    assert "| onnxruntime-cuda | no: absent: pip install onnxruntime-gpu | - | - | - | - |" in table
    assert "| tensorrt-rtx | yes, FAILED: tokens differ from the CPU's |" in table
    assert "NVIDIA H200, 143771 MiB, driver 570.1" in table and table.rstrip().endswith("exit 1")
    assert _report(h200, [reference]).exit_code() == 0
    failed_tests = _report(h200, [reference])
    failed_tests.tests_ok = False
    assert failed_tests.exit_code() == 1


def test_backend_probe_sees_the_cpu_reference_here():
    machine = gpu_check.probe_machine()
    assert [probe.name for probe in machine.backends][:1] == ["onnxruntime"] and machine.probe("onnxruntime").present
    assert {probe.name for probe in machine.backends} == {"onnxruntime", *gpu_check.GPU_BACKENDS}


@no_gpu_here
def test_a_spent_budget_says_so_in_every_step(tmp_path):
    result = _check("--workdir", str(tmp_path / "check"), "--budget", "1")
    assert result.returncode == 2, result.stderr
    assert result.stdout.rstrip().splitlines()[-1] == NO_GPU
    assert "| 2. tiny: checkpoint | 0.0 | not run: time budget spent |" in result.stdout
    assert "| onnxruntime | no: no tiny bundle; no shapes bundle | - | - | - | - |" in result.stdout


@no_gpu_here
def test_the_cpu_path_runs_for_real_and_exits_2(tmp_path, shapes_bundle):
    workdir = tmp_path / "check"
    result = _check("--workdir", str(workdir), "--scenes", "2", "--shapes-bundle", str(shapes_bundle),
                    "--json", str(tmp_path / "out.json"))
    assert result.returncode == 2, result.stderr
    lines = result.stdout.rstrip().splitlines()
    assert lines[-1] == NO_GPU and f"[gpu-check] {NO_GPU}" in lines[:12]  # said after step 1, and at the end
    report = json.loads((tmp_path / "out.json").read_text())
    assert report == json.loads((workdir / "gpu-check.json").read_text()) and report["exit_code"] == 2
    assert (workdir / "gpu-check.md").read_text() == report["table"] and report["table"] in result.stdout
    cpu = report["rows"][0]
    assert cpu["backend"] == "onnxruntime" and cpu["ran"] and cpu["passed"], cpu["why"]
    assert set(cpu["accuracy"]) == {"caption_exact_match", "vqa_accuracy", "ocr_exact_match", "detection_precision",
                                    "detection_recall", "segmentation_miou"}
    assert cpu["accuracy"]["caption_exact_match"] > 0.5  # the trained model, two scenes: it captions them
    assert cpu["decode_tokens_per_s"] > 0
    for row in report["rows"][1:]:
        assert not row["ran"] and row["why"] in ("no NVIDIA GPU",) + tuple(
            f"absent: {probe['detail']}" for probe in report["machine"]["backends"] if probe["name"] == row["backend"])
    # the ids the check compares backends on are the library's own greedy ids on that bundle and picture
    with paligemma_edge.load(workdir / "tiny") as model:
        expected = [r.token_ids for r in model.generate_batch([workdir / "sample.png"], list(PROMPTS),
                                                             GenerationOptions(max_new_tokens=gpu_check.NEW_TOKENS))]
    assert cpu["tokens"] == [list(ids) for ids in expected] and len(expected) == 3
    steps = {step: outcome for step, _, outcome in report["steps"]}
    assert steps["2. tiny: export"] == "ok" and steps["4. GPU tests"].startswith("not run: no NVIDIA GPU")
    assert not any("shapes-inplace" in step for step in steps)  # the CUDA graph comparison's bundle: GPU only
    for flavour in report["machine"]["flavours"]:  # TensorRT for RTX builds without a GPU
        assert steps[f"3. build-engines tiny --backend {flavour}"] == "ok"
