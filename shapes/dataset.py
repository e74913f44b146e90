"""Write a shapes dataset in Roboflow's PaliGemma layout, optionally with a shape the model never saw.

    python -m paligemma_edge.shapes.dataset OUT [--add-shape star] [--train 2400] [--valid 120] [--test 300]

``OUT/dataset/_annotations.{train,valid,test}.jsonl`` with the pictures beside them, as Roboflow's
PaliGemma export lays them out, so every command that takes a user's dataset reads it unchanged.

What is decided here:

- Scenes are drawn as the committed model's were (shapes/scenes.py), with their objects among the
  original shapes plus ``--add-shape``; each split has its own seeds, none shared with the scenes
  the committed model was trained or evaluated on.
- ``train`` and ``valid`` hold every task pair of each scene (caption, questions, ocr, detect,
  segment), old shapes and the new one mixed, so fine-tuning keeps the old tasks while it learns the
  new shape. Segment pairs need the shape's 16 seg codes: the new shape has none in the committed
  model's mask codebook, so its scenes teach detect, questions and captions, not masks.
- ``test`` measures the new shape alone: ``detect SHAPE`` on every test scene that has one, and
  ``answer en what color is the SHAPE`` where exactly one is present. The old tasks are measured on
  the fixed held-out benchmark (``eval --dataset shapes``), so "before" and "after" are the same test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from ..runtime.errors import InputError
from . import scenes, tasks

SPLIT_SEEDS = {"train": 3_000_017, "valid": 3_000_019, "test": 3_000_023}
DEFAULT_SIZES = {"train": 2400, "valid": 120, "test": 300}
COMMITTED_MODEL = Path(__file__).resolve().parents[1] / "models" / "paligemma-shapes"


def seg_codes_of(checkpoint: Path) -> dict[str, list[int]]:
    """The seg codes each shape's mask was trained with (the checkpoint's training.json)."""
    path = Path(checkpoint) / "training.json"
    try:
        return {k: list(v) for k, v in json.loads(path.read_text())["seg_codes"].items()}
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: no seg codes to write segment answers with ({exc})") from None


def split_scene(split: str, index: int, shapes: tuple[str, ...]) -> scenes.Scene:
    return scenes.sample_scene(np.random.default_rng([SPLIT_SEEDS[split], index]), shapes)


def scene_lines(split: str, scene: scenes.Scene, index: int, new_shapes: tuple[str, ...],
                seg_codes: dict[str, list[int]]) -> list[tuple[str, str]]:
    """The (prefix, suffix) lines of one scene in ``split`` (see the module's notes)."""
    if split != "test":
        return tasks.examples(scene, seg_codes, np.random.default_rng([SPLIT_SEEDS[split], index, 1]))
    lines = []
    for shape in new_shapes:
        if scene.count(shape):
            lines.append((f"detect {shape}", tasks.detection_answer(scene, [shape])))
        if scene.count(shape) == 1:
            lines.append((f"answer en {tasks.color_question(shape)}", next(o.color for o in scene.objects if o.shape == shape)))
    return lines


def write_dataset(out: str | Path, new_shapes: tuple[str, ...] = (), sizes: dict[str, int] = DEFAULT_SIZES,
                  seg_codes: dict[str, list[int]] | None = None, overwrite: bool = False,
                  progress=lambda line: None) -> dict[str, int]:
    """Write the dataset to ``out`` (``out.partial`` first, then renamed); the lines written per split."""
    unknown = [s for s in new_shapes if s not in scenes.EXTRA_SHAPES]
    if unknown:
        raise InputError(f"no drawing for {', '.join(unknown)}: the generator adds {', '.join(scenes.EXTRA_SHAPES)}")
    if sizes.get("test") and not new_shapes:
        raise InputError("the test split measures an added shape: pass --add-shape, or --test 0")
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; pass --force to replace it")
    seg_codes = seg_codes if seg_codes is not None else seg_codes_of(COMMITTED_MODEL)
    shapes = scenes.SHAPES + tuple(new_shapes)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    folder = partial / "dataset"
    folder.mkdir(parents=True)
    written = {}
    for split, count in sizes.items():
        rows = []
        for index in range(count):
            scene = split_scene(split, index, shapes)
            lines = scene_lines(split, scene, index, tuple(new_shapes), seg_codes)
            if not lines:
                continue
            image = f"{split}-{index:05d}.png"
            scenes.render(scene).save(folder / image)
            rows += [json.dumps({"image": image, "prefix": prefix, "suffix": suffix}) for prefix, suffix in lines]
        (folder / f"_annotations.{split}.jsonl").write_text("".join(row + "\n" for row in rows))
        written[split] = len(rows)
        progress(f"{split}: {len(rows)} lines from {count} scenes")
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paligemma_edge.shapes.dataset", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--add-shape", action="append", default=[], choices=scenes.EXTRA_SHAPES,
                        help="a shape the committed model never saw, drawn into the scenes (repeatable)")
    for split, default in DEFAULT_SIZES.items():
        parser.add_argument(f"--{split}", type=int, default=default, metavar="SCENES", help=f"scenes in {split} (default {default})")
    parser.add_argument("--seg-codes-from", type=Path, default=COMMITTED_MODEL,
                        help="checkpoint whose training.json gives the seg codes (default: the committed model)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    sizes = {split: getattr(args, split) for split in DEFAULT_SIZES}
    if any(n < 0 for n in sizes.values()):
        parser.error("split sizes must be 0 or more")
    try:
        written = write_dataset(args.out, tuple(dict.fromkeys(args.add_shape)), sizes,
                                seg_codes_of(args.seg_codes_from), args.force, progress=print)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {', '.join(f'{n} {s}' for s, n in written.items())} lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
