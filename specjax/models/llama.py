"""Llama-family decoder as pure functions over a param pytree.

Params (layers stacked on a leading axis L and run with `lax.scan`; or the same per-layer dicts
as a list, run as unrolled Python layers — the default on CPU, where it is ~1/3 faster per decode
step; see `forward_hidden`):

    embed        [V, D]
    layers/attn_norm [L, D]      layers/mlp_norm [L, D]
    layers/wqkv  [L, D, (H + 2 KV) hd]   q, k, v projections side by side   layers/wo [L, H*hd, D]
    layers/bqkv  [L, (H + 2 KV) hd]      (only when cfg.attention_bias)
    layers/w_gate_up [L, D, 2F]          gate then up                        layers/w_down [L, F, D]
    final_norm   [D]
    lm_head      [D, V]          (absent when cfg.tie_word_embeddings: the head is embed.T)

The four layer matrices may instead be stored transposed, [out, in], under the names
`OUT_IN_NAMES` gives ("wqkv_t", ...): the "out_in" orientation (`Family.orient`), CPU's default,
where a product of 2-16 rows against an [out, in] matrix runs ~20% faster as a row reduction
than XLA's small-M matrix product (see `linear`). The names say the orientation, so a traced
function knows it from the pytree's structure.

The matrices (layer products, embedding, head) may be stored in bfloat16 while the model
computes in float32 (`Model.with_storage`): where every weight is exactly a bfloat16 number,
as in a bfloat16 checkpoint, `times_out_in` forms the float32 products exactly from bfloat16
pieces (`exact_bf16_product`) at half the bytes. `compute_dtype` is the activations' dtype (the
norms', which always keep it).

Axis letters used in einsums: b batch, t query tokens, s key slots, k kv heads, g query heads per
kv head, d head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import tree_attention
from specjax.models.cache import BlockKV, KVCache, write_block
from specjax.models.config import ModelConfig
from specjax.models.family import Family, Hiddens, compute_dtype, is_unrolled, register_family

ATTENTION_IMPLS = ("xla", "pallas")
# Query block of a causal prefill (`_causal_blocks`); 0 computes the full T x T scores.
# Measured for SmolLM2-135M on a 2-core CPU (one fresh forward): T = 1024: 3.65 s unblocked,
# 2.98 s at 256, 2.3-2.6 s at 128 and 64; T = 768: 2.22 s -> 1.54 s at 128.
PREFILL_BLOCK = 128


# The layer matrices and their names when stored [out, in] (the "out_in" orientation).
OUT_IN_NAMES = {"wqkv": "wqkv_t", "wo": "wo_t", "w_gate_up": "w_gate_up_t", "w_down": "w_down_t"}
# Rows (batch x block tokens) for which `linear` writes a product against an [out, in] matrix as
# a row reduction on CPU. XLA CPU runs it as one YNNPACK reduce kernel that reads the matrix
# once for up to 8 rows (twice for 9-16), where its matrix-product kernel for 2+ rows runs far
# below the memory bound; for one row the matrix-vector product stays (as a reduction it took
# 0.7-1.2 s for SmolLM2's 30 layers). SmolLM2-135M verify forward, prefix 256, medians of 3
# interleaved rounds (`python benchmarks/verify_orientation.py`, 2026-12-05, a slow hour):
# T = 4 / 8 / 16: 63.1 / 76.9 / 94.9 ms [in, out] -> 54.1 / 65.5 / 86.2 ms [out, in]; T = 9 (two
# passes) 79.8 -> 84.6; T = 1 and prefill (> 16 rows) within noise. Trees of 7 nodes (T = 8)
# suit it best.
ROW_REDUCE_ROWS = (2, 16)


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [hd/2] (float64 numpy: a compile-time constant), with HF's scalings."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / rs.factor
    elif rs.rope_type == "llama3":
        # Llama 3.1: leave high frequencies, divide low ones by `factor`, interpolate between.
        old = rs.original_max_position_embeddings
        low_wavelen = old / rs.low_freq_factor
        high_wavelen = old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x: [B, T, heads, hd]; positions: [B, T]. HF's rotate-half convention."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, hd/2]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- blocks


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


class AttentionMask(NamedTuple):
    """What a block of T tokens may attend to, in the two parts `attention_split` reads."""

    cache: jax.Array | None  # [B, T, S] committed slots; None: the cache is empty (a prefill)
    own: jax.Array  # [B, T, T] among the block's own tokens
    # Static: > 0 promises `own` is causal, so a prefill may attend in query blocks of this size.
    causal_block: int = 0


def build_attention_mask(
    lengths: jax.Array,
    positions: jax.Array,
    block_mask: jax.Array,
    max_len: int,
    sliding_window: int | None,
    write_offset: jax.Array | None = None,
) -> jax.Array:
    """Visibility [B, T, S] of cache slots for T block tokens.

    Committed slots (< length) are visible to every block token. The W slots after them,
    [length, length + W), follow `block_mask` [B, T, W]: for a verify block W = T (causal for a
    chain, ancestor-or-self for a tree); a drafter growing a tree one depth at a time writes
    each depth after the previous ones (`write_offset`) and sees its ancestors through W > T.
    Later slots are hidden.
    """
    B, T, W = block_mask.shape
    slot = jnp.arange(max_len)[None, :]  # [1, S]
    rel = slot - lengths[:, None]  # [B, S] offset inside the window
    in_window = (rel >= 0) & (rel < W)
    rel_c = jnp.clip(rel, 0, W - 1)
    win_vis = jnp.take_along_axis(
        block_mask, jnp.broadcast_to(rel_c[:, None, :], (B, T, max_len)), axis=2
    )  # [B, T, S]
    mask = jnp.where(in_window[:, None, :], win_vis, (rel < 0)[:, None, :])
    if sliding_window is not None:
        # Key positions: committed slot s holds position s; this block's slots hold `positions`
        # (other window slots are treated as their slot index, an upper bound of their position).
        off = jnp.zeros_like(lengths) if write_offset is None else write_offset
        in_block = (rel >= off[:, None]) & (rel < off[:, None] + T)
        blk = jnp.clip(rel - off[:, None], 0, T - 1)
        key_pos = jnp.where(in_block, jnp.take_along_axis(positions, blk, axis=1), slot)  # [B, S]
        mask &= (positions[:, :, None] - key_pos[:, None, :]) < sliding_window
    return mask


def split_attention_masks(
    lengths: jax.Array,
    positions: jax.Array,
    block_mask: jax.Array,
    max_len: int,
    sliding_window: int | None,
    write_offset: jax.Array | None = None,
) -> AttentionMask:
    """`build_attention_mask` cut in two for `attention_split`: the cache as it was before this
    block was written (the block's own slots hidden: the old buffer holds garbage there) and
    the block's own tokens; together the two parts show exactly what the dense mask shows."""
    B, T, W = block_mask.shape
    off = jnp.zeros_like(lengths) if write_offset is None else write_offset  # [B]
    dense = build_attention_mask(
        lengths, positions, block_mask, max_len, sliding_window, write_offset
    )
    rel = jnp.arange(max_len)[None, :] - lengths[:, None]  # [B, S]
    own = (rel >= off[:, None]) & (rel < off[:, None] + T)
    cache_mask = dense & ~own[:, None, :]
    cols = off[:, None] + jnp.arange(T)[None, :]  # [B, T] window columns of the block
    own_mask = jnp.take_along_axis(
        block_mask, jnp.broadcast_to(cols[:, None, :], (B, T, T)), axis=2
    )
    if sliding_window is not None:
        own_mask &= (positions[:, :, None] - positions[:, None, :]) < sliding_window
    return AttentionMask(cache=cache_mask, own=own_mask)


def causal_block_mask(batch: int, T: int) -> jax.Array:
    return jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (batch, T, T))


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference attention. q [B,T,H,hd], k/v [B,KV,S,hd], mask [B,T,S] -> [B,T,H,hd]."""
    B, T, H, hd = q.shape
    KV = k.shape[1]
    qg = q.reshape(B, T, KV, H // KV, hd)  # [B, T, KV, G, hd]
    s = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bksd,bkgts->btkgd", v, p)  # [B, T, KV, G, hd]; why v first: attention_split
    return o.reshape(B, T, H, hd)


def attention_split(
    q: jax.Array,
    k: jax.Array | None,
    v: jax.Array | None,
    k_new: jax.Array,
    v_new: jax.Array,
    cache_mask: jax.Array | None,
    own_mask: jax.Array,
    causal_block: int = 0,
) -> jax.Array:
    """`attention_xla` over the cache as it was before the block was written (k, v
    [B, KV, S, hd] under cache_mask [B, T, S]) plus the block's own keys (k_new, v_new
    [B, KV, T, hd] under own_mask [B, T, T]), one softmax over both. k = v = None: the cache
    is empty (a prefill) and only the block is attended to; then `causal_block` > 0 (static)
    promises own_mask is zero above the diagonal, and queries are taken causal_block at a time
    against the keys up to their block only (a long causal prefill skips most of the masked
    upper triangle).

    Why: the layer can then write the block into the cache after attention has read it, so the
    written buffer feeds only the loop carry and XLA updates it in place. Reading the updated
    buffer instead made XLA CPU duplicate the dynamic-update-slice into both consumers and copy
    every layer's cache twice per decode step. Values are the left operand of the p @ v dots:
    with p on the left XLA CPU ran them 2-3x slower over a long cache (30 layers, 1,152 slots,
    one query: 17.8 -> 7.0 ms), which made decode cost grow with max_new_tokens."""
    B, T, H, hd = q.shape
    KV = k_new.shape[1]
    qg = q.reshape(B, T, KV, H // KV, hd) / math.sqrt(hd)  # [B, T, KV, G, hd]
    lo = jnp.finfo(jnp.float32).min
    if k is None and causal_block and T > causal_block and T % causal_block == 0:
        return _causal_blocks(qg, k_new, v_new, own_mask, causal_block).reshape(B, T, H, hd)
    s_n = jnp.einsum("btkgd,bkud->bkgtu", qg, k_new, preferred_element_type=jnp.float32)
    s_n = jnp.where(own_mask[:, None, None], s_n, lo)
    if k is None:  # an empty cache (prefill): the block attends only to itself
        p_n = jax.nn.softmax(s_n, axis=-1).astype(v_new.dtype)
        return jnp.einsum("bkud,bkgtu->btkgd", v_new, p_n).reshape(B, T, H, hd)
    s_c = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
    s_c = jnp.where(cache_mask[:, None, None], s_c, lo)
    m = jnp.maximum(s_c.max(axis=-1, keepdims=True), s_n.max(axis=-1, keepdims=True))
    p_c, p_n = jnp.exp(s_c - m), jnp.exp(s_n - m)
    denom = p_c.sum(axis=-1, keepdims=True) + p_n.sum(axis=-1, keepdims=True)
    o = jnp.einsum("bksd,bkgts->btkgd", v, (p_c / denom).astype(v.dtype)) + jnp.einsum(
        "bkud,bkgtu->btkgd", v_new, (p_n / denom).astype(v.dtype)
    )
    return o.reshape(B, T, H, hd)


def _causal_blocks(
    qg: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, blk: int
) -> jax.Array:
    """Causal self-attention in query blocks: qg [B, T, KV, G, hd] (already scaled), k/v
    [B, KV, T, hd], mask [B, T, T] zero above the diagonal -> [B, T, KV, G, hd]. Query block
    i reads keys [0, (i + 1) * blk): (n + 1) / 2n of the full T x T scores for n blocks."""
    lo = jnp.finfo(jnp.float32).min
    outs = []
    for i in range(qg.shape[1] // blk):
        rows, end = slice(i * blk, (i + 1) * blk), (i + 1) * blk
        s = jnp.einsum(
            "btkgd,bkud->bkgtu", qg[:, rows], k[:, :, :end], preferred_element_type=jnp.float32
        )
        s = jnp.where(mask[:, rows, :end][:, None, None], s, lo)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkud,bkgtu->btkgd", v[:, :, :end], p))
    return jnp.concatenate(outs, axis=1)


def _attention(
    impl: str,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    lengths: jax.Array,
    block_mask: jax.Array,
) -> jax.Array:
    """q [B,T,H,hd], k/v [B,KV,S,hd]. "xla" reads the dense `mask` [B,T,S]; "pallas" derives the
    same visibility from `lengths` [B] and `block_mask` [B,T,T] (block written at `lengths`)."""
    if impl == "xla":
        return attention_xla(q, k, v, mask)
    if impl == "pallas":
        return tree_attention(
            q, k, v, lengths, block_mask, interpret=(jax.default_backend() == "cpu")
        )
    raise ValueError(f"unknown attention impl {impl!r}; valid: {ATTENTION_IMPLS}")


def _ordered_after(x: jax.Array, idx: jax.Array) -> jax.Array:
    """`idx`, made data-dependent on `x` (a comparison that is never true, not even for NaN).

    XLA orders a cache write after the reads of the old buffer only when the write depends on
    them; otherwise it copies the whole buffer (per layer, per decode step) to be safe. An
    optimization barrier does not create that dependency; this does, at the cost of one scalar."""
    return idx + (x.reshape(-1)[0] > jnp.inf).astype(idx.dtype)


class LayerContext(NamedTuple):
    """What every layer of one forward shares."""

    impl: str  # "xla" | "pallas"
    inv_freq: np.ndarray  # [hd/2] RoPE inverse frequencies (a compile-time constant)
    positions: jax.Array  # [B, T] position ids of the block
    mask: AttentionMask | None  # the XLA path's visibility (None for the kernel)
    start: jax.Array  # [B] first cache slot the block is written to
    lengths: jax.Array  # [B] committed slots (the kernel derives visibility from them)
    block_mask: jax.Array  # [B, T, W] visibility inside the block's window


def _layer(
    cfg: ModelConfig,
    ctx: LayerContext,
    lp: dict,
    h: jax.Array,
    ck: jax.Array,
    cv: jax.Array,
    layer: jax.Array | None = None,
    x: jax.Array | None = None,
    write: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder layer -> (h, ck, cv). Writes this block's K/V into layer `layer` of the
    stacked cache carry (or into the per-layer buffers ck, cv when `layer` is None). `x`, when
    given, is the attention input in place of `rms_norm(h)` (EAGLE layers feed [embedding;
    feature] there, with `h` as the residual). `write=False` (XLA path only) leaves the cache
    alone and returns the block's own K/V [B, KV, T, hd] in place of ck, cv."""
    B, T, _ = h.shape
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if x is None:
        x = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    qkv = linear(x, lp, "wqkv")
    if cfg.attention_bias:
        qkv = qkv + lp["bqkv"]
    q, k, v = split_qkv(qkv, cfg)
    q = apply_rope(q.reshape(B, T, H, hd), ctx.positions, ctx.inv_freq)
    k = apply_rope(k.reshape(B, T, KV, hd), ctx.positions, ctx.inv_freq)
    v = v.reshape(B, T, KV, hd)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, KV, T, hd]
    if ctx.impl == "xla":  # attend first, then write (see attention_split)
        kl, vl = (ck, cv) if layer is None else (ck[layer], cv[layer])  # [B, KV, S, hd]
        m = ctx.mask
        if m.cache is None:  # an empty cache: attend within the block only
            kl = vl = None
        k, v = k.astype(ck.dtype), v.astype(cv.dtype)
        o = attention_split(q, kl, vl, k, v, m.cache, m.own, m.causal_block)
        if not write:
            return _mlp(cfg, lp, h, o), k, v
        start = _ordered_after(o, ctx.start)
        ck, cv = write_block(ck, layer, k, start), write_block(cv, layer, v, start)
    else:  # the kernel reads the block from the cache
        ck, cv = write_block(ck, layer, k, ctx.start), write_block(cv, layer, v, ctx.start)
        kl, vl = (ck, cv) if layer is None else (ck[layer], cv[layer])
        o = _attention(ctx.impl, q, kl, vl, None, ctx.lengths, ctx.block_mask)  # [B, T, H, hd]
    return _mlp(cfg, lp, h, o), ck, cv


