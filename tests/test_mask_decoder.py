"""The numpy VQ-VAE mask decoder against an independent PyTorch reference with the real key names."""

from __future__ import annotations

import numpy as np
import pytest

from paligemma_edge import BundleError, MaskDecoder
from paligemma_edge.fixtures.tiny import build_mask_decoder_npz
from paligemma_edge.runtime.generation.mask_decoder import required_shapes


def torch_reference(weights: dict[str, np.ndarray]):
    """big_vision's decoder as a PyTorch nn.Sequential whose state_dict names are the npz keys."""
    import torch
    from torch import nn

    class ResBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 1))

        def forward(self, x):
            return x + self.net(x)

    dim = weights["_vq_vae._embedding"].shape[1]
    decoder = nn.Sequential(
        nn.Conv2d(dim, 128, 1), nn.ReLU(), ResBlock(), ResBlock(),
        nn.ConvTranspose2d(128, 128, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 1, 1),
    )
    state = {k[len("decoder."):]: torch.from_numpy(v) for k, v in weights.items() if k.startswith("decoder.")}
    decoder.load_state_dict(state, strict=True)
    codebook = torch.from_numpy(weights["_vq_vae._embedding"])

    def run(indices: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            codes = codebook[torch.from_numpy(indices)].reshape(len(indices), 4, 4, dim).permute(0, 3, 1, 2)
            return decoder(codes)[:, 0].numpy()

    return run


@pytest.mark.parametrize("dim", [16, 64])
def test_numpy_decoder_matches_torch(tmp_path, dim):
    path = build_mask_decoder_npz(tmp_path / "vae-oid.npz", codebook_dim=dim, seed=dim)
    with np.load(path) as data:
        weights = {k: data[k] for k in data.files}
    indices = np.random.default_rng(1).integers(0, 128, (3, 16))
    ours = MaskDecoder.from_npz(path)(indices)
    theirs = torch_reference(weights)(indices)
    assert ours.shape == (3, 64, 64)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert np.abs(ours).max() > 1e-3  # a real signal, not zeros


def test_npz_layout_is_checked(tmp_path):
    path = build_mask_decoder_npz(tmp_path / "vae-oid.npz")
    with np.load(path) as data:
        weights = {k: data[k] for k in data.files}
    assert set(weights) == set(required_shapes(16))

    del weights["decoder.8.bias"]
    np.savez(tmp_path / "missing.npz", **weights)
    with pytest.raises(BundleError, match="missing decoder.8.bias"):
        MaskDecoder.from_npz(tmp_path / "missing.npz")
    weights["decoder.8.bias"] = np.zeros(5, np.float32)
    np.savez(tmp_path / "shape.npz", **weights)
    with pytest.raises(BundleError, match="'decoder.8.bias' has shape"):
        MaskDecoder.from_npz(tmp_path / "shape.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(Exception, match="not a readable .npz"):
        MaskDecoder.from_npz(tmp_path / "junk.npz")
