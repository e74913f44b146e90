"""Smoke test of the benchmark harness on the tiny model: the report's fields, no timed assertions."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from paligemma_edge.runtime.bundle.manifest import SCHEMA_VERSION, read_manifest

from .conftest import run_cli

ROW_FIELDS = {"backend", "precision", "vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "peak_rss_mb",
              "bundle_mb", "prompt_tokens", "new_tokens"}


def test_bench_tiny_writes_json_markdown_and_chart(tmp_path):
    out = tmp_path / "results"
    result = run_cli("bench", "--model", "tiny", "--precision", "fp32,int8", "--runs", "1", "--new-tokens", "4",
                     "--workdir", str(tmp_path / "work"), "--out-dir", str(out), check=True)
    report = json.loads((out / "tiny.json").read_text())
    assert {"cpu", "cores", "memory_read_bandwidth_gbs"} <= set(report["machine"])
    assert report["machine"]["memory_read_bandwidth_gbs"] > 0
    rows = {(r["backend"], r["precision"]): r for r in report["results"]}
    assert set(rows) == {("transformers", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")}
    for row in rows.values():
        assert ROW_FIELDS <= set(row), row
        assert row["new_tokens"] == 4 and row["decode_tokens_per_s"] > 0 and row["peak_rss_mb"] > 0
    for key in (("onnxruntime", "fp32"), ("onnxruntime", "int8")):
        row = rows[key]
        assert {"decode_speedup", "ttft_ratio", "peak_rss_ratio"} <= set(row["vs_transformers"])
        assert 0 < row["percent_of_bandwidth_ceiling"] and row["weight_bytes_per_token"] > 0
    assert rows[("onnxruntime", "int8")]["quantize_s"] > 0 and rows[("onnxruntime", "fp32")]["export_s"] > 0
    table = (out / "tiny.md").read_text()
    assert table.count("\n| ") == 1 + 3 and table == result.stdout  # header + three rows
    assert Image.open(out / "tiny.png").size[0] > 0

    # --reuse keeps the int8 bundle made above instead of quantizing again
    int8_manifest = tmp_path / "work" / "tiny-int8" / "manifest.json"
    made = int8_manifest.stat().st_mtime_ns
    run_cli("bench", "--model", "tiny", "--precision", "int8", "--reuse", "--baseline", "none", "--runs", "1",
            "--new-tokens", "3", "--workdir", str(tmp_path / "work"), "--out-dir", str(out), check=True)
    (row,) = json.loads((out / "tiny.json").read_text())["results"]
    assert row["precision"] == "int8" and "quantize_s" not in row and int8_manifest.stat().st_mtime_ns == made
    # ... but quantizes again over a bundle in a format this version no longer reads
    int8_manifest.write_text(int8_manifest.read_text().replace(f'"schema_version": {SCHEMA_VERSION}', '"schema_version": 0'))
    run_cli("bench", "--model", "tiny", "--precision", "int8", "--reuse", "--baseline", "none", "--runs", "1",
            "--new-tokens", "3", "--workdir", str(tmp_path / "work"), "--out-dir", str(out), check=True)
    (row,) = json.loads((out / "tiny.json").read_text())["results"]
    assert row["quantize_s"] > 0 and read_manifest(int8_manifest.parent).schema_version == SCHEMA_VERSION

    # The same bundles again as a device would run them: no checkpoint, no baseline, no export.
    bundles = ",".join(str(tmp_path / "work" / f"tiny-{p}") for p in ("fp32", "int8"))
    run_cli("bench", "--bundles", bundles, "--runs", "1", "--new-tokens", "3", "--out-dir", str(out), check=True)
    report = json.loads((out / "tiny-bundles.json").read_text())
    rows = {(r["backend"], r["precision"]): r for r in report["results"]}
    assert set(rows) == {("onnxruntime", "fp32"), ("onnxruntime", "int8")}
    for row in rows.values():
        assert ROW_FIELDS <= set(row) and "vs_transformers" not in row and "quantize_s" not in row
        assert row["new_tokens"] == 3


def test_bench_rejects_bad_options(tmp_path):
    result = run_cli("bench", "--model", "tiny", "--precision", "fp8", "--workdir", str(tmp_path))
    assert result.returncode == 2 and "unknown precision" in result.stderr
    assert not any(tmp_path.iterdir())
    for args, message in (
        (("--bundles", str(tmp_path)), "not a bundle directory"),
        (("--bundles", str(tmp_path), "--precision", "int8"), "--precision applies to --model"),
        (("--bundles", str(tmp_path), "--model", "tiny"), "not allowed with argument"),
        (("--bundles", str(tmp_path), "--reuse"), "--reuse applies to --model"),
    ):
        result = run_cli("bench", *args, "--workdir", str(tmp_path))
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and not any(tmp_path.iterdir())


def test_profile_splits_a_decode_step_by_operator(bundles):
    result = subprocess.run(
        [sys.executable, "-m", "paligemma_edge.benchmarks.profile", str(bundles[(2, 28)]), "--new-tokens", "4",
         "--top", "1000"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "median decode step" in lines[0] and "slowest nodes:" in lines
    assert any("MatMul" in line.split()[0] for line in lines[1:] if line.startswith("  "))
    # the LM head reads the whole tied table each step: its rate is reported
    assert any("GB/s of weights" in line for line in lines if line.startswith("  ")), result.stdout