def _mlp(cfg: ModelConfig, lp: dict, h: jax.Array, o: jax.Array) -> jax.Array:
    """The rest of a layer after attention: output projection, residual, MLP block. o [B, T,
    H, hd] -> h [B, T, D]."""
    B, T = h.shape[:2]
    h = h + linear(o.reshape(B, T, -1), lp, "wo")
    x = rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    gate, up = _grouped_split(linear(x, lp, "w_gate_up"), cfg.shards, (1,), 2)
    return h + linear(jax.nn.silu(gate) * up, lp, "w_down")


def linear(x: jax.Array, lp: dict, name: str) -> jax.Array:
    """x [..., in] times the layer matrix `name`, stored [in, out] under `name` or [out, in]
    under `OUT_IN_NAMES[name]` -> [..., out]."""
    if name in lp:
        return times_in_out(x, lp[name])
    return times_out_in(x, lp[OUT_IN_NAMES[name]])


# `exact_bf16_product` puts an [out, in] matrix on the left of the product for up to this many
# bfloat16 rows (3 per float32 row, so T <= 5), the pieces beyond: with the matrix on the left
# T <= 4 ran faster in every run; for T = 8-16 the runs disagreed (`python
# benchmarks/bf16_left_operand.py`, `python benchmarks/q4_codes.py --forms
# bf16_wleft,bf16_xleft`; benchmarks/RESULTS.md section 8).
EXACT_BF16_W_LEFT_ROWS = 16


