"""Every task on a few held-out scenes: the answers next to the truth, and overlay pictures.

    python -m paligemma_edge.shapes.demo BUNDLE --out DIR [--scenes 4]

Runtime only (no torch): what `make demo` runs on the int8 bundle of paligemma-shapes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..runtime.drawing import draw_results
from ..runtime.errors import PaliGemmaEdgeError
from ..runtime.model import load
from . import metrics, scenes, tasks
from .evaluate import OPTIONS


def _mark(answer: str, truth: str) -> str:
    return "ok  " if answer.strip() == truth else "MISS"


def run_demo(bundle: str | Path, out: str | Path, count: int = 4, print_line=print) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with load(bundle) as model:
        busy = (i for i in range(10_000) if len(scenes.scene("heldout", i).objects) >= 2)
        for index in [next(busy) for _ in range(count)]:  # scenes with two or three shapes show more
            scene = scenes.scene("heldout", index)
            image = scenes.render(scene)
            print_line(f"scene {index}: {', '.join(o.name for o in scene.objects)}"
                       + (f", text '{scene.text}'" if scene.text else ""))
            truth = tasks.caption(scene)
            answer = model.caption(image, options=OPTIONS).text
            print_line(f"  {_mark(answer, truth)} caption en  -> {answer!r}  (truth {truth!r})")
            for question, truth in tasks.questions(scene):
                answer = model.answer(image, question, options=OPTIONS).text
                print_line(f"  {_mark(answer, truth)} {question}  -> {answer!r}  (truth {truth!r})")
            if scene.text:
                answer = model.ocr(image, options=OPTIONS).text
                print_line(f"  {_mark(answer, scene.text)} ocr  -> {answer!r}  (truth {scene.text!r})")
            names = scene.shapes_present()
            segmented = model.segment(image, names, options=OPTIONS)
            ious = metrics.match([(s.label, s.box) for s in segmented.objects],
                                 [(o.shape, o.box) for o in scene.objects], metrics.box_iou)
            right = len(segmented.objects) == len(scene.objects) and min(ious) >= 0.5
            print_line(f"  {'ok  ' if right else 'MISS'} segment {' ; '.join(names)}  -> "
                       + "; ".join(f"{s.label} [{', '.join(f'{v:.0f}' for v in s.box)}]" for s in segmented.objects)
                       + f"  (truth {'; '.join(f'{o.shape} {list(o.box)}' for o in scene.objects)})")
            path = out / f"scene{index}.png"
            draw_results(image, list(segmented.objects)).save(path)
            written.append(path)
    print_line(f"wrote {len(written)} overlay pictures to {out}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="a paligemma-shapes bundle (any precision)")
    parser.add_argument("--out", required=True, help="directory for the overlay PNGs")
    parser.add_argument("--scenes", type=int, default=4, help="held-out scenes to run (default 4)")
    args = parser.parse_args(argv)
    try:
        run_demo(args.bundle, args.out, args.scenes)
    except PaliGemmaEdgeError as exc:
        print(f"paligemma-edge demo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
