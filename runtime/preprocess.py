"""Image loading and preprocessing, identical to the checkpoint's processor.

RGB (transparency composited onto white), squash-resize to the model's input size with
the processor's resample filter, rescale, normalize; channels first, float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError
from .manifest import ImageSpec

ImageInput = Union[str, Path, Image.Image, np.ndarray]


def to_rgb(image: Image.Image) -> Image.Image:
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_image(source: ImageInput) -> Image.Image:
    """Open a path, or accept a PIL image or an HxWx3 uint8 array; returns an RGB PIL image."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise InputError("image arrays must be uint8, HxW or HxWxC")
        return to_rgb(Image.fromarray(source))
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    try:
        with Image.open(path) as opened:
            opened.load()
            return to_rgb(opened)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None


def preprocess(images: list[Image.Image], spec: ImageSpec) -> np.ndarray:
    """RGB PIL images -> pixel_values [batch, 3, height, width] float32."""
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    batch = []
    for image in images:
        resized = image.resize((spec.width, spec.height), resample=Image.Resampling(spec.resample))
        # float64 then float32, as transformers rescales, so the pixels match bit for bit.
        pixels = (np.asarray(resized, dtype=np.float64) * spec.rescale_factor).astype(np.float32)
        pixels = (pixels - mean) / std
        batch.append(pixels.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(batch), dtype=np.float32)
