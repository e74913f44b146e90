"""Smoke test of the benchmark harness on the tiny model: the report's fields, no timed assertions."""

from __future__ import annotations

import json

from PIL import Image

from .conftest import run_cli

ROW_FIELDS = {"backend", "precision", "vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "peak_rss_mb",
              "bundle_mb", "prompt_tokens", "new_tokens"}


def test_bench_tiny_writes_json_markdown_and_chart(tmp_path):
    out = tmp_path / "results"
    result = run_cli("bench", "--model", "tiny", "--precision", "fp32,int8", "--runs", "1", "--new-tokens", "4",
                     "--workdir", str(tmp_path / "work"), "--out-dir", str(out), check=True)
    report = json.loads((out / "tiny.json").read_text())
    assert {"cpu", "cores", "memory_bandwidth_gbs"} <= set(report["machine"])
    assert report["machine"]["memory_bandwidth_gbs"] > 0
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


def test_bench_rejects_bad_options(tmp_path):
    result = run_cli("bench", "--model", "tiny", "--precision", "fp8", "--workdir", str(tmp_path))
    assert result.returncode == 2 and "unknown precision" in result.stderr
    assert not any(tmp_path.iterdir())
