"""Static-shape KV cache with per-row lengths.

Layout: `k`, `v` are `[layers, batch, kv_heads, max_len, head_dim]` (head-major, so attention is a
plain batched matmul over (batch, kv head) with no transpose of the cache); `lengths[b]` is the
number of committed tokens of row b. Slot s of a row holds the token at position s for s < length.
A forward call writes its T new tokens at slots `[length, length + T)` without moving `lengths`;
the caller commits what it accepts. Entries beyond `lengths` are garbage that is never attended
to and is overwritten later, so rejecting draft tokens costs nothing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from specjax.models.config import ModelConfig


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, KV, S, hd]
    v: jax.Array  # [L, B, KV, S, hd]
    lengths: jax.Array  # [B] int32, committed tokens per row

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))


def commit_chain(cache: KVCache, n_new: jax.Array) -> KVCache:
    """Accept the first `n_new[b]` tokens written after `lengths[b]` (they are already in place)."""
    return cache.replace(lengths=cache.lengths + n_new.astype(jnp.int32))


def gather_slots(cache: KVCache, src: jax.Array, n_new: jax.Array) -> KVCache:
    """Move the entries at block offsets `src[b, j]` (relative to `lengths[b]`) to offset j, for
    every layer, then commit `n_new[b]` of them. This is how an accepted root-to-leaf path of a
    draft tree is compacted into contiguous slots. `src`: [B, M] int32 with src[b, j] >= j."""
    B, M = src.shape
    from_slot = cache.lengths[:, None] + src  # [B, M]
    to_slot = cache.lengths[:, None] + jnp.arange(M)[None, :]  # [B, M]

    def move(x):  # x: [L, B, KV, S, hd]
        picked = jnp.take_along_axis(x, from_slot[None, :, None, :, None], axis=3)  # [L,B,KV,M,hd]
        idx = (jnp.arange(x.shape[0])[:, None, None, None], jnp.arange(B)[None, :, None, None],
               jnp.arange(x.shape[2])[None, None, :, None], to_slot[None, :, None, :])
        return x.at[idx].set(picked, mode="drop")

    return KVCache(k=move(cache.k), v=move(cache.v),
                   lengths=cache.lengths + n_new.astype(jnp.int32))
