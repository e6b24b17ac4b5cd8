"""Hybrid drafting, `switch` mode: per step and row, an n-gram chain when its suffix match is long
enough, else an EAGLE tree (specjax/drafters/hybrid.py).

Greedy: identical to plain decoding on a ragged batch, with both branches taken (asserted from
the hybrid's statistics). Sampling: the setup, size and power of test_tree_sampling.py (the
V = 16 target, 8192 rows of its repetitive PROMPT, 4 new tokens; the (t1, t2, t3) joint and the
(t2, t3, t4) marginal against the exact law; TV >= 0.060 / 0.065 at temperature 0.7 is detected
with probability >= 0.99), with a random EAGLE-3 tree as the model drafter and min_match 2, so
rows take both branches (asserted: each branch serves >= 10% of the verify steps). Negative
control: the tree rule changed to accept the first valid child of each node always
(test_tree_sampling's `accept_first`) is rejected by the same fit.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_eagle import random_eagle
from test_tree_sampling import (  # noqa: F401  (`exact` is a fixture)
    cell_counts,
    exact,
    patched_tree_rule,
    sample_tokens,
    tree_rule,
)

import specjax
from specjax import drafters

from test_spec_sampling import ALPHA, MODES, chi_square, models  # noqa: F401  (a fixture)

NEW = 20
TREE = drafters.DynamicTree(nodes=6, depth=3, top_k=2)


def make_hybrid(target, min_match=2, seed=1, k=3):
    model = drafters.eagle(random_eagle(target, 3, seed=seed, draft_vocab=12), tree=TREE)
    return drafters.hybrid(drafters.ngram(max_ngram=3, k=k), model, min_match=min_match)


@pytest.mark.parametrize("min_match", [1, 2])
def test_hybrid_greedy_equals_ar(target, min_match):
    from conftest import RAGGED_PROMPTS

    ar = specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=NEW)
    # A random EAGLE-3 over the target's whole vocabulary (draft vocab 101)
    model = drafters.eagle(random_eagle(target, 3, seed=2), tree=TREE)
    d = drafters.hybrid(drafters.ngram(max_ngram=3, k=5), model, min_match=min_match)
    out = specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=NEW, drafter=d)
    assert out.tokens == ar.tokens
    h = out.stats["hybrid"]
    print(min_match, h, out.stats["tau"])
    assert h["retrieval_steps"] > 0 and h["model_steps"] > 0, h
    assert h["retrieval_accepted"] > 0  # the looping random target repeats itself
    assert h["retrieval_steps"] + h["model_steps"] == sum(out.stats["acceptance_histogram"])
    single = specjax.generate(target, RAGGED_PROMPTS[:1], max_new_tokens=NEW, drafter=d)
    assert single.tokens == ar.tokens[:1]
    # Batch 1: a step that takes the chain verifies its 5 nodes only (and skips the model's
    # drafting); the others verify the whole 6-node tree. Sizes: [plain, 5, 6].
    sizes = single.stats["verify_size_histogram"]
    h = single.stats["hybrid"]
    assert sizes == [0, h["retrieval_steps"], h["model_steps"]], (sizes, h)


def test_hybrid_sampling_matches_target(models, exact):
    target, _ = models
    toks, st = sample_tokens(target, make_hybrid(target), MODES["plain"], seed=5151)
    h = st["hybrid"]
    steps = h["retrieval_steps"] + h["model_steps"]
    print(f"hybrid branches {h}, histogram {st['acceptance_histogram']}")
    assert h["retrieval_steps"] >= 0.1 * steps and h["model_steps"] >= 0.1 * steps, h
    ex = exact["plain"]
    for cols, law in (((0, 1, 2), ex["joint123"]), ((1, 2, 3), ex["marg234"])):
        fit = chi_square(cell_counts(toks, cols), law)
        print(f"hybrid {cols}: {fit}")
        assert fit.impossible == 0
        assert fit.pvalue > ALPHA, f"hybrid differs from the target: {fit}"
    hist = np.asarray(st["acceptance_histogram"])
    assert hist[0] >= 0.05 * hist.sum() and hist[1:].sum() >= 0.05 * hist.sum(), hist


def test_hybrid_broken_rule_is_detected(models, exact, monkeypatch):
    target, _ = models
    broken = tree_rule("accept_first")
    with patched_tree_rule(monkeypatch, broken):
        toks, _ = sample_tokens(target, make_hybrid(target), MODES["plain"], seed=5152)
    assert broken.traced > 0
    fit = chi_square(cell_counts(toks, (0, 1, 2)), exact["plain"]["joint123"])
    print(f"hybrid with accept_first: {fit}")
    assert fit.pvalue < ALPHA, fit


def test_hybrid_refuses_what_it_cannot_follow(target):
    tree = drafters.layer_skip(layers=1, tree=TREE)
    with pytest.raises(ValueError, match="must be an EAGLE tree"):
        specjax.generate(
            target, [[1, 2, 3]], max_new_tokens=2, drafter=drafters.hybrid(drafters.ngram(), tree)
        )
    eagle = drafters.eagle(random_eagle(target, 3, seed=2), tree=TREE)
    with pytest.raises(ValueError, match="must be an n-gram chain"):
        specjax.generate(
            target,
            [[1, 2, 3]],
            max_new_tokens=2,
            drafter=drafters.hybrid(drafters.ngram(branches=2), eagle),
        )
    with pytest.raises(ValueError, match="unknown hybrid mode 'merge'"):
        drafters.hybrid(drafters.ngram(), eagle, mode="merge")


def test_hybrid_cli_name():
    from specjax.drafters import registry

    name = registry.parse("hybrid:ngram@6+eagle3_tree")
    assert name.entry.name == "hybrid" and name.arg == "ngram@6+eagle3_tree"
    for bad, why in (
        ("hybrid:ngram", "RETRIEVAL\\+MODEL"),
        ("hybrid:cascade:ngram>layer_skip+eagle3_tree", "cannot be a part of a hybrid"),
        ("hybrid:ngram+nope", "unknown drafter 'nope'"),
    ):
        with pytest.raises(ValueError, match=why):
            registry.parse(bad)
