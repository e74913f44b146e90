"""The shapes dataset: deterministic scenes, targets the runtime's parsers read back, metrics."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from paligemma_edge.runtime.parsing import parse_detections
from paligemma_edge.shapes import metrics, scenes, tasks

N = 300


def _scenes(split: str, n: int = N):
    return [scenes.scene(split, i) for i in range(n)]


def test_scenes_are_deterministic_and_splits_disjoint():
    first = [hashlib.sha256(scenes.render(scenes.scene("train", i)).tobytes()).hexdigest() for i in range(20)]
    again = [hashlib.sha256(scenes.render(scenes.scene("train", i)).tobytes()).hexdigest() for i in range(20)]
    heldout = {hashlib.sha256(scenes.render(s).tobytes()).hexdigest() for s in _scenes("heldout", 200)}
    assert first == again
    assert not heldout & {hashlib.sha256(scenes.render(s).tobytes()).hexdigest() for s in _scenes("train", 200)}


def test_scene_layout_rules():
    counts = {1: 0, 2: 0, 3: 0}
    kinds, colors, texts = set(), set(), 0
    for scene in _scenes("train"):
        objects = scene.objects
        counts[len(objects)] += 1
        centres = [o.box[0] + o.box[2] for o in objects]
        assert centres == sorted(centres)  # left to right
        assert all(b - a >= 40 for a, b in zip(centres, centres[1:]))  # never a close call
        boxes = [o.box for o in objects] + ([scene.text_box] if scene.text else [])
        for i, a in enumerate(boxes):
            assert 0 <= a[0] < a[2] <= scenes.CANVAS and 0 <= a[1] < a[3] <= scenes.CANVAS
            for b in boxes[i + 1:]:
                assert not scenes._overlaps(a, b, gap=0)
        kinds |= {o.shape for o in objects}
        colors |= {o.color for o in objects}
        texts += scene.text is not None
    assert min(counts.values()) > N / 10 and kinds == set(scenes.SHAPES) and colors == set(scenes.COLORS)
    assert N * 0.35 < texts < N * 0.65


def test_object_masks_match_the_rendered_pixels():
    scene = next(s for s in _scenes("train") if len(s.objects) == 3)
    pixels = np.asarray(scenes.render(scene)).astype(int)
    for obj in scene.objects:
        mask = scenes.object_mask(obj)
        colour = np.array(scenes.COLORS[obj.color])
        assert np.abs(pixels[mask] - colour).max() == 0
        x0, y0, x1, y1 = obj.box
        assert mask[y0:y1, x0:x1].sum() == mask.sum() > 0.4 * (x1 - x0) * (y1 - y0)


def test_captions_and_questions():
    scene = scenes.Scene(
        (scenes.ShapeObject("circle", "red", (0, 0, 50, 50)), scenes.ShapeObject("square", "blue", (80, 0, 130, 50)),
         scenes.ShapeObject("circle", "green", (150, 0, 200, 50))), None, None, 0, (255, 255, 255))
    assert tasks.caption(scene) == "a red circle, a blue square and a green circle"
    assert tasks.caption(scenes.Scene(scene.objects[:2], None, None, 0, (255, 255, 255))) == "a red circle and a blue square"
    assert tasks.questions(scene) == [(tasks.COUNT_QUESTION, "3"), (tasks.color_question("square"), "blue")]
    assert tasks.query_sets(scene) == [["circle"], ["square"], ["circle", "square"]]


def test_detection_targets_parse_back_to_the_true_boxes():
    """The training targets and the runtime's parser agree on big_vision's box convention."""
    for scene in _scenes("heldout", 60):
        for names in tasks.query_sets(scene):
            answer = tasks.detection_answer(scene, names)
            parsed = parse_detections(answer, scenes.CANVAS, scenes.CANVAS)
            truth = [o for name in names for o in scene.objects if o.shape == name]
            assert [d.label for d in parsed] == [o.shape for o in truth]
            for detection, obj in zip(parsed, truth):
                assert np.abs(np.subtract(detection.box, obj.box)).max() <= scenes.CANVAS / 1023 / 2 + 1e-9
                assert metrics.box_iou(detection.box, obj.box) > 0.98


def test_segmentation_target_layout():
    scene = next(s for s in _scenes("train") if s.count("triangle") == 2)
    codes = {shape: list(range(16)) for shape in scenes.SHAPES}
    entries = tasks.segmentation_answer(scene, ["triangle"], codes).split(" ; ")
    assert len(entries) == 2
    for entry in entries:
        assert entry.endswith("<seg015> triangle") and entry.count("<loc") == 4 and entry.count("<seg") == 16


def test_box_iou_and_matching():
    assert metrics.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert metrics.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert metrics.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    truth = [("circle", (0, 0, 10, 10)), ("circle", (20, 0, 30, 10)), ("square", (40, 0, 50, 10))]
    predicted = [("circle", (21, 0, 31, 10)), ("circle", (0, 0, 10, 10)), ("circle", (40, 0, 50, 10)),
                 ("circle", (1, 0, 11, 10))]  # a duplicate, and a wrong label on the square
    counts = metrics.DetectionCounts()
    counts.add(predicted, truth)
    assert (counts.true_positives, counts.predicted, counts.truth) == (2, 4, 3)
    assert counts.precision == 0.5 and counts.recall == pytest.approx(2 / 3)
    assert metrics.match(predicted, truth, metrics.box_iou)[2] == 0.0


def test_mask_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2], b[1:3] = True, True
    assert metrics.mask_iou(a, b) == pytest.approx(4 / 12)
    assert metrics.mask_iou(a, a) == 1.0