def split_bf16(x: jax.Array) -> jax.Array:
    """float32 x [rows, n] -> bfloat16 [3 rows, n]: three blocks of rows whose float32 sum is x
    exactly (8 + 8 + 8 significant bits, and bfloat16 has float32's exponent range; only values
    below ~2^-110, whose smallest piece would be subnormal, may lose it)."""
    hi = x.astype(jnp.bfloat16)
    rest = x - hi.astype(jnp.float32)
    mid = rest.astype(jnp.bfloat16)
    lo = (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)
    return jnp.concatenate([hi, mid, lo])


def exact_bf16_product(
    x: jax.Array, w: jax.Array, w_axes: str = "oi", w_left: bool | None = None
) -> jax.Array:
    """float32 x [rows, in] times bfloat16 w ([out, in] for `w_axes` "oi", [in, out] for "io")
    -> float32 [rows, out], exact to float32.

    x is split into three bfloat16 pieces (`split_bf16`), so every partial product x_i w_i is an
    8 x 8-bit product, exact in float32, and one bfloat16 product accumulating in float32 forms
    all of them: the float32 product of x and w summed in another order. On CPUs with
    AVX-512-BF16 or AMX it reads 2 bytes a weight where float32 reads 4 (a bfloat16 product of
    one row would be ~10x slower, bfloat16 activations inexact). `w_left` puts an [out, in]
    matrix on the left of the product (default: for up to `EXACT_BF16_W_LEFT_ROWS` bfloat16
    rows). Measured: benchmarks/RESULTS.md, section 8."""
    rows, pieces = x.shape[0], split_bf16(x)
    if w_left is None:
        w_left = w_axes == "oi" and 3 * rows <= EXACT_BF16_W_LEFT_ROWS
    if w_left:
        y = jnp.einsum(f"{w_axes},ti->ot", w, pieces, preferred_element_type=jnp.float32)
        y = y.reshape(-1, 3, rows).transpose(1, 2, 0)
    else:
        y = jnp.einsum(f"ti,{w_axes}->to", pieces, w, preferred_element_type=jnp.float32)
        y = y.reshape(3, rows, y.shape[-1])
    return (y[2] + y[1]) + y[0]  # the small pieces first


