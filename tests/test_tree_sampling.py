"""Speculative sampling with draft TREES is lossless: engine-level statistical test.

Claim under test: with a tree drafter, the tokens `generate` emits at temperature > 0 are
distributed exactly as plain autoregressive sampling from the target, after the same temperature
/ top-k / top-p processing. The tree path of the engine is `engine.verify` -> target forward over
[last, nodes] with the ancestor mask and depth positions -> `tree.verify_tree_sampling`
(recursive rejection sampling over siblings; all drafters here propose deterministic candidates,
so q is one-hot: accept x with probability p(x), else remove x from p and renormalize) -> the
accepted root-to-leaf path is emitted and compacted in the KV cache.

Method: as in test_spec_sampling.py (whose statistics helpers, target and small draft model are
reused): chi-square goodness of fit (`ALPHA` = 1e-3, cells with expected count < 5 pooled) of
empirical counts over `N_ROWS` = 8192 copies of one prompt, decoded in one `generate` call, against
the exact law computed from the cache-free forward `Model.logits` over every continuation.
Target: the 2-layer V = 16 random Llama with its head scaled by 1.5. The fixed seeds make every
test deterministic; a correct implementation fails one fit with probability ALPHA for a random
seed (12 engine-level fits, 2 tests of the negative-control machinery: family-wise size <= 1.4%).

Each row generates 4 tokens (EOS disabled). Two fits per case:
  * the joint law of the first 3 tokens (t1, t2, t3): p(t1) p(t2 | t1) p(t3 | t1, t2) (the claim);
  * the marginal law of (t2, t3, t4) (sum over t1 of the exact 4-token joint), which also covers
    the bonus token after a depth-2 acceptance and the first token of a second step drafted and
    verified on the compacted cache after a depth-1 acceptance.
t1 comes from the prefill; t2 is the first verified token (an accepted root child or the bonus);
t3 is an accepted depth-2 node, the bonus after a depth-1 acceptance, or the first token of the
second step.

Drafters (all propose deterministic candidates, one-hot q):
  * `ngram(k=2, branches=3)`: up to three continuations copied from the history, merged into a
    tree. PROMPT is chosen so that, after each likely t1, the history holds several earlier
    occurrences of the newest tokens with different continuations: with probability 0.88 over t1
    the first tree has >= 2 root children, and by the exact law of the algorithm the first step
    accepts a root child other than the first one with probability 0.545 (plain) / 0.68
    (top-k/top-p) (asserted below, >= 0.85 and >= 0.3).
  * `small_model(draft, tree=DynamicTree(nodes=6, depth=2, top_k=3))`: the 1-layer independent
    draft model of test_spec_sampling.py (shares the target's embedding and head).
  * `layer_skip(layers=1, tree=DynamicTree(nodes=5, depth=3, top_k=2))`: the target's first layer.
  * `small_model(target, tree=DynamicTree(nodes=4, depth=2, top_k=2))`: the target as its own
    drafter (candidates = the target's own top tokens).
  * `layer_skip(layers=1, tree=DynamicTree(nodes=5, depth=3, top_k=2, sizing=...))`: the
    layer-skip tree with per-step verify sizing (`VerifySizing`: 1, 3 or 5 nodes, or a plain
    step). A batch verifies the largest size any row asks for; the costs given make 5 nodes
    never worth it, so every step verifies the truncated 3-node tree (the `lax.switch` branch).
at temperature 0.7 ("plain") and at temperature 1 with top-k = 5, top-p = 0.8 (both cut): the
n-gram tree (the one whose first step accepts a root child other than the first most often) in
both modes, the others in one mode each (`CASES`), since the rule they exercise is the same code
for every drafter and the mode changes only the laws it is handed: the model and self trees
plain, the layer-skip and sized trees top-k/top-p (the sized tree's choice of size does not
depend on the mode).
The tests assert that draft tokens are accepted often (>= 20% of the verify steps accept at least
one: the tree path is exercised), that rejections happen (>= 5%), and that depth >= 2 acceptances
happen (two draft tokens of one branch emitted in one step): observed in 9-15% (n-gram), 12-15%
(small model), 27-31% (layer skip, of which 2-3% depth 3), 35-39% (self) and 15-16% (sized) of
the steps.

Power: after pooling, the (t1, t2, t3) joint has 132 cells (plain) / 32 (top-k/top-p, its whole
support); with N = 8192 at ALPHA, any law whose TV distance from the target over those cells is
>= 0.060 / 0.046 is rejected with probability >= 0.99 (noncentral chi-square, lambda >= 4 N TV^2;
checked by `test_stated_power`). The (t2, t3, t4) marginal: 212 / 98 cells (the latter its whole
support), TV >= 0.065 / 0.056.

Negative controls: the engine's tree sampling rule (`EngineConfig.rules.tree_sampling`) is
replaced by the same loop changed in one place (the
unchanged loop is checked to reproduce the library bit for bit): (a) after a rejection the
rejected candidate is not removed from p (residual = p); (b) the first valid child is always
accepted. The exact law of (t1, t2, t3) under the broken rule is computed from the n-gram trees
(obtained from the drafter's own `propose` on every reachable history), which gives the TV
distance and the power of the test against it:

    (a) residual = p,        ngram tree, plain          TV 0.20   lambda 1975     observed p = 0
    (b) accept first child,  ngram tree, top-k/top-p    TV 0.99   lambda 971210   observed p = 0

(power: 1 to float precision; p = 0: below float64's smallest number; in (b) 6628 of the 8192
rows even fall in cells of target probability 0). Observed chi-square 1996 / 987205, simulated
under the computed broken law 2084 +- 95 / 970741 +- 9656.

The test asserts power >= 0.999, an observed p-value below ALPHA, and that the observed statistic
is typical of samples from the computed broken law (|z| < 5), so the power is computed against
the alternative the engine actually produced. The rules are a static field of the engine config,
so a broken rule compiles a program of its own (`patched_tree_rule`).
"""

