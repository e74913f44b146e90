"""A small VQ-VAE with big_vision's mask-decoder architecture, trained on shape masks (torch).

The decoder's parameter names are those of ``vae-oid.npz`` (an ``nn.Sequential`` with ReLUs at
the odd indices), so :func:`save_npz` writes a file the runtime's numpy MaskDecoder loads. The
encoder (ours: four stride-2 convs, 64 -> 4) turns an object's 64x64 box mask into the 16
codebook indices that are the ``<segNNN>`` training targets.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from ..runtime.generation.mask_decoder import CODEBOOK, SEG_TOKENS
from .metrics import mask_iou
from .scenes import SHAPES, box_mask

CODES = 128


class ResBlock(nn.Module):
    def __init__(self, channels: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x):
        return x + self.net(x)


def mask_decoder(dim: int) -> nn.Sequential:
    """big_vision's decoder: codes [n, dim, 4, 4] -> logits [n, 1, 64, 64]."""
    layers: list[nn.Module] = [nn.Conv2d(dim, 128, 1), nn.ReLU(), ResBlock(), ResBlock()]
    for cin, cout in ((128, 128), (128, 64), (64, 32), (32, 16)):
        layers += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
    layers.append(nn.Conv2d(16, 1, 1))
    return nn.Sequential(*layers)


def mask_encoder(dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for cin, cout in ((1, 32), (32, 64), (64, 128), (128, 128)):
        layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
    layers += [ResBlock(), nn.Conv2d(128, dim, 1)]
    return nn.Sequential(*layers)


class VQVAE(nn.Module):
    def __init__(self, dim: int = 32):
        super().__init__()
        self.encoder = mask_encoder(dim)
        self.decoder = mask_decoder(dim)
        self.codebook = nn.Parameter(torch.randn(CODES, dim) * 0.5)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """z [n, dim, 4, 4] -> indices [n, 16] (row-major over the 4x4 grid)."""
        flat = z.permute(0, 2, 3, 1).reshape(len(z), SEG_TOKENS, -1)
        return torch.cdist(flat, self.codebook.expand(len(z), -1, -1)).argmin(-1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.codebook[indices].reshape(len(indices), 4, 4, -1).permute(0, 3, 1, 2)

    def forward(self, masks: torch.Tensor):
        z = self.encoder(masks)
        q = self.lookup(self.quantize(z))
        vq_loss = ((q - z.detach()) ** 2).mean() + 0.25 * ((z - q.detach()) ** 2).mean()
        logits = self.decoder(z + (q - z).detach())  # straight-through
        return logits, vq_loss

    @torch.no_grad()
    def encode(self, masks: np.ndarray) -> np.ndarray:
        """bool masks [n, 64, 64] -> codebook indices [n, 16]."""
        x = torch.from_numpy(np.asarray(masks, dtype=np.float32))[:, None]
        return self.quantize(self.encoder(x)).numpy()


def random_masks(rng: np.random.Generator, n: int, size: int = 64) -> np.ndarray:
    """Varied filled shapes (ellipses, rectangles, triangles, polygons) and the dataset's three box masks."""
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        kind = rng.integers(5)
        if kind == 4:
            masks[i] = box_mask(SHAPES[rng.integers(len(SHAPES))], size)
            continue
        image = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(image)
        x0, y0 = rng.integers(0, size // 3, size=2)
        x1, y1 = rng.integers(2 * size // 3, size + 1, size=2)
        if kind == 0:
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
        elif kind == 1:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
        elif kind == 2:
            draw.polygon([(rng.integers(x0, x1), y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=255)
        else:
            draw.polygon([tuple(p) for p in rng.integers(0, size, size=(int(rng.integers(3, 7)), 2))], fill=255)
        masks[i] = np.asarray(image) > 0
    return masks


def train(steps: int = 1500, batch: int = 64, dim: int = 32, seed: int = 0, log_every: int = 250) -> VQVAE:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = VQVAE(dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.time()
    for step in range(1, steps + 1):
        masks = torch.from_numpy(random_masks(rng, batch).astype(np.float32))[:, None]
        logits, vq_loss = model(masks)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, masks) + vq_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                iou = mean_mask_iou((logits > 0).numpy()[:, 0], masks.numpy()[:, 0] > 0.5)
            print(f"vqvae step {step}/{steps} loss {loss.item():.4f} mask IoU {iou:.3f} ({time.time() - start:.0f} s)", flush=True)
    return model.eval()


def mean_mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean of :func:`metrics.mask_iou` over a batch of masks [n, h, w]."""
    return float(np.mean([mask_iou(p, t) for p, t in zip(predicted, truth)]))


def save_npz(model: VQVAE, path: str | Path) -> Path:
    """The decoder and codebook in the vae-oid.npz key layout."""
    arrays = {f"decoder.{name}": value.detach().numpy() for name, value in model.decoder.state_dict().items()}
    arrays[CODEBOOK] = model.codebook.detach().numpy()
    path = Path(path)
    # mypy matches a **dict against every keyword of numpy's savez stub, allow_pickle: bool included
    np.savez(path, **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()})  # type: ignore[arg-type]
    return path
