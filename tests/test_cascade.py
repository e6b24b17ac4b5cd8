"""Vertical cascades (`drafters.cascade`): A drafts for B, B for the target, and deeper.

Greedy: outputs equal plain greedy decoding token for token, for a two-level cascade with an
n-gram bottom, one with an LM bottom (its `rewind` after the target rejects), and a three-level
one (a cascade as the lower level of another).

Sampling: the chi-square test of tests/test_spec_sampling.py (same target, prompt, N_ROWS = 8192
rows, 3 new tokens, the joint of (t1, t2, t3) against the exact target law; its stated power:
TV >= 0.062 (plain) / 0.047 (top-k/top-p) is rejected with probability >= 0.99 at ALPHA). The
top level is that file's 1-layer draft model with k = 2, so t2 and t3 pass through the target's
check of the cascade's draft. Negative control: a cascade that hands the target the wrong
distribution for its draft (uniform instead of the upper level's own q_B) must be rejected; its
exact law is computable because the upper level's emitted tokens follow q_B exactly (the inner
level is lossless), which gives the TV distance and the power of the test against it.

An EAGLE top level (n-gram -> EAGLE, n-gram -> layer skip -> EAGLE): greedy identity, the
Jacobi block scoring against sequential feeding, chi-square by one pass and by a pass per slot,
and a negative control (the uniform law handed to the target).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax import drafters
from specjax.drafters.cascade import CascadeSpec

from test_spec_sampling import (  # noqa: F401  (`models`, `exact` are pytest fixtures)
    ALPHA,
    MIN_POWER,
    MODES,
    N_ROWS,
    _scaled,
    assert_follows_target,
    chi_square,
    exact,
    models,
    power,
    sample_joint,
)

NEW = 24


@pytest.fixture(scope="module")
def greedy_ar(target):
    from conftest import RAGGED_PROMPTS

    return RAGGED_PROMPTS, specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=NEW).tokens


GREEDY_CASES = {
    # n-gram bottom, the target's first 2 of 3 layers on top
    "ngram>layer_skip": lambda other: [
        drafters.ngram(k=2),
        drafters.layer_skip(layers=2, k=3),
    ],
    # an LM bottom: after each target check it rewinds its own cache
    "model>layer_skip": lambda other: [
        drafters.small_model(other, k=2),
        drafters.layer_skip(layers=2, k=3),
    ],
    # three levels: n-gram -> 1 layer -> 2 layers -> target
    "ngram>layer_skip>layer_skip": lambda other: [
        drafters.ngram(k=1),
        drafters.layer_skip(layers=1, k=2),
        drafters.layer_skip(layers=2, k=4),
    ],
}


@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_cascade_greedy_equals_ar(target, other, greedy_ar, case):
    prompts, ar = greedy_ar
    out = specjax.generate(
        target, prompts, max_new_tokens=NEW, drafter=drafters.cascade(GREEDY_CASES[case](other))
    )
    assert out.tokens == ar
    hist = np.asarray(out.stats["acceptance_histogram"])
    # the target both accepts and rejects parts of the cascade's drafts
    assert hist[0] > 0 and hist[1:].sum() > 0, hist
    # per-level statistics, smallest level first; each upper level accepted some drafts
    levels = out.stats["cascade_levels"]
    assert len(levels) == len(GREEDY_CASES[case](other)) - 1
    for lv in levels:
        assert 0 < lv["accepted"] < lv["drafted"] and lv["upper_forwards"] > 0, levels
        assert lv["tau"] == (lv["accepted"] + lv["upper_forwards"]) / lv["upper_forwards"]
    if len(levels) == 2:  # the deepest cascade at batch 1 too
        d = drafters.cascade(GREEDY_CASES[case](other))
        one = specjax.generate(target, prompts[3], max_new_tokens=NEW, drafter=d, chat=False)
        assert one.tokens == [ar[3]]
        # and through generate_pmap (a device axis on every state leaf, merged into rows):
        # the same tokens and per-level statistics
        pm = specjax.generate_pmap(target, prompts, max_new_tokens=NEW, drafter=d)
        assert pm.tokens == ar and pm.stats["cascade_levels"] == levels, pm.stats


def test_lenient_cascade_greedy_equals_ar(target, other, greedy_ar):
    """A lenient level accepts more of the draft below it; the target's check keeps the output."""
    prompts, ar = greedy_ar
    acceptance = {}
    for leniency in (1.0, 4.0):
        d = drafters.cascade(GREEDY_CASES["model>layer_skip"](other), leniency=leniency)
        out = specjax.generate(target, prompts, max_new_tokens=NEW, drafter=d)
        assert out.tokens == ar, leniency
        acceptance[leniency] = out.stats["cascade_levels"][0]["acceptance"]
    print(acceptance)
    assert acceptance[4.0] > acceptance[1.0], acceptance
    with pytest.raises(ValueError, match="leniency must be a finite number >= 1, got 0.5"):
        drafters.cascade(GREEDY_CASES["model>layer_skip"](other), leniency=0.5)


