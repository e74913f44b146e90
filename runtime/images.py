"""Pictures as people have them -> the upright RGB image the model sees.

One loader for every entry point (``run``, the Python API, ``serve`` uploads, camera frames,
``eval``, ``compare``, calibration). It reproduces what transformers gives a user who opens a
file the way its pipelines do (``exif_transpose(Image.open(f))``) and hands it to the
checkpoint's image processor:

- a path, bytes, a binary file object or a PIL image is decoded by Pillow, its first frame for
  animated GIF / WebP / APNG (a PIL image: the frame it is on), then turned upright by its EXIF
  orientation (tags 2-8, as ``PIL.ImageOps.exif_transpose``), so the model, boxes, masks and
  drawings all share the upright picture's pixels, which is what viewers and browsers show;
- uint8 arrays (HxW, HxWx1, HxWx2, HxWx3, HxWx4, RGB order) have no EXIF and are taken as they are;
- then RGB as the processor converts it: transparency (an alpha band, or a ``transparency``
  entry of a palette, greyscale or RGB picture) composited onto white, every other mode (L, I;16,
  I, F, P, CMYK / YCCK JPEG, YCbCr, ...) through Pillow's own ``convert("RGB")``.

Needs only pillow and numpy.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import InputError, first_line

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image, np.ndarray]

# What Pillow raises for data it cannot decode: its own errors are OSError subclasses, but some
# plugins raise SyntaxError, EOFError, ValueError or struct.error for broken files.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, EOFError, ValueError, struct.error)
_ARRAY_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_TURNS = (2, 3, 4, 5, 6, 7, 8)  # EXIF orientations that move pixels (1 is upright)


class ImageTooLargeError(InputError):
    """A picture over the pixel limit the caller set (or over Pillow's decompression-bomb limit)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the checkpoint's image processor converts it: transparency composited onto white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def upright(image: Image.Image) -> Image.Image:
    """The picture as viewers show it: EXIF orientations 2-8 undone (``exif_transpose``), else itself."""
    image.load()  # a PNG's eXIf chunk may follow the pixels: it is only read with them
    if image.getexif().get(ExifTags.Base.Orientation, 1) not in _TURNS:
        return image
    return ImageOps.exif_transpose(image)


def load_image(source: ImageInput, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
    """A path, bytes, binary file, PIL image or uint8 array -> the upright RGB PIL image.

    ``max_pixels`` refuses larger pictures from their header, before any pixels are decoded
    (:class:`ImageTooLargeError`). Anything unreadable is an :class:`InputError` with one line
    that starts with ``name`` (default: the path, or what the source is).
    """
    if isinstance(source, np.ndarray):
        return to_rgb(_from_array(source))
    if isinstance(source, Image.Image):
        return _decoded(source, name or "the image", max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise InputError(f"{name or 'the image data'}: empty")
        return _open_and_decode(io.BytesIO(bytes(source)), name or "the image data", max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{name or path}: no such image file")
        with path.open("rb") as handle:
            return _open_and_decode(handle, name or str(path), max_pixels)
    if hasattr(source, "read"):
        return _open_and_decode(source, name or str(getattr(source, "name", "the image file")), max_pixels)
    raise InputError(f"cannot read an image from a {type(source).__name__}: give a path, bytes, a PIL image "
                     "or a uint8 array")


def _open_and_decode(handle: BinaryIO, name: str, max_pixels: int | None) -> Image.Image:
    try:
        with Image.open(handle) as opened:
            return _decoded(opened, name, max_pixels)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: image is too large to decode ({first_line(exc)})") from None
    except UnidentifiedImageError:
        raise InputError(f"{name}: not a supported image (Pillow does not know its format)") from None
    except _DECODE_ERRORS as exc:
        raise InputError(f"{name}: not a readable image ({first_line(exc)})") from None


def _decoded(image: Image.Image, name: str, max_pixels: int | None) -> Image.Image:
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"{name}: image is {width}x{height} pixels; at most {max_pixels} are accepted")
    try:
        return to_rgb(upright(image))
    except _DECODE_ERRORS as exc:
        raise InputError(f"{name}: not a readable image ({first_line(exc)})") from None


def _from_array(array: np.ndarray) -> Image.Image:
    channels = 1 if array.ndim == 2 else array.shape[2] if array.ndim == 3 else 0
    if array.dtype != np.uint8 or channels not in _ARRAY_MODES or 0 in array.shape:
        raise InputError(f"image arrays must be uint8 HxW or HxWxC with C 1-4 in RGB(A) order, not "
                         f"{array.dtype} {tuple(array.shape)}")
    pixels = np.ascontiguousarray(array.reshape(array.shape[:2]) if channels == 1 else array)
    return Image.fromarray(pixels, _ARRAY_MODES[channels])
