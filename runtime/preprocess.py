"""Preprocessing, identical to the checkpoint's processor.

Pictures are loaded by :mod:`.images` (upright, RGB with transparency composited onto white);
here they are squash-resized to the model's input size with the processor's resample filter,
rescaled and normalized; channels first, float32.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .bundle.manifest import ImageSpec


def preprocess(images: list[Image.Image], spec: ImageSpec) -> np.ndarray:
    """RGB PIL images (as :func:`.images.load_image` returns them) -> pixel_values [batch, 3, height, width] float32."""
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
