"""The TensorRT runtime backends (tensorrt, tensorrt-rtx) and ONNX Runtime's GPU providers.

Running engines needs an NVIDIA GPU: those tests skip here and say so. What a CPU-only machine
can check is checked: the refusals a user meets without a GPU, without the packages, or with
engines built elsewhere; the buffer sizes; that every TensorRT call the backend makes exists in
the installed TensorRT bindings; and the backend's whole generation loop on engines built for
real by TensorRT for RTX, with TensorRT's execution and CUDA memory played on the CPU
(tests/tensorrt_emulation.py): which buffer each tensor is bound to, the shapes declared per
profile, the KV-cache banks, what crosses between host and device, and the tokens that result.
``kv_bundle`` gives the tiny checkpoints with either KV cache (``export --kv-cache``): in place (one
buffer, TensorRT's KV-cache update layer) or growing (the old graph).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import paligemma_edge
from paligemma_edge import cli
from paligemma_edge.runtime.backends import tensorrt as trt_backend
from paligemma_edge.runtime.backends.base import create_backend
from paligemma_edge.runtime.backends.cuda import CudaError
from paligemma_edge.runtime.engines.build import profiles_for
from paligemma_edge.runtime.engines.common import gpu_description
from paligemma_edge.runtime.bundle.manifest import EngineSpec, past_names, present_names, read_manifest
from paligemma_edge.runtime.bundle.writer import write_manifest
from paligemma_edge.runtime.generation.sampling import GenerationOptions

from .conftest import model_id, run_cli
from .tensorrt_emulation import EmulatedTensorRT, EmulationError, Faults, kv_cache_updates

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


@pytest.mark.parametrize("kind", ["inplace", "growing"])
@pytest.mark.parametrize("profiles", [1, 2])
def test_max_shapes_cover_prefill_and_decode(kv_bundle, profiles, kind):
    manifest = read_manifest(kv_bundle((2, 28), kind))
    record = EngineSpec("d.engine", "decoder", manifest.decoder_graph.inputs, manifest.decoder_graph.outputs,
                        profiles_for(manifest.decoder_graph, "decoder", 2, 48, profiles))
    shapes = trt_backend.max_shapes(record)
    spec = manifest.decoder
    assert shapes["inputs_embeds"] == (2, 48, spec.hidden_size)  # prefill's sequence
    # decode's past (growing), or every slot of the in-place buffer
    assert shapes["past_key_0"] == (2, spec.num_kv_heads, 48 if kind == "inplace" else 47, spec.head_dim)
    assert shapes["attention_mask"] == (2, 1, 48, 48)
    assert ("write_indices" in shapes) == (kind == "inplace")


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


def _as_tensorrt_engines(bundle: Path) -> None:
    """Record the bundle's TensorRT for RTX engines as TensorRT's too, so the emulation can play TensorRT
    (the flavour whose backend captures the decode step itself) with them."""
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    for tag, record in list(data["engines"].items()):
        tag = tag.replace("tensorrt-rtx-", "tensorrt-", 1)
        data["engines"][tag] = record | {"flavour": "tensorrt", "device": tag}
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture()
def emulated(tmp_path, monkeypatch, request):
    """A bundle with real TensorRT for RTX engines (max batch 3, max sequence 48), run by the emulation
    as the backend of ``flavour`` (default tensorrt-rtx; tensorrt: the same engines, recorded for it).
    Variants: fp32 (in-place cache), growing (fp32), int4-trt-io, segment."""
    import tensorrt_rtx_bindings

    model, variant, profiles, *flavour = request.param
    bundle = tmp_path / "bundle"
    kv_bundle = request.getfixturevalue("kv_bundle")
    if variant == "segment":  # the fp32 bundle with a mask decoder (export's default cache)
        source = request.getfixturevalue("segment_bundle")
    elif variant in ("fp32", "growing"):  # fp32, the in-place or the growing KV cache
        source = kv_bundle(model, "inplace" if variant == "fp32" else "growing")
    else:  # int4-trt-io: for TensorRT with the in-place cache in fp16 (TensorRT's KV-cache update takes no Cast)
        source = tmp_path / "source"
        run_cli("quantize", str(kv_bundle(model, "inplace")), "--output", str(source), "--precision",
                variant.split("-")[0], "--target", "tensorrt", "--fp16-io", check=True)
    shutil.copytree(source, bundle)
    run_cli("build-engines", str(bundle), "--backend", "tensorrt-rtx", "--max-batch", "3", "--max-seq-len", "48",
            "--decoder-profiles", str(profiles), check=True)
    if flavour == ["tensorrt"]:
        _as_tensorrt_engines(bundle)
    emulation = EmulatedTensorRT(bundle, tensorrt_rtx_bindings.__version__)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda flavour: emulation)
    monkeypatch.setattr(trt_backend, "Cuda", emulation.Cuda)
    return bundle, emulation


def _touched_allocations(device, transfers) -> set[int]:
    return {device.allocation(address) for address, _ in transfers}


def _flavour(param: tuple) -> str:
    return param[3] if len(param) > 3 else "tensorrt-rtx"


@needs_rtx
@pytest.mark.parametrize("emulated", [((2, 28), "fp32", 2, "tensorrt"), ((1, 28), "fp32", 1), ((1, 28), "fp32", 2),
                                      ((2, 28), "int4-trt-io", 1, "tensorrt"), ((2, 28), "growing", 2),
                                      ((1, 28), "growing", 1)],
                         indirect=True, ids=lambda p: f"{model_id(p[0])}-{p[1]}-{p[2]}-profiles-{_flavour(p)}")
def test_backend_loop_on_emulated_engines_matches_onnxruntime(emulated, images, request):
    """A left-padded batch of three prompts (Gemma 2's longer than its sliding window of 8), both families,
    both cache kinds, generating past the engines' 48 positions; as TensorRT (which captures an in-place
    decode step itself) and TensorRT for RTX (whose decode context does)."""
    bundle, emulation = emulated
    flavour = _flavour(request.node.callspec.params["emulated"])
    options = GenerationOptions(max_new_tokens=64)  # past the engines' 48 positions
    pictures = [*images, Image.open(images[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]  # 4 different ones
    with paligemma_edge.load(bundle) as model:
        reference = model.generate_batch([images[0]], PROMPTS, options)
        pixels = model.encode_images(pictures)
    with paligemma_edge.load(bundle, backend=flavour) as model:
        device, engines, manifest = emulation.device, model.backend, model.manifest
        assert device is not None  # the backend made its CUDA memory
        assert isinstance(engines, trt_backend.TensorRTBackend)
        spec = manifest.decoder  # the banks: every past at [max batch, kv heads, max sequence, head dim]
        in_place = spec.cache_in_place
        assert in_place == (manifest.engines[next(iter(manifest.engines))].kv_cache == "inplace")
        kv_bytes = 3 * spec.num_kv_heads * 48 * spec.head_dim * engines.decoder.dtypes["past_key_0"].itemsize
        banks = {address for address, nbytes in device.allocations().items() if nbytes == kv_bytes}
        assert len(banks) == (1 if in_place else 2) * 2 * spec.num_layers  # one bank in place, two growing
        allocations = device.mallocs
        device.uploads.clear()
        device.downloads.clear()
        device.zeroed.clear()
        ours = model.generate_batch([images[0]], PROMPTS, options)
        assert device.mallocs == allocations  # every buffer was allocated at load
        assert not banks & _touched_allocations(device, device.uploads + device.downloads)  # the cache stays put
        rows_bytes = len(PROMPTS) * kv_bytes // 3  # the generation's rows of each bank, zeroed once at its start
        assert sorted(device.zeroed) == (sorted((bank, rows_bytes) for bank in banks) if in_place else [])
        image_bytes = (manifest.image.num_tokens * manifest.decoder.hidden_size
                       * engines.vision.dtypes["image_embeds"].itemsize)
        logits_bytes = len(PROMPTS) * manifest.embedding.shape[0] * engines.decoder.dtypes["logits"].itemsize
        steps = max(len(g.token_ids) + (g.finish_reason == "eos") for g in ours)  # one decoder run per step
        assert [n for _, n in device.downloads] == [image_bytes] + [logits_bytes] * steps  # nothing else comes back
        # TensorRT, in place: the first decode step runs, then is captured once; every later one is a launch
        captures = in_place and flavour == "tensorrt"
        assert (len(device.graphs), device.launches) == ((1, steps - 2) if captures else (0, 0))
        strategies = {profile: context.graph_strategy for profile, context in engines.decoder.contexts.items()}
        decode_profile = "decode" if "decode" in strategies else next(iter(strategies))
        if not in_place:
            assert engines.decode_graphs.startswith("off")
        elif flavour == "tensorrt":
            assert engines.decode_graphs == trt_backend.GRAPHS_CAPTURED
        else:  # TensorRT for RTX runs the decode steps' context as a graph of its own
            assert engines.decode_graphs == trt_backend.GRAPHS_BUILT_IN
        built_in = in_place and flavour == "tensorrt-rtx"
        assert strategies == {profile: "WHOLE_GRAPH_CAPTURE" if built_in and profile == decode_profile else "DISABLED"
                              for profile in strategies}
        model.feature_cache.clear()
        device.downloads.clear()
        assert np.array_equal(model.encode_images(pictures), pixels)
        assert [n for _, n in device.downloads] == [3 * image_bytes, image_bytes]  # max batch 3
    for mine, theirs in zip(ours, reference):
        assert mine.token_ids == theirs.token_ids[:len(mine.token_ids)]
        assert mine.finish_reason == theirs.finish_reason or mine.finish_reason == "max_seq_len"
    assert any(g.finish_reason == "max_seq_len" for g in ours)  # generation stopped at the engines' limit


@needs_rtx
@pytest.mark.parametrize("emulated", [((1, 28), "segment", 2)], indirect=True, ids=["pg1-28px-segment-2-profiles"])
def test_cli_tasks_on_emulated_engines_print_what_onnxruntime_prints(emulated, images, capsys):
    bundle, _ = emulated
    tasks = [["--task", "caption"], ["--task", "detect", "--objects", "circle ; square"],
             ["--task", "segment", "--objects", "triangle"], ["--prompt", "ocr", "--prompt", "answer en what is it"]]
    for task in tasks:
        printed = []
        for backend in ("onnxruntime", "tensorrt-rtx"):
            assert cli.main(["run", str(bundle), "--backend", backend, "--image", str(images[1]), *task, "--json",
                             "--max-new-tokens", "20"]) == 0
            results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
            printed.append([{k: v for k, v in result.items() if k != "timings"} for result in results])
        assert printed[0] == printed[1] and len(printed[0]) == (2 if "--prompt" in task else 1)


def _step_inputs(manifest, past: int, seq: int, width: int,
                 rng) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Random embeddings, positions and masks for ``seq`` new positions after ``past``: every written slot
    visible, the rest of ``width`` slots (an in-place cache's unwritten ones) masked."""
    visible = np.arange(width) < past + seq
    masks = {t.name: np.broadcast_to(visible, (1, 1, seq, width)).copy()
             for t in manifest.decoder_graph.inputs if "mask" in t.name}
    embeds = rng.standard_normal((1, seq, manifest.decoder.hidden_size)).astype(np.float32)
    return embeds, masks, np.arange(past, past + seq)[None]


