"""Horizontal cascades (specjax/drafters/horizontal.py): an EAGLE chain for the first draft
positions, an n-gram continuation for the later ones.

Greedy: identical to plain decoding on a ragged batch and at batch 1, with tokens the n-gram
drafted accepted.
Sampling: test_tree_sampling's setup and power (the V = 16 target, 8192 rows of its
repetitive PROMPT, 4 new tokens; the (t1, t2, t3) joint and the (t2, t3, t4) marginal against the
exact law) with a random EAGLE-3 chain of 1 and an n-gram continuation of 2, so a step's draft
mixes a sampled position with deterministic ones; negative controls: every draft token accepted
(the chain rule broken), and the n-gram's positions handed to the target as if drawn from the
EAGLE drafter's last law (the schedule's point masses dropped), both rejected by the same fit.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_eagle import random_eagle
from test_tree_sampling import cell_counts, exact, sample_tokens  # noqa: F401  (`exact`: fixture)

import specjax
from specjax import drafters
from specjax.drafters.horizontal import HorizontalSpec

from test_spec_sampling import (  # noqa: F401  (`models` is a fixture)
    ALPHA,
    MODES,
    broken_verify_chain,
    chi_square,
    models,
    patched_verify_chain,
)

NEW = 20


def make(target, first_k=1, later_k=2, seed=1, **kw):
    first = drafters.eagle(random_eagle(target, 3, seed=seed, **kw), k=first_k)
    return drafters.horizontal(first, drafters.ngram(max_ngram=3, k=later_k, adaptive=False))


def _accepted_beyond(hist, first_k):
    """Steps that accepted a token the n-gram drafted (more than first_k tokens)."""
    return int(np.asarray(hist)[first_k + 1 :].sum())


def test_horizontal_greedy_equals_ar(models):
    # The V = 16 target of the sampling tests (its greedy continuations loop, so the n-gram
    # continuation is often right) on a ragged batch of its prompt's suffixes.
    from test_tree_sampling import PROMPT

    target, _ = models
    prompts = [PROMPT, PROMPT[3:], PROMPT[7:], PROMPT[:11]]
    ar = specjax.generate(target, prompts, max_new_tokens=NEW)
    # An EAGLE-3 with a draft vocabulary of one token (seed 4: token 11, which the last row
    # repeats): its one draft token is right there, and the n-gram's continuation too.
    d = make(target, first_k=1, later_k=3, seed=4, draft_vocab=1)
    out = specjax.generate(target, prompts, max_new_tokens=NEW, drafter=d)
    assert out.tokens == ar.tokens
    hist = out.stats["acceptance_histogram"]
    print(hist, out.stats["tau"])
    assert len(hist) == 5 and _accepted_beyond(hist, 1) > 0, hist
    # Per-part statistics agree with the histogram (first part: 1 token, then the n-gram's).
    h = np.asarray(hist)
    n = np.arange(len(h))
    assert out.stats["horizontal"] == {
        "steps": int(h.sum()),
        "first_accepted": int((h * np.minimum(n, 1)).sum()),
        "later_reached": int(h[1:].sum()),
        "later_accepted": int((h * np.maximum(n - 1, 0)).sum()),
    }, out.stats["horizontal"]
    pm = specjax.generate_pmap(target, prompts, max_new_tokens=NEW, drafter=d)
    assert pm.tokens == ar.tokens and pm.stats["horizontal"] == out.stats["horizontal"]
    single = specjax.generate(target, prompts[1:2], max_new_tokens=NEW, drafter=d)
    assert single.tokens == ar.tokens[1:2]


def _fit(toks, exact_mode):
    fits = []
    for cols, law in (((0, 1, 2), exact_mode["joint123"]), ((1, 2, 3), exact_mode["marg234"])):
        fits.append(chi_square(cell_counts(toks, cols), law))
    return fits


def test_horizontal_sampling_matches_target(models, exact):
    target, _ = models
    d = make(target, draft_vocab=12)
    toks, st = sample_tokens(target, d, MODES["plain"], seed=7171)
    hist = np.asarray(st["acceptance_histogram"])
    print(f"horizontal histogram {hist.tolist()}")
    for fit in _fit(toks, exact["plain"]):
        print(f"horizontal: {fit}")
        assert fit.impossible == 0
        assert fit.pvalue > ALPHA, f"horizontal differs from the target: {fit}"
    assert hist[0] >= 0.05 * hist.sum() and hist[1] >= 0.05 * hist.sum(), hist
    assert _accepted_beyond(hist, 1) >= 0.02 * hist.sum(), hist  # n-gram tokens accepted


def test_horizontal_broken_rule_is_detected(models, exact, monkeypatch):
    target, _ = models
    broken = broken_verify_chain("accept_all")
    with patched_verify_chain(monkeypatch, broken):
        toks, _ = sample_tokens(target, make(target, draft_vocab=12), MODES["plain"], seed=7172)
    assert broken.traced > 0
    fit = _fit(toks, exact["plain"])[0]
    print(f"horizontal with accept_all: {fit}")
    assert fit.pvalue < ALPHA, fit


class _NoPointMasses(HorizontalSpec):
    """The n-gram's positions handed to the target with the EAGLE drafter's law at its last
    position instead of their point masses (a class of its own: its own compiled program)."""

    def propose(self, params, state, last, key, mode, sp):
        draft, state = super().propose(params, state, last, key, mode, sp)
        a = self.first.k
        wrong = np.repeat(np.arange(a)[-1:], self.later.k)  # the last EAGLE row, repeated
        return draft._replace(logp=draft.logp.at[:, a:].set(draft.logp[:, wrong])), state


def test_horizontal_without_point_masses_is_detected(models, exact):
    """A wrong q for the n-gram's positions must be caught by the fit."""
    import dataclasses

    target, _ = models
    good = make(target, draft_vocab=12)
    spec, params = good.bind(target)
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    broken = drafters.Drafter.fixed("no point masses", _NoPointMasses(**fields), params)
    toks, _ = sample_tokens(target, broken, MODES["plain"], seed=7173)
    fit = _fit(toks, exact["plain"])[0]
    print(f"horizontal without point masses: {fit}")
    assert fit.pvalue < ALPHA, fit


def test_horizontal_refuses_what_it_cannot_follow(target):
    eagle = drafters.eagle(random_eagle(target, 3, seed=2), k=2)
    tree = drafters.DynamicTree(nodes=4, depth=2, top_k=2)
    for first, later, why in (
        (drafters.layer_skip(layers=1, k=2), drafters.ngram(k=2), "first part must be an EAGLE"),
        (drafters.eagle(random_eagle(target, 3, seed=2), tree=tree), drafters.ngram(k=2), "EAGLE"),
        (eagle, drafters.ngram(k=2, branches=2), "later part must be an n-gram chain"),
    ):
        with pytest.raises(ValueError, match=why):
            specjax.generate(
                target, [[1, 2, 3]], max_new_tokens=2, drafter=drafters.horizontal(first, later)
            )


def test_horizontal_cli_name():
    from specjax.drafters import registry

    name = registry.parse("horizontal:eagle3@2+ngram@4")
    assert name.entry.name == "horizontal" and name.arg == "eagle3@2+ngram@4"
    for bad, why in (
        ("horizontal:eagle3", "FIRST\\+LATER"),
        ("horizontal:hybrid:ngram+eagle3_tree+ngram", "FIRST\\+LATER"),
        ("horizontal:eagle3+nope", "unknown drafter 'nope'"),
    ):
        with pytest.raises(ValueError, match=why):
            registry.parse(bad)
