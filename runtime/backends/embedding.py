"""The tied embedding table as the bundle stores it: memory-mapped once, read by the token lookup on
the host and handed to the decoder's LM head by every backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BundleError
from ..manifest import Manifest


class HostEmbedding:
    """``table`` (and int8 ``row_scales``) as stored, checked against the decoder's input dtypes."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, input_dtypes: dict[str, np.dtype]):
        spec = manifest.embedding
        self.table = load_array(Path(bundle_dir) / spec.file, np.dtype(spec.dtype), spec.stored_shape)
        self.transposed = spec.transposed
        self.row_scales = None
        if spec.scale_file:
            self.row_scales = load_array(Path(bundle_dir) / spec.scale_file, np.dtype("float32"), (spec.shape[0],))
        for name, array in self.decoder_inputs().items():
            if input_dtypes.get(name) != array.dtype:
                raise BundleError(
                    f"{bundle_dir}: the decoder takes {name} as {input_dtypes.get(name)}, the bundle stores "
                    f"{array.dtype}; re-create the bundle"
                )
        self._scale = np.float32(manifest.decoder.embedding_scale)

    def decoder_inputs(self) -> dict[str, np.ndarray]:
        """The decoder's constant inputs: the table, and its per-token scales when it is int8."""
        inputs = {"embedding": self.table}
        if self.row_scales is not None:
            inputs["embedding_scale"] = self.row_scales
        return inputs

    def lookup(self, token_ids: np.ndarray) -> np.ndarray:
        """token ids [batch, seq] -> scaled float32 embeddings [batch, seq, hidden]."""
        if self.transposed:
            rows = np.moveaxis(np.asarray(self.table[:, token_ids], dtype=np.float32), 0, -1)
        else:
            rows = np.asarray(self.table[token_ids], dtype=np.float32)
        if self.row_scales is not None:
            rows *= self.row_scales[token_ids][..., None]
        return rows * self._scale


def load_array(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Memory-map a .npy file and check it is what the manifest says."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable array ({exc})") from None
    if array.shape != shape or array.dtype != dtype:
        raise BundleError(f"{path}: {array.dtype} {array.shape} differs from the manifest's {dtype} {shape}")
    return array
