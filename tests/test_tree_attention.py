"""Tree-attention kernel (Pallas, interpret mode on CPU) vs its float32 reference vs numpy.

Invariants: kernel == reference on random trees with ragged prefix lengths (0, 1, block_k - 1,
block_k + 1, long, and a block that ends exactly at S), GQA ratios 1/2/3, T in {1, 5, 16} (and 40:
two mask words), float32 and bfloat16; reference == plain numpy softmax over the visible slots;
garbage beyond lengths + T never changes the output; bad shapes raise clear ValueErrors.
K/V use the model's head-major cache layout [B, KV, S, hd]. The model with impl="pallas" (prefill,
decode, tree verify, and speculative `generate`) matches impl="xla".
Every case is one kernel compile (~1 s in interpret mode), so the sweep is kept deliberate.
"""

from __future__ import annotations

import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    BlockSizes,
    dense_tree_mask,
    tree_attention,
    tree_attention_reference,
    tree_mask_bits,
)

BK = 16  # small block_k so short caches still span several KV blocks
F32_TOL = dict(atol=1e-5, rtol=1e-5)
# bf16 inputs: the kernel casts p to bf16 for p @ v (as FlashAttention does) and rounds the
# output to bf16 (rel. 2^-8); the reference stays float32 until the final cast.
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- helpers


def random_parents(rng: np.random.Generator, T: int) -> np.ndarray:
    """A random tree of T nodes in topological order: node 0 is the root (-1), parent[i] < i."""
    parents = np.full(T, -1, np.int64)
    for i in range(1, T):
        parents[i] = rng.integers(0, i)
    return parents


def ancestor_mask(parents: np.ndarray) -> np.ndarray:
    """[T, T] bool: mask[t, u] iff u is t or an ancestor of t (walks the parent links)."""
    T = len(parents)
    mask = np.zeros((T, T), bool)
    for t in range(T):
        u = t
        while u >= 0:
            mask[t, u] = True
            u = parents[u]
    return mask


def random_tree_masks(rng, B: int, T: int) -> np.ndarray:
    return np.stack([ancestor_mask(random_parents(rng, T)) for _ in range(B)])  # [B, T, T]


