"""Tree attention for speculative verification: a flash-attention Pallas kernel and its reference.

Verification runs the target over the T tokens of a draft tree (a chain is the tree whose parents
are i - 1) in one forward. The cache is head-major, k/v [B, KV, S, hd] (one layer of the model's
[L, B, KV, S, hd] cache). Row b of the batch has a committed prefix in KV-cache slots
[0, lengths[b]); the block's own K/V were just written at [lengths[b], lengths[b] + T); slots
beyond hold stale or garbage entries (rejected drafts) and must be ignored. Query t sees

    slot s < lengths[b]                      always (committed prefix),
    s = lengths[b] + u, 0 <= u < T           iff block_mask[b, t, u] (ancestor-or-self),
    anything else                            never.

and the output is softmax(q k^T / sqrt(hd) over the visible slots) v, per head, with GQA
(H = KV * G query heads; query head h reads kv head h // G).

Kernel design (FlashAttention-2, Dao 2023, Alg. 1, specialised to a short query block):

- grid (B, KV, R / block_q): one program per (row, kv head, query block). The G query heads of a
  kv head and the T block tokens are folded into R = T * G query rows (row r = t * G + g, padded
  to a multiple of block_q), so the whole GQA group shares every K/V load: one pass over the
  cache per kv head instead of per query head.
- K/V are read in place from the head-major cache [B, KV, S, hd]: the program of (b, kv head)
  reads the contiguous [S, hd] slab k[b, h], with no transpose or copy of the cache per call (the
  cache dominates the bytes moved; a copy would double them). Exceptions, which do copy: S not a
  multiple of block_k (padded), and a head dim padded to a power of two for GPU (Triton) tiles.
- `lax.fori_loop` over KV blocks of `block_k` slots, only up to ceil(min(lengths[b] + T, S) /
  block_k): work is proportional to the row's real length, not to max_len, so ragged rows cost
  what they hold. Blocks lying wholly inside the committed prefix need no mask at all (the first
  loop); only the last one or two blocks, which hold the end of the prefix, the tree and garbage,
  compute the mask (the second loop). sglang-jax reported its tree-mask verify running 61x
  slower than causal until its mask handling was fixed: here the mask is computed only on the
  few blocks that need it and is never a dense [T, S] tensor read from memory.
- The tree mask travels as bits: `tree_mask_bits` packs block_mask[b, t, :] into ceil(T / 32)
  int32 words, so the in-kernel test for slot s is a shift and an and of word (s - length) // 32
  -- elementwise integer ops every backend has, no gather.
- Running max m, running sum l and the output accumulator are float32; scores and the p @ v
  product are accumulated in float32 (preferred_element_type); p is cast to v's dtype for the
  second matmul as in FlashAttention. Masked scores are set to a finite -0.7 * f32max and their
  probabilities forced to exactly 0, so garbage K/V (even huge values) never leak into the
  output and no inf - inf arises. A query with no visible slot (impossible when the diagonal of
  block_mask is True and lengths[b] + T <= S) gets an all-zero output.

Backends (checked against the source of the installed jax 0.10.2):

- CPU: `interpret=True` only (the Pallas HLO interpreter); this is what the tests run.
- GPU: jax 0.10 lowers a bare `pl.pallas_call` to *Mosaic GPU* by default
  (`jax_pallas_use_mosaic_gpu` defaults to True) and warns that pallas_call for Mosaic GPU is
  deprecated in favour of `plgpu.kernel`; Triton stays available and is chosen by passing
  `pallas.triton.CompilerParams`. This kernel is written in the Triton programming model
  (BlockSpec blocks, 2-D tiles, masked elementwise ops), so on GPU it passes
  `triton.CompilerParams(num_warps, num_stages)` and thereby targets the Triton backend
  explicitly. Triton needs every loaded tile to have a power-of-two size and dot operands of at
  least 16 per side: block_q/block_k are powers of two >= 16 on GPU and the head dim is
  zero-padded to a power of two (>= 16) when it is not one. A Mosaic GPU (Hopper wgmma/TMA)
  version would be a separate kernel written with `plgpu.kernel`.
- TPU: Mosaic TPU, `pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)`, lengths in
  SMEM. A block's last two dims must be multiples of (8, 128) or the full dims: the [S_pad, hd]
  K/V slab has the full head dim and S_pad a multiple of block_k >= 8, so no head-dim padding
  (hence no cache copy) is needed, e.g. for hd = 64 (SmolLM2). The whole [S, hd] slab of a kv
  head is staged in VMEM (S * hd * 2 bytes * 2 buffers each for K and V), so very long caches may
  need `vmem_limit_bytes`.
- What is tested: numerics only in interpret mode on CPU; in addition the tests *lower* the GPU
  variant to Triton IR and the TPU variant to Mosaic MLIR from the CPU machine (the TPU device
  kind faked as v5e), which catches unsupported ops and tile shapes. Compiling those modules
  (ptxas / libtpu) and running them is UNTESTED: no GPU or TPU was available. Treat the GPU and
  TPU paths as a first draft to validate on hardware (tests + benchmarks/tree_attention_bench.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

# Finite "minus infinity" for masked scores: exp(m_prev - m_new) stays NaN-free while a row has
# seen only masked slots (FlashAttention implementations use the same trick).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_BITS = 32  # tree-mask bits per int32 word


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of `tree_attention` (hashable: passed as a static argument).

    block_k:  KV-cache slots per inner-loop step. A power of two >= 8 (>= 16 on GPU, where Triton
              needs power-of-two tiles and dot operands of at least 16). 128 fits H100 SRAM and
              TPU lanes; small caches (the CPU tests) use 16 or 32.
    block_q:  query rows per program, rows being the T * G (tree token, query head of the GQA
              group) pairs of one kv head. None: all rows in one program, rounded up to a power of
              two >= 16 and capped at 64 (more rows would spill the float32 accumulator out of
              registers on GPU; the extra programs re-read K/V). A power of two >= 8 otherwise.
    num_warps, num_stages: Triton (GPU) launch parameters; ignored elsewhere.
    """

    block_k: int = 128
    block_q: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if not (isinstance(self.block_k, int) and _is_pow2(self.block_k) and self.block_k >= 8):
            raise ValueError(
                f"BlockSizes.block_k must be a power of two >= 8, got {self.block_k!r}"
            )
        if self.block_q is not None and not (
            isinstance(self.block_q, int) and _is_pow2(self.block_q) and self.block_q >= 8
        ):
            raise ValueError(
                f"BlockSizes.block_q must be None or a power of two >= 8, got {self.block_q!r}"
            )
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(
                f"BlockSizes.num_warps/num_stages must be >= 1, got "
                f"{self.num_warps}/{self.num_stages}"
            )

    def rows_block(self, rows: int) -> int:
        """Query rows per program for `rows` = T * G rows per kv head."""
        if self.block_q is not None:
            return self.block_q
        return min(64, max(16, _next_pow2(rows)))


