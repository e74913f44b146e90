"""Boxes, labels and mask overlays drawn on the picture the model saw: upright, RGB (pillow)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import InputError
from .images import ImageInput, load_image
from .generation.parsing import Detection, Segmentation

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
MASK_ALPHA = 110


def draw_results(image: ImageInput, objects: Sequence[Detection | Segmentation]) -> Image.Image:
    """A copy of the picture (upright and RGB, as the model saw it; same size) with each object's mask
    tinted, its box outlined and labelled. ``image`` is anything the runtime loads (path, bytes, PIL, array)."""
    base = load_image(image).convert("RGBA")
    for item in objects:
        if isinstance(item, Segmentation) and item.mask.shape != (base.height, base.width):
            height, width = item.mask.shape
            raise InputError(f"a mask of a {width}x{height} picture cannot be drawn on a {base.width}x{base.height} one")
    overlay = np.zeros((base.height, base.width, 4), dtype=np.uint8)
    for index, item in enumerate(objects):
        if isinstance(item, Segmentation):
            overlay[item.mask] = (*PALETTE[index % len(PALETTE)], MASK_ALPHA)
    canvas = Image.alpha_composite(base, Image.fromarray(overlay, "RGBA"))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(min(base.size) / 160))
    for index, item in enumerate(objects):
        color = PALETTE[index % len(PALETTE)]
        x0, y0, x1, y1 = item.box
        draw.rectangle((x0, y0, x1, y1), outline=(*color, 255), width=width)
        left, top, right, bottom = draw.textbbox((x0, y0), item.label or "?", font=font)
        lift = min(bottom - top + 2, y0)
        draw.rectangle((left, top - lift, right + 2, bottom - lift), fill=(*color, 255))
        draw.text((x0 + 1, y0 - lift), item.label or "?", fill=(255, 255, 255, 255), font=font)
    return canvas.convert("RGB")