def numpy_tree_attention(q, k, v, lengths, block_mask) -> np.ndarray:
    """Independent float64 oracle: loop over rows/queries/heads, softmax over visible slots."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV
    out = np.zeros((B, T, H, hd))
    for b in range(B):
        L = int(lengths[b])
        for t in range(T):
            slots = list(range(L)) + [L + u for u in range(T) if block_mask[b, t, u] and L + u < S]
            for h in range(H):
                kv = h // G
                if not slots:  # no visible slot: zeros by convention
                    continue
                s = k[b, kv, slots] @ q[b, t, h] / math.sqrt(hd)
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ v[b, kv, slots]
    return out


def make_inputs(seed, B, T, H, KV, hd, S, dtype, lengths):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, hd)).astype(np.float32)
    k = rng.normal(size=(B, KV, S, hd)).astype(np.float32)  # head-major cache layout
    v = rng.normal(size=(B, KV, S, hd)).astype(np.float32)
    mask = random_tree_masks(rng, B, T)
    lengths = np.asarray(lengths, np.int32)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), jnp.asarray(lengths), jnp.asarray(mask)


def ragged_lengths(S: int, T: int, block_k: int = BK) -> list[int]:
    """0, 1, block_k - 1, block_k + 1, long, and a block that ends exactly at slot S."""
    return [0, 1, block_k - 1, block_k + 1, S - T - 3, S - T]


def assert_close(x, y, tol):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **tol)


# ----------------------------------------------------------------------------- reference


def test_tree_mask_from_parents():
    # Chain (parents i - 1) -> causal; a star (all children of the root) -> root + self.
    assert (ancestor_mask(np.arange(-1, 5)) == np.tril(np.ones((6, 6), bool))).all()
    star = ancestor_mask(np.array([-1, 0, 0, 0]))
    assert (star == np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], bool)).all()


def test_dense_mask_and_bits():
    rng = np.random.default_rng(0)
    B, T, S = 3, 40, 64
    bm = random_tree_masks(rng, B, T)
    lengths = np.array([0, 5, 24])
    dense = np.asarray(dense_tree_mask(jnp.asarray(lengths), jnp.asarray(bm), S))
    for b in range(B):
        L = lengths[b]
        assert dense[b, :, :L].all() and not dense[b, :, L + T :].any()
        assert (dense[b, :, L : L + T] == bm[b]).all()
    words = np.asarray(tree_mask_bits(jnp.asarray(bm))).view(np.uint32)  # [B, T, 2]
    assert words.shape == (B, T, 2)
    unpacked = (words[..., None] >> np.arange(32, dtype=np.uint32)) & 1  # [B, T, 2, 32]
    assert (unpacked.reshape(B, T, 64)[..., :T] == bm).all()
    assert not unpacked.reshape(B, T, 64)[..., T:].any()


@pytest.mark.parametrize("H,KV,T", [(4, 4, 5), (6, 2, 16), (4, 2, 1)])
def test_reference_matches_numpy_dense_attention(H, KV, T):
    S, hd = 48, 8
    q, k, v, lengths, bm = make_inputs(1, 6, T, H, KV, hd, S, jnp.float32, ragged_lengths(S, T))
    ref = tree_attention_reference(q, k, v, lengths, bm)
    oracle = numpy_tree_attention(q, k, v, np.asarray(lengths), np.asarray(bm))
    assert_close(ref, oracle, F32_TOL)


def test_reference_matches_model_attention_path():
    """dense_tree_mask == the model's build_attention_mask; reference == attention_xla."""
    llama = pytest.importorskip("specjax.models.llama")
    B, T, H, KV, hd, S = 3, 5, 4, 2, 8, 32
    q, k, v, lengths, bm = make_inputs(2, B, T, H, KV, hd, S, jnp.float32, [0, 7, 27])
    positions = lengths[:, None] + jnp.arange(T)[None]
    mask = llama.build_attention_mask(lengths, positions, bm, S, None)
    assert (np.asarray(mask) == np.asarray(dense_tree_mask(lengths, bm, S))).all()
    assert_close(
        tree_attention_reference(q, k, v, lengths, bm), llama.attention_xla(q, k, v, mask), F32_TOL
    )


# ----------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("T", [1, 5, 16])
@pytest.mark.parametrize("H,KV", [(2, 2), (4, 2), (6, 2)], ids=["G1", "G2", "G3"])
def test_kernel_matches_reference_f32(H, KV, T):
    S, hd = 64, 16
    q, k, v, lengths, bm = make_inputs(3, 6, T, H, KV, hd, S, jnp.float32, ragged_lengths(S, T))
    out = tree_attention(q, k, v, lengths, bm, block_sizes=BlockSizes(block_k=BK), interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, tree_attention_reference(q, k, v, lengths, bm), F32_TOL)


@pytest.mark.parametrize("H,KV,T", [(2, 2, 5), (6, 2, 16), (3, 1, 1)])
def test_kernel_matches_reference_bf16(H, KV, T):
    S, hd = 64, 16
    q, k, v, lengths, bm = make_inputs(4, 6, T, H, KV, hd, S, jnp.bfloat16, ragged_lengths(S, T))
    out = tree_attention(q, k, v, lengths, bm, block_sizes=BlockSizes(block_k=BK), interpret=True)
    assert out.dtype == jnp.bfloat16
    assert_close(out, tree_attention_reference(q, k, v, lengths, bm), BF16_TOL)


