"""The JAX Llama-family model against HF transformers (torch, float32), and the KV-cache paths
(incremental decoding, ragged rows, rejected draft tokens) against the cache-free forward."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import specjax
from specjax import models
from specjax.models import llama
from specjax.models.cache import commit_chain, init_cache
from specjax.models.config import RopeScaling

ATOL = 1e-4

LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)

# name -> (family, config overrides, sequence length). Batch is always 2.
PARITY_CASES = {
    # MHA, odd head count, explicit head_dim with num_heads * head_dim (56) != hidden_size (42).
    "llama-mha-7heads": (
        "llama",
        dict(hidden_size=42, num_attention_heads=7, num_key_value_heads=7, head_dim=8),
        20,
    ),
    "llama-gqa-6q-2kv": (
        "llama",
        dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2),
        20,
    ),
    "llama-mqa-8q-1kv": (
        "llama",
        dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=1),
        20,
    ),
    # Llama 3.1 RoPE. head_dim 16, theta 1e4: wavelengths 6.3 (kept), 19.9 and 62.8 (smoothly
    # interpolated: between 64/4 and 64/1), >= 199 (divided by 8): all three branches are used.
    # Sequences (80) run past original_max_position_embeddings (64).
    "llama31-rope": (
        "llama",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters=LLAMA3_ROPE,
        ),
        80,
    ),
    "llama-linear-rope": (
        "llama",
        dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
        40,
    ),
    # Sliding window shorter than the sequence, so the window matters.
    "mistral-sliding-window": ("mistral", dict(sliding_window=8), 30),
    "qwen2-qkv-bias": ("qwen2", dict(), 20),
    # SmolLM2 layout: Llama with tied input/output embeddings.
    "smollm2-tied": (
        "llama",
        dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=4),
        20,
    ),
    "llama-untied": ("llama", dict(tie_word_embeddings=False), 20),
}


def hf_logits(hf_model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def random_ids(vocab: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def with_config(model: specjax.Model, **changes) -> specjax.Model:
    return dataclasses.replace(model, config=dataclasses.replace(model.config, **changes))


# ----------------------------------------------------------------------------- logits parity


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_hf(case, make_hf_model):
    family, overrides, T = PARITY_CASES[case]
    hf = make_hf_model(family, **overrides)
    model = specjax.model_from_hf(hf, dtype=jnp.float32)
    ids = random_ids(hf.config.vocab_size, (2, T), seed=1)
    want = hf_logits(hf, ids)
    got = np.asarray(model.logits(ids))
    assert got.shape == want.shape == (2, T, hf.config.vocab_size)
    assert np.abs(want).max() > 1.0, "weights too small for a meaningful comparison"
    assert max_err(got, want) < ATOL, f"{case}: max abs error {max_err(got, want):.2e}"

    # 1-D input (one sequence) is the same as row 0 of the batch.
    assert max_err(model.logits(ids[0]), got[0]) < 1e-5

    cfg = model.config
    assert cfg.model_type == family
    assert cfg.num_heads == hf.config.num_attention_heads
    assert cfg.num_kv_heads == hf.config.num_key_value_heads
    assert cfg.head_dim == overrides.get("head_dim", hf.config.hidden_size // cfg.num_heads)


@pytest.mark.parametrize("case, blk", [("smollm2-tied", 5), ("mistral-sliding-window", 10)])
def test_blocked_causal_prefill_matches_hf(case, blk, make_hf_model, monkeypatch):
    """Long prefills attend in query blocks (`PREFILL_BLOCK`, 256 in use); a small block makes
    the tiny models take that path. Runs eagerly, so the spy sees every call."""
    family, overrides, T = PARITY_CASES[case]
    hf = make_hf_model(family, **overrides)
    model = specjax.model_from_hf(hf, dtype=jnp.float32)
    calls, real = [], llama._causal_blocks
    monkeypatch.setattr(llama, "_causal_blocks", lambda *a: calls.append(a[-1]) or real(*a))
    monkeypatch.setattr(llama, "PREFILL_BLOCK", blk)
    ids = random_ids(hf.config.vocab_size, (2, T), seed=1)
    got = models.full_logits(model.params, model.config, jnp.asarray(ids))
    assert calls and set(calls) == {blk}  # every layer took the blocked path
    assert max_err(got, hf_logits(hf, ids)) < ATOL


def test_parity_cases_are_discriminative(make_hf_model):
    """The parity checks above can fail: each feature under test changes the logits by far more
    than ATOL, so dropping it (wrong RoPE scaling, no sliding window, no bias) is caught."""

    def err_without(case, mutate):
        family, overrides, T = PARITY_CASES[case]
        hf = make_hf_model(family, **overrides)
        ids = random_ids(hf.config.vocab_size, (1, T), seed=2)
        return max_err(mutate(specjax.model_from_hf(hf)).logits(ids), hf_logits(hf, ids))

    default_rope = dict(rope_scaling=RopeScaling())
    assert err_without("llama31-rope", lambda m: with_config(m, **default_rope)) > 1e-2
    assert err_without("llama-linear-rope", lambda m: with_config(m, **default_rope)) > 1e-2
    assert (
        err_without("mistral-sliding-window", lambda m: with_config(m, sliding_window=None)) > 1e-2
    )

    def zero_bias(m):
        m = m.with_layout("scan")
        layers = dict(m.params["layers"], bqkv=jnp.zeros_like(m.params["layers"]["bqkv"]))
        return dataclasses.replace(m, params=dict(m.params, layers=layers))

    assert err_without("qwen2-qkv-bias", zero_bias) > 1e-2


def test_tied_and_untied_heads(make_hf_model):
    tied = make_hf_model("llama", tie_word_embeddings=True)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    m = specjax.model_from_hf(tied)
    assert m.config.tie_word_embeddings and "lm_head" not in m.params

    untied = make_hf_model("llama", tie_word_embeddings=False)
    m = specjax.model_from_hf(untied)
    assert not m.config.tie_word_embeddings
    np.testing.assert_array_equal(
        np.asarray(m.params["lm_head"]), untied.lm_head.weight.detach().numpy().T
    )
    assert max_err(m.params["lm_head"], np.asarray(m.params["embed"]).T) > 0.1


def test_qwen2_biases_are_converted(make_hf_model):
    hf = make_hf_model("qwen2")
    m = specjax.model_from_hf(hf)
    assert m.config.attention_bias
    # Runtime layout: q, k, v biases side by side in `bqkv`.
    want = np.concatenate(
        [
            np.stack(
                [
                    getattr(layer.self_attn, theirs).bias.detach().numpy()
                    for layer in hf.model.layers
                ]
            )
            for theirs in ("q_proj", "k_proj", "v_proj")
        ],
        axis=-1,
    )
    assert np.abs(want).max() > 0.5  # really non-zero (HF's init zeroes them)
    np.testing.assert_array_equal(np.asarray(m.with_layout("scan").params["layers"]["bqkv"]), want)


# ----------------------------------------------------------------------------- KV cache

_forward = jax.jit(llama.forward, static_argnums=1, static_argnames=("hidden_layers", "impl"))

INCREMENTAL_CASES = {
    "llama-gqa": ("llama", dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=48)),
    # Window 6 < prefix length 11: the cached path must hide keys that fell out of the window.
    "mistral-window6": ("mistral", dict(sliding_window=6)),
    "qwen2-bias": ("qwen2", dict()),
}


@pytest.mark.parametrize("case", list(INCREMENTAL_CASES))
def test_incremental_decoding_matches_full_forward(case, make_hf_model):
    """Prefill -> single-token steps -> a 4-token chunk with 2 wrong (rejected) tokens -> more
    single-token steps, on a batch of two rows with different lengths (right padded). Every
    logit must equal the cache-free forward over the true sequence."""
    family, overrides = INCREMENTAL_CASES[case]
    model = specjax.model_from_hf(make_hf_model(family, **overrides), dtype=jnp.float32)
    params, cfg = model.params, model.config
    B, N, S = 2, 28, 32
    ids = random_ids(cfg.vocab_size, (B, N), seed=3)
    full = np.asarray(model.logits(ids))  # [B, N, V]; rows are independent
    rows = np.arange(B)

    # Prefill: row 0 has 5 prompt tokens, row 1 has 11. Row 0's slots 5..10 get pad tokens,
    # which are written to the cache but never committed: they must never be attended to.
    P = np.array([5, 11])
    T0 = int(P.max())
    prompt = ids[:, :T0].copy()
    prompt[0, P[0] :] = (ids[0, P[0] : T0] + 1) % cfg.vocab_size  # garbage != the true tokens
    positions = np.broadcast_to(np.arange(T0, dtype=np.int32), (B, T0))
    cache = init_cache(cfg, B, S, jnp.float32)
    logits, _, cache = _forward(params, cfg, jnp.asarray(prompt), jnp.asarray(positions), cache)
    logits = np.asarray(logits)
    for b in rows:
        assert max_err(logits[b, : P[b]], full[b, : P[b]]) < ATOL
    cache = cache.replace(lengths=jnp.asarray(P, jnp.int32))

    def step(cache, n_steps):
        for _ in range(n_steps):
            L = np.asarray(cache.lengths)
            tok = ids[rows, L][:, None]
            logits, _, cache = _forward(
                params, cfg, jnp.asarray(tok), jnp.asarray(L[:, None].astype(np.int32)), cache
            )
            assert logits.shape == (B, 1, cfg.vocab_size)
            assert max_err(logits[:, 0], full[rows, L]) < ATOL, f"step at lengths {L}"
            cache = commit_chain(cache, jnp.ones(B, jnp.int32))
        return cache

    cache = step(cache, 3)

    # A chunk of K=4 tokens (a drafted chain): the first 2 are right, the last 2 wrong.
    K, good = 4, 2
    L = np.asarray(cache.lengths)
    idx = L[:, None] + np.arange(K)[None, :]
    chunk = np.take_along_axis(ids, idx, axis=1).copy()
    chunk[:, good:] = (chunk[:, good:] + 7) % cfg.vocab_size
    logits, _, cache = _forward(params, cfg, jnp.asarray(chunk), jnp.asarray(idx, jnp.int32), cache)
    assert logits.shape == (B, K, cfg.vocab_size)
    want = np.take_along_axis(full, idx[:, :good, None], axis=1)
    assert max_err(np.asarray(logits)[:, :good], want) < ATOL
    assert np.all(np.asarray(cache.lengths) == L), "forward must not move lengths"
    # Commit only the correct prefix; the wrong tokens' K/V stay in the cache as garbage.
    cache = commit_chain(cache, jnp.full((B,), good, jnp.int32))

    # Continue token by token: the garbage slots are overwritten / never seen.
    cache = step(cache, 3)
    # And a fully correct chunk at the ragged lengths.
    L = np.asarray(cache.lengths)
    idx = L[:, None] + np.arange(K)[None, :]
    assert idx.max() < N
    logits, _, cache = _forward(
        params,
        cfg,
        jnp.asarray(np.take_along_axis(ids, idx, axis=1)),
        jnp.asarray(idx, jnp.int32),
        cache,
    )
    assert max_err(logits, np.take_along_axis(full, idx[:, :, None], axis=1)) < ATOL


def test_logits_at_selects_positions(make_hf_model):
    model = specjax.model_from_hf(make_hf_model("llama"))
    params, cfg = model.params, model.config
    ids = random_ids(cfg.vocab_size, (2, 12), seed=4)
    full = np.asarray(model.logits(ids))
    at = np.array([[11], [3]], np.int32)
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    logits, _, _ = _forward(
        params, cfg, jnp.asarray(ids), positions, init_cache(cfg, 2, 12), logits_at=jnp.asarray(at)
    )
    assert logits.shape == (2, 1, cfg.vocab_size)
    assert max_err(logits[:, 0], full[[0, 1], at[:, 0]]) < ATOL


# ----------------------------------------------------------------------------- hidden states


def test_hidden_layers_match_hf_hidden_states(make_hf_model):
    """`forward(..., hidden_layers=idx).layers[j]` is the residual stream *entering* decoder layer
    idx[j] (idx 0: the embedding output; idx i: the output of layer i-1), always before any
    norm. This equals HF `hidden_states[i]` for i < num_layers. For i == num_layers it is the
    output of the last layer *before* the final norm, whereas HF's `hidden_states[num_layers]`
    is the final-normed state (`last_hidden_state`, transformers 4.x appended it after the norm,
    and 5.x overwrites `hidden_states[-1]` with it). The final-normed state is `Hiddens.last`.
    """
    L = 3
    hf = make_hf_model("llama", num_hidden_layers=L)
    model = specjax.model_from_hf(hf)
    params, cfg = model.params, model.config
    B, T = 2, 10
    ids = random_ids(cfg.vocab_size, (B, T), seed=5)

    captured = {}

    def hook(_module, _inputs, output):  # output of the last decoder layer, pre final norm
        captured["pre_norm"] = (output[0] if isinstance(output, tuple) else output).detach()

    handle = hf.model.layers[L - 1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = hf.model(torch.as_tensor(ids, dtype=torch.long), output_hidden_states=True)
    finally:
        handle.remove()
    hs = [h.numpy() for h in out.hidden_states]
    assert len(hs) == L + 1
    pre_norm = captured["pre_norm"].numpy()
    # HF's convention for the last entry (documented above):
    np.testing.assert_allclose(hs[L], out.last_hidden_state.numpy(), atol=1e-6)
    assert max_err(hs[L], pre_norm) > 0.1

    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    want_idx = (0, 2, L)
    logits, hiddens, _ = _forward(
        params, cfg, jnp.asarray(ids), positions, init_cache(cfg, B, T), hidden_layers=want_idx
    )
    layers = np.asarray(hiddens.layers)
    assert layers.shape == (len(want_idx), B, T, cfg.hidden_size)
    assert max_err(layers[0], hs[0]) < 1e-6  # embedding lookup: exact
    assert max_err(layers[1], hs[2]) < ATOL  # output of layer 1
    assert max_err(layers[2], pre_norm) < ATOL  # output of the last layer, pre-norm
    assert max_err(hiddens.last, hs[L]) < ATOL  # post final norm == HF hidden_states[-1]
    assert (
        max_err(
            llama.rms_norm(hiddens.layers[2], params["final_norm"], cfg.rms_norm_eps), hiddens.last
        )
        < 1e-5
    )
    assert max_err(logits, hf_logits(hf, ids)) < ATOL

    # Order and repetition of the requested indices are respected; none requested -> None.
    _, h2, _ = _forward(
        params, cfg, jnp.asarray(ids), positions, init_cache(cfg, B, T), hidden_layers=(L, 1, 1)
    )
    assert max_err(h2.layers[0], layers[2]) < 1e-6
    assert max_err(h2.layers[1], hs[1]) < ATOL and max_err(h2.layers[2], hs[1]) < ATOL
    _, h3, _ = _forward(params, cfg, jnp.asarray(ids), positions, init_cache(cfg, B, T))
    assert h3.layers is None


def test_scan_and_unrolled_layouts_agree(make_hf_model):
    """Both runtime layouts (stacked layers under lax.scan, per-layer dicts unrolled) give the
    same logits, the same incremental decoding and the same generations."""
    hf = make_hf_model("qwen2", num_hidden_layers=3)
    unrolled = specjax.model_from_hf(hf)
    scan = unrolled.with_layout("scan")
    assert unrolled.layout == "unrolled" and scan.layout == "scan"
    assert scan.with_layout("unrolled").layout == "unrolled"
    ids = random_ids(hf.config.vocab_size, (2, 20), seed=3)
    np.testing.assert_allclose(
        np.asarray(scan.logits(ids)), np.asarray(unrolled.logits(ids)), atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(scan.logits(ids)), hf_logits(hf, ids), atol=1e-4)
    prompts = [ids[0, :7].tolist(), ids[1].tolist()]
    a = specjax.generate(
        scan, prompts, max_new_tokens=12, drafter=specjax.drafters.layer_skip(layers=1, k=2)
    )
    b = specjax.generate(unrolled, prompts, max_new_tokens=12)
    assert a.tokens == b.tokens
    with pytest.raises(ValueError, match="layout"):
        unrolled.with_layout("stacked")


def test_weight_orientations_agree(make_hf_model):
    """Layer matrices stored [in, out] (checkpoints) or [out, in] (CPU's default: products of
    2-16 rows as row reductions, `llama.times_out_in`): the same model. Logits agree for 1 row
    (matrix-vector), 2 x 4 rows (row reduction) and 2 x 20 rows (weight-left product), with HF
    too; greedy and speculative generations are identical; the conversion round-trips exactly in
    both layouts; a bad name is refused."""
    hf = make_hf_model("qwen2", num_hidden_layers=3)  # biases too
    loaded = specjax.model_from_hf(hf)
    assert loaded.orientation == specjax.model.default_orientation()
    out_in, in_out = loaded.with_orientation("out_in"), loaded.with_orientation("in_out")
    assert out_in.orientation == "out_in" and in_out.orientation == "in_out"
    assert "wqkv_t" in out_in.params["layers"][0] and "wqkv" in in_out.params["layers"][0]
    for shape in ((1, 1), (2, 4), (2, 20)):
        ids = random_ids(hf.config.vocab_size, shape, seed=4)
        a, b = np.asarray(out_in.logits(ids)), np.asarray(in_out.logits(ids))
        np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_allclose(a, hf_logits(hf, ids), atol=1e-4)
    for layout in ("unrolled", "scan"):
        m = in_out.with_layout(layout)
        back = m.with_orientation("out_in").with_orientation("in_out")
        assert jax.tree.structure(back.params) == jax.tree.structure(m.params)
        for x, y in zip(jax.tree.leaves(back.params), jax.tree.leaves(m.params)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    prompts = [[5, 6, 7, 5, 6, 7, 5], [9, 3, 1, 4, 1, 5, 9, 2, 6]]
    ngram = specjax.drafters.ngram(k=4)
    ref = specjax.generate(in_out, prompts, max_new_tokens=16).tokens
    for m in (out_in, out_in.with_layout("scan")):
        assert specjax.generate(m, prompts, max_new_tokens=16).tokens == ref
        assert specjax.generate(m, prompts, max_new_tokens=16, drafter=ngram).tokens == ref
    with pytest.raises(ValueError, match="orientation"):
        loaded.with_orientation("transposed")
