"""Task prompts and PaliGemma-format answers for a scene (the training targets and the truth)."""

from __future__ import annotations

import numpy as np

from .scenes import ALL_SHAPES, CANVAS, Scene, ShapeObject

COUNT_QUESTION = "how many shapes are there"


def color_question(shape: str) -> str:
    return f"what color is the {shape}"


def caption(scene: Scene) -> str:
    names = [f"a {o.name}" for o in scene.objects]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def loc_tokens(box: tuple[int, int, int, int]) -> str:
    """big_vision's box encoding: y0 x0 y1 x1, each round(v / side * 1023)."""
    x0, y0, x1, y1 = box
    return "".join(f"<loc{round(v / CANVAS * 1023):04d}>" for v in (y0, x0, y1, x1))


def _query_objects(scene: Scene, names: list[str]) -> list[ShapeObject]:
    return [o for name in names for o in scene.objects if o.shape == name]


def detection_answer(scene: Scene, names: list[str]) -> str:
    return " ; ".join(f"{loc_tokens(o.box)} {o.shape}" for o in _query_objects(scene, names))


def segmentation_answer(scene: Scene, names: list[str], seg_codes: dict[str, list[int]]) -> str:
    return " ; ".join(
        loc_tokens(o.box) + "".join(f"<seg{c:03d}>" for c in seg_codes[o.shape]) + f" {o.shape}"
        for o in _query_objects(scene, names)
    )


def questions(scene: Scene) -> list[tuple[str, str]]:
    """(question, answer) pairs the scene answers unambiguously."""
    pairs = [(COUNT_QUESTION, str(len(scene.objects)))]
    for shape in ALL_SHAPES:
        matching = [o for o in scene.objects if o.shape == shape]
        if len(matching) == 1:
            pairs.append((color_question(shape), matching[0].color))
    return pairs


def query_sets(scene: Scene, rng: np.random.Generator | None = None) -> list[list[str]]:
    """Object queries for detect/segment: each present shape, and (with ``rng``) a pair of them."""
    present = scene.shapes_present()
    sets = [[shape] for shape in present]
    if len(present) >= 2:
        pair = list(rng.choice(present, size=2, replace=False)) if rng is not None else present[:2]
        sets.append([str(s) for s in pair])
    return sets


def examples(scene: Scene, seg_codes: dict[str, list[int]], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Every (prefix, suffix) training pair of a scene (segment pairs only for shapes with seg codes)."""
    pairs = [("caption en", caption(scene))]
    pairs += [(f"answer en {q}", a) for q, a in questions(scene)]
    if scene.text is not None:
        pairs.append(("ocr", scene.text))
    for names in query_sets(scene, rng):
        pairs.append(("detect " + " ; ".join(names), detection_answer(scene, names)))
        if all(name in seg_codes for name in names):
            pairs.append(("segment " + " ; ".join(names), segmentation_answer(scene, names, seg_codes)))
    return pairs