from __future__ import annotations

import contextlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax import drafters
from specjax.drafters.ngram import NgramState
from specjax.engine import accept
from specjax.engine import tree as tree_lib
from specjax.engine.accept import AcceptRules, TreeAccepted
from specjax.engine.protocol import Tree
from specjax.sampling import make_sampling, process_logits

# Shared with the chain-drafter test: statistics helpers and the target / draft model fixture.
from test_spec_sampling import (  # noqa: F401  (`models` is a pytest fixture)
    ALPHA,
    MIN_POWER,
    MODES,
    N_ROWS,
    V,
    assert_no_degenerate_boundary,
    chi_square,
    detectable_tv,
    models,
    pooled_bins,
    power,
    sample_rows,
)

NEW_TOKENS = 4
# After each likely t1 the history holds the newest tokens several times with different
# continuations, which the target often continues with (found by a small search).
PROMPT = [6, 1, 14, 14, 6, 13, 15, 1, 9, 9, 13, 0, 11, 4, 14, 13, 6, 6, 7, 10]

DRAFTERS = ("ngram_tree", "model_tree", "layer_skip_tree", "self_tree", "sized_tree")
# Verify sizes 1, 3 or the whole 5-node tree, or a plain step, chosen per step from the draft's
# confidence (`VerifySizing`). A batch verifies the largest size any active row asks for, so with
# 8192 rows the whole tree would be verified in every step: its cost here is prohibitive, so
# the steps verify a truncated tree (3 nodes; the lax.switch branch, asserted below).
SIZED_TREE = drafters.DynamicTree(
    nodes=5, depth=3, top_k=2, sizing=drafters.VerifySizing((1, 3, 5), (1.0, 1.05, 1.3, 100.0))
)
SEEDS = {(d, m): 2000 + 10 * i + j for i, d in enumerate(DRAFTERS) for j, m in enumerate(MODES)}
ONE_MODE = {"model_tree": "plain", "self_tree": "plain", "layer_skip_tree": "topk5_topp0.8"}
ONE_MODE["sized_tree"] = "topk5_topp0.8"
CASES = [(d, m) for d in DRAFTERS for m in MODES if ONE_MODE.get(d, m) == m]


