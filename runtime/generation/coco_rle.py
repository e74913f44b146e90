"""COCO run-length encoding of boolean masks, in numpy (no pycocotools on the device).

The format every mask tool reads (pycocotools, supervision, FiftyOne, CVAT):

- the mask is read column by column (Fortran order: down the first column, then the next);
- ``counts`` are the lengths of alternating runs of 0 and 1, starting with a run of 0
  (of length 0 when the first pixel is set), summing to ``height * width``;
- compressed, ``counts`` is an ASCII string: each count, minus the count two places before
  it from the fourth count on, is written as a signed number in 5-bit groups, least
  significant first, one character (``48 + group``) per group; bit 0x20 of a group says
  another group follows, and bit 0x10 of the last group is the sign.

``{"size": [height, width], "counts": "<string>"}`` is what pycocotools' ``mask.encode``
returns (with bytes) and ``mask.decode`` reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError

_OFFSET = 48  # "0": the character of group value 0
_GROUP_BITS = 5
_GROUP = 0x1F
_SIGN = 0x10
_MORE = 0x20


def mask_counts(mask: np.ndarray) -> list[int]:
    """Column-major run lengths of a 2-D boolean mask, starting with a (possibly empty) run of False."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return [0, *counts] if flat[0] else counts


def counts_to_string(counts: Sequence[int]) -> str:
    """Run lengths -> COCO's compressed counts string."""
    chars = []
    for index, count in enumerate(counts):
        value = int(count) - (int(counts[index - 2]) if index > 2 else 0)
        while True:
            group = value & _GROUP
            value >>= _GROUP_BITS  # arithmetic shift: a negative value ends at -1
            more = value != (-1 if group & _SIGN else 0)
            chars.append(chr(_OFFSET + group + (_MORE if more else 0)))
            if not more:
                break
    return "".join(chars)


def string_to_counts(text: str | bytes) -> list[int]:
    """COCO's compressed counts string -> run lengths."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    counts: list[int] = []
    value = shift = 0
    for char in text:
        code = ord(char) - _OFFSET
        if not 0 <= code < 2 * _MORE:
            raise InputError(f"not a COCO RLE counts string: character {char!r}")
        value |= (code & _GROUP) << shift
        shift += _GROUP_BITS
        if code & _MORE:
            continue
        if code & _SIGN:
            value -= 1 << shift  # sign-extend the last group
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
        value = shift = 0
    if shift:
        raise InputError("not a COCO RLE counts string: it ends inside a number")
    return counts


def encode(mask: np.ndarray) -> dict:
    """A 2-D boolean mask -> ``{"size": [height, width], "counts": "<compressed string>"}``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"a mask must be 2-D (height, width), got shape {mask.shape}")
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts_to_string(mask_counts(mask))}


def decode(rle: dict) -> np.ndarray:
    """COCO RLE (compressed string or bytes, or an uncompressed list of counts) -> bool [height, width]."""
    try:
        height, width = (int(v) for v in rle["size"])
        raw = rle["counts"]
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f'a COCO RLE mask is {{"size": [h, w], "counts": ...}}: {error}') from None
    counts = string_to_counts(raw) if isinstance(raw, (str, bytes)) else [int(c) for c in raw]
    if height < 0 or width < 0 or any(c < 0 for c in counts):
        raise InputError(f"a COCO RLE mask has a negative size or run length (size {[height, width]})")
    if sum(counts) != height * width:
        raise InputError(f"COCO RLE counts sum to {sum(counts)}, not {height} x {width} = {height * width}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((height, width), order="F")
