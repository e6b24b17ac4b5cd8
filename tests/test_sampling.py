"""`process_logits` (temperature, top-k, top-p) against the sorting definition it replaced.

The engine's version avoids sorting the vocabulary (XLA CPU sorts 49,152 floats in ~12 ms, a
SmolLM2 step is ~25 ms): top-k through XLA's TopK kernel, top-p's cut looked for in the head of
the descending order (the top-k tokens, or the 256 / 2048 most likely) before a full sort. It
must give exactly the log-probs of the definition below, which sorts everything.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import sampling
from specjax.sampling import NEG_INF, make_sampling, process_logits


@functools.partial(jax.jit, static_argnums=1)
def sorting_reference(logits, mode, sp):
    """The definition: top-k by the k-th largest logit, top-p over the whole sorted vocabulary
    (HF semantics: a token is kept while the mass strictly before it is < top_p)."""
    x = logits.astype(jnp.float32) / sp["temperature"]
    if mode.top_k is not None and mode.top_k < x.shape[-1]:
        kth = jnp.sort(x, axis=-1)[..., -mode.top_k][..., None]
        x = jnp.where(x < kth, NEG_INF, x)
    logp = jax.nn.log_softmax(x, axis=-1)
    if mode.use_top_p:
        p = jnp.exp(logp)
        sorted_p = jnp.sort(p, axis=-1)[..., ::-1]
        before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
        keep = (before < sp["top_p"]).at[..., 0].set(True)
        min_kept = jnp.min(jnp.where(keep, sorted_p, jnp.inf), axis=-1, keepdims=True)
        logp = jax.nn.log_softmax(jnp.where(p >= min_kept, logp, NEG_INF), axis=-1)
    return logp


engine_version = jax.jit(process_logits, static_argnums=1)


def _logits(kind: str, rows: int, V: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "ties":  # integer logits: many ties at the k-th value and at top-p's cut
        return rng.integers(-3, 4, (rows, V)).astype(np.float32)
    scale = {"flat": 0.3, "medium": 2.5, "peaky": 6.0}[kind]
    return (scale * rng.standard_normal((rows, V))).astype(np.float32)


def _head_needed(logits: np.ndarray, temperature: float, top_p: float) -> int:
    """How far down the descending order the top-p cut of the neediest row lies (float64)."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    before = np.cumsum(-np.sort(-p, -1), -1)
    return int((before < top_p).sum(-1).max()) + 1


@pytest.mark.parametrize("kind", ["peaky", "medium", "flat", "ties"])
@pytest.mark.parametrize(
    "top_k,top_p", [(None, 0.9), (40, None), (40, 0.9), (3, 0.5), (None, 0.99), (2500, 0.95)]
)
def test_same_logprobs_as_sorting_everything(kind, top_k, top_p):
    V = 5000  # above both top-p heads (256, 2048): every level of the search is reachable
    for seed, temperature in ((0, 1.0), (1, 0.7)):
        x = jnp.asarray(_logits(kind, 6, V, seed))
        mode, sp = make_sampling(temperature, top_k, top_p)
        got = np.asarray(engine_version(x, mode, sp))
        want = np.asarray(sorting_reference(x, mode, sp))
        np.testing.assert_array_equal(got, want)
        assert np.isfinite(got).any(-1).all()


def test_every_top_p_level_is_taken():
    """The cases above reach each level of the search: the 256-token head, the 2048-token head
    and the full sort (measured on the logits themselves, in float64)."""
    V, heads = 5000, sampling.TOP_P_HEADS
    needed = {kind: _head_needed(_logits(kind, 6, V, 0), 1.0, 0.9) for kind in ("peaky", "medium")}
    needed["flat"] = _head_needed(_logits("flat", 6, V, 0), 1.0, 0.99)
    assert needed["peaky"] <= heads[0] < needed["medium"] <= heads[1] < needed["flat"], needed


def test_small_vocabulary_and_top_k_at_least_v():
    x = jnp.asarray(_logits("medium", 4, 101, 3))
    for top_k, top_p in ((None, 0.8), (101, 0.8), (500, None), (5, 0.8), (1, 0.3)):
        mode, sp = make_sampling(1.3, top_k, top_p)
        np.testing.assert_array_equal(
            np.asarray(engine_version(x, mode, sp)), np.asarray(sorting_reference(x, mode, sp))
        )


def _compiled_ops(top_k, top_p) -> tuple[int, int]:
    """(sorts, TopK kernels) in the compiled CPU program of `process_logits` at V = 4096."""
    mode, sp = make_sampling(1.0, top_k, top_p)
    x = jnp.zeros((3, 4096), jnp.float32)
    text = jax.jit(process_logits, static_argnums=1).lower(x, mode, sp).compile().as_text()
    return len(re.findall(r"= \S+ sort\(", text)), len(re.findall(r"topk", text, re.IGNORECASE))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="reads XLA CPU's compiled program")
def test_top_k_compiles_without_a_sort():
    """XLA runs `lax.top_k` as its TopK kernel only when the whole top-k result is read; taking
    just the k-th value compiled to a full sort of the vocabulary (this function once did, at
    ~10 ms a row for SmolLM2's 49,152 tokens). Top-p alone keeps one sort: the last resort."""
    assert _compiled_ops(50, None) == (0, 1)
    assert _compiled_ops(50, 0.9) == (0, 1)
    sorts, topks = _compiled_ops(None, 0.9)
    assert sorts == 1 and topks == 2


def test_argmax_is_jnp_argmax():
    """The greedy paths' `sampling.argmax` (max, then the first index holding it) returns what
    `jnp.argmax` returns: the first maximum on ties, the first NaN when a row holds one."""
    rng = np.random.default_rng(5)
    rows = [
        rng.standard_normal(300),
        rng.integers(-2, 3, 300),  # ties everywhere
        np.full(300, -np.inf),
        np.where(np.arange(300) % 7 == 3, np.nan, rng.standard_normal(300)),
        np.r_[np.full(299, -np.inf), 0.0],
    ]
    x = jnp.asarray(np.stack(rows).astype(np.float32))
    for arr in (x, x.reshape(1, 5, 300), x[:, :196]):
        got = jax.jit(sampling.argmax)(arr)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(arr, axis=-1)))
