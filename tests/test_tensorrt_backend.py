"""The TensorRT runtime backends (tensorrt, tensorrt-rtx) and ONNX Runtime's GPU providers.

Running engines needs an NVIDIA GPU: those tests skip here and say so. What a CPU-only machine
can check is checked: the refusals a user meets without a GPU, without the packages, or with
engines built elsewhere; the buffer sizes; and that every TensorRT call the backend makes exists
in the installed TensorRT bindings.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import shutil

import numpy as np
import pytest

import paligemma_edge
from paligemma_edge.runtime.backends import tensorrt as trt_backend
from paligemma_edge.runtime.engines import gpu_description, profiles_for
from paligemma_edge.runtime.manifest import EngineSpec, read_manifest
from paligemma_edge.runtime.sampling import GenerationOptions

from .conftest import run_cli

PROMPTS = ["caption en", "answer en what is the quick brown fox doing on the table today", "ocr"]

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
FLAVOUR = next((name for name, module in (("tensorrt", "tensorrt"), ("tensorrt-rtx", "tensorrt_rtx_bindings"))
                if importlib.util.find_spec(module)), None)
HAS_GPU = gpu_description() != "no-gpu"
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT for RTX not installed (make install adds it)")
needs_gpu = pytest.mark.skipif(
    not (HAS_GPU and FLAVOUR and importlib.util.find_spec("cuda")),
    reason="running TensorRT engines needs an NVIDIA GPU, TensorRT (or TensorRT for RTX) and cuda-python",
)


@pytest.fixture()
def with_engines(bundles, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles[(2, 28)], bundle)
    run_cli("build-engines", str(bundle), "--backend", "tensorrt-rtx", "--max-seq-len", "48", check=True)
    return bundle


def test_max_shapes_cover_both_decoder_profiles(bundles):
    manifest = read_manifest(bundles[(2, 28)])
    record = EngineSpec("d.engine", "decoder", manifest.decoder_graph.inputs, manifest.decoder_graph.outputs,
                                    profiles_for(manifest.decoder_graph, "decoder", 2, 48))
    shapes = trt_backend.max_shapes(record)
    spec = manifest.decoder
    assert shapes["inputs_embeds"] == (2, 48, spec.hidden_size)  # prefill's sequence
    assert shapes["past_key_0"] == (2, spec.num_kv_heads, 47, spec.head_dim)  # decode's past
    assert shapes["attention_mask"] == (2, 1, 48, 48)


@needs_rtx
def test_engines_without_a_gpu_say_so(with_engines, images):
    result = run_cli("run", str(with_engines), "--backend", "tensorrt-rtx", "--image", str(images[0]), "--task", "caption")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    if importlib.util.find_spec("cuda") is None:
        assert "cuda-python is not installed" in message
    elif not HAS_GPU:
        assert "no CUDA GPU is usable here" in message


@needs_rtx
def test_engines_built_for_another_device_ask_for_a_rebuild(bundles, images):
    result = run_cli("run", str(bundles[(2, 28)]), "--backend", "tensorrt-rtx", "--image", str(images[0]), "--task", "caption")
    assert result.returncode != 0 and "run 'paligemma-edge build-engines BUNDLE' on this machine" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_missing_tensorrt_names_what_to_install(bundles, images):
    result = run_cli("run", str(bundles[(2, 28)]), "--backend", "tensorrt", "--image", str(images[0]), "--task", "caption")
    assert result.returncode == 2 and "tensorrt is not installed" in result.stderr and "JetPack" in result.stderr


@pytest.mark.parametrize("backend, provider", [("onnxruntime-cuda", "CUDAExecutionProvider"),
                                               ("onnxruntime-tensorrt", "TensorrtExecutionProvider")])
def test_onnxruntime_gpu_providers_missing_say_what_to_install(bundles, images, backend, provider):
    import onnxruntime

    if provider in onnxruntime.get_available_providers():
        pytest.skip(f"{provider} is available here")
    result = run_cli("run", str(bundles[(2, 28)]), "--backend", backend, "--image", str(images[0]), "--task", "caption")
    assert result.returncode == 2 and provider in result.stderr and "onnxruntime-gpu" in result.stderr


@needs_rtx
def test_every_tensorrt_call_exists_in_the_bindings():
    """Names the backend calls on TensorRT objects, checked against TensorRT for RTX's classes."""
    import tensorrt_rtx_bindings as trt

    tree = ast.parse(inspect.getsource(trt_backend))
    called = {node.func.attr for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    classes = (trt.Runtime, trt.ICudaEngine, trt.IExecutionContext)
    ours = {"get_tensor_name", "get_tensor_dtype", "deserialize_cuda_engine", "create_execution_context",
            "set_optimization_profile_async", "set_input_shape", "set_tensor_address", "execute_async_v3"}
    assert ours <= called
    for name in ours:
        assert any(hasattr(cls, name) for cls in classes), name
    assert hasattr(trt.ICudaEngine, "num_io_tensors") and hasattr(trt, "nptype")


@needs_gpu
@pytest.mark.parametrize("variant", ["fp32", "int8-trt", "int4-trt"])
def test_engines_generate_what_onnxruntime_generates(bundles, quantized, images, tmp_path, variant):
    source = bundles[(2, 28)] if variant == "fp32" else quantized[(2, 28), variant]
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    run_cli("build-engines", str(bundle), "--backend", FLAVOUR, "--max-batch", "3", check=True)
    options = GenerationOptions(max_new_tokens=12)
    with paligemma_edge.load(bundle) as model:
        reference = [r.token_ids for r in model.generate_batch([images[0]], PROMPTS, options)]
        pixels = model.encode_images([images[0]])
    with paligemma_edge.load(bundle, backend=FLAVOUR) as model:
        ours = [r.token_ids for r in model.generate_batch([images[0]], PROMPTS, options)]
        engine_pixels = model.encode_images([images[0]])
    assert np.abs(engine_pixels - pixels).max() <= (1e-3 if variant == "fp32" else 5e-2) * max(1.0, np.abs(pixels).max())
    if variant == "fp32":
        assert ours == reference
    else:
        agreement = np.mean([a == b for r, o in zip(reference, ours) for a, b in zip(r, o)])
        print(f"{variant}: token agreement with ONNX Runtime {agreement:.2f}")
        assert agreement >= 0.5
