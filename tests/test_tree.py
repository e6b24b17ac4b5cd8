"""Draft trees: structure helpers, exact greedy tree verification end to end, and exact
recursive rejection sampling over siblings (chi-square against the target law)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from specjax import api as gen
from specjax import drafters
from specjax.drafters import shapes
from specjax.engine import accept, tree
from specjax.engine.protocol import Tree

from conftest import RAGGED_PROMPTS

NEW = 32
# The shared ragged prompts, the last one extended so n-gram branches have several candidates.
PROMPTS = RAGGED_PROMPTS[:3] + [RAGGED_PROMPTS[3] + [40, 5, 6, 40, 41]]


# ------------------------------------------------------------------------------ structure


def naive_ancestors(parents):
    N = len(parents)
    anc = np.eye(N, dtype=bool)
    for i in range(N):
        p = parents[i]
        while p >= 0:
            anc[i, p] = True
            p = parents[p]
    return anc


def test_choices_mask_depth_and_paths():
    choices = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [2]]
    parents, rank = shapes.parents_from_choices(choices)
    assert parents.tolist() == [-1, -1, -1, 0, 0, 1, 3]
    assert rank.tolist() == [0, 1, 2, 0, 1, 0, 0]
    P = jnp.asarray(parents)[None]
    assert tree.depth_from_parents(P)[0].tolist() == [1, 1, 1, 2, 2, 2, 3]
    m = np.asarray(tree.block_mask(P))[0]
    assert m[:, 0].all() and m[0].sum() == 1  # everybody sees the root; the root only itself
    np.testing.assert_array_equal(m[1:, 1:], naive_ancestors(parents))
    assert tree.path_to(P, jnp.array([6]), 4)[0].tolist() == [0, 3, 6, -1]
    assert tree.path_to(P, jnp.array([-1]), 3)[0].tolist() == [-1, -1, -1]
    pos = tree.block_positions(tree.depth_from_parents(P), jnp.array([10]))
    assert pos[0].tolist() == [10, 11, 11, 11, 12, 12, 12, 13]
    # A chain is the tree with parents i - 1.
    chain = jnp.asarray(tree.chain_parents(5))[None]
    np.testing.assert_array_equal(np.asarray(tree.block_mask(chain))[0], np.tril(np.ones((6, 6))))


def test_random_trees_ancestor_matrix():
    rng = np.random.default_rng(1)
    for _ in range(20):
        N = int(rng.integers(1, 20))
        parents = np.array([int(rng.integers(-1, i)) for i in range(N)])
        np.testing.assert_array_equal(
            np.asarray(tree.ancestor_matrix(jnp.asarray(parents)[None]))[0],
            naive_ancestors(parents),
        )


def test_bad_choices():
    with pytest.raises(ValueError, match="no parent"):
        shapes.parents_from_choices([[0], [1, 0]])
    with pytest.raises(ValueError, match="empty"):
        shapes.parents_from_choices([])


def test_ngram_branches_merge_common_prefixes():
    from specjax.drafters.ngram import merge_prefixes

    toks = jnp.array([[[1, 2, 3], [1, 2, 4], [5, 6, 7], [1, 2, 3]]])
    t = merge_prefixes(toks, jnp.array([[True, True, True, True]]))
    assert t.valid[0].tolist() == [1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    assert t.parents[0, 5] == 1  # "4" hangs under chain 0's "2"
    assert t.parents[0, 6] == -1 and t.parents[0, 7] == 6 and t.parents[0, 8] == 7


# ------------------------------------------------------------------------ greedy identity

# `target` (3-layer tiny Llama) and `other` (independent 1-layer draft) come from conftest.py.


@pytest.fixture(scope="module")
def ar_out(target):
    return gen.generate(target, PROMPTS, max_new_tokens=NEW)


def test_tree_drafters_greedy_equal_ar(target, other, ar_out):
    cases = {
        "ngram_tree": drafters.ngram(k=4, branches=3),
        "model_tree": drafters.small_model(
            other, tree=drafters.DynamicTree(nodes=8, depth=3, top_k=3)
        ),
        "layer_skip_tree": drafters.layer_skip(
            layers=2, tree=drafters.DynamicTree(nodes=6, depth=4, top_k=2)
        ),
    }
    for name, d in cases.items():
        out = gen.generate(target, PROMPTS, max_new_tokens=NEW, drafter=d)
        assert out.tokens == ar_out.tokens, name
        single = gen.generate(target, PROMPTS[3], max_new_tokens=NEW, drafter=d)
        assert single.tokens[0] == ar_out.tokens[3], name
    # Some branch other than the first one must have been accepted at least once for the
    # ngram tree to be more than a chain: its tau is at least the chain's.
    chain = gen.generate(target, PROMPTS, max_new_tokens=NEW, drafter=drafters.ngram(k=4))
    tree_out = gen.generate(
        target, PROMPTS, max_new_tokens=NEW, drafter=drafters.ngram(k=4, branches=3)
    )
    assert tree_out.stats["tau"] >= chain.stats["tau"]


def test_self_drafting_tree_accepts_full_depth(target, ar_out):
    # The target drafting for itself with top_k = 1: the tree is the greedy chain, grown through
    # the tree machinery (window masks, fed offsets, compaction), so every step accepts `depth`
    # tokens until the budget cuts it. (With top_k > 1 the greedy path can be outscored by
    # other branches and pruned: EAGLE-2 trees do not guarantee it.)
    d = drafters.small_model(target, tree=drafters.DynamicTree(nodes=3, depth=3, top_k=1))
    out = gen.generate(target, PROMPTS, max_new_tokens=NEW, drafter=d)
    assert out.tokens == ar_out.tokens
    hist = out.stats["acceptance_histogram"]
    assert len(hist) == 4 and hist[3] >= 0.8 * sum(hist)
    wide = drafters.small_model(target, tree=drafters.DynamicTree(nodes=7, depth=3, top_k=2))
    assert gen.generate(target, PROMPTS, max_new_tokens=NEW, drafter=wide).tokens == ar_out.tokens


# --------------------------------------------------------------- exact tree sampling (unit)


@pytest.mark.parametrize("construction", ["deterministic", "without_replacement", "iid"])
def test_verify_tree_sampling_first_token_follows_target(construction):
    """The first emitted token (accepted child of the root, or the bonus when all root children
    are rejected) must follow the target's distribution at the root exactly.

    V = 6, a root with 3 children and one grandchild; 200k vmapped trials; chi-square at
    alpha = 1e-3. Children are drawn per trial by the named construction from a draft q that
    differs from p (TV(p, q) ~ 0.4), so rejections and residuals are exercised.
    """
    V, trials = 6, 200_000
    p_root = np.array([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])
    q_root = np.array([0.3, 0.1, 0.3, 0.1, 0.1, 0.1])
    p_child = np.array([0.2, 0.2, 0.2, 0.1, 0.2, 0.1])
    parents = jnp.array([-1, -1, -1, 0], jnp.int32)
    depth = jnp.array([1, 1, 1, 2], jnp.int32)
    key = jax.random.key(0)
    k_draw, k_ver = jax.random.split(key)

    def one(kd, kv):
        if construction == "deterministic":
            kids = jnp.array([2, 0, 4])  # fixed candidates
        elif construction == "iid":
            kids = jax.random.categorical(kd, jnp.log(jnp.asarray(q_root)), shape=(3,))
        else:  # Gumbel top-k = sampling without replacement
            g = jax.random.gumbel(kd, (V,))
            kids = jax.lax.top_k(jnp.log(jnp.asarray(q_root)) + g, 3)[1]
        toks = jnp.concatenate([kids, kids[:1]]).astype(jnp.int32)
        t = Tree(
            tokens=toks[None],
            parents=parents[None],
            depth=depth[None],
            valid=jnp.ones((1, 4), bool),
        )
        logp = jnp.log(jnp.stack([jnp.asarray(p_root)] + [jnp.asarray(p_child)] * 4))[None]
        child = (
            None
            if construction == "deterministic"
            else jnp.log(jnp.stack([jnp.asarray(q_root)] * 5))[None]
        )
        acc = accept.verify_tree_sampling(
            kv, logp, t, child, 2, without_replacement=construction == "without_replacement"
        )
        first = jnp.where(acc.n > 0, toks[jnp.maximum(acc.path[0, 0], 0)], acc.bonus[0])
        return first[0] if first.ndim else first

    kd = jax.random.split(k_draw, trials)
    kv = jax.random.split(k_ver, trials)
    firsts = np.asarray(jax.jit(jax.vmap(one))(kd, kv))
    counts = np.bincount(firsts, minlength=V)
    _, pval = stats.chisquare(counts, p_root * trials)
    assert pval > 1e-3, (construction, counts / trials, pval)


def test_verify_tree_sampling_negative_control():
    """Treating siblings drawn without replacement as if i.i.d. (not updating q) is biased:
    the same test must reject it."""
    V, trials = 6, 200_000
    p_root = jnp.array([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])
    q_root = jnp.array([0.3, 0.1, 0.3, 0.1, 0.1, 0.1])
    parents = jnp.array([[-1, -1, -1]], jnp.int32)

    def one(kd, kv):
        kids = jax.lax.top_k(jnp.log(q_root) + jax.random.gumbel(kd, (V,)), 3)[1].astype(jnp.int32)
        t = Tree(
            tokens=kids[None],
            parents=parents,
            depth=jnp.ones((1, 3), jnp.int32),
            valid=jnp.ones((1, 3), bool),
        )
        logp = jnp.log(jnp.stack([p_root] * 4))[None]
        acc = accept.verify_tree_sampling(
            kv, logp, t, jnp.log(jnp.stack([q_root] * 4))[None], 1, without_replacement=False
        )  # wrong for this draw
        return jnp.where(acc.n > 0, kids[jnp.maximum(acc.path[0, 0], 0)], acc.bonus)[0]

    k1, k2 = jax.random.split(jax.random.key(1))
    firsts = np.asarray(
        jax.jit(jax.vmap(one))(jax.random.split(k1, trials), jax.random.split(k2, trials))
    )
    _, pval = stats.chisquare(np.bincount(firsts, minlength=V), np.asarray(p_root) * trials)
    assert pval < 1e-6
