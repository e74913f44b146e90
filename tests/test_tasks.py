"""Task API and CLI on the tiny bundles: prompts, typed results, image-feature cache, drawing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import paligemma_edge
from paligemma_edge import (
    DetectionResult, Generation, GenerationOptions, InputError, SegmentationResult, build_prompt,
)
from paligemma_edge.runtime.generation.results import rle_to_mask

from .conftest import run_cli
from .test_parsing import loc, seg

OPTIONS = GenerationOptions(max_new_tokens=6)


def generation_of(result: Generation | DetectionResult | SegmentationResult) -> Generation:
    return result.generation if isinstance(result, (DetectionResult, SegmentationResult)) else result


@pytest.mark.parametrize("method, args, prompt", [
    ("caption", (), "caption en"),
    ("describe", ("es",), "describe es"),
    ("ocr", (), "ocr"),
    ("answer", ("how many shapes",), "answer en how many shapes"),
    ("detect", (["circle", "square"],), "detect circle ; square"),
])
def test_task_methods_send_the_exact_prompt(method, args, prompt, bundles, images):
    with paligemma_edge.load(bundles[(2, 28)]) as model:
        result = getattr(model, method)(images[0], *args, options=OPTIONS)
        direct = model.generate_batch([images[0]], [prompt], OPTIONS)[0]
    generation = result.generation if isinstance(result, DetectionResult) else result
    assert isinstance(generation, Generation) and generation.prompt == prompt
    assert generation.token_ids == direct.token_ids
    if method == "detect":
        assert isinstance(result, DetectionResult) and isinstance(result.detections, tuple)


@pytest.mark.parametrize("method, args, fields", [
    ("caption", (), {}), ("describe", (), {}), ("ocr", (), {}), ("answer", ("what is it",), {"question": "what is it"}),
    ("detect", (["cat"],), {"objects": ["cat"]}), ("segment", (["cat"],), {"objects": ["cat"]}),
])
def test_every_task_streams_the_same_tokens_and_result(method, args, fields, segment_bundle, images):
    with paligemma_edge.load(segment_bundle) as model:
        stream = model.stream(images[0], build_prompt(method, **fields), OPTIONS)
        chunks = list(stream)
        result = getattr(model, method)(images[0], *args, options=OPTIONS)
    generation = generation_of(result)
    assert tuple(c.token_id for c in chunks) == generation.token_ids
    assert "".join(c.text for c in chunks) == generation.text
    streamed = stream.result  # the task method's result, parsed the same way for detect and segment
    assert type(streamed) is type(result)
    assert generation_of(streamed).token_ids == generation.token_ids
    assert [o.label for o in getattr(streamed, "objects", ())] == [o.label for o in getattr(result, "objects", ())]


def test_a_stream_is_lazy_and_stops_when_closed(bundles, images):
    options = GenerationOptions(max_new_tokens=8, ignore_eos=True)
    with paligemma_edge.load(bundles[(2, 28)]) as model:
        calls: list[int] = []
        step = model.backend.step

        def counted(*args):
            calls.append(1)
            return step(*args)

        setattr(model.backend, "step", counted)  # a spy on the real backend: count decoder calls
        stream = model.stream(images[0], "caption en", options)
        assert calls == []  # nothing generated before the first chunk is asked for
        with pytest.raises(RuntimeError, match="read it to its end"):
            stream.result
        first = next(stream)
        stream.close()
        assert len(calls) == 1  # the prefill that chose the first token, no decode step after
        assert list(stream) == []
        with pytest.raises(RuntimeError, match="closed before its end"):
            stream.result
        whole = model.stream(images[0], "caption en", options)
        chunks = list(whole)
        result = whole.result
        assert result == whole.drain()  # already at its end: the same result again
    assert isinstance(result, Generation) and len(chunks) == 8 == len(result.token_ids)
    assert chunks[0] == first and result.token_ids[0] == first.token_id


def test_stream_checks_its_prompt_before_generating(bundles, images):
    with paligemma_edge.load(bundles[(2, 28)]) as model:
        with pytest.raises(InputError, match="--mask-decoder"):
            model.stream(images[0], "segment cat")


def test_bad_task_arguments_fail_before_any_work(bundles, images):
    with paligemma_edge.load(bundles[(2, 28)]) as model:
        with pytest.raises(InputError, match="unknown language"):
            model.caption(images[0], lang="klingon")
        with pytest.raises(InputError, match="at least one object"):
            model.detect(images[0], [])


def test_segment_needs_a_mask_decoder(bundles, images):
    with paligemma_edge.load(bundles[(2, 28)]) as model:
        with pytest.raises(InputError, match="--mask-decoder"):
            model.segment(images[0], ["cat"])
    result = run_cli("run", str(bundles[(2, 28)]), "--image", str(images[0]), "--task", "segment", "--objects", "cat")
    assert result.returncode == 2 and "--mask-decoder" in result.stderr and "Traceback" not in result.stderr


def test_segment_results_carry_full_size_masks(segment_bundle, images):
    picture = Image.open(images[1])
    with paligemma_edge.load(segment_bundle) as model:
        result = model.segment(picture, ["cat"], options=OPTIONS)
        assert isinstance(result, SegmentationResult)  # the task's own result type, statically too
        answer = f"{loc(0, 0, 1023, 1023)}{seg(*range(16))} cat ; {loc(1, 2, 3)} broken"
        parsed = model.structure(Generation(
            prompt="segment cat", text=answer, token_ids=(), finish_reason="eos", timings=result.generation.timings,
        ), *picture.size)
    assert isinstance(parsed, SegmentationResult)
    assert [s.label for s in parsed.segmentations] == ["cat"]
    assert parsed.segmentations[0].mask.shape == (picture.height, picture.width)
    assert parsed.segmentations[0].box == (0.0, 0.0, float(picture.width), float(picture.height))


def test_vision_graph_runs_once_for_three_prompts_on_one_image(bundles, images):
    with paligemma_edge.load(bundles[(1, 28)]) as model:
        calls: list[int] = []
        encode = model.backend.encode_images

        def counted(pixels: np.ndarray) -> np.ndarray:
            calls.append(len(pixels))
            return encode(pixels)

        setattr(model.backend, "encode_images", counted)  # a spy on the real backend: count vision calls
        first = model.caption(images[0], options=OPTIONS)
        model.answer(images[0], "what is this", options=OPTIONS)
        model.detect(Image.open(images[0]), ["cat"], options=OPTIONS)  # same pixels, another object
        assert calls == [1]
        model.generate_batch([images[1], images[0], images[1]], ["a", "b", "c"], OPTIONS)
        assert calls == [1, 1]  # only the unseen image, once
        model.feature_cache.clear()
        assert model.caption(images[0], options=OPTIONS).token_ids == first.token_ids
        assert calls == [1, 1, 1]


def test_feature_cache_is_bounded():
    from paligemma_edge.runtime.feature_cache import FeatureCache

    cache = FeatureCache(max_entries=2, max_bytes=10_000)
    pixels = np.random.default_rng(0).random((4, 3, 2, 2)).astype(np.float32)
    embed = lambda batch: np.repeat(batch.reshape(len(batch), 1, -1), 10, axis=1)  # 480 bytes each
    out = cache.encode(pixels, embed)
    np.testing.assert_array_equal(out, embed(pixels))
    assert len(cache) == 2
    cache = FeatureCache(max_entries=10, max_bytes=1000)
    cache.encode(pixels, embed)
    assert len(cache) == 2


def test_cli_task_json_shapes(bundles, segment_bundle, images):
    detect = run_cli("run", str(bundles[(2, 28)]), "--image", str(images[0]), "--task", "detect",
                     "--objects", "cat ; dog", "--json", check=True)
    row = json.loads(detect.stdout)
    assert row["prompt"] == "detect cat ; dog" and isinstance(row["detections"], list)
    free = run_cli("run", str(bundles[(2, 28)]), "--image", str(images[0]), "--prompt", "detect cat",
                   "--prompt", "caption en", "--json", check=True)
    rows = [json.loads(line) for line in free.stdout.splitlines()]
    assert "detections" in rows[0] and "detections" not in rows[1]
    segment = run_cli("run", str(segment_bundle), "--image", str(images[0]), "--task", "segment",
                      "--objects", "cat", "--json", check=True)
    assert isinstance(json.loads(segment.stdout)["segmentations"], list)
    answer = run_cli("run", str(bundles[(2, 28)]), "--image", str(images[0]), "--task", "answer",
                     "--question", "what is it", "--lang", "de", "--json", check=True)
    assert json.loads(answer.stdout)["prompt"] == "answer de what is it"


def test_cli_task_usage_errors(bundles, images):
    base = ["run", str(bundles[(2, 28)]), "--image", str(images[0])]
    for extra, message in [([], "--task or at least one --prompt"), (["--task", "answer"], "needs a question"),
                           (["--task", "caption", "--lang", "xx"], "unknown language"),
                           (["--task", "detect"], "at least one object"),
                           (["--prompt", "x", "--objects", "cat"], "go with --task")]:
        result = run_cli(*base, *extra)
        assert result.returncode == 2 and message in result.stderr, (extra, result.stderr)


def test_cli_draw_writes_an_image_of_the_input_size(segment_bundle, images, tmp_path):
    out = tmp_path / "drawn.png"
    result = run_cli("run", str(segment_bundle), "--image", str(images[1]), "--task", "segment",
                     "--objects", "cat", "--draw", str(out), check=True)
    assert "drew" in result.stderr
    assert Image.open(out).size == Image.open(images[1]).size
    bad = run_cli("run", str(segment_bundle), "--image", str(images[1]), "--prompt", "x", "--draw",
                  str(tmp_path / "drawing.unknownext"))
    assert bad.returncode == 2 and "cannot write the drawing" in bad.stderr


def test_json_masks_are_rle_of_the_original_size(segment_bundle, images):
    picture = Image.open(images[2])
    with paligemma_edge.load(segment_bundle) as model:
        timings = model.caption(picture, options=OPTIONS).timings
        generation = Generation("segment cat", f"{loc(0, 0, 1023, 1023)}{seg(*[7] * 16)} cat", (), "eos", timings)
        row = model.structure(generation, *picture.size).to_dict()
    mask = rle_to_mask(row["segmentations"][0]["mask"])
    assert mask.shape == (picture.height, picture.width)
    json.dumps(row)  # serialisable as is