BAD_LENIENCY = "leniency after '~' must be a finite number >= 1"


def test_cascade_cli_name(target):
    """`cascade:A>B` through the drafter registry (what --drafter and bench take)."""
    from specjax.drafters import registry

    d = registry.make("cascade:ngram@2>layer_skip:2@3", model=target)
    assert d.k == 3 and d.name == "cascade(ngram(n=1..4, k=2) > layer_skip(layers=2, k=3))", d.name
    spec, _ = d.bind(target)
    assert (spec.lower.k, spec.upper.k, spec.upper.cfg.num_layers) == (2, 3, 2)
    # `~L` makes every level lenient by the factor L (the name says so, the spec carries it).
    d = registry.make("cascade:ngram@2>layer_skip:2@3~2.5", model=target)
    assert d.name == "cascade(ngram(n=1..4, k=2) > layer_skip(layers=2, k=3), leniency=2.5)"
    assert d.bind(target)[0].leniency == 2.5
    for bad, msg in [
        ("cascade:ngram", ">= 2 levels"),
        ("cascade:ngram>nope", "unknown drafter 'nope'"),
        ("cascade:auto>layer_skip", "cannot be inside a cascade"),
        ("cascade:ngram>layer_skip~0.5", f"{BAD_LENIENCY}, got '0.5'"),
        ("cascade:ngram>layer_skip~x", f"{BAD_LENIENCY}, got 'x'"),
        ("cascade:ngram>layer_skip~nan", f"{BAD_LENIENCY}, got 'nan'"),
        ("cascade:ngram>layer_skip~inf", f"{BAD_LENIENCY}, got 'inf'"),
        ("cascade:ngram>layer_skip~", f"{BAD_LENIENCY}, got ''"),
    ]:
        with pytest.raises(ValueError, match=msg):
            registry.parse(bad)


def test_cascade_levels_are_checked(target, other):
    ok_lower, ok_upper = drafters.ngram(k=2), drafters.small_model(other, k=2)
    with pytest.raises(ValueError, match=">= 2 drafters"):
        drafters.cascade([ok_upper])
    with pytest.raises(ValueError, match="upper level must be an LM chain drafter"):
        specjax.generate(
            target, [[1, 2, 3]], max_new_tokens=4, drafter=drafters.cascade([ok_lower, ok_lower])
        )
    tree = drafters.small_model(other, tree=drafters.DynamicTree(nodes=4, depth=2, top_k=2))
    with pytest.raises(ValueError, match="a lower level must draft a chain"):
        specjax.generate(
            target, [[1, 2, 3]], max_new_tokens=4, drafter=drafters.cascade([tree, ok_upper])
        )
    with pytest.raises(ValueError, match="upper level must be an LM chain drafter"):
        specjax.generate(
            target, [[1, 2, 3]], max_new_tokens=4, drafter=drafters.cascade([ok_lower, tree])
        )


# ---------------------------------------------------------------------------------- sampling


def _draft2(draft: specjax.Model) -> specjax.Model:
    """A second small model: the draft with a flatter head (a distribution of its own)."""
    return _scaled(draft, lm_head=draft.params["lm_head"] * 0.6)


SAMPLED = {  # name -> (levels(draft), mode, seed)
    "ngram>model": (
        lambda d: [drafters.ngram(max_ngram=3, k=2), drafters.small_model(d, k=2)],
        "plain",
        3101,
    ),
    "model>model": (
        lambda d: [drafters.small_model(_draft2(d), k=2), drafters.small_model(d, k=2)],
        "topk5_topp0.8",
        3102,
    ),
    "ngram>model>model": (
        lambda d: [
            drafters.ngram(max_ngram=3, k=1),
            drafters.small_model(_draft2(d), k=2),
            drafters.small_model(d, k=2),
        ],
        "plain",
        3103,
    ),
    # lenient middle level: the upper model accepts the n-gram's tokens with min(1, 4 p / q)
    "ngram>model lenient": (
        lambda d: [drafters.ngram(max_ngram=3, k=2), drafters.small_model(d, k=2)],
        "plain",
        3104,
    ),
    "model>model lenient": (
        lambda d: [drafters.small_model(_draft2(d), k=2), drafters.small_model(d, k=2)],
        "topk5_topp0.8",
        3105,
    ),
}
LENIENCY = 4.0