def make_drafter(name: str, target, draft):
    if name == "ngram_tree":
        return drafters.ngram(k=2, branches=3)
    if name == "model_tree":
        return drafters.small_model(draft, tree=drafters.DynamicTree(nodes=6, depth=2, top_k=3))
    if name == "layer_skip_tree":
        return drafters.layer_skip(layers=1, tree=drafters.DynamicTree(nodes=5, depth=3, top_k=2))
    if name == "self_tree":
        return drafters.small_model(target, tree=drafters.DynamicTree(nodes=4, depth=2, top_k=2))
    if name == "sized_tree":
        return drafters.layer_skip(layers=1, tree=SIZED_TREE)
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------
# Exact target law
# ---------------------------------------------------------------------------------------------


def next_token_dists(model: specjax.Model, mode_kw: dict, prompt=None, check_margins=False):
    """Exact processed next-token distributions after prompt + t1..t_{j-1}, j = 1..4:
    -> [p1 [V], p2 [V, V], p3 [V, V, V], p4 [V, V, V, V]] float64 (p3[a, b] = p(. | a, b)).

    With `check_margins`, asserts that in every reachable context no top-k / top-p boundary is
    within float noise (margins > 1e-4), so the engine (KV cache, tree masks: logits differing by
    ~1e-6) arrives at the same support."""
    prompt = PROMPT if prompt is None else prompt
    mode, sp = make_sampling(mode_kw["temperature"], mode_kw["top_k"], mode_kw["top_p"])
    P = len(prompt)
    abc = np.array(list(itertools.product(range(V), repeat=3)), np.int32)  # row a*V^2 + b*V + c
    ids = np.concatenate([np.tile(np.asarray(prompt, np.int32), (V**3, 1)), abc], axis=1)
    logits = model.logits(ids)[:, P - 1 : P + 3]  # [V^3, 4, V]
    probs = np.exp(np.asarray(process_logits(logits, mode, sp), np.float64))
    probs /= probs.sum(-1, keepdims=True)
    p1, p2 = probs[0, 0], probs[:: V * V, 1]
    p3 = probs[::V, 2].reshape(V, V, V)
    p4 = probs[:, 3].reshape(V, V, V, V)
    if check_margins:
        j3 = p1[:, None, None] * p2[:, :, None] * p3
        reach = np.stack(
            [
                np.arange(V**3) == 0,
                np.repeat(p1 > 0, V * V),
                np.repeat((p1[:, None] * p2 > 0).ravel(), V),
                (j3 > 0).ravel(),
            ],
            1,
        )
        assert_no_degenerate_boundary(logits, reach, mode, mode_kw)
    return [p1, p2, p3, p4]


@pytest.fixture(scope="module")
def exact(models):
    """mode -> {"p": [p1, p2, p3, p4], "joint123": [V^3], "marg234": [V^3]}."""
    target, _ = models
    out = {}
    for name, kw in MODES.items():
        p1, p2, p3, p4 = next_token_dists(target, kw, check_margins=True)
        j3 = p1[:, None, None] * p2[:, :, None] * p3
        j4 = j3[..., None] * p4
        assert abs(j4.sum() - 1) < 1e-9
        out[name] = {"p": [p1, p2, p3, p4], "joint123": j3.ravel(), "marg234": j4.sum(0).ravel()}
    return out


def sample_tokens(target, drafter, mode_kw, seed, n=N_ROWS):
    """-> (tokens [n, NEW_TOKENS] of n independent rows, generate stats)."""
    return sample_rows(target, drafter, mode_kw, seed, PROMPT, NEW_TOKENS, n)


def cell_counts(toks: np.ndarray, cols) -> np.ndarray:
    idx = np.ravel_multi_index(toks[:, list(cols)].T, (V,) * len(cols))
    return np.bincount(idx, minlength=V ** len(cols))


# Fraction of verify steps accepting >= 2 draft tokens that each drafter must show.
MIN_DEPTH2 = {
    "ngram_tree": 0.05,
    "model_tree": 0.05,
    "layer_skip_tree": 0.1,
    "self_tree": 0.2,
    "sized_tree": 0.05,
}