def test_kernel_default_block_sizes_and_padded_cache():
    """block_k = 128 around its edges, with S = 200 not a multiple of 128 (the pad path)."""
    S, T = 200, 5
    lengths = [0, 1, 127, 129, S - T]
    q, k, v, lengths, bm = make_inputs(5, 5, T, 4, 2, 16, S, jnp.float32, lengths)
    out = tree_attention(q, k, v, lengths, bm, interpret=True)
    assert_close(out, tree_attention_reference(q, k, v, lengths, bm), F32_TOL)


def test_kernel_query_blocks_and_two_mask_words():
    """T = 40 > 32 (two int32 mask words) and block_q = 16 < T * G = 80 rows (5 query blocks)."""
    S, T = 96, 40
    q, k, v, lengths, bm = make_inputs(6, 4, T, 2, 1, 8, S, jnp.float32, [0, 1, 17, S - T])
    out = tree_attention(
        q, k, v, lengths, bm, block_sizes=BlockSizes(block_k=BK, block_q=16), interpret=True
    )
    assert_close(out, tree_attention_reference(q, k, v, lengths, bm), F32_TOL)


def test_garbage_beyond_block_is_ignored():
    """Huge finite K/V in slots >= lengths + T (stale rejected drafts) change nothing.

    Also: a query that sees no slot at all (row 0 has length 0; its last query is given an
    all-False mask row, which real trees never have) outputs exactly zeros, not garbage.
    """
    B, T, H, KV, hd, S = 6, 5, 4, 2, 16, 64
    q, k, v, lengths, bm = make_inputs(7, B, T, H, KV, hd, S, jnp.float32, ragged_lengths(S, T))
    bm = bm.at[0, T - 1].set(False)
    stale = (jnp.arange(S)[None, :] >= (lengths + T)[:, None])[:, None, :, None]  # [B, 1, S, 1]
    clean_k, clean_v = jnp.where(stale, 0.0, k), jnp.where(stale, 0.0, v)
    dirty_k, dirty_v = jnp.where(stale, 1e30, k), jnp.where(stale, -3e29, v)
    bs = BlockSizes(block_k=BK)
    clean = tree_attention(q, clean_k, clean_v, lengths, bm, block_sizes=bs, interpret=True)
    dirty = tree_attention(q, dirty_k, dirty_v, lengths, bm, block_sizes=bs, interpret=True)
    assert np.isfinite(np.asarray(dirty)).all()
    assert not np.asarray(dirty)[0, T - 1].any()
    np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))
    assert_close(
        tree_attention_reference(q, dirty_k, dirty_v, lengths, bm),
        tree_attention_reference(q, clean_k, clean_v, lengths, bm),
        F32_TOL,
    )
    assert_close(
        dirty,
        numpy_tree_attention(q, dirty_k, dirty_v, np.asarray(lengths), np.asarray(bm)),
        F32_TOL,
    )


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernel_lowers_for_gpu_and_tpu(platform, monkeypatch):
    """Lower (not compile, not run) the Triton-GPU and Mosaic-TPU variants from this CPU machine.

    Catches ops a backend's Pallas lowering lacks (e.g. Triton has no value slicing) and tile
    shapes it rejects. T = 40 (two mask words), hd = 80 (head-dim padding), GQA 3, ragged S.
    Compiling and running them needs the accelerator: untested here.
    """
    ta = importlib.import_module("pallas_kernels.tree_attention")
    marker = {"cuda": "xla.gpu.triton", "tpu": "tpu_custom_call"}[platform]
    if platform == "tpu":
        # Mosaic TPU lowering asks the default device for its generation; pretend to be a v5e.
        # (The pinned jax has these hooks; a jax without them fails here, loudly.)
        tpu_info = importlib.import_module("jax._src.pallas.mosaic.tpu_info")
        monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
        monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    B, T, H, KV, hd, S = 3, 40, 6, 2, 80, 200
    sds = jax.ShapeDtypeStruct
    args = (
        sds((B, T, H, hd), jnp.bfloat16),
        sds((B, KV, S, hd), jnp.bfloat16),
        sds((B, KV, S, hd), jnp.bfloat16),
        sds((B,), jnp.int32),
        sds((B, T, T), jnp.bool_),
    )
    call = functools.partial(
        ta._tree_attention_call,
        block_sizes=BlockSizes(block_k=64),
        backend={"cuda": "gpu", "tpu": "tpu"}[platform],
    )
    text = jax.jit(call).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert marker in text


