"""Bad input: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from paligemma_edge.extras import MissingExtraError, explain
from paligemma_edge.runtime.bundle.manifest import MANIFEST_NAME, read_manifest

from .conftest import run_cli


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paligemma-edge: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture()
def bundle_copy(bundles, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundles[(2, 28)], target)
    return target


def test_missing_model_directory(tmp_path):
    assert_one_line_error_export(run_cli("export", str(tmp_path / "nope"), "-o", str(tmp_path / "b")),
                                 "no such checkpoint directory")


def assert_one_line_error_export(result, fragment: str) -> None:
    """Export prints progress lines first; the last line is the error."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("paligemma-edge: error: ")
    assert fragment in result.stderr.strip().splitlines()[-1]


def test_non_paligemma_model_directory(tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_one_line_error_export(run_cli("export", str(llama), "-o", str(tmp_path / "b")), "not PaliGemma")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error_export(run_cli("export", str(empty), "-o", str(tmp_path / "b")), "no config.json")
    assert not (tmp_path / "b").exists()


def test_paligemma_dir_with_broken_weights(checkpoints, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints[(1, 28)], broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    result = run_cli("export", str(broken), "-o", str(tmp_path / "b"))
    assert_one_line_error_export(result, "cannot load checkpoint")


def test_bundle_missing_a_file(bundle_copy, images):
    (bundle_copy / "decoder.onnx").unlink()
    result = run_cli("run", str(bundle_copy), "--image", str(images[0]), "--prompt", "caption en")
    assert_one_line_error(result, "missing 'decoder.onnx'")


def test_not_a_bundle(tmp_path, images):
    result = run_cli("run", str(tmp_path), "--image", str(images[0]), "--prompt", "caption en")
    assert_one_line_error(result, "not a bundle")


def test_checksum_mismatch(bundle_copy, images):
    path = bundle_copy / "embedding.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run_cli("run", str(bundle_copy), "--image", str(images[0]), "--prompt", "caption en")
    assert_one_line_error(result, "checksum mismatch", "embedding.npy")


def test_truncated_graph(bundle_copy, images):
    path = bundle_copy / "decoder.onnx"
    path.write_bytes(path.read_bytes()[:5000])
    result = run_cli("run", str(bundle_copy), "--image", str(images[0]), "--prompt", "caption en")
    assert_one_line_error(result, "checksum mismatch", "decoder.onnx")
    # Without the checksum check, ONNX Runtime's own refusal is reported just as cleanly.
    result = run_cli("run", str(bundle_copy), "--image", str(images[0]), "--prompt", "caption en", "--no-verify")
    assert_one_line_error(result, "ONNX Runtime cannot load the graph", "decoder.onnx")


def test_corrupt_manifest(bundle_copy, images):
    (bundle_copy / MANIFEST_NAME).write_text("{not json")
    result = run_cli("run", str(bundle_copy), "--image", str(images[0]), "--prompt", "caption en")
    assert_one_line_error(result, "unreadable manifest")


@pytest.mark.parametrize("kind", ["missing", "text", "directory", "truncated"])
def test_bad_image(kind, bundles, images, tmp_path):
    path = tmp_path / "picture.png"
    if kind == "text":
        path.write_text("hello, not an image")
    elif kind == "directory":
        path.mkdir()
    elif kind == "truncated":
        path.write_bytes(images[0].read_bytes()[:60])
    result = run_cli("run", str(bundles[(1, 28)]), "--image", str(path), "--prompt", "caption en")
    assert_one_line_error(result, str(path))


def test_prompt_longer_than_the_bundles_max_sequence(bundles, images):
    result = run_cli("run", str(bundles[(1, 28)]), "--image", str(images[0]), "--prompt", "word " * 80)
    assert_one_line_error(result, "max sequence is 64", "--max-seq-len")


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_max_new_tokens_below_one(value, bundles, images):
    result = run_cli("run", str(bundles[(1, 28)]), "--image", str(images[0]), "--prompt", "x",
                     "--max-new-tokens", value)
    assert_one_line_error(result, "--max-new-tokens")


def test_bad_sampling_options_and_backend(bundles, images):
    base = ["run", str(bundles[(1, 28)]), "--image", str(images[0]), "--prompt", "x"]
    assert_one_line_error(run_cli(*base, "--top-p", "0"), "top_p")
    assert_one_line_error(run_cli(*base, "--temperature", "-1"), "temperature")
    assert_one_line_error(run_cli(*base, "--backend", "vulkan"), "unknown backend 'vulkan'")
    assert_one_line_error(run_cli(*base, "--stream", "--json"), "--stream")
    assert_one_line_error(run_cli(*base, "--stream", "--prompt", "y"), "--stream")


def test_bad_prompt_and_seed(bundles, images):
    base = ["run", str(bundles[(1, 28)]), "--image", str(images[0])]
    assert_one_line_error(run_cli(*base, "--prompt", "caption <image> en"), "image token")
    assert_one_line_error(run_cli(*base, "--prompt", "x", "--seed", "-1"), "seed")


@pytest.mark.parametrize("field, value", [
    (("tokens", "eos"), 1), (("files",), []), (("decoder", "layer_types"), None),
    (("image", "resample"), 99), (("decoder", "num_layers"), "3"), (("image", "mean"), [0.5, 0.5]),
])
def test_mistyped_manifest_values(field, value, bundle_copy, images):
    data = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    target = data
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(data))
    result = run_cli("run", str(bundle_copy), "--image", str(images[0]), "--prompt", "caption en")
    assert_one_line_error(result, "manifest")


def test_usage_errors():
    assert_one_line_error(run_cli(), "required")
    assert_one_line_error(run_cli("run"), "required")
    assert_one_line_error(run_cli("frobnicate"), "invalid choice")


def blocked_cli(blocked: list[str], *args: str) -> subprocess.CompletedProcess:
    """The CLI with ``blocked`` modules unimportable (a partial install); the venv test in test_install
    runs the commands on a real base install."""
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); "
            "from paligemma_edge.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_a_module_of_an_extra_missing_under_a_command_is_one_line(checkpoints, tmp_path):
    # torch is installed but a part of it is not: the check before the command passes, the import fails later
    result = blocked_cli(["torch.export"], "export", str(checkpoints[(2, 28)]), "-o", str(tmp_path / "b"))
    assert_one_line_error(result, "export needs the 'export' extra (torch.export is missing)",
                          "pip install 'paligemma-edge[export]'")
    # the check before the command: what it imports from the extra, before any work
    result = blocked_cli(["onnx_ir"], "quantize", str(checkpoints[(2, 28)]), "--precision", "int4", "-o", "x")
    assert_one_line_error(result, "quantize needs the 'export' extra (onnx_ir is missing)")
    result = blocked_cli(["uvicorn", "cv2"], "serve", str(tmp_path))
    assert_one_line_error(result, "serve needs the 'apps' extra (uvicorn is missing)")


