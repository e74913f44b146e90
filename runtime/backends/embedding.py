"""The tied embedding table as the bundle stores it: memory-mapped once and read by the token lookup on
the host. A float table is also handed to the decoder's LM head as an input; an int8 table in blocks
is read by the decoder graph itself (its LM head's initializers are the same files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BundleError
from ..bundle.manifest import Manifest

ZERO_POINT = 128  # an int8 table's stored value is round(value / scale) + 128: MatMulNBits' 8-bit default
LM_HEAD_NODE = "lm_head_int8/matmul"  # the decoder's node that reads an int8 table


class HostEmbedding:
    """``table`` (and the int8 table's ``block_scales``) as stored, checked against the decoder's input dtypes."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, input_dtypes: dict[str, np.dtype]):
        spec = manifest.embedding
        self.table = load_array(Path(bundle_dir) / spec.file, np.dtype(spec.dtype), spec.stored_shape)
        self.hidden = spec.shape[1]
        self.block_scales = None
        if spec.block_size:
            if spec.scale_file is None:
                raise BundleError(f"{bundle_dir}: the manifest's int8 table has no scale file; re-create the bundle")
            self.block_scales = load_array(Path(bundle_dir) / spec.scale_file, np.dtype("float32"), (spec.shape[0], spec.blocks))
            if "embedding" in input_dtypes:
                raise BundleError(f"{bundle_dir}: the table is int8 in blocks, read by the LM head, but the decoder "
                                  "takes it as an input; re-create the bundle")
        for name, array in self.decoder_inputs().items():
            if input_dtypes.get(name) != array.dtype:
                raise BundleError(
                    f"{bundle_dir}: the decoder takes {name} as {input_dtypes.get(name)}, the bundle stores "
                    f"{array.dtype}; re-create the bundle"
                )
        self._scale = np.float32(manifest.decoder.embedding_scale)

    def decoder_inputs(self) -> dict[str, np.ndarray]:
        """The decoder's constant inputs: a float table; none for an int8 table (the graph reads it)."""
        return {} if self.block_scales is not None else {"embedding": self.table}

    def head_bytes(self) -> int:
        """Bytes of the table (and scales) the LM head reads per step."""
        return self.table.nbytes + (self.block_scales.nbytes if self.block_scales is not None else 0)

    def lookup(self, token_ids: np.ndarray) -> np.ndarray:
        """token ids [batch, seq] -> scaled float32 embeddings [batch, seq, hidden]."""
        if self.block_scales is not None:
            rows = dequantize_rows(self.table, self.block_scales, token_ids, self.hidden)
        else:
            rows = np.asarray(self.table[token_ids], dtype=np.float32)
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


def dequantize_rows(table: np.ndarray, scales: np.ndarray, token_ids: np.ndarray, hidden: int) -> np.ndarray:
    """Rows of a blocked int8 table ([vocab, blocks, block], scales [vocab, blocks]) as float32
    [..., hidden], reading only the rows asked for."""
    rows = (np.asarray(table[token_ids], dtype=np.float32) - ZERO_POINT) * np.asarray(scales[token_ids])[..., None]
    return rows.reshape(*rows.shape[:-2], -1)[..., :hidden]