# ----------------------------------------------------------------------------- model

MODEL_ATOL = 1e-5  # float32 logits, impl="pallas" vs impl="xla"


@pytest.fixture(scope="module")
def tiny_model(make_hf_model):
    """2 layers, 4 query heads over 2 kv heads (GQA), hd 8, vocab 101; no EOS so every row runs
    its whole budget in `generate`."""
    specjax = pytest.importorskip("specjax")
    return specjax.model_from_hf(make_hf_model("llama", eos_token_id=None), dtype=jnp.float32)


def test_model_forward_pallas_matches_xla(tiny_model):
    """Whole-model logits, impl="pallas" vs "xla", on ragged rows: causal prefill (row 0's pad
    slots are written but never committed), one decode token, then a random-tree verify block.
    Drafter-style calls (write_offset, block_mask wider than the block) fall back to XLA."""
    from specjax.engine import tree
    from specjax.models import llama
    from specjax.models.cache import init_cache

    params, cfg = tiny_model.params, tiny_model.config
    fwd = jax.jit(llama.forward, static_argnums=1, static_argnames=("impl",))
    rng = np.random.default_rng(9)
    B, P, S, N = 2, 11, 48, 6

    def both(tokens, positions, cache, **kw):
        args = (
            params,
            cfg,
            jnp.asarray(tokens, jnp.int32),
            jnp.asarray(positions, jnp.int32),
            cache,
        )
        uses_kernel = "pallas_call" in str(
            jax.make_jaxpr(functools.partial(llama.forward, impl="pallas", **kw), static_argnums=1)(
                *args
            )
        )
        lx, _, cx = fwd(*args, impl="xla", **kw)
        lp, _, cp = fwd(*args, impl="pallas", **kw)
        err = float(jnp.max(jnp.abs(lp - lx)))
        assert err < MODEL_ATOL, err
        assert_close(cp.k, cx.k, F32_TOL)
        return cx, uses_kernel

    # Prefill (causal), then commit 7 and 11 prompt tokens.
    ids = rng.integers(0, cfg.vocab_size, (B, P))
    cache, used = both(ids, np.broadcast_to(np.arange(P), (B, P)), init_cache(cfg, B, S))
    assert used
    cache = cache.replace(lengths=jnp.asarray([7, P], jnp.int32))

    # One decode token per row.
    tok = rng.integers(0, cfg.vocab_size, (B, 1))
    cache, used = both(tok, cache.lengths[:, None], cache)
    assert used
    cache = cache.replace(lengths=cache.lengths + 1)

    # Verify a random tree per row: [root, node_0 .. node_{N-1}] with ancestor-or-self masks.
    parents = jnp.asarray(
        np.stack([random_parents(rng, N + 1)[1:] - 1 for _ in range(B)]), jnp.int32
    )  # node i's parent in [-1, i): -1 is the root
    depth = tree.depth_from_parents(parents)
    block = rng.integers(0, cfg.vocab_size, (B, N + 1))
    _, used = both(
        block,
        tree.block_positions(depth, cache.lengths),
        cache,
        block_mask=tree.block_mask(parents),
    )
    assert used

    # A drafter growing a tree: 2 tokens written after a 3-slot window prefix -> XLA fallback.
    wmask = jnp.broadcast_to(jnp.asarray([[1, 0, 0, 1, 0], [1, 1, 0, 0, 1]], bool), (B, 2, 5))
    _, used = both(
        block[:, :2],
        cache.lengths[:, None] + jnp.asarray([[1, 2]]),
        cache,
        block_mask=wmask,
        write_offset=jnp.full((B,), 3, jnp.int32),
    )
    assert not used


