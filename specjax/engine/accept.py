"""Acceptance rules: which draft tokens the target accepts, exactly lossless.

Pure functions of the target's logits over a verified block and the draft; the engine's
verifiers (`specjax.engine.verify`) call them through `AcceptRules`, a static field of the
engine config, so a different rule (a test's deliberately broken one) is a different compiled
program rather than a patched global.

Chains. Inputs for a batch of B rows and a draft of K tokens:
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

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from specjax.engine.protocol import Tree
from specjax.engine.tree import ancestor_matrix, path_to
from specjax.sampling import SamplingMode, argmax, process_logits


class Accepted(NamedTuple):
    n: jax.Array  # [B] int32 accepted draft tokens
    bonus: jax.Array  # [B] int32 target token after the accepted prefix


def _leading_true(x: jax.Array) -> jax.Array:
    """[B, K] bool -> [B] int32 length of the all-True prefix."""
    return jnp.sum(jnp.cumprod(x.astype(jnp.int32), axis=-1), axis=-1)


def verify_chain(
    key: jax.Array,
    target_logits: jax.Array,
    draft_tokens: jax.Array,
    draft_logp: jax.Array | None,
    mode: SamplingMode,
    sp: dict,
) -> Accepted:
    B, K = draft_tokens.shape
    if mode.greedy:
        best = argmax(target_logits)  # [B, K+1]
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
        q_n = jax.nn.one_hot(
            jnp.take_along_axis(draft_tokens, jnp.minimum(n, K - 1)[:, None], axis=1)[:, 0],
            p_n.shape[-1],
            dtype=p_n.dtype,
        )
    else:
        q_n = jnp.exp(
            jnp.take_along_axis(draft_logp, jnp.minimum(n, K - 1)[:, None, None], axis=1)[:, 0]
        )
    rejected = (n < K)[:, None]
    residual = jnp.where(rejected, jnp.maximum(p_n - q_n, 0.0), p_n)
    # If p == q the residual is all zero; that branch then has probability 0 of being taken,
    # but keep the arithmetic finite by falling back to p.
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(mass > 0, residual, p_n)
    bonus = jax.random.categorical(k_res, jnp.log(residual), axis=-1).astype(jnp.int32)
    return Accepted(n=n, bonus=bonus)


# ----------------------------------------------------------------------------- trees


class TreeAccepted(NamedTuple):
    node: jax.Array  # [B] deepest accepted node (-1: none, only the bonus token is emitted)
    n: jax.Array  # [B] accepted draft tokens (= depth of `node`)
    path: jax.Array  # [B, D] accepted nodes root-to-leaf (-1 padded)
    bonus: jax.Array  # [B] target token after the accepted path


def verify_tree_greedy(target_logits: jax.Array, tree: Tree, max_depth: int) -> TreeAccepted:
    """Temperature 0: accept the deepest node whose whole root path agrees with the target
    argmax at each parent. target_logits [B, N+1, V] over the block [root, nodes]."""
    best = argmax(target_logits)  # [B, N+1]
    at_parent = jnp.take_along_axis(best, tree.parents + 1, axis=1)  # [B, N]
    correct = (tree.tokens == at_parent) & tree.valid
    anc = ancestor_matrix(tree.parents)
    ok = jnp.all(jnp.where(anc, correct[:, None, :], True), axis=2)  # [B, N]
    score = jnp.where(ok, tree.depth, 0)
    n = jnp.max(score, axis=1)
    node = jnp.where(n > 0, jnp.argmax(score, axis=1), -1).astype(jnp.int32)
    bonus = jnp.take_along_axis(best, (node + 1)[:, None], axis=1)[:, 0]
    return TreeAccepted(
        node=node, n=n.astype(jnp.int32), path=path_to(tree.parents, node, max_depth), bonus=bonus
    )


def verify_tree_sampling(
    key: jax.Array,
    target_logp: jax.Array,
    tree: Tree,
    child_logp: jax.Array | None,
    max_depth: int,
    without_replacement: bool,
    point_mass: jax.Array | None = None,
) -> TreeAccepted:
    """Recursive rejection sampling over siblings (SpecInfer, Miao et al. 2024; Jeon et al. 2024).

    target_logp [B, N+1, V]: processed target log-probs at the block positions.
    child_logp [B, N+1, V]: the draft distribution q from which the children of each block
    position were drawn, or None when children are deterministic candidates.

    Walk from the root. At the current node, try its children in order: accept child x with
    probability min(1, p(x)/q(x)); on rejection replace p by norm(max(p - q, 0)) and try the next
    sibling. Exactness of the sibling loop depends on how siblings were drawn:
      * i.i.d. from q (with replacement): q stays the same for every sibling (SpecInfer).
      * without replacement from q: after rejecting x, q becomes q with x removed and
        renormalized (Jeon et al., "Recursive Speculative Decoding") — each sibling is then a
        draw from exactly that conditional q, so every step is a standard exact rejection step.
      * deterministic candidates (`child_logp` None): q is one-hot on x, so acceptance is p(x)
        and the residual is p with x removed.
      * mixed siblings (`point_mass` [B, N] bool marks deterministic nodes among children drawn
        from q, e.g. a retrieval continuation merged into a sampled model tree): each sibling is
        tested against its own proposal law, one-hot for a marked node and q for the others,
        and only a rejected unmarked sibling updates q (without replacement). Why this is exact:
        the recursive rule is exact when, given everything tried before it, sibling j is a draw
        from the law q_j the rule uses for it, independent of the earlier accept/reject coins
        (each step is then one standard rejection step from the current residual p). A marked
        sibling's token is fixed by the history before any coin is drawn, so its law is the
        point mass whatever was rejected before it; an unmarked sibling was drawn from q (or q
        less the earlier unmarked draws) by the drafter before verification, so neither the
        marked siblings nor the coins change its law. Tested by chi-square in
        tests/test_hybrid.py (mixed siblings, with a negative control that treats the
        deterministic sibling as a draw from q).
    When a child is accepted, p and q move to that child's position. When the current node's
    children are exhausted, the bonus token is drawn from the current (residual) p.
    """
    B, N = tree.tokens.shape
    keys = jax.random.split(key, N + 1)
    p = jnp.exp(target_logp[:, 0])  # [B, V]
    q = None if child_logp is None else jnp.exp(child_logp[:, 0])
    cur = jnp.full((B,), -1, jnp.int32)
    b_idx = jnp.arange(B)
    for i in range(N):  # nodes are topologically ordered; N is small and static
        x = tree.tokens[:, i]
        is_child = (tree.parents[:, i] == cur) & tree.valid[:, i]
        p_x = p[b_idx, x]
        one_hot = jax.nn.one_hot(x, p.shape[-1], dtype=p.dtype)
        marked = None if point_mass is None else point_mass[:, i]
        if q is None:
            q_vec = one_hot
        elif marked is None:
            q_vec = q
        else:
            q_vec = jnp.where(marked[:, None], one_hot, q)
        q_x = q_vec[b_idx, x]
        u = jax.random.uniform(keys[i], (B,))
        accept = is_child & (u * q_x < p_x)
        reject = is_child & ~accept
        # Rejected: residual target distribution (and, without replacement, residual draft).
        resid = jnp.maximum(p - q_vec, 0.0)
        resid = resid / jnp.maximum(resid.sum(-1, keepdims=True), 1e-30)
        new_p = jnp.where(
            accept[:, None], jnp.exp(target_logp[:, i + 1]), jnp.where(reject[:, None], resid, p)
        )
        if q is not None:
            q_next = jnp.exp(child_logp[:, i + 1])
            if without_replacement:
                q_wo = q.at[b_idx, x].set(0.0)
                q_wo = q_wo / jnp.maximum(q_wo.sum(-1, keepdims=True), 1e-30)
            else:
                q_wo = q
            # A rejected marked (deterministic) sibling leaves the model's draft law as it was.
            moves = reject if marked is None else reject & ~marked
            q = jnp.where(accept[:, None], q_next, jnp.where(moves[:, None], q_wo, q))
        p = new_p
        cur = jnp.where(accept, i, cur)
    bonus = jax.random.categorical(keys[N], jnp.log(p), axis=-1).astype(jnp.int32)
    depth = jnp.where(
        cur >= 0, jnp.take_along_axis(tree.depth, jnp.maximum(cur, 0)[:, None], 1)[:, 0], 0
    )
    return TreeAccepted(
        node=cur, n=depth.astype(jnp.int32), path=path_to(tree.parents, cur, max_depth), bonus=bonus
    )


# ----------------------------------------------------------------------------- the rule set


@dataclasses.dataclass(frozen=True)
class AcceptRules:
    """The acceptance rules one compiled decode program uses (hashable: a static field of
    `EngineConfig`). The defaults are the exact rules above; anything else is for experiments
    and tests (e.g. negative controls that must be caught by the statistical tests)."""

    chain: Callable = verify_chain
    tree_greedy: Callable = verify_tree_greedy
    tree_sampling: Callable = verify_tree_sampling


# What `specjax.generate` compiles with. Read when a config is built, so swapping it (a test's
# broken rule) gives a new config and a new compilation, never a stale cached program.
DEFAULT_RULES = AcceptRules()