def test_a_missing_module_of_our_own_keeps_its_traceback(checkpoints, tmp_path):
    result = blocked_cli(["paligemma_edge.export.onnx_graphs"], "export", str(checkpoints[(2, 28)]),
                         "-o", str(tmp_path / "b"))
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert "ModuleNotFoundError: import of paligemma_edge.export.onnx_graphs halted" in result.stderr
    assert "extra" not in result.stderr


def test_only_modules_of_an_extra_are_explained():
    for name in ("paligemma_edge.runtime.no_such_module", "no_such_package_anywhere"):
        with pytest.raises(ModuleNotFoundError) as caught:
            importlib.import_module(name)
        assert explain("run", caught.value) is None
    with pytest.raises(ModuleNotFoundError) as caught:
        importlib.import_module("cv2.no_such_part")
    error = explain("camera", caught.value)
    assert isinstance(error, MissingExtraError) and error.exit_code == 2
    assert str(error).startswith("camera needs the 'apps' extra (cv2")
    assert "python3-opencv" in str(error)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_build_engines_refuses_a_bundle_quantized_for_onnxruntime(precision, quantized):
    target = quantized[(2, 28), precision]  # quantize's default target
    for flavour in ("tensorrt", "tensorrt-rtx"):  # before TensorRT is imported: the same where it is missing
        result = run_cli("build-engines", str(target), "--backend", flavour)
        assert_one_line_error(result, f"{target} was quantized for ONNX Runtime", "MatMulNBits",
                              f"quantize FP32_BUNDLE --precision {precision} --target tensorrt")
        assert "Plugin" not in result.stderr and "parsing" not in result.stderr
    assert read_manifest(target).engines == {} and not list(target.glob("*.engine"))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None,
                    reason="TensorRT for RTX not installed (make install adds tensorrt-rtx-cu13-libs/-bindings)")
def test_build_engines_takes_a_bundle_for_onnxruntime_without_its_ops(bundles, tmp_path):
    """The check is by op, not by target: Q/DQ weights with the float table parse."""
    target = tmp_path / "int8-qdq"
    run_cli("quantize", str(bundles[(2, 28)]), "--precision", "int8", "--int8-method", "weight-only",
            "--keep-embeddings", "-o", str(target), check=True)
    assert read_manifest(target).quantization["options"]["target"] == "onnxruntime"
    run_cli("build-engines", str(target), "--backend", "tensorrt-rtx", "--max-seq-len", "32", check=True)
    assert len(read_manifest(target).engines) == 1