@pytest.mark.parametrize("case", list(SAMPLED))
def test_cascade_sampling_matches_target(models, exact, case):
    target, draft = models
    levels, mode, seed = SAMPLED[case]
    leniency = LENIENCY if case.endswith("lenient") else 1.0
    d = drafters.cascade(levels(draft), leniency=leniency)
    counts, st = sample_joint(target, d, MODES[mode], seed)
    hist = np.asarray(st["acceptance_histogram"])
    assert_follows_target(counts, exact[mode]["joint"], hist, f"cascade {case}/{mode}")
    assert hist[0] >= 0.05 * hist.sum() and hist[1:].sum() >= 0.05 * hist.sum(), hist


@dataclasses.dataclass(frozen=True)
class UniformHandedSpec(CascadeSpec):
    """Broken on purpose: tells the target its draft follows the uniform distribution."""

    def _handed_logp(self, logits, draft, mode, sp):
        return jnp.full(logits.shape, -np.log(logits.shape[-1]), jnp.float32)


def _broken(
    levels,
    spec_class=UniformHandedSpec,
    leniency: float = 1.0,
    name: str = "broken-cascade",
    passes: int | None = None,
) -> drafters.Drafter:
    """The cascade of `levels`, its spec rebuilt as `spec_class` (a broken subclass)."""
    good = drafters.cascade(levels, leniency=leniency, passes=passes)

    def bind(target):
        spec, params = good.bind(target)
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
        return spec_class(**fields), params

    return drafters.Drafter(name=name, k=good.k, binder=bind)