@pytest.mark.parametrize(("drafter", "mode"), CASES)
def test_tree_drafter_matches_target(models, exact, drafter, mode):
    target, draft = models
    toks, st = sample_tokens(
        target, make_drafter(drafter, target, draft), MODES[mode], SEEDS[drafter, mode]
    )
    fits = {
        "(t1,t2,t3)": chi_square(cell_counts(toks, (0, 1, 2)), exact[mode]["joint123"]),
        "(t2,t3,t4)": chi_square(cell_counts(toks, (1, 2, 3)), exact[mode]["marg234"]),
    }
    hist = np.asarray(st["acceptance_histogram"])
    print(f"{drafter}/{mode}: acceptance histogram {hist.tolist()}")
    for name, fit in fits.items():
        print(f"  {name}: {fit}, bins={fit.n_bins}")
    for name, fit in fits.items():
        assert fit.impossible == 0, f"{name}: {fit.impossible} samples outside the support"
        assert fit.n_bins >= 30
        assert fit.pvalue > ALPHA, f"{drafter}/{mode} {name}: differs from the target: {fit}"
    # The tree path is exercised: draft tokens are accepted often, rejections happen too, and
    # whole branches of two draft tokens are accepted in one step.
    total = hist.sum()
    assert hist[0] >= 0.05 * total and hist[1:].sum() >= 0.2 * total, hist
    assert hist[2:].sum() >= MIN_DEPTH2[drafter] * total, hist
    if drafter == "layer_skip_tree":  # whole depth-3 branches too
        assert len(hist) == 4 and hist[3] >= 0.01 * total, hist
    if drafter == "sized_tree":  # the truncated tree is what is verified
        sizes = np.asarray(st["verify_size_histogram"])
        print(f"  verify sizes (0, 1, 3, 5): {sizes.tolist()}")
        assert len(sizes) == 4 and sizes[3] == 0 and sizes[2] >= 0.5 * sizes.sum(), sizes


def test_stated_power(exact):
    """The detectable effect sizes stated in the module docstring."""
    stated = {
        ("plain", "joint123"): (132, 0.060),
        ("topk5_topp0.8", "joint123"): (32, 0.046),
        ("plain", "marg234"): (212, 0.065),
        ("topk5_topp0.8", "marg234"): (98, 0.056),
    }
    for (mode, law), (n_bins, tv) in stated.items():
        bins = pooled_bins(exact[mode][law], N_ROWS)
        assert bins.max() + 1 == n_bins, (mode, law, bins.max() + 1)
        got = detectable_tv(n_bins - 1, N_ROWS)
        assert got <= tv, (mode, law, got)


# ---------------------------------------------------------------------------------------------
# Negative controls: the tree rule changed in one place
# ---------------------------------------------------------------------------------------------


def tree_rule(flaw=None):
    """`verify_tree_sampling` for deterministic candidates (one-hot q), written out with one
    optional flaw: "residual_is_p" (a rejected candidate stays in p) or "accept_first" (the first
    valid child of the current node is always accepted). flaw=None reproduces the library."""

    def rule(key, target_logp, tree, child_logp, max_depth, without_replacement):
        rule.traced += 1
        assert child_logp is None, "the drafters under test propose deterministic candidates"
        B, N = tree.tokens.shape
        keys = jax.random.split(key, N + 1)
        p = jnp.exp(target_logp[:, 0])
        cur = jnp.full((B,), -1, jnp.int32)
        b_idx = jnp.arange(B)
        for i in range(N):
            x = tree.tokens[:, i]
            is_child = (tree.parents[:, i] == cur) & tree.valid[:, i]
            u = jax.random.uniform(keys[i], (B,))
            accept = is_child & (u < p[b_idx, x])
            if flaw == "accept_first":
                accept = is_child
            reject = is_child & ~accept
            resid = p.at[b_idx, x].set(0.0)
            resid = resid / jnp.maximum(resid.sum(-1, keepdims=True), 1e-30)
            if flaw == "residual_is_p":
                resid = p
            p = jnp.where(
                accept[:, None],
                jnp.exp(target_logp[:, i + 1]),
                jnp.where(reject[:, None], resid, p),
            )
            cur = jnp.where(accept, i, cur)
        bonus = jax.random.categorical(keys[N], jnp.log(p), axis=-1).astype(jnp.int32)
        depth = jnp.where(
            cur >= 0, jnp.take_along_axis(tree.depth, jnp.maximum(cur, 0)[:, None], 1)[:, 0], 0
        ).astype(jnp.int32)
        return TreeAccepted(
            node=cur, n=depth, path=tree_lib.path_to(tree.parents, cur, max_depth), bonus=bonus
        )

    rule.traced = 0
    return rule


