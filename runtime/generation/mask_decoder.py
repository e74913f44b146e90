"""big_vision's VQ-VAE mask decoder in numpy: 16 <seg> codebook indices -> a 64x64 mask logit map.

Weights come from a ``vae-oid.npz`` file (PyTorch-layout arrays, the key names big_vision uses):
codebook ``_vq_vae._embedding`` [128, D]; ``decoder.0`` 1x1 conv D->128 + ReLU; two residual
blocks ``decoder.2`` / ``decoder.3`` (3x3, ReLU, 3x3, ReLU, 1x1, plus the input); four
transposed convs ``decoder.4/6/8/10`` (kernel 4, stride 2, padding 1, each + ReLU) doubling
4 -> 64; ``decoder.12`` 1x1 conv 16 -> 1.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import BundleError, InputError, first_line

CODEBOOK = "_vq_vae._embedding"
RESBLOCKS = ("decoder.2", "decoder.3")
UPSAMPLES = ("decoder.4", "decoder.6", "decoder.8", "decoder.10")
SEG_TOKENS = 16
MASK_SIZE = 64


def required_shapes(dim: int) -> dict[str, tuple[int, ...]]:
    """Every key of a vae-oid.npz with its shape, for a codebook of width ``dim``."""
    shapes: dict[str, tuple[int, ...]] = {CODEBOOK: (128, dim), "decoder.0.weight": (128, dim, 1, 1), "decoder.0.bias": (128,)}
    for block in RESBLOCKS:
        for index, kernel in ((0, 3), (2, 3), (4, 1)):
            shapes[f"{block}.net.{index}.weight"] = (128, 128, kernel, kernel)
            shapes[f"{block}.net.{index}.bias"] = (128,)
    for name, (cin, cout) in zip(UPSAMPLES, ((128, 128), (128, 64), (64, 32), (32, 16))):
        shapes[f"{name}.weight"] = (cin, cout, 4, 4)
        shapes[f"{name}.bias"] = (cout,)
    shapes["decoder.12.weight"] = (1, 16, 1, 1)
    shapes["decoder.12.bias"] = (1,)
    return shapes


def _conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Conv2d, stride 1, 'same' padding. x [n, cin, h, w]; weight [cout, cin, k, k]."""
    k = weight.shape[-1]
    pad = k // 2
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    h, w = x.shape[-2:]
    out = np.zeros((x.shape[0], weight.shape[0], h, w), dtype=np.float32)
    for dy in range(k):
        for dx in range(k):
            out += np.einsum("nchw,oc->nohw", padded[:, :, dy:dy + h, dx:dx + w], weight[:, :, dy, dx], optimize=True)
    return out + bias[None, :, None, None]


def _conv_transpose(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int = 2, padding: int = 1) -> np.ndarray:
    """ConvTranspose2d as PyTorch defines it. x [n, cin, h, w]; weight [cin, cout, k, k]."""
    n, _, h, w = x.shape
    k = weight.shape[-1]
    full = np.zeros((n, weight.shape[1], (h - 1) * stride + k, (w - 1) * stride + k), dtype=np.float32)
    for dy in range(k):
        for dx in range(k):
            full[:, :, dy:dy + stride * h:stride, dx:dx + stride * w:stride] += np.einsum(
                "nchw,co->nohw", x, weight[:, :, dy, dx], optimize=True
            )
    out_h, out_w = (h - 1) * stride - 2 * padding + k, (w - 1) * stride - 2 * padding + k
    return full[:, :, padding:padding + out_h, padding:padding + out_w] + bias[None, :, None, None]


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


class MaskDecoder:
    """Decodes seg-token indices to 64x64 mask logits (threshold at 0)."""

    def __init__(self, weights: dict[str, np.ndarray]):
        check_weights(weights, "mask decoder weights")
        self.w = {name: np.asarray(value, dtype=np.float32) for name, value in weights.items()}

    @classmethod
    def from_npz(cls, path: str | Path) -> "MaskDecoder":
        path = Path(path)
        try:
            data = np.load(path)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("an .npy array, not an .npz archive")
            with data:
                weights = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(f"{path}: not a readable .npz mask decoder ({first_line(exc)})") from None
        check_weights(weights, path)
        return cls(weights)

    @property
    def codebook_dim(self) -> int:
        return int(self.w[CODEBOOK].shape[1])

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        """indices [n, 16] in 0..127 -> mask logits [n, 64, 64]."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 2 or indices.shape[1] != SEG_TOKENS or indices.min(initial=0) < 0 or indices.max(initial=0) >= 128:
            raise InputError(f"mask decoder takes [n, {SEG_TOKENS}] codebook indices in 0..127")
        w = self.w
        codes = w[CODEBOOK][indices].reshape(len(indices), 4, 4, -1).transpose(0, 3, 1, 2)
        x = _relu(_conv(codes, w["decoder.0.weight"], w["decoder.0.bias"]))
        for block in RESBLOCKS:
            y = _relu(_conv(x, w[f"{block}.net.0.weight"], w[f"{block}.net.0.bias"]))
            y = _relu(_conv(y, w[f"{block}.net.2.weight"], w[f"{block}.net.2.bias"]))
            x = x + _conv(y, w[f"{block}.net.4.weight"], w[f"{block}.net.4.bias"])
        for name in UPSAMPLES:
            x = _relu(_conv_transpose(x, w[f"{name}.weight"], w[f"{name}.bias"]))
        return _conv(x, w["decoder.12.weight"], w["decoder.12.bias"])[:, 0]


def check_weights(weights: dict[str, np.ndarray], source: Path | str) -> None:
    """Reject an npz whose keys or shapes differ from the vae-oid.npz layout."""
    if CODEBOOK not in weights or np.ndim(weights[CODEBOOK]) != 2:
        raise BundleError(f"{source}: not a vae-oid.npz mask decoder (no 2-D '{CODEBOOK}')")
    expected = required_shapes(int(np.shape(weights[CODEBOOK])[1]))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise BundleError(f"{source}: mask decoder is missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    for name, shape in expected.items():
        if tuple(np.shape(weights[name])) != shape:
            raise BundleError(f"{source}: '{name}' has shape {tuple(np.shape(weights[name]))}, expected {shape}")