def uniform_handed_law(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Law of the first token a target check emits when the draft follows q but the target is
    told it follows the uniform distribution u: draft x is accepted with min(1, p(x) / u(x)),
    a rejection draws from norm(max(p - u, 0))."""
    u = 1.0 / p.shape[-1]
    a = q * np.minimum(1.0, p / u)
    res = np.maximum(p - u, 0.0)
    mass = res.sum(-1, keepdims=True)
    res = np.where(mass > 0, res / np.where(mass > 0, mass, 1), p)
    return a + (1.0 - a.sum(-1, keepdims=True)) * res


def test_cascade_wrong_handed_distribution_is_detected(models, exact):
    """With k = 2 and 3 new tokens, t2 | t1 and t3 | t1, t2 are each either a draft token checked
    against (p, q_B) at its position or the first token of a new check there: both follow
    `uniform_handed_law(p, q_B)` (q_B: the top level's exact law, `exact[mode]["q"]`)."""
    target, draft = models
    mode = "plain"
    p1, p2, p3 = exact[mode]["p"]
    _, q2, q3 = exact[mode]["q"]
    law = (
        p1[:, None, None] * uniform_handed_law(p2, q2)[:, :, None] * uniform_handed_law(p3, q3)
    ).ravel()
    null = exact[mode]["joint"]
    tv, pw, lam = power(null, law, N_ROWS)
    levels = SAMPLED["ngram>model"][0](draft)
    counts, _ = sample_joint(target, _broken(levels), MODES[mode], 3111)
    fit = chi_square(counts, null)
    alt = chi_square(counts, law)
    print(f"uniform handed q: TV={tv:.3f} lambda={lam:.0f} power={pw} {fit}; vs broken law {alt}")
    assert pw >= MIN_POWER
    assert fit.pvalue < ALPHA, fit
    assert alt.pvalue > ALPHA, alt  # and it is the broken law the engine produced


def test_rewind_follows_the_sequence():
    """`rewind` on n-gram and LM states: drop the newest tokens, append a new newest one."""
    from specjax.drafters.lm import LMDraftState
    from specjax.drafters.ngram import NgramState
    from specjax.models.cache import KVCache

    ng = drafters.ngram(k=2)
    spec, _ = ng.binder(None)
    st = NgramState(hist=jnp.array([[5, 6, 7, 8, 0, 0]]), hist_len=jnp.array([4]))
    out = spec.rewind(None, st, jnp.array([2]), jnp.array([9]))
    assert out.hist_len.tolist() == [3] and out.hist[0, :3].tolist() == [5, 6, 9]

    lm = drafters.LMDrafterSpec(k=2)
    cache = KVCache(k=(), v=(), lengths=jnp.array([10, 10, 10]))
    st = LMDraftState(
        cache=cache,
        pending=jnp.array([[3, 4], [3, 0], [3, 4]]),
        n_pending=jnp.array([2, 1, 2]),
        len_before=cache.lengths,
    )
    out = lm.rewind(None, st, jnp.array([1, 3, 3]), jnp.array([7, 8, 9]))
    # row 0: drop 4, keep 3 pending -> [3, 7]; row 1: 11 tokens - 3 -> 8 cached, [8] pending;
    # row 2: 12 - 3 -> 9 cached, [9] pending
    assert out.cache.lengths.tolist() == [10, 8, 9]
    assert out.n_pending.tolist() == [2, 1, 1]
    assert out.pending.tolist() == [[3, 7], [8, 0], [9, 0]]
    jax.block_until_ready(out)


# ------------------------------------------------------------------- an EAGLE top level


def wobbly_echo(target, scale: float = 1.0):
    """`echo_eagle1` with a random attention output projection: drafts the target often accepts
    (the echo) from outputs that depend on the features fed before them (the projection), so a
    block scored with fewer Jacobi passes than slots follows another law than the chain."""
    from test_eagle import echo_eagle1

    from specjax.models import eagle as N

    cfg, p = echo_eagle1(target)
    wo = N.init_params(cfg, jax.random.key(5))["layer"]["wo"]
    return cfg, {**p, "layer": {**p["layer"], "wo": wo * scale}}


def test_eagle_block_passes():
    """`eagle_block`: as many Jacobi passes as slots give the sequential outputs (each slot fed
    the output before it, one token at a time, as the EAGLE chain drafts); one pass does not."""
    from test_eagle import random_eagle

    from specjax.drafters.cascade import eagle_block
    from specjax.drafters.feature import EagleSpec
    from specjax.models import eagle as N
    from specjax.models.cache import init_cache

    from conftest import build_hf_model

    target = specjax.model_from_hf(build_hf_model("llama", seed=0, eos_token_id=None))
    cfg, params = random_eagle(target, 3, seed=2, draft_vocab=80)
    params = N.bind_target(params, target.params)
    spec = EagleSpec(k=3, eagle=cfg, target_cfg=target.config)
    B, T, P, D = 2, 4, 5, cfg.hidden
    rng = np.random.default_rng(0)
    cache = init_cache(cfg.layer, B, 16, jnp.float32, per_layer=True)
    _, cache = N.draft_block(
        cfg,
        params,
        jnp.asarray(rng.normal(size=(B, P, D)), jnp.float32),
        jnp.asarray(rng.integers(0, 100, (B, P))),
        jnp.broadcast_to(jnp.arange(P), (B, P)),
        cache,
    )
    cache = cache.replace(lengths=jnp.asarray([P, P - 2]))  # ragged: row 1 two slots earlier
    feat = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
    block = jnp.asarray(rng.integers(0, 100, (B, T)))
    pos = cache.lengths[:, None] + jnp.arange(T)[None, :]
    seq, f, c = [], feat, cache
    for i in range(T):
        o, c = N.draft_block(cfg, params, f[:, None], block[:, i : i + 1], pos[:, i : i + 1], c)
        c = c.replace(lengths=c.lengths + 1)
        seq.append(o[:, 0])
        f = o[:, 0]
    seq = np.stack(seq, 1)
    full, _ = eagle_block(spec, params, feat, block, pos, cache, T)
    np.testing.assert_allclose(full, seq, atol=2e-5)
    one, _ = eagle_block(spec, params, feat, block, pos, cache, 1)
    np.testing.assert_allclose(one[:, 0], seq[:, 0], atol=2e-5)  # slot 0 is exact in any pass
    assert np.abs(np.asarray(one[:, 1:]) - seq[:, 1:]).max() > 1e-2


def test_eagle_top_greedy_equals_ar(target, greedy_ar):
    """An EAGLE chain as the top level of a cascade: the n-gram drafts for it (two levels), or
    a layer-skip level between them (three); greedy output equals AR, ragged batch and batch 1.
    With a pass per slot the cascade's draft is the EAGLE chain's own (lossless at its level):
    the target's acceptance histogram equals that of the EAGLE drafter alone, step for step."""
    prompts, ar = greedy_ar
    w = wobbly_echo(target)
    alone = specjax.generate(target, prompts, max_new_tokens=NEW, drafter=drafters.eagle(w, k=3))
    hists = {}
    for passes in (None, 1):
        d = drafters.cascade([drafters.ngram(k=2), drafters.eagle(w, k=3)], passes=passes)
        out = specjax.generate(target, prompts, max_new_tokens=NEW, drafter=d)
        assert out.tokens == ar, passes
        (lv,) = out.stats["cascade_levels"]
        assert 0 < lv["accepted"] < lv["drafted"], lv
        hists[passes] = out.stats["acceptance_histogram"]
    assert hists[None] == alone.stats["acceptance_histogram"], (hists, alone.stats)
    assert sum(hists[1][1:]) > 0, hists  # the target accepts the one-pass law's drafts too
    d = drafters.cascade(
        [drafters.ngram(k=1), drafters.layer_skip(layers=2, k=2), drafters.eagle(w, k=3)],
        passes=2,
    )
    out = specjax.generate(target, prompts, max_new_tokens=NEW, drafter=d)
    assert out.tokens == ar
    assert [lv["upper_forwards"] > 0 for lv in out.stats["cascade_levels"]] == [True, True]
    one = specjax.generate(target, prompts[3], max_new_tokens=NEW, drafter=d, chat=False)
    assert one.tokens == [ar[3]]


def test_eagle_level_placement_is_checked(target):
    from test_eagle import random_eagle

    w = random_eagle(target, 3, seed=1, draft_vocab=80)
    ngram = drafters.ngram(k=2)
    with pytest.raises(ValueError, match="an EAGLE drafter can only be the top level"):
        specjax.generate(
            target,
            [[1, 2, 3]],
            max_new_tokens=4,
            drafter=drafters.cascade([ngram, drafters.eagle(w, k=2), drafters.layer_skip(2)]),
        )
    tree = drafters.eagle(w, tree=drafters.DynamicTree(nodes=4, depth=2, top_k=2))
    with pytest.raises(ValueError, match="or, at the top, an EAGLE chain"):
        specjax.generate(
            target, [[1, 2, 3]], max_new_tokens=4, drafter=drafters.cascade([ngram, tree])
        )
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=f"passes must be a positive int.*got {bad!r}"):
            drafters.cascade([ngram, drafters.eagle(w, k=2)], passes=bad)


def _eagle_top(target, passes):
    from test_eagle import random_eagle

    weights = random_eagle(target, 3, seed=11, draft_vocab=12)
    return [drafters.ngram(max_ngram=3, k=2), drafters.eagle(weights, k=2)], passes


@pytest.mark.parametrize(("passes", "mode"), [(1, "plain"), (None, "topk5_topp0.8")])
def test_eagle_top_sampling_matches_target(models, exact, passes, mode):
    """The chi-square test above for n-gram -> EAGLE-3 chain (draft vocabulary 12 of 16) ->
    target, by one Jacobi pass (a law of its own) and by the EAGLE chain's law."""
    target, _ = models
    levels, passes = _eagle_top(target, passes)
    d = drafters.cascade(levels, passes=passes)
    counts, st = sample_joint(target, d, MODES[mode], 3120 + (passes or 0))
    hist = np.asarray(st["acceptance_histogram"])
    assert_follows_target(counts, exact[mode]["joint"], hist, f"ngram > eagle3 passes={passes}")
    assert hist[0] >= 0.05 * hist.sum() and hist[1:].sum() >= 0.05 * hist.sum(), hist
    (lv,) = st["cascade_levels"]
    assert 0.05 < lv["acceptance"] < 0.95, lv


def test_eagle_top_wrong_handed_distribution_is_detected(models, exact):
    """Negative control of the test above: the EAGLE level tells the target its draft follows
    the uniform distribution (`UniformHandedSpec`); the chi-square test rejects it."""
    target, _ = models
    levels, passes = _eagle_top(target, 1)
    broken = _broken(levels, name="broken eagle top", passes=passes)
    counts, _ = sample_joint(target, broken, MODES["plain"], 3123)
    fit = chi_square(counts, exact["plain"]["joint"])
    print(f"EAGLE top handing the uniform law: {fit}")
    assert fit.pvalue < ALPHA, fit


@dataclasses.dataclass(frozen=True)
class PlainHandedLenientSpec(CascadeSpec):
    """Broken on purpose: a lenient level that tells the target its draft follows q_B (what an
    exact level would hand) instead of the lenient law pi."""

    def _lenient_handed(self, law, logits, mode, sp):
        from specjax.sampling import process_logits

        return process_logits(logits, mode, sp)


def test_lenient_level_handing_q_b_is_detected(models, exact):
    target, draft = models
    levels = SAMPLED["ngram>model lenient"][0](draft)
    broken = _broken(levels, PlainHandedLenientSpec, LENIENCY, "lenient handing q_B")
    counts, _ = sample_joint(target, broken, MODES["plain"], 3112)
    fit = chi_square(counts, exact["plain"]["joint"])
    print(f"lenient level handing q_B: {fit}")
    assert fit.pvalue < ALPHA, fit
