"""Task prompts, answer parsers, mask RLE and drawing: pure functions on golden strings, no model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from paligemma_edge import InputError, LANGUAGES, build_prompt, parse_detections, parse_segmentations
from paligemma_edge.runtime.drawing import draw_results
from paligemma_edge.runtime.generation.parsing import Detection, Segmentation, paste_mask
from paligemma_edge.runtime.generation.results import mask_to_rle, rle_to_mask
from paligemma_edge.runtime.generation.tasks import result_kind


def loc(*bins: int) -> str:
    return "".join(f"<loc{b:04d}>" for b in bins)


def seg(*codes: int) -> str:
    return "".join(f"<seg{c:03d}>" for c in codes)


@pytest.mark.parametrize("task, kwargs, expected", [
    ("caption", {}, "caption en"),
    ("caption", {"lang": "de"}, "caption de"),
    ("describe", {"lang": "fil"}, "describe fil"),
    ("ocr", {}, "ocr"),
    ("answer", {"question": " what is on the table? "}, "answer en what is on the table?"),
    ("answer", {"lang": "fr", "question": "qui est là"}, "answer fr qui est là"),
    ("detect", {"objects": ["cat"]}, "detect cat"),
    ("detect", {"objects": ["cat", "red car"]}, "detect cat ; red car"),
    ("detect", {"objects": "cat ;dog; "}, "detect cat ; dog"),
    ("answer", {"question": "what\nis  this"}, "answer en what is this"),
    ("detect", {"objects": [" red\tcar "]}, "detect red car"),
    ("segment", {"objects": ["person", "dog"]}, "segment person ; dog"),
])
def test_exact_prompt_strings(task, kwargs, expected):
    assert build_prompt(task, **kwargs) == expected


def test_the_35_languages():
    assert len(LANGUAGES) == 35 and {"en", "fil", "zh", "mi"} <= LANGUAGES


@pytest.mark.parametrize("task, kwargs, message", [
    ("caption", {"lang": "xx"}, "unknown language code 'xx'"),
    ("answer", {"lang": "EN", "question": "q"}, "unknown language code"),
    ("answer", {"question": "  "}, "needs a question"),
    ("detect", {"objects": []}, "at least one object"),
    ("segment", {"objects": " ; "}, "at least one object"),
    ("point", {}, "unknown task 'point'"),
    ("detect", {"objects": ["cat;dog"]}, "cannot contain ';'"),
    ("detect", {"objects": [None]}, "must be text"),
    ("answer", {"question": 5}, "must be text"),
    ("caption", {"lang": ["en"]}, "unknown language code"),
    ("ocr", {"lang": "en"}, "takes no language"),
    ("caption", {"question": "why"}, "takes no question"),
])
def test_bad_task_arguments_are_input_errors(task, kwargs, message):
    with pytest.raises(InputError, match=message):
        build_prompt(task, **kwargs)


def test_result_kind_covers_free_prompts():
    assert result_kind("detect cat") == "detections" and result_kind("segment a ; b") == "segmentations"
    assert result_kind("caption en") == "text" and result_kind("detector en") == "text"


def test_detections_map_bins_with_big_vision_convention():
    text = f"{loc(0, 0, 1023, 1023)} cat ; {loc(100, 200, 300, 400)} red car"
    found = parse_detections(text, width=640, height=480)
    assert [d.label for d in found] == ["cat", "red car"]
    assert found[0].box == (0.0, 0.0, 640.0, 480.0)
    np.testing.assert_allclose(found[1].box, (200 / 1023 * 640, 100 / 1023 * 480, 400 / 1023 * 640, 300 / 1023 * 480))


@pytest.mark.parametrize("bad", [
    f"{loc(1, 2, 3)} three locs",
    f"{loc(10, 10, 5, 20)} y2 below y1",
    f"{loc(10, 20, 30, 20)} x2 equals x1",
    f"{loc(10, 20, 1024, 40)} bin out of range",
    f"{loc(10, 20, 30, 40)}{loc(50)} stray loc in label",
    "no tokens at all",
    "<loc12><loc0001><loc0002><loc0003> short digits",
    "",
])
def test_malformed_detections_are_dropped_without_hurting_valid_ones(bad):
    text = f"{loc(0, 0, 512, 512)} first ; {bad} ; {loc(512, 512, 1023, 1023)} last"
    assert [d.label for d in parse_detections(text, 100, 100)] == ["first", "last"]
    assert parse_detections(bad, 100, 100) == []


def _square_decoder(indices: np.ndarray) -> np.ndarray:
    """A stand-in for the VQ-VAE (not under test here): index 0 -> all-on, otherwise all-off logits."""
    return np.where(indices[:, :1, None] == 0, 1.0, -1.0) * np.ones((len(indices), 64, 64), dtype=np.float32)


def test_segmentations_paste_masks_into_the_original_image():
    text = f"{loc(0, 0, 511, 511)}{seg(*[0] * 16)} cat ; {loc(512, 512, 1023, 1023)}{seg(*[5] * 16)} dog"
    found = parse_segmentations(text, width=200, height=100, mask_decoder=_square_decoder)
    assert [s.label for s in found] == ["cat", "dog"]
    cat, dog = found
    assert cat.mask.shape == (100, 200) and cat.mask.dtype == bool
    # Corners truncate to whole pixels like big_vision: 511/1023 of 200 x 100 -> x < 99, y < 49.
    assert cat.mask[:49, :99].all() and not cat.mask[49:, :].any() and not cat.mask[:, 99:].any()
    assert not dog.mask.any()


@pytest.mark.parametrize("bad", [
    f"{loc(0, 0, 511, 511)}{seg(*[0] * 15)} fifteen segs",
    f"{loc(0, 0, 511, 511)} no segs",
    f"{loc(0, 0, 511, 511)}{seg(*[0] * 15, 128)} seg out of range",
    f"{loc(0, 0, 511, 511)}{seg(*[0] * 17)} seventeen segs",
    f"{loc(600, 0, 511, 511)}{seg(*[0] * 16)} bad box",
])
def test_malformed_segmentations_are_dropped(bad):
    text = f"{bad} ; {loc(0, 0, 1023, 1023)}{seg(*[0] * 16)} good"
    assert [s.label for s in parse_segmentations(text, 64, 64, _square_decoder)] == ["good"]


def test_whitespace_between_loc_and_seg_runs_is_accepted():
    text = f"{loc(0, 0, 1023, 1023)} {seg(*[0] * 16)} cat"
    assert [s.label for s in parse_segmentations(text, 10, 10, _square_decoder)] == ["cat"]


def test_paste_mask_resizes_bilinearly_onto_the_box():
    logits = np.full((64, 64), -1.0, dtype=np.float32)
    logits[:, 32:] = 1.0  # right half on
    mask = paste_mask(logits, (10.0, 20.0, 50.0, 40.0), width=60, height=50)
    assert mask[20:40, 31:50].all() and not mask[20:40, 10:29].any()
    assert not mask[:20].any() and not mask[40:].any()


def test_mask_rle_round_trip():
    rng = np.random.default_rng(0)
    for mask in [rng.random((7, 9)) > 0.5, np.ones((3, 4), bool), np.zeros((2, 2), bool)]:
        rle = mask_to_rle(mask)
        assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)
        np.testing.assert_array_equal(rle_to_mask(rle), mask)
    # COCO RLE, worked by hand: column-major runs 0 off, 2 on, 2 off -> characters "0", "2", "2"
    assert mask_to_rle(np.array([[True, False], [True, False]])) == {"size": [2, 2], "counts": "022"}


def test_drawing_keeps_the_size_and_marks_boxes_and_masks():
    image = Image.new("RGB", (120, 80), (255, 255, 255))
    mask = np.zeros((80, 120), dtype=bool)
    mask[50:70, 60:100] = True
    objects: list[Detection | Segmentation] = [
        Detection("cat", (10.0, 20.0, 40.0, 45.0)), Segmentation("dog", (60.0, 50.0, 100.0, 70.0), mask),
    ]
    drawn = np.asarray(draw_results(image, objects))
    assert drawn.shape == (80, 120, 3)
    assert tuple(drawn[30, 10]) != (255, 255, 255)  # on the cat's box outline
    assert tuple(drawn[35, 25]) == (255, 255, 255)  # inside the cat's box: untouched
    assert tuple(drawn[65, 80]) != (255, 255, 255)  # inside the dog's mask: tinted
    assert tuple(drawn[5, 110]) == (255, 255, 255)  # elsewhere: untouched
