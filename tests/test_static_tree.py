"""Static draft trees from choice lists (Medusa / EAGLE-1 style): the feed schedule, greedy
output identical to plain decoding for small-model and layer-skip drafters, full acceptance when
the target drafts for itself, the YAML presets and the validation errors."""

from __future__ import annotations

import numpy as np
import pytest

from specjax import api as gen
from specjax import drafters
from specjax.drafters import StaticTree, _lm_spec
from specjax.drafters import shapes as tree
from specjax.drafters.lm import LMStaticTreeSpec
from specjax.drafters.shapes import static_tree_schedule

VOCAB = 101
NEW = 32
_rng = np.random.default_rng(0)
PROMPTS = [  # ragged batch, as in test_tree.py
    _rng.integers(0, VOCAB, 5).tolist(),
    [7, 8, 9, 10] * 3,
    [63, 54, 56, 94, 28, 82, 67, 0, 39, 86, 55, 3, 77, 73, 85, 17],
    [40, 41, 42] * 3 + [40, 5, 6, 40, 41],
]
EAGLE_SMALL = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0, 0]]


# ------------------------------------------------------------------------------ structure


def test_schedule_feeds_internal_nodes_depth_by_depth():
    parents, rank = tree.parents_from_choices(EAGLE_SMALL)
    exps, depth, fed_off, W = static_tree_schedule(tuple(parents.tolist()), tuple(rank.tolist()))
    assert depth.tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert len(exps) == 4 and W == 5  # internal nodes: [0], [1], [0,0], [0,1], [0,0,0]
    # Window: depth-1 internal nodes at offsets 0, 1; depth 2 at 2, 3; depth 3 at 4.
    assert fed_off.tolist() == [0, 1, -1, 2, 3, -1, 4, -1, -1, -1]
    assert [e.fed.tolist() for e in exps] == [[], [0, 1], [3, 4], [6]]
    assert [e.off for e in exps] == [0, 0, 2, 4]
    assert [e.top for e in exps] == [3, 2, 2, 1]
    # Each fed node sees exactly its own slot and its ancestors' slots.
    np.testing.assert_array_equal(exps[2].vis, [[1, 0, 1, 0, 0], [1, 0, 0, 1, 0]])
    np.testing.assert_array_equal(exps[3].vis, [[1, 0, 1, 0, 1]])
    # Children pick their parent's block row and their rank.
    assert exps[1].kids.tolist() == [3, 4, 5] and exps[1].slot.tolist() == [0, 0, 1]
    assert exps[1].rank.tolist() == [0, 1, 0]

    spec = _lm_spec(None, 0, StaticTree(EAGLE_SMALL))
    assert isinstance(spec, LMStaticTreeSpec) and spec.k == 10
    assert spec.max_accept == 4 and spec.cache_slack >= W + 2
    assert hash(spec) == hash(
        _lm_spec(None, 0, StaticTree("eagle_small"))
    )  # static: usable as a jit static argument


# ------------------------------------------------------------------------ greedy identity

# `target` (3-layer tiny Llama) and `other` (independent 1-layer draft) come from conftest.py.


@pytest.fixture(scope="module")
def ar_out(target):
    return gen.generate(target, PROMPTS, max_new_tokens=NEW)


def test_static_trees_greedy_equal_ar(target, other, ar_out):
    cases = {
        "model_eagle_small": drafters.small_model(other, tree=StaticTree("eagle_small")),
        # Skipped ranks, uneven fan-out, a depth-1 leaf beside a deep branch.
        "layer_skip_ragged": drafters.layer_skip(
            layers=2, tree=StaticTree([[0], [2], [0, 1], [0, 3], [0, 1, 0]])
        ),
        # Only children of the root: no window is fed, every accepted token goes to pending.
        "model_depth_one": drafters.small_model(other, tree=StaticTree([[0], [1], [2]])),
    }
    for name, d in cases.items():
        out = gen.generate(target, PROMPTS, max_new_tokens=NEW, drafter=d)
        assert out.tokens == ar_out.tokens, name
        assert len(out.stats["acceptance_histogram"]) == d.bind(target)[0].max_accept + 1, name


@pytest.mark.parametrize(
    "choices", [[[0], [0, 0], [0, 0, 0]], EAGLE_SMALL], ids=["chain3", "eagle_small"]
)
def test_self_drafting_accepts_full_depth(target, ar_out, choices):
    # The target drafting for itself: the rank-0 spine of the tree is the target's greedy
    # continuation (computed through window masks and fed offsets), so every step accepts the
    # whole spine (the tree depth) until the budget cuts it. In eagle_small the spine's fed
    # nodes sit at window offsets 0, 2, 4 beside other branches: the commit must compact them.
    d = drafters.small_model(target, tree=StaticTree(choices))
    out = gen.generate(target, PROMPTS, max_new_tokens=NEW, drafter=d)
    assert out.tokens == ar_out.tokens
    hist = out.stats["acceptance_histogram"]
    D = max(map(len, choices))
    assert len(hist) == D + 1 and hist[D] >= 0.8 * sum(hist), hist


# ------------------------------------------------------------------------------ presets


def test_presets_load():
    names = tree.available_trees()
    assert {"chain4", "binary_d3", "eagle_small"} <= set(names)
    for name in names:
        t = StaticTree(name)
        assert t.name == name and t.nodes == len(tree.load_choices(name))
    assert tree.load_choices("chain4") == [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]
    assert tree.load_choices("eagle_small") == EAGLE_SMALL
    assert (StaticTree("binary_d3").nodes, StaticTree("binary_d3").depth) == (14, 3)


def test_preset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tree 'nope'.*chain4.*eagle_small"):
        tree.load_choices("nope")
    with pytest.raises(ValueError, match="no tree file"):
        tree.load_choices(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nchoice: [[0]]\n")
    with pytest.raises(ValueError, match="needs a `choices:` list"):
        tree.load_choices(str(bad))
    good = tmp_path / "mine.yaml"
    good.write_text("name: mine\ndescription: x\nchoices: [[0], [1], [0, 0]]\n")
    assert StaticTree(str(good)).nodes == 3


@pytest.mark.parametrize(
    "choices, message",
    [
        ([], "empty"),
        ([[0], [1, 0]], "no parent"),
        ([[0], [0]], "more than once"),
        ([[0], [-1]], "ints >= 0"),
        ([[0], []], "non-empty"),
        ([["a"]], "ints >= 0"),
        ([[0.5]], "ints >= 0"),
        ([0, 1], "non-empty list"),
        (7, "list of lists"),
    ],
)
def test_bad_choices(choices, message):
    with pytest.raises(ValueError, match=message):
        StaticTree(choices)


def test_bad_static_spec():
    with pytest.raises(ValueError, match="parents must come first"):
        LMStaticTreeSpec(k=2, parents=(1, -1), rank=(0, 0))
    with pytest.raises(ValueError, match="distinct among siblings"):
        LMStaticTreeSpec(k=2, parents=(-1, -1), rank=(0, 0))
    with pytest.raises(ValueError, match="needs 3 parents"):
        LMStaticTreeSpec(k=3, parents=(-1, -1), rank=(0, 1))
    with pytest.raises(TypeError, match="DynamicTree or a StaticTree"):
        _lm_spec(None, 4, [[0]])


def test_rank_beyond_vocabulary(target):
    d = drafters.layer_skip(layers=1, tree=StaticTree([[0], [VOCAB]]))
    with pytest.raises(ValueError, match="top 102 tokens"):
        gen.generate(target, PROMPTS[0], max_new_tokens=4, drafter=d)
