"""Chunked attention (export/attention.py): exact against the plain computation, and really applied.

Tiny random models with a small query chunk, so that a prompt spans several chunks: the exported
graphs (ONNX Runtime) must give the logits of the module with one chunk (the plain computation) on a
left-padded prefill and on a decode step, and the graph must hold one Softmax per chunk and layer.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from paligemma_edge.export.attention import (MIN_QUERY_CHUNK, QUERY_CHUNK, SCORES_PER_CHUNK, chunk_bounds,
                                              default_query_chunk)
from paligemma_edge.export.checkpoint import decoder_spec
from paligemma_edge.export.graphs import DecoderStep, VisionEncoder
from paligemma_edge.export.onnx_graphs import decoder_io, export_decoder, export_graph, vision_io
from paligemma_edge.fixtures.tiny import TinySpec, build_model
from paligemma_edge.runtime.bundle.manifest import GROWING, INPLACE, ImageSpec

from .conftest import run_cli

CHUNK = 4
MAX_SEQ_LEN = 18  # 5 chunks of 4 (the last one open-ended)
PROMPT = 13  # spans 4 chunks
PADS = (0, 3)  # left padding per batch row


@pytest.fixture(scope="module", params=[1, 2], ids=["gemma", "gemma2"])
def model(request):
    torch.manual_seed(0)
    model, _ = build_model(TinySpec(family=request.param, image_size=56))  # 16 image tokens
    return model.eval()


def _spec(model):
    return decoder_spec(model, MAX_SEQ_LEN, kv_cache=GROWING)


def _masks(spec, seq: int, past: int, pads=PADS) -> list[torch.Tensor]:
    """Causal masks over past + seq positions for left-padded rows (bool, True = attend)."""
    total = past + seq
    query = torch.arange(past, total)[:, None]
    key = torch.arange(total)[None, :]
    full = torch.stack([(key <= query) & (key >= pad) for pad in pads])[:, None]
    masks = [full]
    if spec.has_sliding_layers:
        masks.append(full & (query - key < spec.sliding_window))
    return masks


def _inputs(model, spec, seq: int, past_kv: list[torch.Tensor] | None) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seq)
    batch = len(PADS)
    past = 0 if past_kv is None else past_kv[0].shape[2]
    embeds = torch.randn(batch, seq, spec.hidden_size, generator=generator)
    positions = torch.stack([(torch.arange(past, past + seq) - pad).clamp(min=0) for pad in PADS])
    embedding = model.model.language_model.embed_tokens.weight.detach()
    if past_kv is None:
        past_kv = [torch.zeros(batch, spec.num_kv_heads, 0, spec.head_dim) for _ in range(2 * spec.num_layers)]
    return [embeds, *_masks(spec, seq, past), positions, embedding, *past_kv]


def _run_onnx(path, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, (t.numpy() for t in inputs))))


def _softmax_count(path) -> int:
    import onnx

    return sum(node.op_type == "Softmax" for node in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.fixture(scope="module")
def decoder_onnx(model, tmp_path_factory):
    spec = _spec(model)
    path = tmp_path_factory.mktemp("decoder") / "decoder.onnx"
    module = DecoderStep(model, spec, query_chunk=CHUNK).eval()
    inputs, outputs = decoder_io(spec)
    embedding = model.model.language_model.embed_tokens.weight.detach()
    return path, export_graph(module, inputs, outputs, path, overrides={"embedding": embedding})


def test_chunk_bounds_cover_every_row():
    assert chunk_bounds(18, 4) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, None)]
    assert chunk_bounds(3, 4) == [(0, None)]
    with pytest.raises(ValueError):
        chunk_bounds(8, 0)


def test_default_chunk_halves_for_long_sequences_only():
    """512 query rows while a chunk's scores stay under SCORES_PER_CHUNK: every 224 and 448 px graph (up to
    1,536 positions) keeps 512; the 896 px ones (4,096 image tokens, 4,608 decoder positions) get 256."""
    assert [default_query_chunk(n) for n in (1, 768, 1536, 3906)] == [QUERY_CHUNK] * 4
    assert [default_query_chunk(n) for n in (4096, 4608, 7812)] == [256, 256, 256]
    assert default_query_chunk(7813) == 128 and default_query_chunk(10**9) == MIN_QUERY_CHUNK
    for length in (1, 1536, 4608, 100_000):
        chunk = default_query_chunk(length)
        assert chunk * length <= SCORES_PER_CHUNK or chunk == MIN_QUERY_CHUNK


def test_decoder_module_chunked_equals_plain(model):
    spec = _spec(model)
    plain = DecoderStep(model, spec, query_chunk=MAX_SEQ_LEN).eval()
    chunked = DecoderStep(model, spec, query_chunk=CHUNK).eval()
    inputs = _inputs(model, spec, PROMPT, None)
    with torch.no_grad():
        want, got = plain(*inputs), chunked(*inputs)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_inplace_cache_module_chunked_equals_plain(model):
    """With the in-place cache the attention reads the whole buffer (max_seq_len slots) through the mask."""
    spec = decoder_spec(model, MAX_SEQ_LEN, kv_cache=INPLACE)
    plain = DecoderStep(model, spec, query_chunk=MAX_SEQ_LEN).eval()
    chunked = DecoderStep(model, spec, query_chunk=CHUNK).eval()
    batch = len(PADS)
    buffers = [torch.zeros(batch, spec.num_kv_heads, MAX_SEQ_LEN, spec.head_dim) for _ in range(2 * spec.num_layers)]
    embeds, *masks_and_rest = _inputs(model, spec, PROMPT, None)[: -2 * spec.num_layers]
    masks = [torch.nn.functional.pad(m, (0, MAX_SEQ_LEN - PROMPT)) for m in _masks(spec, PROMPT, 0)]
    inputs = [embeds, *masks, *masks_and_rest[len(masks):], *buffers, torch.zeros(batch, dtype=torch.int64)]
    with torch.no_grad():
        want, got = plain(*inputs), chunked(*inputs)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_decoder_graph_prefill_and_decode_match_plain(model, decoder_onnx):
    spec, (path, _) = _spec(model), decoder_onnx
    plain = DecoderStep(model, spec, query_chunk=MAX_SEQ_LEN).eval()
    prefill = _inputs(model, spec, PROMPT, None)
    with torch.no_grad():
        want = plain(*prefill)
    got = _run_onnx(path, prefill)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)
    step = _inputs(model, spec, 1, [torch.from_numpy(p) for p in got[1:]])
    with torch.no_grad():
        want_step = plain(*step)
    got_step = _run_onnx(path, step)
    np.testing.assert_allclose(got_step[0], want_step[0].numpy(), rtol=1e-5, atol=1e-5)


def test_decoder_graph_has_one_softmax_per_chunk_and_layer(model, decoder_onnx):
    spec = _spec(model)
    assert _softmax_count(decoder_onnx[0]) == spec.num_layers * math.ceil(MAX_SEQ_LEN / CHUNK)


def test_default_chunk_keeps_short_sequences_plain(model, tmp_path):
    """A bundle whose max_seq_len fits one default chunk has today's graph: one Softmax per layer."""
    spec = decoder_spec(model, QUERY_CHUNK, kv_cache=GROWING)
    path = tmp_path / "decoder.onnx"
    inputs, outputs = decoder_io(spec)
    embedding = model.model.language_model.embed_tokens.weight.detach()
    export_graph(DecoderStep(model, spec).eval(), inputs, outputs, path, overrides={"embedding": embedding})
    assert _softmax_count(path) == spec.num_layers


