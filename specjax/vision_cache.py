"""The vision-feature cache: projected features of each distinct image (or video) computed once
and reused across the rows of a batch, across calls and across the turns of a conversation.

Keyed, as vLLM keys its encoder cache, by a content hash of what the tower reads (the
preprocessed pixel values: their bytes, shape and dtype, so every preprocessing setting is in
the key) plus everything else that changes the features: the model's fingerprint (its
config, feature layers, select strategy and a digest of the projector and embedding weights)
and the kind of input (image or video). Bounded in bytes; the least recently used entry is
evicted first.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Any

import jax
import numpy as np

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: ~450 LLaVA-1.5-7B images (576 x 4096 x float32 = 9.4 MB)


def content_hash(pixels: np.ndarray, kind: str, fingerprint: str) -> str:
    """The cache key of one preprocessed image [C, H, W] or video [F, C, H, W]."""
    a = np.ascontiguousarray(pixels)
    h = hashlib.sha256()
    h.update(f"{fingerprint}|{kind}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.view(np.uint8).reshape(-1))
    return h.hexdigest()


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    encode_s: float = 0.0  # seconds spent computing entries for misses
    encoded: int = 0  # entries computed (images / videos run through a tower; prefixes)
    reused_tokens: int = 0  # prefix cache: prompt tokens whose prefill was skipped


def nbytes(tree: Any) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


class ByteLRU:
    """An LRU map key -> a pytree of arrays, bounded by the bytes of its arrays. An entry
    larger than the whole bound is used for the call that made it and not kept."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.bytes = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Any:
        """The entry under `key` (now the most recently used), or None; counts a hit/miss."""
        x = self._entries.get(key)
        if x is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return x

    def put(self, key: str, value: Any) -> None:
        size = nbytes(value)
        if key in self._entries:
            self.bytes -= nbytes(self._entries.pop(key))
        if size > self.max_bytes:
            return
        while self._entries and self.bytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= nbytes(old)
            self.stats.evictions += 1
        self._entries[key] = value
        self.bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def summary(self) -> dict:
        """What `generate` reports in its stats."""
        return {
            **dataclasses.asdict(self.stats),
            "entries": len(self._entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
        }


class FeatureCache(ByteLRU):
    """Content key -> projected features (a device array [T, D]), bounded in bytes. One cache
    may serve several models (the fingerprint is part of every key)."""