# ----------------------------------------------------------------------------- masks


def dense_tree_mask(lengths: jax.Array, block_mask: jax.Array, S: int) -> jax.Array:
    """Visibility [B, T, S] bool of cache slots for the T block tokens at [length, length + T).

    Slot s < lengths[b] is visible to every query; s = lengths[b] + u (0 <= u < T) is visible to
    query t iff block_mask[b, t, u]; all other slots are hidden. Same rule as
    `specjax.models.llama.build_attention_mask` without a sliding window.
    """
    B, T, _ = block_mask.shape
    slot = jnp.arange(S)[None, :]  # [1, S]
    rel = slot - lengths[:, None].astype(jnp.int32)  # [B, S] offset inside the block
    in_block = (rel >= 0) & (rel < T)
    rel_c = jnp.broadcast_to(jnp.clip(rel, 0, T - 1)[:, None, :], (B, T, S))
    block_vis = jnp.take_along_axis(block_mask.astype(bool), rel_c, axis=2)  # [B, T, S]
    return jnp.where(in_block[:, None, :], block_vis, (rel < 0)[:, None, :])


def tree_mask_bits(block_mask: jax.Array) -> jax.Array:
    """Pack block_mask [B, T, T] bool into int32 words [B, T, ceil(T / 32)].

    Bit u % 32 of word u // 32 of [b, t] is block_mask[b, t, u]. The kernel tests a slot with a
    shift and an and (no gather), and reads T / 8 bytes per query instead of a [T, S] mask.
    """
    B, T, U = block_mask.shape
    W = -(-U // _BITS)
    m = jnp.pad(block_mask.astype(jnp.uint32), ((0, 0), (0, 0), (0, W * _BITS - U)))
    m = m.reshape(B, T, W, _BITS)
    # Distinct powers of two: the sum is the bitwise or, and fits uint32 exactly.
    words = jnp.sum(m << jnp.arange(_BITS, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
    return lax.bitcast_convert_type(words, jnp.int32)  # [B, T, W]


# ----------------------------------------------------------------------------- checks


def _check_inputs(
    q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, block_mask: jax.Array
) -> None:
    """Raise ValueError naming the bad argument, its shape and what would be valid."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, hd], got shape {q.shape}")
    B, T, H, hd = q.shape
    if k.ndim != 4:
        raise ValueError(f"k must be [B, KV, S, hd] (head-major cache), got shape {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {k.shape} ([B, KV, S, hd]), got {v.shape}")
    Bk, KV, S, hdk = k.shape
    if Bk != B:
        raise ValueError(
            f"k/v batch {Bk} (shape {k.shape}) must equal q's batch {B} (shape {q.shape})"
        )
    if hdk != hd:
        raise ValueError(
            f"k/v head dim {hdk} (shape {k.shape}) must equal q's head dim {hd} (shape {q.shape})"
        )
    if KV < 1 or H % KV:
        raise ValueError(
            f"query heads H={H} must be a positive multiple of kv heads KV={KV} "
            f"(GQA groups); q shape {q.shape}, k shape {k.shape}"
        )
    if not 1 <= T <= S:
        raise ValueError(
            f"block length T={T} must satisfy 1 <= T <= S={S} (cache slots); "
            f"q shape {q.shape}, k shape {k.shape}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")
    if k.dtype != v.dtype:
        raise ValueError(f"k and v must share a dtype, got {k.dtype} and {v.dtype}")
    if lengths.shape != (B,):
        raise ValueError(
            f"lengths must be [B] = ({B},) (one prefix length per row), got shape {lengths.shape}"
        )
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an integer dtype, got {lengths.dtype}")
    if block_mask.shape != (B, T, T):
        raise ValueError(
            f"block_mask must be [B, T, T] = ({B}, {T}, {T}), got shape {block_mask.shape}"
        )
    if block_mask.dtype != jnp.bool_:
        raise ValueError(f"block_mask must be bool, got {block_mask.dtype}")


# ----------------------------------------------------------------------------- kernel


def _tree_attention_kernel(
    lengths_ref: jax.Ref,
    q_ref: jax.Ref,
    k_ref: jax.Ref,
    v_ref: jax.Ref,
    bits_ref: jax.Ref,
    o_ref: jax.Ref,
    *,
    seq_len: int,
    T: int,
    block_k: int,
    scale: float,
    precision: lax.Precision | None,
) -> None:
    """One (row b, kv head, query block) program.

    lengths_ref [B'] int32 (whole array), q_ref [bq, hd], k_ref/v_ref [S', hd] (the kv head's
    slab of the row's cache), bits_ref [bq, W] int32, o_ref [bq, hd].
    """
    b = pl.program_id(0)
    length = lengths_ref[b]  # wrapper clipped it to [0, seq_len]
    q = q_ref[...]  # [bq, hd]
    bq, hd = q.shape
    # One [bq, 1] column per mask word, read from the ref (Triton has no value slicing).
    words = [bits_ref[:, pl.ds(w, 1)] for w in range(bits_ref.shape[1])]

    # Blocks [0, n_full) lie inside the committed prefix: every slot visible, no mask.
    # Blocks [n_full, n_total) hold the prefix's end, the tree and garbage: masked.
    end = jnp.minimum(length + T, seq_len)
    n_full = length // block_k
    n_total = (end + block_k - 1) // block_k

    def visible(start: jax.Array) -> jax.Array:  # [bq, bk] bool for the block at `start`
        slot = start + lax.broadcasted_iota(jnp.int32, (bq, block_k), 1)  # [bq, bk]
        rel = slot - length  # offset inside the tree block
        hit = jnp.zeros((bq, block_k), jnp.bool_)
        for w, word in enumerate(words):  # static: ceil(T / 32) words, 1 or 2 for real trees
            off = rel - w * _BITS
            bit = (word >> jnp.clip(off, 0, _BITS - 1)) & 1  # [bq, bk]
            hit = hit | ((off >= 0) & (off < _BITS) & (bit == 1))
        in_block = (rel >= 0) & (rel < T) & (slot < seq_len)
        return (slot < length) | (in_block & hit)

    def body(
        i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array], masked: bool
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        m, l, acc = carry  # [bq, 1], [bq, 1], [bq, hd] float32
        start = pl.multiple_of(i * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]  # [bk, hd]
        v = v_ref[pl.ds(start, block_k), :]
        s = (
            lax.dot_general(
                q,
                k,
                (((1,), (1,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )
            * scale
        )  # [bq, bk]
        if masked:
            vis = visible(start)
            s = jnp.where(vis, s, _MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if masked:
            p = jnp.where(vis, p, 0.0)  # exact zeros: garbage and fully masked rows add nothing
        alpha = jnp.exp(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        pv = lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )  # [bq, hd]
        return m_new, l, alpha * acc + pv

    carry = (
        jnp.full((bq, 1), _MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
        jnp.zeros((bq, hd), jnp.float32),
    )
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(n_full, n_total, functools.partial(body, masked=True), carry)
    _, l, acc = carry
    o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def _backend_params(
    backend: str | None, block_sizes: BlockSizes
) -> tuple[pl.CompilerParams | None, pl.BlockSpec]:
    """(compiler_params, lengths BlockSpec) for the target backend; None backend = interpret."""
    if backend == "gpu":
        # Explicit Triton params: jax 0.10 would otherwise pick Mosaic GPU for a bare pallas_call.
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(
            num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
        )
        return params, pl.BlockSpec()
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
        return params, pl.BlockSpec(memory_space=pltpu.SMEM)
    return None, pl.BlockSpec()


def _padded_head_dim(backend: str | None, hd: int) -> int:
    # Triton tiles are powers of two >= 16; TPU and interpret take the full head dim as it is.
    return max(16, _next_pow2(hd)) if backend == "gpu" else hd


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def tree_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    block_mask: jax.Array,
    *,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
) -> jax.Array:
    """Tree attention of a block of T tokens against each row's KV cache (Pallas kernel).

    q [B, T, H, hd]; k, v [B, KV, S, hd] (head-major cache, block K/V already at slots
    [lengths, lengths + T)); lengths [B] int (committed prefix per row, in [0, S]); block_mask
    [B, T, T] bool (query t sees block key u iff block_mask[b, t, u]). Returns [B, T, H, hd] in
    q.dtype.

    q is cast to k's dtype for the matmuls when they differ. `interpret=True` runs the Pallas
    interpreter (the only mode on CPU). S is padded up to a multiple of block_k when needed,
    which copies the cache: pick max_len as a multiple of block_k.
    """
    _check_inputs(q, k, v, lengths, block_mask)
    backend = None if interpret else jax.default_backend()
    if backend == "cpu":
        raise ValueError(
            "tree_attention: Pallas runs on CPU only with interpret=True "
            "(or use tree_attention_reference / the XLA attention path)"
        )
    return _tree_attention_call(
        q, k, v, lengths, block_mask, block_sizes=block_sizes, backend=backend
    )


def _tree_attention_call(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    block_mask: jax.Array,
    *,
    block_sizes: BlockSizes,
    backend: str | None,
) -> jax.Array:
    """Layout + pallas_call for `backend` ("gpu", "tpu", or None = interpret). Unjitted, so tests
    can lower the GPU/TPU variants from a CPU machine (`lower(lowering_platforms=...)`)."""
    B, T, H, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV
    if backend == "gpu" and (block_sizes.block_k < 16 or block_sizes.rows_block(T * G) < 16):
        raise ValueError(f"on GPU (Triton) block_k and block_q must be >= 16, got {block_sizes}")
    block_k = block_sizes.block_k
    rows = T * G
    block_q = block_sizes.rows_block(rows)
    R = _round_up(rows, block_q)
    S_pad = _round_up(S, block_k)
    hdp = _padded_head_dim(backend, hd)
    W = -(-T // _BITS)  # int32 mask words per query

    # Queries: rows (t, g) of each kv head, so a GQA group shares its K/V loads.
    qg = q.astype(k.dtype).reshape(B, T, KV, G, hd)
    qg = qg.transpose(0, 2, 1, 3, 4).reshape(B, KV, rows, hd)  # [B, KV, T*G, hd]
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, R - rows), (0, hdp - hd)))  # [B, KV, R, hdp]

    # K/V: used in place ([B, KV, S, hd]: program (b, h) reads the slab k[b, h]). Pads copy: rare.
    if S_pad != S or hdp != hd:
        pad = ((0, 0), (0, 0), (0, S_pad - S), (0, hdp - hd))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)

    bits = tree_mask_bits(block_mask)  # [B, T, W]
    bits = jnp.repeat(bits, G, axis=1)  # [B, T*G, W]: row r = t*G + g has token t's bits
    bits = jnp.pad(bits, ((0, 0), (0, R - rows), (0, 0)))  # [B, R, W]

    lens = jnp.clip(lengths.astype(jnp.int32), 0, S)
    lens = jnp.pad(lens, (0, _next_pow2(B) - B))  # [B'] power of two (Triton loads)

    compiler_params, lengths_spec = _backend_params(backend, block_sizes)
    kernel = functools.partial(
        _tree_attention_kernel,
        seq_len=S,
        T=T,
        block_k=block_k,
        scale=1.0 / math.sqrt(hd),
        precision=lax.Precision.HIGHEST if k.dtype == jnp.float32 else None,
    )
    itemsize = jnp.dtype(k.dtype).itemsize
    cost = pl.CostEstimate(
        flops=int(4 * B * KV * R * S * hdp),
        transcendentals=int(B * KV * R * S),
        bytes_accessed=int(itemsize * (2 * B * S * KV * hdp + 2 * B * KV * R * hdp)),
    )
    out = pl.pallas_call(
        kernel,
        grid=(B, KV, R // block_q),
        in_specs=[
            lengths_spec,
            pl.BlockSpec((None, None, block_q, hdp), lambda b, h, i: (b, h, i, 0)),
            pl.BlockSpec((None, None, S_pad, hdp), lambda b, h, i: (b, h, 0, 0)),
            pl.BlockSpec((None, None, S_pad, hdp), lambda b, h, i: (b, h, 0, 0)),
            pl.BlockSpec((None, block_q, W), lambda b, h, i: (b, i, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, block_q, hdp), lambda b, h, i: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((B, KV, R, hdp), q.dtype),
        compiler_params=compiler_params,
        cost_estimate=cost,
        interpret=backend is None,
        name="tree_attention",
    )(lens, qg, k, v, bits)
    out = out[:, :, :rows, :hd].reshape(B, KV, T, G, hd)
    return out.transpose(0, 2, 1, 3, 4).reshape(B, T, H, hd)  # [B, T, H, hd]


# ----------------------------------------------------------------------------- reference


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def tree_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    block_mask: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """float32 jnp twin of `tree_attention` (same signature; block_sizes/interpret are ignored).

    Dense [B, T, S] mask from `dense_tree_mask`, softmax in float32 at HIGHEST precision; a query
    with no visible slot gets zeros (the kernel's convention). Returns q.dtype.
    """
    del block_sizes, interpret
    _check_inputs(q, k, v, lengths, block_mask)
    B, T, H, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    f32 = jnp.float32
    qg = q.astype(f32).reshape(B, T, KV, H // KV, hd)  # [B, T, KV, G, hd]
    s = jnp.einsum(
        "btkgd,bksd->bkgts", qg, k.astype(f32), precision=lax.Precision.HIGHEST
    ) / math.sqrt(hd)  # [B, KV, G, T, S]
    mask = dense_tree_mask(lengths, block_mask, S)[:, None, None]  # [B, 1, 1, T, S]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l == 0.0, 1.0, l)
    o = jnp.einsum("bkgts,bksd->btkgd", p, v.astype(f32), precision=lax.Precision.HIGHEST)
    return o.reshape(B, T, H, hd).astype(q.dtype)
