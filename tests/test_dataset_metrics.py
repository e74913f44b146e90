"""Dataset metrics against values computed by hand, and an eval of a tiny bundle over a generated JSONL."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from paligemma_edge.evaluation import metrics
from paligemma_edge.evaluation.evaluate import EvalOptions, evaluate_dataset, load_eval_dataset, write_outputs
from paligemma_edge.runtime.errors import InputError
from paligemma_edge.runtime.model import load

pytest.importorskip("pycocotools", reason="detection and mask mAP come from pycocotools (test extra)")

Example = metrics.ObjectsExample


def square(size: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = True
    return mask


# -- detection: COCO mAP from pycocotools -----------------------------------------------------------

def test_detection_perfect_none_and_half():
    truth = (("cat", (10, 10, 50, 50)), ("cat", (60, 60, 90, 90)))
    perfect = metrics.detection_scores([Example(100, 100, truth, truth)])
    assert (perfect.map_50_95, perfect.map_50, perfect.recall_50) == pytest.approx((1.0, 1.0, 1.0))
    nothing = metrics.detection_scores([Example(100, 100, truth, ())])
    assert (nothing.map_50_95, nothing.map_50, nothing.recall_50) == (0.0, 0.0, 0.0)
    # one of two cats found exactly: precision 1 up to recall 0.5, none beyond. COCO interpolates
    # precision at 101 recall points 0, 0.01, ..., 1: 51 of them are <= 0.5, so AP = 51/101.
    half = metrics.detection_scores([Example(100, 100, truth, truth[:1])])
    assert (half.map_50_95, half.map_50, half.recall_50) == pytest.approx((51 / 101, 51 / 101, 0.5))
    assert (half.truth_objects, half.predicted_objects) == (2, 1)


def test_detection_iou_thresholds_and_classes():
    # a box of IoU 0.62 (100x62 inside 100x100) counts at thresholds 0.50, 0.55 and 0.60 of the ten
    loose = metrics.detection_scores([Example(200, 200, (("cat", (0, 0, 100, 100)),), (("cat", (0, 0, 100, 62)),))])
    assert (loose.map_50_95, loose.map_50, loose.recall_50) == pytest.approx((0.3, 1.0, 1.0))
    # mAP averages the classes that have truth: cat found (AP 1), dog missed (AP 0), over two images;
    # a predicted class with no truth anywhere (bird) is not averaged in
    examples = [Example(100, 100, (("cat", (10, 10, 50, 50)),), (("cat", (10, 10, 50, 50)), ("bird", (0, 0, 9, 9)))),
                Example(80, 60, (("dog", (5, 5, 40, 40)),), ())]
    mixed = metrics.detection_scores(examples)
    assert (mixed.map_50_95, mixed.map_50, mixed.recall_50) == pytest.approx((0.5, 0.5, 0.5))
    # the wrong label at the right place is no match
    wrong = metrics.detection_scores([Example(100, 100, (("cat", (10, 10, 50, 50)),), (("dog", (10, 10, 50, 50)),))])
    assert wrong.map_50 == 0.0 and wrong.recall_50 == 0.0


def test_detection_without_truth_is_undefined():
    scores = metrics.detection_scores([Example(100, 100, (), (("cat", (1, 1, 5, 5)),))])
    assert (scores.map_50_95, scores.map_50, scores.recall_50) == (None, None, None)


def test_perfect_objects_decides_misses():
    truth = (("cat", (10, 10, 50, 50)),)
    assert metrics.perfect_objects(Example(100, 100, truth, truth), masks=False)
    assert metrics.perfect_objects(Example(100, 100, (), ()), masks=False)
    assert not metrics.perfect_objects(Example(100, 100, truth, truth * 2), masks=False)  # an extra box
    assert not metrics.perfect_objects(Example(100, 100, truth, (("cat", (10, 10, 50, 25)),)), masks=False)


# -- segmentation: COCO mask mAP and mean IoU ----------------------------------------------------------

def test_segmentation_mask_map_and_mean_iou():
    truth_mask = square(40, 0, 0, 25, 25)  # 625 pixels
    truth = (("cat", (0, 0, 25, 25), truth_mask),)
    perfect = metrics.segmentation_scores([Example(40, 40, truth, truth)])
    assert (perfect.mask_map_50_95, perfect.mask_map_50, perfect.mean_iou) == pytest.approx((1.0, 1.0, 1.0))
    # 25x16 inside the 25x25 truth: mask IoU 400/625 = 0.64, matched at 0.50, 0.55, 0.60 of the ten thresholds
    partial = (("cat", (0, 0, 25, 16), square(40, 0, 0, 25, 16)),)
    scores = metrics.segmentation_scores([Example(40, 40, truth, partial)])
    assert (scores.mask_map_50_95, scores.mask_map_50, scores.mean_iou) == pytest.approx((0.3, 1.0, 0.64))
    # two true objects, one predicted exactly and one not at all: mean IoU (1 + 0) / 2
    two = truth + (("dog", (30, 30, 40, 40), square(40, 30, 30, 40, 40)),)
    halves = metrics.segmentation_scores([Example(40, 40, two, truth)])
    assert halves.mean_iou == pytest.approx(0.5) and halves.mask_map_50 == pytest.approx(0.5)


# -- text ----------------------------------------------------------------------------------------------

def test_ocr_exact_match_and_character_error_rate():
    assert metrics.ocr_exact(" HELLO\n", "HELLO") and not metrics.ocr_exact("hello", "HELLO")
    # 0 edits on "hello", 1 deletion on "world": 1 / 10 reference characters
    assert metrics.character_error_rate(["hello", "wrld"], ["hello", "world"]) == pytest.approx(0.1)
    # "kitten" -> "sitting": 3 edits over 7 reference characters
    assert metrics.character_error_rate(["kitten"], ["sitting"]) == pytest.approx(3 / 7)
    assert metrics.character_error_rate(["abc"], [""]) is None


@pytest.mark.parametrize("answer, truth", [
    ("Two", "2"), ("the dog.", "dog"), ("A red square!", "red square"), ("dont know", "don't know"),
    ("100,978", "100978"), ("none", "0"), ("yes\n", "yes"), ("2:50 pm", "2:50 pm"), ("3.5", "3.5"),
])
def test_vqa_normalization_matches(answer, truth):
    assert metrics.vqa_exact(answer, truth)


@pytest.mark.parametrize("answer, truth", [
    ("3.5", "35"), ("girl's", "girls"), ("2:50", "250"), ("two dogs", "2 cats"), ("eleven", "11"),
])
def test_vqa_normalization_keeps_apart(answer, truth):
    assert not metrics.vqa_exact(answer, truth)


def test_vqa_normalize_steps():
    assert metrics.vqa_normalize("The Answer: Three, e.g. 1,000 cats; isnt it?") == "answer: 3 eg 1000 cats isn't it"


def test_caption_exact_and_chrf():
    assert metrics.caption_exact("A red  square\n", "a red square")
    assert metrics.chrf(["a red square"], ["a red square"]) == pytest.approx(100.0)
    assert metrics.chrf(["xyz"], ["abc"]) == pytest.approx(0.0)
    close = metrics.chrf(["a red square on the left"], ["a red square on the right"])
    far = metrics.chrf(["two blue circles"], ["a red square on the right"])
    assert far is not None and close is not None and 0 < far < close < 100
    assert metrics.chrf([], []) is None


# -- eval of a tiny random bundle -----------------------------------------------------------------------

BOX = "<loc0100><loc0200><loc0500><loc0600>"
SEGS = "".join(f"<seg{i:03d}>" for i in range(0, 128, 8))


@pytest.fixture
def jsonl_dataset(tmp_path):
    folder = tmp_path / "export" / "dataset"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for name, size in (("a.png", (36, 28)), ("b.png", (28, 44))):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    lines = [
        {"image": "a.png", "prefix": "detect cat ; dog", "suffix": f"{BOX} cat ; {BOX} dog"},
        {"image": "a.png", "prefix": "segment cat", "suffix": f"{BOX}{SEGS} cat"},
        {"image": "a.png", "prefix": "caption en", "suffix": "a red square"},
        {"image": "b.png", "prefix": "answer en how many shapes are there", "suffix": "two"},
        {"image": "b.png", "prefix": "<image>ocr\n", "suffix": "HELLO"},
        {"image": "b.png", "prefix": "describe en", "suffix": "noise"},
        {"image": "b.png", "prefix": "detect dog", "suffix": ""},
        {"image": "a.png", "prefix": "what is this", "suffix": "noise"},
    ]
    (folder / "_annotations.test.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "_annotations.train.jsonl").write_text('{"broken\n')  # not read: eval takes the test split
    return tmp_path / "export", lines


def test_eval_of_a_tiny_bundle_writes_real_reports(segment_bundle, jsonl_dataset, tmp_path):
    path, lines = jsonl_dataset
    dataset = load_eval_dataset(path)
    with load(segment_bundle) as model:
        report = evaluate_dataset(model, dataset, EvalOptions(max_new_tokens=12, batch_size=4))
        one_by_one = evaluate_dataset(model, dataset, EvalOptions(max_new_tokens=12, batch_size=1))
    assert report.precision == "fp32" and report.examples == len(lines)
    assert [k.kind for k in report.kinds] == ["caption", "describe", "ocr", "answer", "detect", "segment", "other"]
    assert {k.kind: k.examples for k in report.kinds}["detect"] == 2
    metric_names = {k.kind: set(k.metrics) for k in report.kinds}
    assert metric_names["detect"] == {"map_50_95", "map_50", "recall_50", "exact_match"}
    assert metric_names["segment"] == {"mask_map_50_95", "mask_map_50", "mean_iou", "exact_match"}
    assert metric_names["ocr"] == {"exact_match", "cer"} and metric_names["answer"] == {"vqa_exact_match"}
    for name, value in report.metrics().items():  # chrF is 0..100, CER 0 and up (insertions), the rest 0..1
        assert value is None or 0 <= value <= (100 if name.endswith("chrf") else 1e9 if name.endswith("cer") else 1), name
    # batches of prompts on one picture give the answers one-by-one runs give
    assert [m.answer for m in report.misses] == [m.answer for m in one_by_one.misses]
    # every miss is a line whose answer is not its truth, in the dataset's line order
    assert [m.line for m in report.misses] == sorted(m.line for m in report.misses)
    for miss in report.misses:
        line = lines[miss.line - 1]
        assert (miss.expected, miss.image) == (line["suffix"], str(path / "dataset" / line["image"]))
        assert miss.answer.strip() != miss.expected or miss.kind in ("detect", "segment")
    ocr_miss = [m for m in report.misses if m.kind == "ocr"]
    assert not ocr_miss or ocr_miss[0].score == pytest.approx(report.metrics()["ocr/cer"], abs=1e-4)  # one line

    written = write_outputs(report, tmp_path / "out/report.json", tmp_path / "out/report.md", tmp_path / "out/misses.jsonl")
    assert [p.name for p in written] == ["report.json", "report.md", "misses.jsonl"]
    saved = json.loads(written[0].read_text())
    assert saved["precision"] == "fp32" and saved["misses"] == len(report.misses)
    assert [k["kind"] for k in saved["kinds"]] == [k.kind for k in report.kinds]
    misses = [json.loads(line) for line in written[2].read_text().splitlines()]
    assert len(misses) == len(report.misses) and {"file", "line", "prefix", "expected", "answer"} <= set(misses[0])
    table = written[1].read_text()
    detect_misses = sum(m.kind == "detect" for m in report.misses)
    assert f"| detect | 2 | {detect_misses} | map_50_95 " in table and "| ocr | 1 | " in table and ", cer " in table


def test_eval_refuses_a_prompt_the_bundle_cannot_take_before_generating(segment_bundle, jsonl_dataset):
    path, lines = jsonl_dataset
    long_line = {"image": "a.png", "prefix": "answer en " + "how many shapes are there " * 20, "suffix": "2"}
    jsonl = path / "dataset" / "_annotations.test.jsonl"
    jsonl.write_text(jsonl.read_text() + json.dumps(long_line) + "\n")
    with load(segment_bundle) as model, pytest.raises(InputError, match=rf"^{jsonl}:{len(lines) + 1}: prompt is \d+ tokens"):
        evaluate_dataset(model, load_eval_dataset(path))
