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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import DTypeLike

from specjax.models.config import ModelConfig
from specjax.models.family import compute_dtype, forward, is_unrolled


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


def grow_cache(cache: KVCache, max_len: int) -> KVCache:
    """The same cache with `max_len` slots per row: the new slots are zeros, as `init_cache`
    leaves them (never attended to before they are written)."""
    grow = max_len - cache.max_len
    if grow < 0:
        raise ValueError(f"cannot shrink a cache of {cache.max_len} slots to {max_len}")

    def pad(x: jax.Array) -> jax.Array:  # [..., S, hd] -> [..., max_len, hd]
        return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, grow), (0, 0)])

    return cache.replace(k=jax.tree.map(pad, cache.k), v=jax.tree.map(pad, cache.v))


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


def write_block(
    c: jax.Array, layer: jax.Array | None, new: jax.Array, start: jax.Array
) -> jax.Array:
    """Write new [B, KV, T, hd] at slots [start[b], start[b]+T) of layer `layer` of a stacked
    cache c [L, B, KV, S, hd], or of a per-layer buffer c [B, KV, S, hd] when `layer` is None.

    Small batches use one dynamic-update-slice per row, which XLA applies in place to the
    while-loop carry; large batches use a scatter (out-of-range slots are dropped)."""
    B, KV, T, hd = new.shape
    new = new.astype(c.dtype)
    lead = () if layer is None else (layer,)
    if B <= 8:
        for b in range(B):
            upd = new[b][None] if layer is None else new[b][None, None]
            c = jax.lax.dynamic_update_slice(c, upd, lead + (b, 0, start[b], 0))
        return c
    slots = start[:, None] + jnp.arange(T)[None, :]  # [B, T]
    return c.at[
        lead + (jnp.arange(B)[:, None, None], jnp.arange(KV)[None, :, None], slots[:, None, :])
    ].set(new, mode="drop")


@struct.dataclass
class BlockKV:
    """The K/V a forward computed for its block, not yet written to any cache (a forward run
    with `write=False`): `k`, `v` [L, B, KV, T, hd]."""

    k: jax.Array
    v: jax.Array


def pad_block(kv: BlockKV, width: int) -> BlockKV:
    """Zero-pad the block axis to `width` slots (so blocks of several sizes share one shape)."""
    pad = ((0, 0), (0, 0), (0, 0), (0, width - kv.k.shape[3]), (0, 0))
    return BlockKV(k=jnp.pad(kv.k, pad), v=jnp.pad(kv.v, pad))


def write_kv(cache: KVCache, kv: BlockKV, start: jax.Array) -> KVCache:
    """Write a block's K/V at slots [start[b], start[b] + T) of every layer; lengths unchanged."""
    if cache.per_layer:
        k = tuple(write_block(c, None, kv.k[i], start) for i, c in enumerate(cache.k))
        v = tuple(write_block(c, None, kv.v[i], start) for i, c in enumerate(cache.v))
    else:  # the same start in every layer: one update over the layer axis
        k = jax.vmap(lambda c, n: write_block(c, None, n, start))(cache.k, kv.k)
        v = jax.vmap(lambda c, n: write_block(c, None, n, start))(cache.v, kv.v)
    return cache.replace(k=k, v=v)


def constrain_cache(cache: KVCache, sharding: NamedSharding | None) -> KVCache:
    """Inside a jitted program: pin the KV cache's layout (`sharding` for [B, KV, S, hd]
    buffers; a stacked cache's layer axis stays whole). None: leave it to XLA."""
    if sharding is None:
        return cache

    def pin(x: jax.Array) -> jax.Array:
        spec = P(*(None,) * (x.ndim - 4), *sharding.spec)
        return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))

    return cache.replace(k=jax.tree.map(pin, cache.k), v=jax.tree.map(pin, cache.v))


def full_logits(params: dict, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Logits [B, T, V] of a full causal forward over `tokens` in a fresh cache (for tests and
    users)."""
    B, T = tokens.shape
    cache = init_cache(cfg, B, T, compute_dtype(params), per_layer=is_unrolled(params))
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits, _, _ = forward(params, cfg, tokens, positions, cache, fresh=True)
    return logits