def times_in_out(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w for w stored [in, out] (`exact_bf16_product` for a bfloat16-stored w)."""
    if w.dtype == jnp.bfloat16 and x.dtype == jnp.float32:
        y = exact_bf16_product(x.reshape(-1, x.shape[-1]), w, "io")
        return y.reshape(*x.shape[:-1], w.shape[-1])
    return x @ w


def times_out_in(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w.T for w stored [out, in] -> [..., out], in the form XLA runs fastest for
    this many rows (on CPU: `ROW_REDUCE_ROWS`; a matrix-vector product for one row); a float32 x
    against a bfloat16-stored w is `exact_bf16_product`."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    x2 = x.reshape(rows, n_in)
    if w.dtype == jnp.bfloat16 and x.dtype == jnp.float32:
        return exact_bf16_product(x2, w).reshape(*lead, w.shape[0])
    lo, hi = ROW_REDUCE_ROWS
    cpu = jax.default_backend() == "cpu"
    if cpu and lo <= rows <= hi:
        y = jnp.sum(w[None] * x2[:, None, :], axis=-1)  # [rows, out]: one reduce kernel
    elif cpu and rows > 1:  # the matrix as the left operand: on CPU as fast as [in, out] storage
        y = jnp.einsum("oi,ti->ot", w, x2).T
    else:  # one row on CPU; every product elsewhere (XLA picks the layouts on accelerators)
        y = jnp.einsum("ti,oi->to", x2, w)
    return y.reshape(*lead, w.shape[0])


def _grouped_split(x: jax.Array, groups: int, parts: tuple, total: int) -> list[jax.Array]:
    """Split the last axis of a fused projection's output into its parts. `parts`: cut points
    in units of 1/total of the axis; with `groups` > 1 (tensor parallelism, `cfg.shards`) every
    group holds its own slice of each part, and the parts are reassembled in group order."""
    n = x.shape[-1]
    cuts = [n // groups * p // total for p in parts]
    if groups == 1:
        return jnp.split(x, cuts, axis=-1)
    g = x.reshape(*x.shape[:-1], groups, n // groups)
    return [y.reshape(*x.shape[:-1], -1) for y in jnp.split(g, cuts, axis=-1)]


def split_qkv(qkv: jax.Array, cfg: ModelConfig) -> list[jax.Array]:
    """[..., (H + 2 KV) hd] -> q [..., H hd], k, v [..., KV hd] (grouped when cfg.shards > 1)."""
    H, KV = cfg.num_heads, cfg.num_kv_heads
    return _grouped_split(qkv, cfg.shards, (H, H + KV), H + 2 * KV)


def embed_tokens(
    params: dict,
    tokens: jax.Array,
    embeds: jax.Array | None = None,
    embed_mask: jax.Array | None = None,
) -> jax.Array:
    """Input embeddings [B, T, D]: the token embeddings, with `embeds` [B, T, D] in their place
    everywhere (no mask) or where `embed_mask` [B, T] is True."""
    dtype = compute_dtype(params)
    if embeds is None:
        return params["embed"][tokens].astype(dtype)
    embeds = embeds.astype(dtype)
    if embed_mask is None:
        return embeds
    return jnp.where(embed_mask[..., None], embeds, params["embed"][tokens].astype(dtype))


def forward_hidden(
    params: dict,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    *,
    block_mask: jax.Array | None = None,
    hidden_layers: Sequence[int] = (),
    impl: str = "xla",
    embeds: jax.Array | None = None,
    embed_mask: jax.Array | None = None,
    write_offset: jax.Array | None = None,
    fresh: bool = False,
    write: bool = True,
) -> tuple[Hiddens, KVCache | BlockKV]:
    """Run the decoder over a block of T tokens per row.

    tokens, positions: [B, T] int32; the block is written at cache slots [lengths, lengths + T)
    and attends to committed slots plus itself under `block_mask` [B, T, T] (default causal).
    `embeds` [B, T, D], when given, replaces the token embeddings (multimodal inputs): all of
    them, or only where `embed_mask` [B, T] is True.
    `write_offset` [B] moves the block to slots [lengths + off, lengths + off + T) and
    `block_mask` may then be [B, T, W] over the window [lengths, lengths + W) (draft trees).
    `fresh` (static): the cache holds nothing yet (a prefill at length 0), so attention skips
    it and costs T x T instead of T x (S + T).
    Returns (Hiddens, cache) with the block's K/V written and `cache.lengths` unchanged.
    `write=False` (static) leaves the cache as it was and returns (Hiddens, BlockKV) instead:
    the block's K/V for the caller to write (`cache.write_kv`). A branch of a `lax.switch`
    that only reads the cache lets XLA keep it in place; one that writes it made XLA copy
    every layer's K and V into and out of the branch on each step.
    """
    B, T = tokens.shape
    causal = block_mask is None
    if causal:
        block_mask = causal_block_mask(B, T)
    impl = _choose_impl(impl, cfg, block_mask, T, write_offset)
    if not write and impl != "xla":
        raise ValueError(f"write=False needs the XLA attention path, got impl={impl!r}")
    mask = None
    if impl == "xla":
        mask = split_attention_masks(
            cache.lengths, positions, block_mask, cache.max_len, cfg.sliding_window, write_offset
        )
        if fresh:  # a default (causal) mask lets the prefill skip the upper triangle
            mask = AttentionMask(None, mask.own, PREFILL_BLOCK if causal else 0)
    start = cache.lengths if write_offset is None else cache.lengths + write_offset  # [B]
    ctx = LayerContext(impl, rope_inv_freq(cfg), positions, mask, start, cache.lengths, block_mask)
    h0 = embed_tokens(params, tokens, embeds, embed_mask)
    run = _run_unrolled if is_unrolled(params) else _run_scan
    h, outs, cache = run(params, cfg, ctx, h0, cache, keep=bool(hidden_layers), write=write)
    layers = None
    if hidden_layers:
        # HF convention: hidden_states[0] is the embedding output, [i] the output of layer i-1.
        all_h = jnp.concatenate([h0[None], outs], axis=0)  # [L+1, B, T, D]
        layers = all_h[np.asarray(tuple(hidden_layers))]
    last = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    return Hiddens(last=last, layers=layers), cache


def _choose_impl(
    impl: str, cfg: ModelConfig, block_mask: jax.Array, T: int, write_offset: jax.Array | None
) -> str:
    """The Pallas kernel covers a block written at `lengths` with block_mask [B, T, T] (prefill,
    decode, verify) and no sliding window. Growing a draft tree (write_offset, W > T) and
    windowed models use the XLA path."""
    if impl == "pallas" and (
        write_offset is not None or block_mask.shape[2] != T or cfg.sliding_window is not None
    ):
        return "xla"
    return impl


def _run_unrolled(
    params: dict,
    cfg: ModelConfig,
    ctx: LayerContext,
    h: jax.Array,
    cache: KVCache,
    keep: bool,
    write: bool = True,
) -> tuple[jax.Array, jax.Array | None, KVCache | BlockKV]:
    """Python-unrolled layers over per-layer weights and cache buffers: nothing is sliced out of
    a stacked array per layer (a scan's per-iteration weight slices cost ~1/3 of a decode step
    on CPU), at the price of a compile time linear in the depth. A stacked cache also works
    (split here, restacked below), at the cost of copies: the engine always pairs layouts
    (init_cache(per_layer=is_unrolled(params))). -> (h, [L, B, T, D] layer outputs or None,
    cache, or the block's BlockKV when not `write`)."""
    ck, cv, outs = list(cache.k), list(cache.v), []
    for i, lp in enumerate(params["layers"]):
        h, ck[i], cv[i] = _layer(cfg, ctx, lp, h, ck[i], cv[i], write=write)
        outs.append(h)
    outs = jnp.stack(outs) if keep else None
    if not write:
        return h, outs, BlockKV(k=jnp.stack(ck), v=jnp.stack(cv))
    ck, cv = (tuple(ck), tuple(cv)) if cache.per_layer else (jnp.stack(ck), jnp.stack(cv))
    return h, outs, cache.replace(k=ck, v=cv)


def _run_scan(
    params: dict,
    cfg: ModelConfig,
    ctx: LayerContext,
    h: jax.Array,
    cache: KVCache,
    keep: bool,
    write: bool = True,
) -> tuple[jax.Array, jax.Array | None, KVCache | BlockKV]:
    """`lax.scan` over stacked layers (deep models on accelerators: one layer body to compile).
    -> (h, [L, B, T, D] layer outputs or None, cache, or the block's BlockKV when not
    `write`)."""
    was_per_layer = cache.per_layer
    k, v = cache.k, cache.v
    if was_per_layer:
        k, v = jnp.stack(k), jnp.stack(v)
    if not write:  # the cache is only read: closed over, not carried

        def read_body(
            h: jax.Array, xs: tuple[dict, jax.Array]
        ) -> tuple[jax.Array, tuple[jax.Array | None, jax.Array, jax.Array]]:
            lp, layer = xs
            h, kb, vb = _layer(cfg, ctx, lp, h, k, v, layer, write=False)
            return h, (h if keep else None, kb, vb)

        h, (outs, kb, vb) = jax.lax.scan(
            read_body, h, (params["layers"], jnp.arange(cfg.num_layers))
        )
        return h, outs, BlockKV(k=kb, v=vb)

    def body(
        carry: tuple[jax.Array, jax.Array, jax.Array], xs: tuple[dict, jax.Array]
    ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], jax.Array | None]:
        h, ck, cv = carry  # h [B, T, D]; ck, cv [L, B, KV, S, hd]
        lp, layer = xs  # one layer's weights, its index []
        h, ck, cv = _layer(cfg, ctx, lp, h, ck, cv, layer)
        return (h, ck, cv), (h if keep else None)

    (h, ck, cv), outs = jax.lax.scan(
        body, (h, k, v), (params["layers"], jnp.arange(cfg.num_layers))
    )
    if was_per_layer:
        ck, cv = tuple(ck), tuple(cv)
    return h, outs, cache.replace(k=ck, v=cv)


def single_layer(
    cfg: ModelConfig,
    lp: dict,
    h: jax.Array,
    x: jax.Array | None,
    positions: jax.Array,
    cache: KVCache,
    *,
    block_mask: jax.Array | None = None,
    write_offset: jax.Array | None = None,
    index: int = 0,
) -> tuple[jax.Array, KVCache]:
    """One decoder layer `lp` over a block (drafters built from a few layers, e.g. EAGLE).

    h [B, T, D] is the residual stream, x [B, T, Din] the attention input (None: rms_norm(h)).
    The layer reads and writes layer `index` of a per-layer cache; the block goes where
    `forward_hidden` would put it. -> (h after the layer [B, T, D], cache with the block's K/V
    written)."""
    B, T = positions.shape
    if block_mask is None:
        block_mask = causal_block_mask(B, T)
    mask = split_attention_masks(
        cache.lengths, positions, block_mask, cache.max_len, cfg.sliding_window, write_offset
    )
    start = cache.lengths if write_offset is None else cache.lengths + write_offset
    ctx = LayerContext("xla", rope_inv_freq(cfg), positions, mask, start, cache.lengths, block_mask)
    h, ck, cv = _layer(cfg, ctx, lp, h, cache.k[index], cache.v[index], x=x)
    k, v = list(cache.k), list(cache.v)
    k[index], v[index] = ck, cv
    return h, cache.replace(k=tuple(k), v=tuple(v))


def lm_head(params: dict, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """[..., D] -> float32 logits [..., V]."""
    if cfg.tie_word_embeddings:
        out = times_out_in(h, params["embed"])  # embed [V, D] is already [out, in]
    else:
        out = times_in_out(h, params["lm_head"])
    return out.astype(jnp.float32)


def forward(
    params: dict,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    *,
    block_mask: jax.Array | None = None,
    hidden_layers: Sequence[int] = (),
    logits_at: jax.Array | None = None,
    impl: str = "xla",
    write_offset: jax.Array | None = None,
    fresh: bool = False,
    embeds: jax.Array | None = None,
    embed_mask: jax.Array | None = None,
    write: bool = True,
) -> tuple[jax.Array, Hiddens, KVCache | BlockKV]:
    """`forward_hidden` plus the LM head -> (logits, hiddens, cache, or BlockKV when not
    `write`).

    `logits_at` [B, M] picks the block positions whose logits are needed (prefill needs only the
    last prompt token; the head over a whole prompt would dominate prefill time).
    """
    hiddens, cache = forward_hidden(
        params,
        cfg,
        tokens,
        positions,
        cache,
        block_mask=block_mask,
        hidden_layers=hidden_layers,
        impl=impl,
        write_offset=write_offset,
        fresh=fresh,
        embeds=embeds,
        embed_mask=embed_mask,
        write=write,
    )
    h = hiddens.last
    if logits_at is not None:
        h = jnp.take_along_axis(h, logits_at[..., None], axis=1)  # [B, M, D]
    return lm_head(params, cfg, h), hiddens, cache


# ----------------------------------------------------------------------------- the families

# HF per-layer suffix -> (our stacked name, transpose?)
LAYER_MAP = {
    "input_layernorm.weight": ("attn_norm", False),
    "post_attention_layernorm.weight": ("mlp_norm", False),
    "self_attn.q_proj.weight": ("wq", True),
    "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True),
    "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False),
    "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "mlp.gate_proj.weight": ("w_gate", True),
    "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
}
TOP_MAP = {
    "model.embed_tokens.weight": ("embed", False),
    "model.norm.weight": ("final_norm", False),
    "lm_head.weight": ("lm_head", True),
}


def _llama_fields(get: Callable[..., Any]) -> dict:
    """Llama and Mistral: optional q/k/v biases and sliding window, as the config says."""
    sliding = get("sliding_window")
    return {
        "attention_bias": bool(get("attention_bias", False)),
        "sliding_window": int(sliding) if sliding else None,
    }


def _qwen2_fields(get: Callable[..., Any]) -> dict:
    # Qwen2 has q/k/v biases, and a sliding window only when `use_sliding_window` is set.
    sliding = get("sliding_window") if get("use_sliding_window", False) else None
    return {
        "attention_bias": bool(get("attention_bias", True)),
        "sliding_window": int(sliding) if sliding else None,
    }


for _name, _fields in (
    ("llama", _llama_fields),
    ("mistral", _llama_fields),
    ("qwen2", _qwen2_fields),
):
    register_family(
        Family(
            name=_name,
            hf_fields=_fields,
            layer_map=LAYER_MAP,
            top_map=TOP_MAP,
            forward=forward,
            forward_hidden=forward_hidden,
            lm_head=lm_head,
            out_in_names=OUT_IN_NAMES,
        )
    )