def patched_tree_rule(monkeypatch, fn):
    """Swap the tree sampling rule `generate` compiles with: the rules are a static field of the
    engine config (read from `accept.DEFAULT_RULES` when the config is built), so the broken
    rule gets a program of its own and no jit cache needs clearing."""
    monkeypatch.setattr(accept, "DEFAULT_RULES", AcceptRules(tree_sampling=fn))
    return contextlib.nullcontext()


def test_unbroken_rule_is_the_library_rule():
    """The negative controls change the library rule in exactly one place: without a flaw the
    written-out loop gives bit-identical results to `verify_tree_sampling` (deterministic
    candidates, random trees, random target distributions with zeros)."""
    rng = np.random.default_rng(5)
    B, N, Vu, D = 512, 7, 6, 4
    parents = np.full((B, N), -1, np.int32)
    for b in range(B):
        for i in range(1, N):
            parents[b, i] = rng.integers(-1, i)
    depth = tree_lib.depth_from_parents(jnp.asarray(parents))
    t = Tree(
        tokens=jnp.asarray(rng.integers(0, Vu, (B, N)), jnp.int32),
        parents=jnp.asarray(parents),
        depth=depth,
        valid=jnp.asarray(rng.random((B, N)) < 0.85),
    )
    logits = rng.standard_normal((B, N + 1, Vu)) * 1.5
    logits[rng.random(logits.shape) < 0.2] = -np.inf
    logits[..., 0] = np.maximum(logits[..., 0], 0.0)
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
    key = jax.random.key(3)
    want = accept.verify_tree_sampling(key, logp, t, None, D, False)
    got = tree_rule()(key, logp, t, None, D, False)
    for name in want._fields:
        np.testing.assert_array_equal(
            np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), err_msg=name
        )
    assert 0.1 < np.mean(np.asarray(want.n) > 0) < 0.9  # both outcomes occur


def ngram_trees(spec, histories):
    """The n-gram drafter's own trees after each history (list of token lists):
    -> list of (tokens [N], parents [N], valid [N]) numpy arrays."""
    B, H = len(histories), max(map(len, histories)) + 8
    hist = np.zeros((B, H), np.int32)
    for i, h in enumerate(histories):
        hist[i, : len(h)] = h
    state = NgramState(
        hist=jnp.asarray(hist), hist_len=jnp.asarray([len(h) for h in histories], jnp.int32)
    )
    last = jnp.asarray([h[-1] for h in histories], jnp.int32)
    mode, sp = make_sampling(1.0, None, None)
    draft, _ = spec.propose(None, state, last, jax.random.key(0), mode, sp)
    t = draft.tree
    toks, par, val = (np.asarray(a) for a in (t.tokens, t.parents, t.valid))
    return [(toks[i], par[i], val[i]) for i in range(B)]


def kids_of(tree, node):
    """Valid children of `node` (-1: the root) in verification order: [(index, token)]."""
    toks, par, val = tree
    return [(i, int(toks[i])) for i in range(len(toks)) if par[i] == node and val[i]]


def node_law(p, kids, flaw=None):
    """Exact outcome of verifying one node whose target distribution is p and whose children
    are the deterministic candidates `kids`: -> (probability of accepting each child, law of the
    bonus token times the probability that every child is rejected)."""
    cur, stay, acc = np.array(p, np.float64), 1.0, []
    for _, x in kids:
        a = 1.0 if flaw == "accept_first" else cur[x]
        acc.append(stay * a)
        stay *= 1.0 - a
        if flaw is None:  # the rejected candidate leaves p
            cur[x] = 0.0
            s = cur.sum()
            cur = cur / s if s > 0 else cur
    return np.asarray(acc), stay * cur


def first_token_law(p, kids, flaw=None):
    acc, out = node_law(p, kids, flaw)
    out = out.copy()
    for (_, x), a in zip(kids, acc):
        out[x] += a
    return out