def test_generate_pallas_matches_xla(tiny_model, monkeypatch):
    """Speculative greedy generation with the n-gram drafter: same tokens with either impl, and
    the pallas run really traces the kernel (prefill and the verify block)."""
    specjax = pytest.importorskip("specjax")
    from specjax.models import llama

    blocks = []

    def spy(q, *args, **kw):
        blocks.append(q.shape[1])
        return tree_attention(q, *args, **kw)

    monkeypatch.setattr(llama, "tree_attention", spy)
    prompts = [[7, 8, 9, 10] * 3, [40, 41, 42, 5, 40, 41]]
    kw = dict(max_new_tokens=8, drafter=specjax.drafters.ngram(k=3))
    want = specjax.generate(tiny_model, prompts, impl="xla", **kw).tokens
    assert not blocks
    got = specjax.generate(tiny_model, prompts, impl="pallas", **kw).tokens
    assert 4 in blocks  # the verify block [last token, 3 drafts]
    assert [len(t) for t in want] == [8, 8]
    assert got == want


# ----------------------------------------------------------------------------- errors


def _ok(B=2, T=3, H=4, KV=2, hd=8, S=16):
    return dict(
        q=jnp.zeros((B, T, H, hd)),
        k=jnp.zeros((B, KV, S, hd)),
        v=jnp.zeros((B, KV, S, hd)),
        lengths=jnp.zeros((B,), jnp.int32),
        block_mask=jnp.ones((B, T, T), bool),
    )


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(q=jnp.zeros((2, 3, 4))), r"q must be \[B, T, H, hd\], got shape \(2, 3, 4\)"),
        (dict(k=jnp.zeros((2, 16, 8))), r"k must be \[B, KV, S, hd\]"),
        (dict(v=jnp.zeros((2, 2, 16, 4))), r"v must have k's shape \(2, 2, 16, 8\)"),
        (dict(k=jnp.zeros((3, 2, 16, 8)), v=jnp.zeros((3, 2, 16, 8))), r"k/v batch 3"),
        (dict(k=jnp.zeros((2, 2, 16, 4)), v=jnp.zeros((2, 2, 16, 4))), r"k/v head dim 4"),
        (
            dict(k=jnp.zeros((2, 3, 16, 8)), v=jnp.zeros((2, 3, 16, 8))),
            r"H=4 must be a positive multiple of kv heads KV=3",
        ),
        (
            dict(k=jnp.zeros((2, 2, 2, 8)), v=jnp.zeros((2, 2, 2, 8))),
            r"T=3 must satisfy 1 <= T <= S=2",
        ),
        (dict(lengths=jnp.zeros((3,), jnp.int32)), r"lengths must be \[B\] = \(2,\)"),
        (dict(lengths=jnp.zeros((2,), jnp.float32)), r"lengths must be an integer dtype"),
        (
            dict(block_mask=jnp.ones((2, 3, 4), bool)),
            r"block_mask must be \[B, T, T\] = \(2, 3, 3\)",
        ),
        (dict(block_mask=jnp.ones((2, 3, 3), jnp.int32)), r"block_mask must be bool"),
        (dict(v=jnp.zeros((2, 2, 16, 8), jnp.bfloat16)), r"k and v must share a dtype"),
    ],
)
@pytest.mark.parametrize(
    "fn", [tree_attention, tree_attention_reference], ids=["kernel", "reference"]
)
def test_shape_errors(fn, change, match):
    args = {**_ok(), **change}
    with pytest.raises(ValueError, match=match):
        fn(args["q"], args["k"], args["v"], args["lengths"], args["block_mask"], interpret=True)


def test_block_sizes_validation_and_cpu_needs_interpret():
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        BlockSizes(block_k=48)
    with pytest.raises(ValueError, match="block_q must be None or a power of two"):
        BlockSizes(block_q=4)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret=True"):
            tree_attention(**_ok())
