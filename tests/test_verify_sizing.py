"""Per-step verify sizing (`VerifySizing`) of dynamic trees and chains: the choice itself, the
best-first node order it relies on, and greedy identity with the plain step, truncated and
whole drafts all taken (LM and EAGLE drafters).

The sampling law of sized drafts is tested with the other chi-square tests (test_tree_sampling.py
`sized_tree`, test_eagle.py `eagle3-tree-sized`, and test_spec_sampling.py `short_verify` for a
chain verified short: the verify path does not depend on how a drafter chose its size)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_eagle import echo_eagle1, random_eagle

import specjax
from specjax import drafters
from specjax.drafters import DraftGate, DynamicTree, VerifySizing, shapes
from specjax.drafters.shapes import grow_dynamic_tree

from conftest import RAGGED_PROMPTS

NEW = 24


def test_choose_maximises_expected_tokens_per_cost():
    rng = np.random.default_rng(0)
    sizing = VerifySizing(sizes=(1, 3, 6), costs=(1.0, 1.2, 1.5, 2.1))
    # Scores best first: cumulative log-probs, descending per row (some -inf padding nodes).
    # Rows of independent node probabilities, uniformly doubtful rows and nearly sure rows.
    p = np.concatenate(
        [
            rng.random((32, 6)) ** 3,
            rng.random((16, 1)) ** 2 * rng.random((16, 6)),
            1 - 0.2 * rng.random((16, 6)),
        ]
    )
    score = np.sort(np.log(p), axis=1)[:, ::-1]
    score[:5, 4:] = -np.inf
    got = np.asarray(sizing.choose(jnp.asarray(score, jnp.float32)))
    expected = np.concatenate([np.zeros((64, 1)), np.cumsum(np.exp(score), 1)], 1)
    sizes = np.array([0, 1, 3, 6])
    want = sizes[np.argmax((1 + expected[:, sizes]) / np.array(sizing.costs), axis=1)]
    np.testing.assert_array_equal(got, want)
    assert len(set(want.tolist())) == 4  # every option is somebody's best here
    # A sure draft is verified whole, a hopeless one not at all.
    sure = sizing.choose(jnp.zeros((1, 6)))
    hopeless = sizing.choose(jnp.full((1, 6), -20.0))
    assert int(sure[0]) == 6 and int(hopeless[0]) == 0


def test_sizing_is_checked():
    with pytest.raises(ValueError, match="ascending positive"):
        VerifySizing(sizes=(4, 2), costs=(1, 2, 3))
    with pytest.raises(ValueError, match="3 positive costs"):
        VerifySizing(sizes=(2, 4), costs=(1, 2))
    with pytest.raises(ValueError, match="3 positive costs"):
        VerifySizing(sizes=(2, 4), costs=(1, 0, 3))
    with pytest.raises(ValueError, match="largest verify size must be the tree's 8 nodes"):
        DynamicTree(nodes=8, depth=4, top_k=3, sizing=VerifySizing((2, 4), (1, 2, 3)))
    with pytest.raises(TypeError, match="VerifySizing"):
        DynamicTree(nodes=4, depth=2, top_k=2, sizing=(2, 4))
    with pytest.raises(ValueError, match="chain's k=4"):
        drafters.layer_skip(layers=2, k=4, sizing=VerifySizing((1, 2), (1, 2, 3)))
    with pytest.raises(ValueError, match="goes in DynamicTree"):
        drafters.layer_skip(
            layers=2, tree=DynamicTree(4, 2, 2), sizing=VerifySizing((2, 4), (1, 2, 3))
        )


def test_dynamic_tree_lists_nodes_best_first():
    """The kept nodes are the N best by cumulative log-prob, listed best first, parents before
    children (so every prefix is a tree, and the best one of its size)."""
    B, V, kk, D, N = 16, 11, 3, 4, 9
    key = jax.random.key(1)

    def feed(carry, tok, feat, depth, vis, off):
        k = jax.random.fold_in(key, depth)
        # Ties on purpose: log-probs rounded to a coarse grid, so equal scores occur.
        lp = jax.nn.log_softmax(jnp.round(jax.random.normal(k, tok.shape + (V,)) * 2) / 2)
        return lp, None, carry

    root = jax.nn.log_softmax(jax.random.normal(key, (B, V)))
    tree, _, _, score = grow_dynamic_tree(root, feed, None, None, top_k=kk, depth=D, nodes=N)
    score, parents, depth = map(np.asarray, (score, tree.parents, tree.depth))
    assert (np.diff(score, axis=1) <= 0).all()
    i = np.arange(N)[None, :]
    assert (parents < i).all()
    has = parents >= 0
    par_depth = np.take_along_axis(depth, np.maximum(parents, 0), axis=1)
    assert (depth[has] == par_depth[has] + 1).all() and (depth[~has] == 1).all()
    par_score = np.take_along_axis(score, np.maximum(parents, 0), axis=1)
    assert (score[has] <= par_score[has]).all()


def _sized(nodes: int, depth: int, top_k: int, sizes: tuple, costs: tuple) -> DynamicTree:
    return DynamicTree(nodes=nodes, depth=depth, top_k=top_k, sizing=VerifySizing(sizes, costs))


# Costs chosen so that on these tiny random models each case takes the verify branches listed
# (indices into (0,) + sizes: 0 is a plain step, the last the whole tree); together they cover
# the plain step, truncated trees and whole trees, with drafts accepted in the LM cases.
SIZED = {
    "self_tree": (
        lambda target: drafters.small_model(
            target, tree=_sized(6, 3, 2, (1, 3, 6), (1.0, 1.1, 1.3, 1.6))
        ),
        (0, 1),
    ),
    "layer_skip_tree": (
        lambda target: drafters.layer_skip(layers=2, tree=_sized(5, 3, 2, (2, 5), (1.0, 1.2, 1.3))),
        (0, 1),
    ),
    "eagle3_tree": (
        lambda target: drafters.eagle(
            random_eagle(target, 3, seed=5, draft_vocab=80),
            tree=_sized(6, 4, 2, (2, 6), (1.0, 1.1, 1.15)),
        ),
        (1, 2),
    ),
    # Chains: the cumulative log-probs of the chain's tokens are its nodes' scores.
    "layer_skip_chain": (
        lambda target: drafters.layer_skip(
            layers=2, k=4, sizing=VerifySizing((1, 2, 4), (1.0, 1.1, 1.2, 1.4))
        ),
        (0, 1),
    ),
    "eagle3_chain": (
        lambda target: drafters.eagle(
            random_eagle(target, 3, seed=5, draft_vocab=80),
            k=4,
            sizing=VerifySizing((2, 4), (1.0, 1.02, 1.04)),
        ),
        (1, 2),
    ),
}


@pytest.fixture(scope="module")
def ar(target):
    return specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=NEW)


@pytest.mark.parametrize("name", list(SIZED))
def test_sized_trees_greedy_equal_ar(name, target, ar):
    make, taken = SIZED[name]
    out = specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=NEW, drafter=make(target))
    assert out.tokens == ar.tokens
    sizes = out.stats["verify_size_histogram"]
    print(f"{name}: verify sizes {sizes}, acceptance {out.stats['acceptance_histogram']}")
    assert sum(sizes) == out.stats["steps"]
    assert all(sizes[i] > 0 for i in taken), sizes


def test_sampled_chain_size_reads_only_the_first_law():
    """A sampled chain's size comes from its first position's law alone
    (`VerifySizing.choose_before_drawing`: the chain top, top^2, .. of that law's best token),
    brute-forced here; the drawn tokens' probabilities do not enter (`shapes.chain_size`)."""
    sizing = VerifySizing(sizes=(1, 2, 4), costs=(1.0, 1.3, 1.5, 2.0))
    top = np.linspace(0.05, 0.95, 19)
    rest = (1 - top) / 7  # the other 7 tokens of an 8-token law share the remainder
    logp = np.log(np.concatenate([top[:, None], np.repeat(rest[:, None], 7, axis=1)], axis=1))
    got = np.asarray(sizing.choose_before_drawing(jnp.asarray(logp, jnp.float32)))
    chain = np.cumsum(top[:, None] ** np.arange(1, 5)[None], axis=1)[:, [0, 1, 3]]
    gain = np.concatenate([np.ones((len(top), 1)), 1 + chain], axis=1) / np.array(sizing.costs)
    np.testing.assert_array_equal(got, np.array([0, 1, 2, 4])[np.argmax(gain, axis=1)])
    assert set(got.tolist()) == {0, 1, 2, 4}  # every choice occurs over this range
    # the drawn tokens (their log-probs) do not matter for a sampled chain; they do when greedy
    confs = [jnp.full((len(top), 4), -5.0, jnp.float32)]
    sampled = shapes.chain_size(sizing, confs, jnp.asarray(logp, jnp.float32))
    np.testing.assert_array_equal(np.asarray(sampled), got)
    assert not np.asarray(shapes.chain_size(sizing, confs, None)).any()  # greedy: plain steps


# ------------------------------------------------------------------ early exit


def test_worth_growing_estimates_from_the_first_level():
    """A tree grows past its first level only if some size would beat a plain step with the
    chain top, top^2, .. (`VerifySizing.worth_growing`), brute-forced here."""
    sizing = VerifySizing(sizes=(1, 2, 4), costs=(1.0, 1.3, 1.5, 2.0))
    top = np.linspace(0.0, 1.0, 101)
    got = np.asarray(sizing.worth_growing(jnp.asarray(top, jnp.float32)))
    chain = np.cumsum(top[:, None] ** np.arange(1, 5)[None], axis=1)
    want = np.any((1 + chain[:, [0, 1, 3]]) / np.array([1.3, 1.5, 2.0]) > 1.0, axis=1)
    np.testing.assert_array_equal(got, want)
    assert not got[:31].any() and got[31:].all()  # (1 + top) / 1.3 > 1 from top 0.31
    assert not VerifySizing((2,), (1.0, 100.0)).worth_growing(jnp.ones(1))[0]


def _early(costs: tuple, early_exit: bool = True):
    sizing = VerifySizing((2, 6), costs, early_exit=early_exit)
    return lambda target: drafters.eagle(echo_eagle1(target), tree=DynamicTree(6, 4, 2, sizing))


def test_early_exit_greedy_equal_ar(target, ar):
    """Greedy identity with the tree's growth skipped always (no size can pay), never (every
    size pays: the same steps as without the early exit), and sometimes (the echo drafter is
    sure where the target repeats itself: skipped and grown steps, drafts accepted)."""
    always = specjax.generate(
        target, RAGGED_PROMPTS, max_new_tokens=NEW, drafter=_early((1.0, 100.0, 100.0))(target)
    )
    assert always.tokens == ar.tokens
    st = always.stats
    assert st["tree_growth_skipped_steps"] == st["steps"]
    assert st["verify_size_histogram"] == [st["steps"], 0, 0]
    cheap = (1.0, 1.0001, 1.0002)
    grown = specjax.generate(
        target, RAGGED_PROMPTS, max_new_tokens=NEW, drafter=_early(cheap)(target)
    )
    plain = specjax.generate(
        target, RAGGED_PROMPTS, max_new_tokens=NEW, drafter=_early(cheap, False)(target)
    )
    assert grown.tokens == ar.tokens and grown.stats["tree_growth_skipped_steps"] == 0
    for k in ("verify_size_histogram", "acceptance_histogram", "steps"):
        assert grown.stats[k] == plain.stats[k], k
    assert "tree_growth_skipped_steps" not in plain.stats
    d = _early((1.0, 1.1, 1.2))(target)
    for rows in (slice(None), slice(1, 2), slice(3, 4)):  # the ragged batch, two rows alone
        out = specjax.generate(target, RAGGED_PROMPTS[rows], max_new_tokens=NEW, drafter=d)
        assert out.tokens == ar.tokens[rows]
        st = out.stats
        sizes, skipped = st["verify_size_histogram"], st["tree_growth_skipped_steps"]
        print(f"early exit rows {rows}: verify sizes {sizes}, skipped growth {skipped}")
        assert 0 < skipped < st["steps"] and sum(sizes[1:]) > 0, (sizes, skipped)
        if rows == slice(None):
            assert sum(st["acceptance_histogram"][1:]) > 0, st["acceptance_histogram"]


# ------------------------------------------------------------------ the draft gate


def _gate_state(**kw):
    g = DraftGate(plain=1.0).init(3)
    return g._replace(**{k: jnp.asarray(v, getattr(g, k).dtype) for k, v in kw.items()})


def test_gate_backs_off_while_drafting_does_not_pay():
    gate = DraftGate(plain=1.0, decay=0.5, max_wait=4)
    active = jnp.asarray([True, True, False])
    # Row 0 drafted and emitted 1 token at cost 2 (paid 0.5): value 0.75, it waits its backoff
    # (3) and the next backoff doubles, capped at max_wait (6 -> 4). Row 1 emitted 3 (paid 1.5):
    # value 1.25, no wait, backoff reset. Row 2 finished: it waits, so it never holds the gate
    # open.
    g = _gate_state(value=[1.0, 1.0, 1.0], wait=[0, 0, 0], backoff=[3, 2, 1], asked=[4, 4, 4])
    u = gate.update(g, jnp.asarray([1, 3, 1]), jnp.float32(2.0), active)
    np.testing.assert_allclose(u.value, [0.75, 1.25, 1.0])
    assert u.wait.tolist() == [3, 0, 4] and u.backoff.tolist() == [4, 1, 1]
    assert u.skipped.tolist() == [0, 0, 0]
    assert not bool(gate.closed(u))  # row 1 wants to draft
    # A step without drafting (asked -1): waits count down, value unchanged, skipped counted.
    s = gate.update(u._replace(asked=jnp.full((3,), -1)), jnp.ones(3, int), 1.0, active)
    assert s.wait.tolist() == [2, 0, 4] and s.skipped.tolist() == [1, 1, 0]
    np.testing.assert_allclose(s.value, u.value)
    assert bool(gate.closed(s._replace(wait=jnp.asarray([1, 2, 4]))))
    with pytest.raises(ValueError, match="plain must be a positive cost"):
        DraftGate(plain=0.0)
    with pytest.raises(ValueError, match="decay"):
        DraftGate(plain=1.0, decay=1.5)
    with pytest.raises(TypeError, match="DraftGate or None"):
        VerifySizing((2,), (1.0, 1.1), gate=1.0)


# A plain step without drafting costs 0.6 against ~1.0 for a drafted one (verifying costs next
# to nothing, so the sizing verifies drafts the tiny target gives any chance): a drafted step
# pays only when it emits >= 2 tokens. The echo drafter is accepted where the target repeats
# itself, so rows draft on through repetitions and back off elsewhere (both branches taken, and
# drafts accepted, asserted).
GATE = DraftGate(plain=0.6)
GATED = {
    "eagle1_tree_gated": lambda target: drafters.eagle(
        echo_eagle1(target),
        tree=DynamicTree(6, 4, 2, VerifySizing((2, 6), (1.0, 1.001, 1.002), GATE)),
    ),
    "eagle1_chain_gated": lambda target: drafters.eagle(
        echo_eagle1(target), k=4, sizing=VerifySizing((2, 4), (1.0, 1.001, 1.002), GATE)
    ),
}


@pytest.mark.parametrize("name", list(GATED))
def test_gated_drafters_greedy_equal_ar(name, target, ar):
    d = GATED[name](target)
    for rows in (slice(None), slice(1, 2), slice(3, 4)):  # the ragged batch, two rows alone
        out = specjax.generate(target, RAGGED_PROMPTS[rows], max_new_tokens=NEW, drafter=d)
        assert out.tokens == ar.tokens[rows]
        st = out.stats
        sizes, skipped, acc = st["verify_size_histogram"], st["draft_skipped_steps"], st["tau"]
        print(f"{name} rows {rows}: verify sizes {sizes}, skipped {skipped}, tau {acc:.2f}")
        assert skipped > 0 and sum(sizes[1:]) > 0, sizes
        if rows == slice(None):  # drafts accepted, between steps without drafting
            assert sum(st["acceptance_histogram"][1:]) > 0, st["acceptance_histogram"]
