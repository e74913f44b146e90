"""A small LRU cache of image embeddings, keyed by the preprocessed pixels.

Several prompts on one image then run the vision graph once. (The decoder's prompt KV
cannot be shared across prompts: the prefix attention is bidirectional, so the image
tokens' keys and values depend on the text after them.)
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable

import numpy as np


class FeatureCache:
    """Bounded by entry count and bytes; the least recently used entries go first."""

    def __init__(self, max_entries: int = 16, max_bytes: int = 256 << 20):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(pixels: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16).digest()

    def encode(self, pixels: np.ndarray, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """pixels [batch, 3, H, W] -> embeddings [batch, ...], computing only unseen images, in one batch."""
        keys = [self.key(p) for p in pixels]
        found = {k: self._entries[k] for k in keys if k in self._entries}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing:
            computed = compute(pixels[[keys.index(k) for k in missing]])
            found.update((k, np.array(e)) for k, e in zip(missing, computed))
        for key in dict.fromkeys(keys):
            if key in self._entries:
                self._entries.move_to_end(key)
            else:
                self._put(key, found[key])
        return np.stack([found[k] for k in keys])

    def _put(self, key: bytes, embedding: np.ndarray) -> None:
        if self.max_entries < 1 or embedding.nbytes > self.max_bytes:
            return
        self._entries[key] = embedding
        self._bytes += embedding.nbytes
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
