"""TensorRT engines built on this CPU-only machine with TensorRT for RTX, from the tiny bundles.

Both KV caches (``export --kv-cache``): in place, a decoder engine with KV-cache update layers over
a fixed number of cache slots, and growing (the old graph). "...-io" variants are quantized for
TensorRT with ``--fp16-io`` (an in-place cache must be the network's input, not a Cast of it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys

import pytest

from paligemma_edge import BundleError, InputError
from paligemma_edge.runtime.bundle.writer import write_manifest
from paligemma_edge.runtime.engines.build import EngineOptions, check_kv_cache_support
from paligemma_edge.runtime.engines.common import select_engines
from paligemma_edge.runtime.bundle.manifest import EngineSet, EngineSpec, read_manifest

from .conftest import model_id, run_cli

needs_rtx = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx_bindings") is None,
    reason="TensorRT for RTX not installed (make install adds tensorrt-rtx-cu13-libs/-bindings)",
)


def _quantize_for_tensorrt(source, target, precision: str, *extra: str):
    run_cli("quantize", str(source), "--output", str(target), "--precision", precision, "--target", "tensorrt", *extra,
            check=True)
    return target


@pytest.fixture()
def bundle_copy(kv_bundle, tmp_path, request):
    """Variants: fp32 (in-place cache); growing (fp32); growing-int8-trt (Q/DQ for TensorRT, fp32 I/O);
    int8-trt, fp16-io, int4-trt-io (the in-place cache quantized for TensorRT; -io: fp16 inputs and outputs)."""
    model, variant = request.param[:2]
    target = tmp_path / "bundle"
    if variant in ("fp32", "growing"):
        shutil.copytree(kv_bundle(model, "inplace" if variant == "fp32" else "growing"), target)
    elif variant.startswith("growing-"):
        _quantize_for_tensorrt(kv_bundle(model, "growing"), target, variant.split("-")[1])
    else:
        _quantize_for_tensorrt(kv_bundle(model, "inplace"), target, variant.split("-")[0],
                               *(["--fp16-io"] * variant.endswith("-io")))
    return target


@needs_rtx
@pytest.mark.parametrize("bundle_copy", [((2, 28), "fp32", 2), ((2, 28), "fp16-io", 1), ((1, 28), "fp32", 1),
                                         ((2, 28), "int8-trt-io", 2), ((2, 28), "int4-trt-io", 1),
                                         ((1, 28), "int4-trt-io", 2), ((2, 28), "growing", 2), ((2, 28), "growing", 1),
                                         ((2, 28), "growing-int8-trt", 2), ((2, 28), "growing-int4-trt", 1)],
                         indirect=True, ids=lambda p: f"{model_id(p[0])}-{p[1]}-{p[2]}-profiles")
def test_engines_build_and_match_the_manifest(bundle_copy, tmp_path, request):
    profiles = request.node.callspec.params["bundle_copy"][2]
    cache = tmp_path / "timing.cache"
    result = run_cli("build-engines", str(bundle_copy), "--backend", "tensorrt-rtx", "--max-batch", "2",
                     "--max-seq-len", "32", "--timing-cache", str(cache), "--decoder-profiles", str(profiles),
                     check=True)
    layout = "prefill, decode profiles" if profiles == 2 else "prefill+decode profile"
    assert f"building the decoder engine ({layout})" in result.stderr
    manifest = read_manifest(bundle_copy)  # checksums of the new engines included
    (tag, record), = manifest.engines.items()
    assert record.flavour == "tensorrt-rtx" and tag.startswith("tensorrt-rtx-") and record.max_seq_len == 32
    in_place = manifest.decoder.cache_in_place
    assert record.kv_cache == manifest.decoder.kv_cache == ("inplace" if in_place else "growing")
    # an in-place engine's cache: fixed at the engines' max sequence, written by KV-cache update layers
    assert ("(32 cache slots)" in result.stderr) == in_place
    past_dims = [tuple(t.shape) for t in record.decoder.inputs if t.name.startswith("past_")]
    assert {dims[2] for dims in past_dims} == ({32} if in_place else {-1})
    assert ("write_indices" in {t.name for t in record.decoder.inputs}) == in_place
    for name, graph in (("vision", manifest.vision_graph), ("decoder", manifest.decoder_graph)):
        engine = getattr(record, name)
        assert (bundle_copy / engine.file).stat().st_size > 0 and engine.file in manifest.files
        assert [(t.name, t.dtype) for t in engine.inputs] == [(t.name, t.dtype) for t in graph.inputs]
        assert [(t.name, t.dtype) for t in engine.outputs] == [(t.name, t.dtype) for t in graph.outputs]
    assert list(record.decoder.profiles) == (["prefill", "decode"] if profiles == 2 else ["prefill+decode"])
    assert record.vision.profiles["vision"]["pixel_values"]["max"][0] == 2
    if in_place:  # every profile: all 32 slots; prefill and decode differ in batch and seq only
        for profile in record.decoder.profiles.values():
            assert {profile["past_key_0"][k][2] for k in ("min", "opt", "max")} == {32}
            assert profile["attention_mask"]["min"][3] == profile["attention_mask"]["max"][3] == 32
            assert profile["write_indices"]["min"] == [1] and profile["write_indices"]["max"] == [2]
    if profiles == 2:
        prefill, decode = record.decoder.profiles["prefill"], record.decoder.profiles["decode"]
        assert prefill["past_key_0"]["max"][2] == (32 if in_place else 0) and prefill["inputs_embeds"]["max"][:2] == [2, 32]
        assert decode["inputs_embeds"]["max"][1] == 1 and decode["past_key_0"]["max"][2] == (32 if in_place else 31)
    else:
        (both,) = record.decoder.profiles.values()
        assert both["past_key_0"]["min"][2] == (32 if in_place else 0)
        assert both["past_key_0"]["max"][2] == (32 if in_place else 31)
        assert both["inputs_embeds"]["max"][:2] == [2, 32] and both["inputs_embeds"]["opt"][1] == 1
        assert both["attention_mask"]["min"] == [1, 1, 1, 32 if in_place else 1]
        assert both["attention_mask"]["max"] == [2, 1, 32, 32]
    assert cache.stat().st_size > 0
    assert select_engines(manifest, tag) == record
    summary = run_cli("inspect", str(bundle_copy), check=True).stdout
    assert f"decoder_profiles {profiles} ({' / '.join(record.decoder.profiles)})" in summary


@needs_rtx
@pytest.mark.parametrize("bundle_copy", [((2, 28), "int8-trt")], indirect=True, ids=["pg2-28px-int8-trt-fp32-io"])
def test_an_in_place_cache_behind_a_cast_is_refused_in_one_line(bundle_copy):
    """An in-place decoder quantized with float32 I/O casts its past before TensorScatter: TensorRT refuses
    the KV-cache update on a tensor that is not a network input, and the user reads the way out."""
    result = run_cli("build-engines", str(bundle_copy), "--backend", "tensorrt-rtx", "--max-seq-len", "32")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "in-place KV cache" in last and "--fp16-io" in last and "--kv-cache growing" in last
    assert read_manifest(bundle_copy).engines == {}


def test_a_tensorrt_without_the_kv_cache_update_asks_for_a_growing_export(kv_bundle):
    in_place, growing = (read_manifest(kv_bundle((2, 28), kind)) for kind in ("inplace", "growing"))
    for flavour, old, new in (("tensorrt", "10.3.0.30", "10.15.1.29"), ("tensorrt-rtx", "1.6.0", "1.7.1.116")):
        with pytest.raises(BundleError, match=f"which {flavour} {old} cannot build .* --kv-cache growing"):
            check_kv_cache_support(in_place, flavour, old)
        check_kv_cache_support(in_place, flavour, new)
        check_kv_cache_support(growing, flavour, old)  # the growing graph builds on any TensorRT 10


def test_decoder_profiles_default_by_flavour_and_are_checked():
    assert EngineOptions("tensorrt").decoder_profiles == 2 and EngineOptions("tensorrt-rtx").decoder_profiles == 1
    with pytest.raises(InputError, match="--decoder-profiles must be 1 or 2"):
        EngineOptions("tensorrt", decoder_profiles=3)


@needs_rtx
@pytest.mark.parametrize("bundle_copy", [((2, 28), "fp32")], indirect=True, ids=["custom-op"])
def test_parser_errors_stop_the_build_with_the_parsers_words(bundle_copy):
    # A node TensorRT's parser has no importer or plugin for, in a graph the manifest does not flag
    # (bundles quantized for ONNX Runtime are refused before TensorRT is imported: test_cli_errors).
    import onnx

    graph = onnx.load(bundle_copy / "vision.onnx")
    node = next(n for n in graph.graph.node if n.op_type == "MatMul")
    node.op_type, node.domain = "NoSuchOp", "com.example"
    graph.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(graph, bundle_copy / "vision.onnx")
    write_manifest(bundle_copy, read_manifest(bundle_copy))  # the checksums of the edited graph
    result = run_cli("build-engines", str(bundle_copy), "--backend", "tensorrt-rtx")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "TensorRT cannot parse" in last and "Traceback" not in result.stderr
    assert read_manifest(bundle_copy).engines == {} and not list(bundle_copy.glob("*.engine"))


def test_engines_for_another_device_are_refused(bundles):
    manifest = read_manifest(bundles[(1, 28)])
    with pytest.raises(BundleError, match="build-engines"):
        select_engines(manifest, "tensorrt-10.3.0-orin-sm87")
    spec = EngineSpec(file="vision.engine", graph="vision.onnx", inputs=(), outputs=(), profiles={})
    built_elsewhere = EngineSet(flavour="tensorrt", tensorrt_version="10.13", device="tensorrt-10.13-h100-sm90",
                                max_batch=1, max_seq_len=64, vision=spec, decoder=spec, build_seconds=1.0)
    other = dataclasses.replace(manifest, engines={"tensorrt-10.13-h100-sm90": built_elsewhere})
    with pytest.raises(BundleError, match="built: tensorrt-10.13-h100-sm90"):
        select_engines(other, "tensorrt-10.3.0-orin-sm87")


def test_missing_tensorrt_says_what_to_install(bundles):
    blocker = ("import sys; sys.modules['tensorrt'] = None; "
               "from paligemma_edge.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", blocker, "build-engines", str(bundles[(1, 28)])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "tensorrt is not installed" in result.stderr and "Traceback" not in result.stderr