@needs_rtx
@pytest.mark.parametrize("emulated", [((2, 28), "fp32", 2), ((1, 28), "fp32", 1), ((2, 28), "growing", 2)],
                         indirect=True, ids=lambda p: f"{model_id(p[0])}-{p[1]}-{p[2]}-profiles")
def test_emulated_steps_reach_each_profiles_max_and_stop_past_it(emulated):
    bundle, _ = emulated
    rng = np.random.default_rng(3)
    with paligemma_edge.load(bundle) as reference, paligemma_edge.load(bundle, backend="tensorrt-rtx") as model:
        manifest = model.manifest
        in_place = manifest.decoder.cache_in_place
        # a full-length prompt (prefill's max), then the last position after a prompt of 47 (decode's max past)
        for steps in ([(0, 48)], [(0, 47), (47, 1)]):
            caches = reference.backend.new_cache(1, 48), model.backend.new_cache(1, 48)
            for past, seq in steps:
                inputs = _step_inputs(manifest, past, seq, 48 if in_place else past + seq, rng)
                expected = reference.backend.step(*inputs, caches[0])
                np.testing.assert_allclose(model.backend.step(*inputs, caches[1]), expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(paligemma_edge.InputError, match="49 positions exceed the engines' max sequence 48"):
            model.backend.step(*_step_inputs(manifest, 48, 1, 49, rng), caches[1])
        with pytest.raises(paligemma_edge.InputError, match="a cache of 49 positions exceeds the engines' max sequence"):
            model.backend.new_cache(1, 49)


@needs_rtx
@pytest.mark.parametrize("emulated", [((2, 28), "fp32", 2)], indirect=True, ids=["pg2-28px-fp32-2-profiles"])
def test_emulated_engines_batches_up_to_the_build(emulated, images):
    bundle, _ = emulated
    options = GenerationOptions(max_new_tokens=4)
    with paligemma_edge.load(bundle) as model:
        reference = [g.token_ids for g in model.generate_batch([images[1]], PROMPTS[:2], options)]
    with paligemma_edge.load(bundle, backend="tensorrt-rtx") as model:
        with pytest.raises(paligemma_edge.InputError, match="a batch of 4 exceeds the engines' max batch 3"):
            model.generate_batch([images[0]], PROMPTS + ["caption en"], options)
        assert [g.token_ids for g in model.generate_batch([images[1]], PROMPTS[:2], options)] == reference


@needs_rtx
@pytest.mark.parametrize("emulated", [((2, 28), "fp32", 2), ((2, 28), "growing", 2)], indirect=True,
                         ids=["pg2-28px-inplace-2-profiles", "pg2-28px-growing-2-profiles"])
def test_the_emulation_catches_what_a_gpu_would_not_report(emulated, images):
    """KV buffers that share memory (present written over another past) and a decode run in the prefill context."""
    bundle, emulation = emulated
    emulation.faults.reused_sizes = True  # every past and present of a shape in one block
    with paligemma_edge.load(bundle, backend="tensorrt-rtx") as model:
        with pytest.raises(EmulationError, match=r"output present_\w+ overlaps (input past|output present)_"):
            model.generate_batch([images[0]], PROMPTS[:1], GenerationOptions(max_new_tokens=3))
    emulation.faults = Faults(profiles_ignored=True)  # the decode context stays on the prefill profile
    with paligemma_edge.load(bundle, backend="tensorrt-rtx") as model:
        if model.manifest.decoder.cache_in_place:  # one token over all slots lies inside prefill's ranges too
            model.generate_batch([images[0]], PROMPTS[:1], GenerationOptions(max_new_tokens=3))
        else:  # a past longer than prefill's empty one does not
            with pytest.raises(paligemma_edge.BundleError, match="does not take past_key_0 of shape .* outside profile 0"):
                model.generate_batch([images[0]], PROMPTS[:1], GenerationOptions(max_new_tokens=3))


def test_only_a_kv_cache_update_may_write_its_own_past(kv_bundle):
    """The emulation's in-place rule: the outputs allowed to lie on an input are the presents an in-place
    decoder's TensorScatter writes into their own past, and none of a growing decoder's (its Concat makes a
    new, longer tensor). Any other overlap fails (test_the_emulation_catches_what_a_gpu_would_not_report)."""
    in_place = kv_bundle((2, 28), "inplace")
    manifest = read_manifest(in_place)
    routes = {present: past for layer in range(manifest.decoder.num_layers)
              for past, present in zip(past_names(layer), present_names(layer))}
    assert kv_cache_updates(in_place / manifest.decoder_graph.file) == routes
    growing = kv_bundle((2, 28), "growing")
    assert kv_cache_updates(growing / read_manifest(growing).decoder_graph.file) == {}


@needs_rtx
@pytest.mark.parametrize("emulated", [((2, 28), "fp32", 2)], indirect=True, ids=["pg2-28px-inplace-2-profiles"])
def test_an_in_place_cache_starts_zeroed(emulated):
    """Device memory that holds NaNs until written: the unwritten slots of an in-place cache are masked,
    and masked slots still multiply their values by a zero weight, so a bank left as cudaMalloc handed it
    out makes every logit NaN. The backend zeroes each generation's banks; skipping that shows."""
    bundle, emulation = emulated
    emulation.faults.dirty_memory = True
    rng = np.random.default_rng(5)
    with paligemma_edge.load(bundle) as reference:
        inputs = _step_inputs(reference.manifest, 0, 6, 48, rng)
        expected = reference.backend.step(*inputs, reference.backend.new_cache(1, 48))
    with paligemma_edge.load(bundle, backend="tensorrt-rtx") as model:
        np.testing.assert_allclose(model.backend.step(*inputs, model.backend.new_cache(1, 48)), expected,
                                   rtol=1e-5, atol=1e-5)
    with paligemma_edge.load(bundle, backend="tensorrt-rtx") as model:
        assert isinstance(model.backend, trt_backend.TensorRTBackend)
        model.backend.cuda.zero = lambda pointer, nbytes: None  # type: ignore[method-assign]  # planted: banks keep what cudaMalloc gave
        assert np.isnan(model.backend.step(*inputs, model.backend.new_cache(1, 48))).all()


@needs_rtx
@pytest.mark.parametrize("emulated", [((2, 28), "fp32", 2, "tensorrt"), ((1, 28), "fp32", 1, "tensorrt")],
                         indirect=True, ids=lambda p: f"{model_id(p[0])}-inplace-{p[2]}-profiles")
def test_decode_graphs_per_batch_size_replay_what_they_captured(emulated, images, monkeypatch):
    """Generations of 1, 3, then 1 rows: one graph per batch size, captured at its first decode step and
    launched for every later one, also in a later generation (after a prefill of other shapes ran in the
    same context with one profile). A launch runs with the addresses and shapes set when it was captured,
    so the tokens equal ONNX Runtime's only if every step writes its inputs where the capture reads them.
    The graphs are destroyed with the backend. Graphs off (PALIGEMMA_EDGE_CUDA_GRAPHS=off) give the same
    tokens with no graph, on TensorRT and on TensorRT for RTX (no graph strategy on its contexts)."""
    bundle, emulation = emulated
    options = GenerationOptions(max_new_tokens=10)
    batches = [PROMPTS[1:2], PROMPTS, PROMPTS[:1]]
    with paligemma_edge.load(bundle) as model:
        reference = [[g.token_ids for g in model.generate_batch([images[0]], prompts, options)] for prompts in batches]
    with paligemma_edge.load(bundle, backend="tensorrt") as model:
        device = emulation.device
        assert device is not None
        ours, launches = [], []
        for prompts in batches:
            before = device.launches
            ours.append([g.token_ids for g in model.generate_batch([images[0]], prompts, options)])
            launches.append(device.launches - before)
        assert len(device.graphs) == 2 and all(len(graph) == 1 for graph in device.graphs)
        assert device.graphs_destroyed == 0
    assert device.graphs_destroyed == 2 and device.closed
    assert ours == reference
    steps = [max(len(ids) for ids in batch) for batch in ours]  # decode steps: every token after the first
    assert launches == [steps[0] - 2, steps[1] - 2, steps[2] - 1]  # the third reuses the first's graph
    monkeypatch.setenv(trt_backend.CUDA_GRAPHS_ENV, "off")
    for flavour in ("tensorrt", "tensorrt-rtx"):
        with paligemma_edge.load(bundle, backend=flavour) as model:
            assert isinstance(model.backend, trt_backend.TensorRTBackend)
            assert model.backend.decode_graphs == f"off ({trt_backend.CUDA_GRAPHS_ENV}=off)"
            assert {c.graph_strategy for c in model.backend.decoder.contexts.values()} == {"DISABLED"}
            assert [[g.token_ids for g in model.generate_batch([images[0]], p, options)] for p in batches] == reference
            assert emulation.device is not None and not emulation.device.graphs and emulation.device.launches == 0


@needs_rtx
@pytest.mark.parametrize("emulated", [((2, 28), "fp32", 2, "tensorrt")], indirect=True,
                         ids=["pg2-28px-inplace-2-profiles"])
@pytest.mark.parametrize("fault, why", [
    ("capture_fails", "the capture failed: cudaStreamBeginCapture failed: cudaErrorStreamCaptureUnsupported"),
    ("not_capturable", "TensorRT says this engine's decode step cannot be captured on its stream"),
])
def test_a_decode_step_that_cannot_be_captured_warns_once_and_runs_uncaptured(emulated, images, fault, why):
    bundle, emulation = emulated
    setattr(emulation.faults, fault, True)
    options = GenerationOptions(max_new_tokens=8)
    with paligemma_edge.load(bundle) as model:
        reference = [g.token_ids for g in model.generate_batch([images[0]], PROMPTS, options)]
    with paligemma_edge.load(bundle, backend="tensorrt") as model:
        with pytest.warns(RuntimeWarning, match="without a CUDA graph: ") as caught:
            ours = [[g.token_ids for g in model.generate_batch([images[0]], PROMPTS, options)] for _ in range(2)]
        assert len(caught) == 1 and isinstance(model.backend, trt_backend.TensorRTBackend)
        assert str(caught[0].message).endswith(why)
        assert model.backend.decode_graphs == f"off ({why})"
        assert emulation.device is not None and not emulation.device.graphs
    assert ours == [reference, reference]


@needs_rtx
@pytest.mark.parametrize("emulated", [((2, 28), "fp32", 2)], indirect=True, ids=["pg2-28px-inplace-2-profiles"])
def test_engines_for_the_other_cache_kind_are_refused(emulated):
    bundle, _ = emulated
    manifest = read_manifest(bundle)
    (tag, record), = manifest.engines.items()
    write_manifest(bundle, dataclasses.replace(manifest, engines={tag: dataclasses.replace(record, kv_cache="growing")}))
    with pytest.raises(paligemma_edge.BundleError, match="built for a growing KV cache .* inplace one: run "
                                                         "'paligemma-edge build-engines' again"):
        paligemma_edge.load(bundle, backend="tensorrt-rtx")


@needs_rtx
@pytest.mark.parametrize("emulated", [((2, 28), "fp32", 2)], indirect=True, ids=["pg2-28px-fp32-2-profiles"])
def test_a_load_that_fails_half_way_frees_the_device(emulated):
    """A decoder engine TensorRT cannot read (after the vision engine loaded), then device memory that runs
    out half-way through the buffers: each time every buffer is freed and the stream destroyed before the
    error propagates. A backend that loads frees the same on leaving its with block, once."""
    bundle, emulation = emulated
    manifest = read_manifest(bundle)
    decoder_engine = bundle / next(iter(manifest.engines.values())).decoder.file
    engine_bytes = decoder_engine.read_bytes()
    decoder_engine.write_bytes(b"not an engine")
    with pytest.raises(paligemma_edge.BundleError, match="TensorRT cannot load the engine"):
        create_backend("tensorrt-rtx", bundle, manifest)
    failed = emulation.device
    assert failed is not None and failed.mallocs == 0 and failed.closed

    decoder_engine.write_bytes(engine_bytes)
    with create_backend("tensorrt-rtx", bundle, manifest) as backend:
        loaded = emulation.device
        assert loaded is not None and loaded.allocations() and not loaded.closed
        buffers = loaded.mallocs
    assert loaded.closed and not loaded.allocations()
    backend.close()  # a second close is harmless

    emulation.faults.mallocs_before_oom = buffers // 2
    with pytest.raises(CudaError, match="cudaErrorMemoryAllocation"):
        create_backend("tensorrt-rtx", bundle, manifest)
    short = emulation.device
    assert short is not None and short.mallocs == buffers // 2 > 0
    assert short.closed and not short.allocations()


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
            "set_optimization_profile_async", "set_input_shape", "set_tensor_address", "execute_async_v3",
            "create_runtime_config"}
    assert ours <= called
    for name in ours:
        assert any(hasattr(cls, name) for cls in classes), name
    assert hasattr(trt.ICudaEngine, "num_io_tensors") and hasattr(trt, "nptype")
    # the decode context's graph: TensorRT for RTX's strategy, and the capturability the backend asks first
    assert "runtime_config: tensorrt_rtx_bindings.tensorrt_rtx.IRuntimeConfig" in trt.ICudaEngine.create_execution_context.__doc__
    assert hasattr(trt.IRuntimeConfig, "cuda_graph_strategy") and hasattr(trt.CudaGraphStrategy, "WHOLE_GRAPH_CAPTURE")
    assert hasattr(trt.IExecutionContext, "is_stream_capturable")


