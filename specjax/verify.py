"""Acceptance of a drafted chain against the target's logits, exactly lossless.

Inputs for a batch of B rows and a draft of K tokens:
    target_logits [B, K+1, V]: the target's logits after `last` and after each draft token;
    draft_tokens  [B, K];
    draft_logp    [B, K, V] log q (processed exactly as the target's), or None for a
                  deterministic drafter (q is one-hot on the drafted token).
Output: `Accepted(n, bonus)`: the first n[b] draft tokens are accepted and `bonus[b]` is the
target's next token after them (its correction on rejection, a free extra token otherwise).

Greedy (temperature 0): accept the longest prefix that equals the target argmax.
Sampling: speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept d_i with
probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample from
norm(max(p_i - q_i, 0)); if all K are accepted, sample the bonus from p_K. The emitted tokens
are distributed exactly as sampling from the target one token at a time.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from specjax.sampling import SamplingMode, process_logits


class Accepted(NamedTuple):
    n: jax.Array  # [B] int32 accepted draft tokens
    bonus: jax.Array  # [B] int32 target token after the accepted prefix


def _leading_true(x: jax.Array) -> jax.Array:
    """[B, K] bool -> [B] int32 length of the all-True prefix."""
    return jnp.sum(jnp.cumprod(x.astype(jnp.int32), axis=-1), axis=-1)


def verify_chain(key: jax.Array, target_logits: jax.Array, draft_tokens: jax.Array,
                 draft_logp: Optional[jax.Array], mode: SamplingMode, sp: dict) -> Accepted:
    B, K = draft_tokens.shape
    if mode.greedy:
        best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, K+1]
        n = _leading_true(draft_tokens == best[:, :K])
        return Accepted(n=n, bonus=jnp.take_along_axis(best, n[:, None], axis=1)[:, 0])
    logp = process_logits(target_logits, mode, sp)  # [B, K+1, V]
    p_d = jnp.exp(jnp.take_along_axis(logp[:, :K], draft_tokens[..., None], axis=-1)[..., 0])
    if draft_logp is None:
        q_d = jnp.ones_like(p_d)
    else:
        q_d = jnp.exp(jnp.take_along_axis(draft_logp, draft_tokens[..., None], axis=-1)[..., 0])
    k_acc, k_res = jax.random.split(key)
    u = jax.random.uniform(k_acc, (B, K))
    # u < p/q  <=>  u * q < p; a token with q = 0 is never drafted by a correct drafter.
    n = _leading_true(u * q_d < p_d)
    p_n = jnp.exp(jnp.take_along_axis(logp, n[:, None, None], axis=1)[:, 0])  # [B, V]
    if draft_logp is None:
        q_n = jax.nn.one_hot(jnp.take_along_axis(draft_tokens, jnp.minimum(n, K - 1)[:, None],
                                                 axis=1)[:, 0], p_n.shape[-1], dtype=p_n.dtype)
    else:
        q_n = jnp.exp(jnp.take_along_axis(draft_logp, jnp.minimum(n, K - 1)[:, None, None],
                                          axis=1)[:, 0])
    rejected = (n < K)[:, None]
    residual = jnp.where(rejected, jnp.maximum(p_n - q_n, 0.0), p_n)
    # If p == q the residual is all zero; that branch then has probability 0 of being taken,
    # but keep the arithmetic finite by falling back to p.
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(mass > 0, residual, p_n)
    bonus = jax.random.categorical(k_res, jnp.log(residual), axis=-1).astype(jnp.int32)
    return Accepted(n=n, bonus=bonus)
