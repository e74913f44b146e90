"""Synthetic scenes: 1-3 coloured shapes and sometimes a word or number, with their ground truth.

Deterministic: scene ``i`` of a split is drawn from its own seed, so the training and held-out
splits never share a scene and every run sees the same pictures. Needs only numpy and pillow
(the evaluation runs on devices that have no torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle")  # what the committed paligemma-shapes model was trained on
# Shapes the generator can also draw, for teaching the model something new (shapes/dataset.py).
EXTRA_SHAPES = ("star",)
ALL_SHAPES = SHAPES + EXTRA_SHAPES
COLORS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (230, 200, 30)}
WORDS = (
    "stop", "exit", "open", "cafe", "taxi", "hotel", "bus", "park", "sale", "zoo",
    "gate", "shop", "bank", "food", "fire", "help", "pull", "push", "love", "sun",
)
CANVAS = 224
SPLIT_SEEDS = {"train": 1_000_003, "heldout": 2_000_003}
_MIN_SIDE, _MAX_SIDE, _GAP, _GAP_X = 48, 92, 6, 20
_TEXT_SIZES, _TEXT_STROKE = (44, 56), 1  # bold enough to read through 14 px patches at 112 px


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, x1/y1 exclusive

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]  # ordered left to right
    text: str | None
    text_box: tuple[int, int, int, int] | None
    text_size: int
    background: tuple[int, int, int]

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)

    def shapes_present(self) -> list[str]:
        return [s for s in ALL_SHAPES if self.count(s)]


def _overlaps(a, b, gap: int = _GAP) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def sample_scene(rng: np.random.Generator, shapes: tuple[str, ...] = SHAPES) -> Scene:
    """Draw a scene description (no pixels yet) from ``rng``, its objects among ``shapes``.

    With the default ``shapes`` a seed gives the scene it always gave (the committed model's data)."""
    red, green, blue = (int(v) for v in rng.integers(228, 256, size=3))
    background = (red, green, blue)
    text, text_box, size, taken = None, None, 0, []
    if rng.random() < 0.5:
        text = str(WORDS[rng.integers(len(WORDS))]) if rng.random() < 0.6 else str(int(rng.integers(0, 100)))
        size = int(rng.integers(*_TEXT_SIZES))
        # pixel offsets: Pillow's layout answers ints (its annotation says float)
        left, top, right, bottom = (int(v) for v in _font(size).getbbox(text, stroke_width=_TEXT_STROKE))
        width, height = right - left, bottom - top
        x, y = int(rng.integers(4, CANVAS - width - 4)), int(rng.integers(4, CANVAS - height - 4))
        text_box = (x, y, x + width, y + height)
        taken.append(text_box)
    objects: list[ShapeObject] = []
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(50):
            side = int(rng.integers(_MIN_SIDE, _MAX_SIDE + 1))
            x, y = (int(v) for v in rng.integers(2, CANVAS - side - 2, size=2))
            box = (x, y, x + side, y + side)
            # centres at least _GAP_X apart left to right, so "left to right" is never a close call
            if not any(_overlaps(box, other) for other in taken) and all(
                abs(box[0] + box[2] - o.box[0] - o.box[2]) >= 2 * _GAP_X for o in objects
            ):
                break
        else:
            continue
        taken.append(box)
        objects.append(ShapeObject(str(shapes[rng.integers(len(shapes))]), str(list(COLORS)[rng.integers(4)]), box))
    objects.sort(key=lambda o: (o.box[0] + o.box[2], o.box[1]))
    return Scene(tuple(objects), text, text_box, size, background)


def scene(split: str, index: int) -> Scene:
    """Scene ``index`` of ``split`` ("train" or "heldout")."""
    return sample_scene(np.random.default_rng([SPLIT_SEEDS[split], index]))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    elif shape == "star":
        draw.polygon(_star_points(x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        raise ValueError(f"no drawing for shape '{shape}' (known: {', '.join(ALL_SHAPES)})")


def _star_points(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    """A five-pointed star, point up, stretched so its outer points touch every side of the box."""
    angles = [math.pi / 2 + k * math.pi / 5 for k in range(10)]
    radii = [1.0 if k % 2 == 0 else 0.42 for k in range(10)]
    xs = [r * math.cos(a) for r, a in zip(radii, angles)]
    ys = [-r * math.sin(a) for r, a in zip(radii, angles)]
    left, right, top, bottom = min(xs), max(xs), min(ys), max(ys)
    return [(x0 + (x - left) / (right - left) * (x1 - x0), y0 + (y - top) / (bottom - top) * (y1 - y0))
            for x, y in zip(xs, ys)]


def render(scene_: Scene) -> Image.Image:
    image = Image.new("RGB", (CANVAS, CANVAS), scene_.background)
    draw = ImageDraw.Draw(image)
    for obj in scene_.objects:
        _draw_shape(draw, obj.shape, obj.box, COLORS[obj.color])
    if scene_.text is not None:
        if scene_.text_box is None:
            raise ValueError("a scene with text needs its text_box")
        font = _font(scene_.text_size)
        left, top, _, _ = font.getbbox(scene_.text, stroke_width=_TEXT_STROKE)
        draw.text((scene_.text_box[0] - left, scene_.text_box[1] - top), scene_.text, fill=(30, 30, 30), font=font,
                  stroke_width=_TEXT_STROKE, stroke_fill=(30, 30, 30))
    return image


def object_mask(obj: ShapeObject, width: int = CANVAS, height: int = CANVAS) -> np.ndarray:
    """Boolean [height, width] mask of one object, as drawn by :func:`render`."""
    image = Image.new("L", (width, height), 0)
    _draw_shape(ImageDraw.Draw(image), obj.shape, obj.box, 255)
    return np.asarray(image) > 0


def box_mask(shape: str, size: int = 64) -> np.ndarray:
    """The shape filling a size x size box: what the mask tokens of one object encode."""
    return object_mask(ShapeObject(shape, "red", (0, 0, size, size)), size, size)