def test_every_cuda_call_exists_in_cuda_python_with_its_arity():
    """Each CUDA runtime function runtime/backends/cuda.py calls (``self.rt.name(...)``), checked against the
    installed cuda-python: it exists and takes that many arguments; and the enums it reads exist."""
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python not installed (the gpu extra)")
    from paligemma_edge.runtime.backends import cuda as cuda_module

    tree = ast.parse(inspect.getsource(cuda_module))
    calls: dict[str, set[int]] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "rt"):
            calls.setdefault(node.func.attr, set()).add(len(node.args))
    assert {"cudaStreamBeginCapture", "cudaStreamEndCapture", "cudaGraphInstantiate", "cudaGraphLaunch",
            "cudaGraphExecDestroy", "cudaMalloc", "cudaMemcpyAsync"} <= set(calls)
    for name, arities in calls.items():
        parameters = inspect.signature(getattr(runtime, name)).parameters
        assert arities == {len(parameters)}, (name, arities, list(parameters))
    assert runtime.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal is not None
    assert runtime.cudaMemcpyKind.cudaMemcpyHostToDevice is not None


@needs_gpu
@pytest.mark.parametrize("variant, profiles", [("fp32", 2), ("fp32", 1), ("int8-trt-io", 2), ("int4-trt-io", 1),
                                               ("growing", 2)])
