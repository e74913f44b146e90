"""Export writes a bundle atomically: failed, refused or interrupted exports leave nothing that loads."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

import paligemma_edge
from paligemma_edge import GenerationOptions
from paligemma_edge.export import onnx_graphs
from paligemma_edge.export.bundle import ExportOptions, export_bundle
from paligemma_edge.runtime.bundle.manifest import read_manifest
from paligemma_edge.runtime.generation.results import Generation

from .conftest import run_cli


def leftovers(directory):
    return [p.name for p in directory.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_validation_failure_leaves_no_bundle(checkpoints, tmp_path):
    output = tmp_path / "bundle"
    result = run_cli("export", str(checkpoints[(1, 28)]), "-o", str(output), "--tolerance", "1e-12")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("paligemma-edge: error: ONNX Runtime logits differ from PyTorch by") and "Traceback" not in result.stderr
    assert not output.exists() and leftovers(tmp_path) == []


def test_interrupted_export_leaves_no_bundle(checkpoints, tmp_path):
    output = tmp_path / "bundle"
    process = subprocess.Popen(
        [sys.executable, "-m", "paligemma_edge", "export", str(checkpoints[(2, 28)]), "-o", str(output)],
        stderr=subprocess.PIPE, text=True,
    )
    stderr = process.stderr
    assert stderr is not None  # stderr=PIPE
    for line in stderr:
        if "exporting decoder graph" in line:
            process.send_signal(signal.SIGINT)
            break
    rest = stderr.read()
    assert process.wait(timeout=120) == 130, rest
    assert "interrupted" in rest
    assert not output.exists() and leftovers(tmp_path) == []


def test_existing_output_needs_force(bundles, checkpoints, tmp_path):
    output = tmp_path / "bundle"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    refused = run_cli("export", str(checkpoints[(1, 28)]), "-o", str(output), "--force")
    assert refused.returncode == 2 and "is not a bundle" in refused.stderr
    (output / "notes.txt").unlink()
    assert run_cli("export", str(checkpoints[(1, 28)]), "-o", str(output)).returncode == 2
    run_cli("export", str(checkpoints[(1, 28)]), "-o", str(output), "--force", "--max-seq-len", "40", check=True)
    assert read_manifest(output).decoder.max_seq_len == 40 and leftovers(tmp_path) == []


def test_large_graphs_use_external_data(checkpoints, bundles, images, tmp_path, monkeypatch):
    """Graphs over the protobuf limit go to external data; the tiny model exercises it with a 0 threshold."""
    monkeypatch.setattr(onnx_graphs, "EXTERNAL_DATA_THRESHOLD", 0)
    output = tmp_path / "external"
    manifest = export_bundle(str(checkpoints[(2, 28)]), output, ExportOptions(max_seq_len=64))
    for graph in (manifest.vision_graph, manifest.decoder_graph):
        assert graph.external_data == (f"{graph.file}.data",)
        assert graph.external_data[0] in manifest.files and (output / graph.external_data[0]).is_file()
    options = GenerationOptions(max_new_tokens=8)
    with paligemma_edge.load(output) as external, paligemma_edge.load(bundles[(2, 28)]) as inline:
        from_external = external.generate(images[0], "caption en", options)
        from_inline = inline.generate(images[0], "caption en", options)
        assert isinstance(from_external, Generation) and isinstance(from_inline, Generation)
        assert from_external.token_ids == from_inline.token_ids


@pytest.mark.parametrize("value", ["0", "5"])
def test_max_seq_len_must_leave_room_for_text(checkpoints, tmp_path, value):
    result = run_cli("export", str(checkpoints[(1, 28)]), "-o", str(tmp_path / "b"), "--max-seq-len", value)
    assert result.returncode == 2 and "--max-seq-len" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "b").exists()


def test_cli_default_tolerance_matches_the_library():
    from paligemma_edge import cli
    from paligemma_edge.export.bundle import DEFAULT_TOLERANCE

    assert cli.DEFAULT_TOLERANCE == DEFAULT_TOLERANCE


@pytest.mark.parametrize("value", ["-1", "0", "nan"])
def test_tolerance_must_be_positive(checkpoints, tmp_path, value):
    result = run_cli("export", str(checkpoints[(1, 28)]), "-o", str(tmp_path / "b"), "--tolerance", value)
    assert result.returncode == 2 and "--tolerance" in result.stderr.strip().splitlines()[-1]


def test_output_that_is_a_file_is_refused(checkpoints, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = run_cli("export", str(checkpoints[(1, 28)]), "-o", str(target), "--force")
    assert result.returncode == 2 and "not a directory" in result.stderr and target.read_text() == "x"


def test_leftovers_of_a_killed_export_are_cleared(checkpoints, tmp_path):
    stale = tmp_path / ".bundle.partial-abc123"
    stale.mkdir()
    (stale / "manifest.json").write_text("{}")
    run_cli("export", str(checkpoints[(1, 28)]), "-o", str(tmp_path / "bundle"), check=True)
    assert not stale.exists() and (tmp_path / "bundle" / "manifest.json").is_file()


def test_exported_graphs_carry_no_intermediate_shapes(bundles):
    """The tracer's value_info keeps element types, not shapes (ONNX Runtime held far more memory with them;
    see _finish_graph), while the I/O keeps the bundle's named dims."""
    import onnx

    manifest = read_manifest(bundles[(2, 28)])
    for graph in (manifest.vision_graph, manifest.decoder_graph):
        model = onnx.load(str(bundles[(2, 28)] / graph.file), load_external_data=False)
        values = model.graph.value_info
        assert values and all(v.type.tensor_type.elem_type for v in values), graph.file
        assert not any(v.type.tensor_type.HasField("shape") for v in values), graph.file
    decoder = onnx.load(str(bundles[(2, 28)] / manifest.decoder_graph.file), load_external_data=False)
    dims = [d.dim_param for d in decoder.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == ["batch", "seq"]
