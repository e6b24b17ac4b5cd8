"""Static-shape KV cache with per-row lengths.

Layout (DESIGN.md): `k`, `v` are `[layers, batch, max_len, kv_heads, head_dim]`; `lengths[b]` is the
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
    k: jax.Array  # [L, B, S, KV, hd]
    v: jax.Array  # [L, B, S, KV, hd]
    lengths: jax.Array  # [B] int32, committed tokens per row

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))


def commit_chain(cache: KVCache, n_new: jax.Array) -> KVCache:
    """Accept the first `n_new[b]` tokens written after `lengths[b]` (they are already in place)."""
    return cache.replace(lengths=cache.lengths + n_new.astype(jnp.int32))


def gather_slots(cache: KVCache, src: jax.Array, n_new: jax.Array) -> KVCache:
    """Move the entries at block offsets `src[b, j]` (relative to `lengths[b]`) to offset j, for
    every layer, then commit `n_new[b]` of them. This is how an accepted root-to-leaf path of a
    draft tree is compacted into contiguous slots. `src`: [B, M] int32 with src[b, j] >= j."""
    b_idx = jnp.arange(cache.batch)[:, None]  # [B, 1]
    from_slot = cache.lengths[:, None] + src  # [B, M]
    to_slot = cache.lengths[:, None] + jnp.arange(src.shape[1])[None, :]  # [B, M]

    def move(x):  # x: [L, B, S, KV, hd]
        picked = x[:, b_idx, from_slot]  # [L, B, M, KV, hd]
        return x.at[:, b_idx, to_slot].set(picked, mode="drop")

    return KVCache(k=move(cache.k), v=move(cache.v),
                   lengths=cache.lengths + n_new.astype(jnp.int32))