def test_engines_generate_what_onnxruntime_generates(kv_bundle, images, tmp_path, variant, profiles):
    """On the GPU: the in-place cache (fp32; int8 and int4 for TensorRT with fp16 I/O) and the growing one."""
    assert FLAVOUR is not None  # needs_gpu skips without one
    sources = {"fp32": kv_bundle((2, 28), "inplace"), "growing": kv_bundle((2, 28), "growing")}
    source = sources.get(variant, tmp_path / "source")
    if variant not in sources:
        run_cli("quantize", str(sources["fp32"]), "--output", str(source), "--precision", variant.split("-")[0],
                "--target", "tensorrt", "--fp16-io", check=True)
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    run_cli("build-engines", str(bundle), "--backend", FLAVOUR, "--max-batch", "3", "--decoder-profiles", str(profiles),
            check=True)
    options = GenerationOptions(max_new_tokens=12)
    with paligemma_edge.load(bundle) as model:
        reference = [r.token_ids for r in model.generate_batch([images[0]], PROMPTS, options)]
        reference_one = [r.token_ids for r in model.generate_batch([images[0]], PROMPTS[:1], options)]
        pixels = model.encode_images([images[0]])
    with paligemma_edge.load(bundle, backend=FLAVOUR) as model:
        ours = [r.token_ids for r in model.generate_batch([images[0]], PROMPTS, options)]
        # then one row, then the three again: a graph per batch size, the first one replayed after the other
        again = [[r.token_ids for r in model.generate_batch([images[0]], prompts, options)]
                 for prompts in (PROMPTS[:1], PROMPTS)]
        engine_pixels = model.encode_images([images[0]])
        assert isinstance(model.backend, trt_backend.TensorRTBackend)
        graphs = model.backend.decode_graphs
    in_place = read_manifest(bundle).decoder.cache_in_place
    print(f"{variant}: decode steps' CUDA graphs {graphs}")
    assert graphs == ((trt_backend.GRAPHS_CAPTURED if FLAVOUR == "tensorrt" else trt_backend.GRAPHS_BUILT_IN)
                      if in_place else "off (a growing cache changes shape every step)")
    assert again[1] == ours  # the three rows' graph, replayed after the one row's
    assert np.abs(engine_pixels - pixels).max() <= (1e-3 if variant in sources else 5e-2) * max(1.0, np.abs(pixels).max())
    if variant in sources:
        assert ours == reference and again[0] == reference_one
    else:
        agreement = np.mean([a == b for r, o in zip(reference, ours) for a, b in zip(r, o)])
        print(f"{variant}: token agreement with ONNX Runtime {agreement:.2f}")
        assert agreement >= 0.5