def ngram_joint(spec, p, flaw=None):
    """Exact law [V^3] of (t1, t2, t3) with the n-gram tree drafter under the (broken) rule, and
    the probability that the first step accepts a root child other than the first one."""
    p1, p2, p3 = p[:3]
    trees1 = ngram_trees(spec, [PROMPT + [a] for a in range(V)])
    trees2 = ngram_trees(spec, [PROMPT + [a, b] for a in range(V) for b in range(V)])
    joint = np.zeros((V, V, V))
    other_branch = 0.0
    for a in np.flatnonzero(p1 > 0):
        t1 = trees1[a]
        kids = kids_of(t1, -1)
        acc, bonus = node_law(p2[a], kids, flaw)
        other_branch += p1[a] * acc[1:].sum()
        for (i, x), ax in zip(kids, acc):  # accepted root child x: t3 from its children
            joint[a, x] += p1[a] * ax * first_token_law(p3[a, x], kids_of(t1, i), flaw)
        for b in np.flatnonzero(bonus > 0):  # all rejected, bonus b: t3 from the second step
            joint[a, b] += (
                p1[a] * bonus[b] * first_token_law(p3[a, b], kids_of(trees2[a * V + b], -1), flaw)
            )
    return joint.ravel(), other_branch


def test_ngram_tree_setup(models, exact):
    """The n-gram tree drafter really drafts trees after PROMPT (the claims of the docstring), and
    the exact law of the algorithm computed from its trees is the target's."""
    spec = drafters.ngram(k=2, branches=3).binder(None)[0]
    p1 = exact["plain"]["p"][0]
    trees1 = ngram_trees(spec, [PROMPT + [a] for a in range(V)])
    branching = sum(p1[a] for a in range(V) if len(kids_of(trees1[a], -1)) >= 2)
    print(f"P(>= 2 root children) = {branching:.3f}")
    assert branching >= 0.85
    for mode in MODES:
        joint, other = ngram_joint(spec, exact[mode]["p"])
        np.testing.assert_allclose(joint, exact[mode]["joint123"], atol=1e-12)
        print(f"{mode}: P(first step accepts a root child other than the first) = {other:.3f}")
        assert other >= 0.3


BROKEN_CASES = [("residual_is_p", "plain"), ("accept_first", "topk5_topp0.8")]


@pytest.mark.parametrize("flaw,mode", BROKEN_CASES)
def test_broken_tree_rule_is_detected(models, exact, monkeypatch, flaw, mode):
    target, draft = models
    spec = drafters.ngram(k=2, branches=3).binder(None)[0]
    null = exact[mode]["joint123"]
    alt, _ = ngram_joint(spec, exact[mode]["p"], flaw)
    tv, pw, lam = power(null, alt, N_ROWS)
    broken = tree_rule(flaw)
    with patched_tree_rule(monkeypatch, broken):
        toks, _ = sample_tokens(
            target,
            make_drafter("ngram_tree", target, draft),
            MODES[mode],
            SEEDS["ngram_tree", mode] + 5,
        )
    assert broken.traced > 0, "the engine did not use the patched rule"
    fit = chi_square(cell_counts(toks, (0, 1, 2)), null)
    print(f"{flaw}/ngram_tree/{mode}: TV={tv:.3f} lambda={lam:.0f} power={pw} {fit}")
    assert pw >= MIN_POWER, f"the test has too little power against {flaw}: {pw}"
    assert fit.pvalue < ALPHA, f"broken rule {flaw} was not detected: {fit}"
    # The computed law of the broken rule is the one the engine produced: its chi-square
    # statistic is typical of samples drawn from that law.
    alt_b = np.bincount(fit.cells, weights=alt)
    expected = np.bincount(fit.cells, weights=null) * N_ROWS
    sims = np.random.default_rng(0).multinomial(N_ROWS, alt_b / alt_b.sum(), size=500)
    sim_stats = ((sims - expected) ** 2 / expected).sum(axis=1)
    z = (fit.stat - sim_stats.mean()) / sim_stats.std()
    print(f"  simulated under the broken law: chi2 {sim_stats.mean():.0f} +- {sim_stats.std():.0f}")
    assert abs(z) < 5, (fit.stat, sim_stats.mean(), sim_stats.std())
