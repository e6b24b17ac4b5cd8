"""Static-shape KV cache with per-row lengths.

Layout: `k`, `v` are `[layers, batch, kv_heads, max_len, head_dim]` (head-major, so attention is a
plain batched matmul over (batch, kv head) with no transpose of the cache), or, for models whose
layers are unrolled (see `specjax.models.llama`), a tuple of per-layer `[batch, kv_heads,
max_len, head_dim]` buffers, each updated in place on its own; `lengths[b]` is the
number of committed tokens of row b. Slot s of a row holds the token at position s for s < length.
A forward call writes its T new tokens at slots `[length, length + T)` without moving `lengths`;
the caller commits what it accepts. Entries beyond `lengths` are garbage that is never attended
to and is overwritten later, so rejecting draft tokens costs nothing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.typing import DTypeLike

from specjax.models.config import ModelConfig


@struct.dataclass
class KVCache:
    k: Any  # [L, B, KV, S, hd], or a tuple of L arrays [B, KV, S, hd]
    v: Any
    lengths: jax.Array  # [B] int32, committed tokens per row

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))

    @property
    def max_len(self) -> int:
        return (self.k[0] if self.per_layer else self.k[0, 0]).shape[-2]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


def init_cache(
    cfg: ModelConfig,
    batch: int,
    max_len: int,
    dtype: DTypeLike = jnp.float32,
    per_layer: bool = False,
) -> KVCache:
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    if per_layer:
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return KVCache(
            k=zeros,
            v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            lengths=jnp.zeros((batch,), jnp.int32),
        )
    shape = (cfg.num_layers,) + shape
    return KVCache(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32)
    )


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

    def move(x: jax.Array) -> jax.Array:  # x: [B, KV, S, hd], one layer
        picked = jnp.take_along_axis(x, from_slot[:, None, :, None], axis=2)  # [B, KV, M, hd]
        idx = (
            jnp.arange(B)[:, None, None],
            jnp.arange(x.shape[1])[None, :, None],
            to_slot[:, None, :],
        )
        return x.at[idx].set(picked, mode="drop")

    if cache.per_layer:
        k, v = tuple(map(move, cache.k)), tuple(map(move, cache.v))
    else:
        k, v = jax.vmap(move)(cache.k), jax.vmap(move)(cache.v)
    return KVCache(k=k, v=v, lengths=cache.lengths + n_new.astype(jnp.int32))