def test_export_attention_chunk_zero_is_one_chunk_and_none_the_default(model, tmp_path):
    """export's --attention-chunk: 0 gives the graph before chunking (one Softmax per layer) over a max sequence
    the default chunk would split in two; None is the default."""
    spec = decoder_spec(model, QUERY_CHUNK + 8, kv_cache=GROWING)
    export_decoder(model, spec, tmp_path / "whole.onnx", attention_chunk=0)
    export_decoder(model, spec, tmp_path / "default.onnx", attention_chunk=None)
    assert _softmax_count(tmp_path / "whole.onnx") == spec.num_layers
    assert _softmax_count(tmp_path / "default.onnx") == 2 * spec.num_layers


def test_export_refuses_a_negative_attention_chunk(checkpoints, tmp_path):
    result = run_cli("export", str(checkpoints[(2, 28)]), "--output", str(tmp_path / "b"), "--attention-chunk", "-1")
    assert result.returncode == 2 and "--attention-chunk" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "b").exists()


def _image_spec(model) -> ImageSpec:
    config = model.config.vision_config
    tokens = (config.image_size // config.patch_size) ** 2
    return ImageSpec(height=config.image_size, width=config.image_size, num_tokens=tokens, resample=3,
                     rescale_factor=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


VISION_CHUNK = 5  # 16 image tokens: chunks of 5, 5, 5, 1


@pytest.fixture(scope="module")
def vision_onnx(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("vision") / "vision.onnx"
    inputs, outputs = vision_io(_image_spec(model), model.config.text_config.hidden_size)
    return path, export_graph(VisionEncoder(model, query_chunk=VISION_CHUNK).eval(), inputs, outputs, path)


def test_vision_graph_chunked_matches_transformers(model, vision_onnx):
    image, (path, _) = _image_spec(model), vision_onnx
    pixels = torch.randn(2, 3, image.height, image.width, generator=torch.Generator().manual_seed(1))
    before = model.config.vision_config._attn_implementation
    with torch.no_grad():
        want = model.model.multi_modal_projector(model.model.vision_tower(pixels).last_hidden_state)
        got = VisionEncoder(model, query_chunk=VISION_CHUNK).eval()(pixels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.config.vision_config._attn_implementation == before  # selected only while the encoder runs
    np.testing.assert_allclose(_run_onnx(path, [pixels])[0], want.numpy(), rtol=1e-5, atol=1e-5)
    layers = model.config.vision_config.num_hidden_layers
    assert _softmax_count(path) == layers * math.ceil(image.num_tokens / VISION_CHUNK)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None, reason="TensorRT for RTX not installed")
def test_chunked_graphs_build_in_tensorrt_rtx(decoder_onnx, vision_onnx):
    """The engine builder's own parse + build on the chunked graphs (empty trailing chunks included)."""
    from paligemma_edge.runtime.engines.build import EngineOptions, _build_one
    from paligemma_edge.runtime.engines.common import import_tensorrt

    trt = import_tensorrt("tensorrt-rtx")
    options = EngineOptions(flavour="tensorrt-rtx", max_batch=2)
    for name, (path, graph) in (("decoder", decoder_onnx), ("vision", vision_onnx)):
        engine, _, _ = _build_one(trt, path.parent, graph, name, options, MAX_SEQ_LEN, b"", lambda message: None)
        assert len(engine) > 0
