"""The shapes dataset: deterministic scenes, targets the runtime's parsers read back, metrics."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from paligemma_edge.runtime.generation.parsing import parse_detections
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


# Scene descriptions of the first 200 train and held-out scenes, as the committed paligemma-shapes model
# was trained and is evaluated on (computed with the scene generator before it could draw more shapes).
COMMITTED_SCENES_SHA256 = "ffeb8da147725269ef3e7b132e9e57dc192e3ba52d5731a2f1f958d71ccb67b0"


def test_adding_shapes_leaves_the_committed_models_scenes_unchanged():
    described = repr([scenes.scene(split, i) for split in ("train", "heldout") for i in range(200)])
    assert hashlib.sha256(described.encode()).hexdigest() == COMMITTED_SCENES_SHA256


def test_a_star_touches_every_side_of_its_box_and_fills_part_of_it():
    star = scenes.ShapeObject("star", "red", (30, 40, 130, 140))
    mask = scenes.object_mask(star)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == star.box
    fill = mask.sum() / (100 * 100)
    assert 0.3 < fill < 0.5  # a five-pointed star, not its box (1.0) nor a thin outline
    square = scenes.object_mask(scenes.ShapeObject("square", "red", star.box))
    assert mask.sum() < square.sum() and not (mask & ~square).any()
    with pytest.raises(ValueError, match="no drawing for shape 'hexagon'"):
        scenes.render(scenes.Scene((scenes.ShapeObject("hexagon", "red", star.box),), None, None, 0, (255, 255, 255)))


def test_scenes_with_an_added_shape_draw_it_and_ask_about_it():
    from paligemma_edge.shapes.dataset import split_scene

    drawn = [split_scene("train", i, scenes.ALL_SHAPES) for i in range(200)]
    with_star = [s for s in drawn if s.count("star")]
    assert 0.3 < len(with_star) / len(drawn) < 0.6
    single = next(s for s in with_star if s.count("star") == 1)
    assert (tasks.color_question("star"), next(o.color for o in single.objects if o.shape == "star")) in tasks.questions(single)
    pairs = tasks.examples(single, {s: list(range(16)) for s in scenes.SHAPES}, np.random.default_rng(0))
    assert ("detect star", tasks.detection_answer(single, ["star"])) in pairs
    assert not any(p.startswith("segment") and "star" in p for p, _ in pairs)  # no seg codes for it


def test_write_dataset_in_roboflows_layout(tmp_path):
    from paligemma_edge.evaluation.datasets import check_dataset, load_dataset
    from paligemma_edge.runtime.errors import InputError
    from paligemma_edge.shapes.dataset import main, split_scene, write_dataset

    out = tmp_path / "stars"
    codes = {s: list(range(16)) for s in scenes.SHAPES}
    written = write_dataset(out, ("star",), {"train": 6, "valid": 2, "test": 12}, codes)
    summary = check_dataset(out)
    assert summary.ok and summary.layout == "roboflow"
    dataset = load_dataset(out)
    assert {name: len(records) for name, records in dataset.splits.items()} == written
    assert sorted((out / "dataset").glob("_annotations.*.jsonl")) == [
        out / "dataset" / f"_annotations.{s}.jsonl" for s in ("test", "train", "valid")]
    test = dataset.splits["test"]
    assert test and {r.prefix for r in test} <= {"detect star", "answer en what color is the star"}
    for record in test:
        index = int(record.image.stem.split("-")[1])
        scene = split_scene("test", index, scenes.ALL_SHAPES)
        if record.kind == "detect":
            found = [d.box for d in parse_detections(record.suffix, scenes.CANVAS, scenes.CANVAS)]
            truth = [o.box for o in scene.objects if o.shape == "star"]
            assert len(found) == len(truth) and all(max(abs(a - b) for a, b in zip(f, t)) <= 1 for f, t in zip(found, truth))
    assert {r.kind for r in dataset.splits["train"]} >= {"caption", "answer", "detect", "segment"}
    with pytest.raises(InputError, match="exists; pass --force"):
        write_dataset(out, ("star",), {"train": 1}, codes)
    assert main([str(tmp_path / "none"), "--test", "3"]) == 2  # a test split needs an added shape
    assert not (tmp_path / "none").exists() and not (tmp_path / "none.partial").exists()


def test_the_walkthrough_table_checks_its_goals(tmp_path):
    import json

    from paligemma_edge.shapes import walkthrough

    def write(name, recall, vqa, caption, det):
        star = {"kinds": [{"kind": "detect", "metrics": {"recall_50": recall, "map_50": recall - 0.1}},
                          {"kind": "answer", "metrics": {"vqa_exact_match": vqa}}]}
        old = {"caption_exact_match": caption, "vqa_accuracy": 1.0, "ocr_exact_match": 0.84,
               "detection_recall": det, "segmentation_miou": 0.89}
        (tmp_path / f"eval-{name}-star.json").write_text(json.dumps(star))
        (tmp_path / f"eval-{name}-shapes.json").write_text(json.dumps(old))

    write("base-fp32", 0.0, 0.68, 0.99, 0.976)
    write("star-fp32", 0.90, 0.95, 0.97, 0.95)  # detect recall 0.026 below the base: within 0.03
    write("star-int4", 0.86, 0.95, 0.97, 0.95)  # recall 0.04 below the merged fp32: missed
    table = walkthrough.table(tmp_path)
    assert "| star-int4 | 0.860 | 0.760 | 0.950 |" in table
    found: dict[str, dict[str, float]] = {}
    for name in ("base-fp32", "star-fp32", "star-int4"):
        figures = walkthrough.figures(tmp_path, name)
        assert figures is not None, name
        found[name] = figures
    met = dict(walkthrough.goals(found))
    assert met["star recall@0.5 >= 0.85 after fine-tuning (0.900)"]
    assert met["detect recall within 0.03 of the committed model (-0.026)"]
    assert not met["star-int4 within 0.03 of star-fp32 on every figure (worst -0.040)"]
    assert "| star-int4 within 0.03 of star-fp32 on every figure (worst -0.040) | **no** |" in table
