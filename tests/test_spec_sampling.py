"""Speculative sampling at temperature > 0 is lossless: a statistical test, stated size and power.

Claim under test: with any drafter, the tokens `generate` emits are distributed exactly as plain
autoregressive sampling from the target, after the same temperature / top-k / top-p processing.

Method. Each check is a chi-square goodness-of-fit test (`scipy.stats.chisquare`) of empirical
counts against an exactly computed distribution. Cells whose expected count is below
`MIN_EXPECTED` are pooled into one cell (so the chi-square approximation holds); cells of
probability zero must be empty, which is asserted separately. Every test uses fixed seeds, so
it is deterministic; `ALPHA` = 1e-3 is the size of each test, i.e. the chance that a correct
implementation fails it for a random seed (10 engine-level fits, 6 unit-level tests of 3 fits
each: family-wise size <= 2.8%).

Engine level (`generate`, the real decode loop). Target: a 2-layer random Llama with a vocabulary
of V = 16 whose head is scaled by 1.5: after the prompt, each next token has entropy 1.3-1.6 nats
at temperature 0.7 (uniform: log 16 = 2.77) and its most likely value has probability 0.5-0.6,
so distributions are neither near-uniform nor near-deterministic. `N_ROWS` = 8192 copies of one
prompt are decoded in one call, 3 new tokens each (EOS disabled), and the joint of (t1, t2, t3)
(V^3 = 4096 cells) is compared with the exact p(t1) p(t2 | t1) p(t3 | t1, t2) obtained from the
cache-free forward `Model.logits` over all V^2 continuations, processed by `process_logits`.
t1 comes from the prefill; t2 is the first verified token; t3 is an accepted second draft token,
a bonus token, or the first token of a second step, depending on the drafter and on acceptance.
Drafters: n-gram (one-hot q; the prompt repeats, so it proposes real continuations, accepted
about half the time), an independent small model (a 1-layer model with its own transformer
weights, sharing the target's embedding and head so that p and q overlap: q is a real
distribution, which exercises p/q and the residual norm(max(p - q, 0))), the target itself as
draft model (q == p: every draft token is accepted; k = 1, so every t3 is a bonus token), and
layer skip (the first layer, k = 1). Each with plain sampling (temperature 0.7) and with
top-k = 5, top-p = 0.8 (temperature 1; both cut: top-k binds in most contexts, top-p in others).
Plain autoregressive sampling goes through the same test as a check of the test itself. The
tests also assert that the acceptance histograms show the paths they claim to exercise.

Power. After pooling, the plain joint has 156 cells and the top-k/top-p joint 34 (its whole
support). With N = 8192 at ALPHA, any distribution whose TV distance from the target over those
cells is at least 0.062 (plain) / 0.047 (top-k/top-p) is rejected with probability >= 0.99
(noncentral chi-square with lambda = N sum (pi_1 - pi_0)^2 / pi_0 >= 4 N TV^2; checked by
`test_stated_power`). Negative controls: the engine's chain rule (`EngineConfig.rules.chain`) is
replaced by the correct rule changed in one place: (a) the token after a rejection is drawn from p
instead of
norm(max(p - q, 0)); (b) every draft token is accepted; (c) the bonus token after a fully accepted
draft is drawn from the target's distribution one position too early. For each, the exact law of
(t1, t2, t3) under the broken rule is computed as well, which gives its TV distance from the
target and the power of the test against it:

    (a) residual = p, small-model drafter, top-k/top-p   TV 0.19   lambda 1606    observed p = 0
    (b) accept every draft, small-model drafter, plain   TV 0.84   lambda 64712   observed p = 0
    (c) bonus one position early, target as drafter      TV 0.37   lambda 45438   observed p = 0

(power: 1 to float precision in each case; p = 0: below float64's smallest number). The test
asserts power >= 0.999, an observed p-value below ALPHA, and that the observed statistic is
typical of samples from the computed broken law (chi-square 1741 / 64442 / 42124 observed,
1644 +- 89 / 65066 +- 1765 / 45356 +- 2886 simulated), so the power is computed against the
alternative the engine actually produced. The rules are a static field of the engine config, so
a broken rule compiles a program of its own (`patched_verify_chain`).

Unit level (`verify_chain` alone): fixed target distributions p_0..p_K (K = 2, V = 8) and a draft
distribution q per position; B = 2^17 rows drafted from q (or a fixed token for one-hot q, or
q == p) are verified in one call. The emitted tokens, completed to K + 1 tokens with fresh
samples from p, must be distributed as p_0 x p_1 x p_2 (that is losslessness); the first emitted
token as p_0; and the emitted tuple (with its length, i.e. the number accepted) as the exact law
of the algorithm: prod_{i<m} min(p_i, q_i)(x_i) times the residual or bonus probability of the
last token (which also pins the acceptance probabilities min(1, p/q)). Cases: q from a correlated
"model", one-hot q (a fixed draft: a likely token, then one outside the top-k/top-p support),
q == p; with and without top-k = 4, top-p = 0.85. With 2^17 samples, the completed-tuple test
detects TV >= 0.019 (plain, 484 cells) / 0.011 (top-k/top-p, 27 cells) with power 0.99, and the
three broken rules above are rejected with observed p-values of 0, 0 and 2e-113 (TV 0.16, 0.95
and 0.012).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, stats

import specjax
from specjax.drafters.lm import LMDrafterSpec
from specjax.engine import accept
from specjax.engine.accept import Accepted, AcceptRules
from specjax.sampling import make_sampling, process_logits

from conftest import MANY_ROWS_XLA

ALPHA = 1e-3
MIN_EXPECTED = 5.0
MIN_POWER = 0.999

V = 16
HEAD_SCALE = 1.5
N_ROWS = 8192
NEW_TOKENS = 3
# Repeats, so the n-gram drafter finds earlier occurrences of the newest tokens; chosen (among
# short repeated patterns) so that the target often continues the pattern: the n-gram drafter's
# first proposal is accepted about half the time.
PROMPT = [14, 11] * 4

MODES = {
    "plain": dict(temperature=0.7, top_k=None, top_p=None),
    "topk5_topp0.8": dict(temperature=1.0, top_k=5, top_p=0.8),
}
DRAFTERS = ("ar", "ngram", "small_model", "self", "layer_skip", "short_verify")
SEEDS = {(d, m): 1000 + 10 * i + j for i, d in enumerate(DRAFTERS) for j, m in enumerate(MODES)}


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Fit:
    stat: float
    df: int
    pvalue: float
    impossible: int  # samples in cells of probability 0
    cells: np.ndarray  # [n_cells] bin index of each original cell (pooled cells share one)
    n_bins: int

    def __str__(self):
        return f"chi2={self.stat:.1f} df={self.df} p={self.pvalue:.3g} impossible={self.impossible}"


def pooled_bins(probs: np.ndarray, n: int) -> np.ndarray:
    """Bin index per cell: cells with expected count >= MIN_EXPECTED keep their own bin, the rest
    (zero-probability cells included) share the last bin, merged into the smallest kept bin when
    its own expected count is still too small."""
    probs = np.asarray(probs, np.float64).ravel()
    big = probs * n >= MIN_EXPECTED
    bins = np.full(probs.shape, -1)
    bins[big] = np.arange(big.sum())
    rest = probs[~big].sum() * n
    if rest >= MIN_EXPECTED or big.sum() == 0:
        bins[~big] = big.sum()
    else:  # pool the small cells with the smallest kept cell
        smallest = np.argmin(np.where(big, probs, np.inf))
        bins[~big] = bins[smallest]
    return bins


def chi_square(counts: np.ndarray, probs: np.ndarray) -> Fit:
    counts = np.asarray(counts).ravel()
    probs = np.asarray(probs, np.float64).ravel()
    probs = probs / probs.sum()
    n = int(counts.sum())
    impossible = int(counts[probs == 0].sum())
    bins = pooled_bins(probs, n)
    k = bins.max() + 1
    obs = np.bincount(bins, weights=counts, minlength=k)
    exp = np.bincount(bins, weights=probs, minlength=k) * n
    if k < 2:
        return Fit(0.0, 0, 1.0 if impossible == 0 else 0.0, impossible, bins, k)
    if np.any((exp == 0) & (obs > 0)):
        return Fit(np.inf, k - 1, 0.0, impossible, bins, k)
    res = stats.chisquare(obs, exp)
    return Fit(float(res.statistic), k - 1, float(res.pvalue), impossible, bins, k)


def detectable_tv(df: int, n: int, power_: float = 0.99) -> float:
    """Smallest TV distance (over the pooled cells) that a chi-square test with df degrees of
    freedom and n samples detects at ALPHA with probability >= power_, whatever its shape: the
    noncentrality is n sum (pi_1 - pi_0)^2 / pi_0 >= n (sum |pi_1 - pi_0|)^2 = 4 n TV^2."""
    crit = stats.chi2.isf(ALPHA, df)
    lam = optimize.brentq(lambda x: stats.ncx2.sf(crit, df, x) - power_, 1e-6, 1e6)
    return float(np.sqrt(lam / n) / 2)


def power(null: np.ndarray, alt: np.ndarray, n: int) -> tuple[float, float, float]:
    """-> (TV distance, power of the chi-square test at ALPHA with n samples, noncentrality)
    against `alt`, with the cells pooled as for the null (noncentral chi-square approximation)."""
    null = np.asarray(null, np.float64).ravel()
    alt = np.asarray(alt, np.float64).ravel()
    tv = 0.5 * np.abs(null - alt).sum()
    bins = pooled_bins(null, n)
    p0 = np.bincount(bins, weights=null)
    p1 = np.bincount(bins, weights=alt)
    if np.any((p0 == 0) & (p1 > 0)):
        return tv, 1.0, np.inf
    ok = p0 > 0
    lam = n * np.sum((p1[ok] - p0[ok]) ** 2 / p0[ok])
    df = len(p0) - 1
    miss = stats.ncx2.cdf(stats.chi2.isf(ALPHA, df), df, lam)
    return tv, float(1.0 - miss), float(lam)


# ---------------------------------------------------------------------------------------------
# Broken acceptance rules (negative controls): the correct rule changed in exactly one place.
# ---------------------------------------------------------------------------------------------


def broken_verify_chain(flaw: str):
    real = accept.verify_chain

    def broken(key, target_logits, draft_tokens, draft_logp, mode, sp):
        broken.traced += 1
        acc = real(key, target_logits, draft_tokens, draft_logp, mode, sp)
        K = draft_tokens.shape[1]
        logp = process_logits(target_logits, mode, sp)  # [B, K+1, V]
        key2 = jax.random.fold_in(key, 7)
        if flaw == "residual_is_p":  # after a rejection at position n, sample p_n, not the residual
            p_n = jnp.take_along_axis(logp, acc.n[:, None, None], axis=1)[:, 0]
            fresh = jax.random.categorical(key2, p_n, axis=-1).astype(jnp.int32)
            return Accepted(n=acc.n, bonus=jnp.where(acc.n < K, fresh, acc.bonus))
        if flaw == "accept_all":  # every draft token is accepted, then the bonus from p_K
            fresh = jax.random.categorical(key2, logp[:, K], axis=-1).astype(jnp.int32)
            return Accepted(n=jnp.full_like(acc.n, K), bonus=fresh)
        if flaw == "bonus_off_by_one":  # after full acceptance, the bonus from p_{K-1}
            fresh = jax.random.categorical(key2, logp[:, K - 1], axis=-1).astype(jnp.int32)
            return Accepted(n=acc.n, bonus=jnp.where(acc.n == K, fresh, acc.bonus))
        raise ValueError(flaw)

    broken.traced = 0
    return broken


def patched_verify_chain(monkeypatch, fn):
    """Swap the chain rule `generate` compiles with: the rules are a static field of the engine
    config (`EngineConfig.rules`, read from `accept.DEFAULT_RULES` when the config is built), so
    the broken rule gets a program of its own and no jit cache needs clearing."""
    monkeypatch.setattr(accept, "DEFAULT_RULES", AcceptRules(chain=fn))
    return contextlib.nullcontext()


def step_law(p: np.ndarray, q: np.ndarray, flaw=None) -> np.ndarray:
    """Law of the first token emitted by one verification when the target's distribution is p and
    the drafter's is q (any leading batch dims): p itself for the correct rule."""
    a = np.minimum(p, q)  # draft x and accept it
    if flaw is None:
        return p
    if flaw == "residual_is_p":
        return a + (1.0 - a.sum(-1, keepdims=True)) * p
    if flaw == "accept_all":
        return q
    raise ValueError(flaw)


# ---------------------------------------------------------------------------------------------
# Engine level
# ---------------------------------------------------------------------------------------------


def _scaled(model: specjax.Model, **params) -> specjax.Model:
    return dataclasses.replace(model, params={**model.params, **params})


@pytest.fixture(scope="module")
def models(make_hf_model):
    """-> (target, small draft model). EOS is disabled so every row emits exactly 3 tokens."""
    target = specjax.model_from_hf(
        make_hf_model("llama", seed=0, vocab_size=V, eos_token_id=None), dtype=jnp.float32
    )
    target = _scaled(target, lm_head=target.params["lm_head"] * HEAD_SCALE)
    draft = specjax.model_from_hf(
        make_hf_model("llama", seed=7, vocab_size=V, eos_token_id=None, num_hidden_layers=1),
        dtype=jnp.float32,
    )
    # Its own transformer layer, the target's vocabulary embedding and head (a random head of its
    # own would make p and q nearly disjoint under top-k, so no draft would ever be accepted).
    draft = _scaled(draft, embed=target.params["embed"], lm_head=target.params["lm_head"])
    assert target.eos_token_ids == () and draft.eos_token_ids == ()
    return target, draft


@dataclasses.dataclass(frozen=True)
class SizedLMSpec(LMDrafterSpec):
    """Test drafter: a small LM that drafts k tokens but asks (`Draft.size`) for `size(...)` of
    them to be verified, rounded up by the engine to one of `sizes`. `fixed` >= 0 asks for that
    many in every row; -1 asks for (first draft token + last) % (k + 1), which differs by row."""

    sizes: tuple = (1,)
    fixed: int = -1

    @property
    def verify_sizes(self) -> tuple:
        return self.sizes + (self.k,)

    def propose(self, params, state, last, key, mode, sp):
        draft, state = super().propose(params, state, last, key, mode, sp)
        size = (
            (draft.tokens[:, 0] + last) % (self.k + 1)
            if self.fixed < 0
            else jnp.full_like(last, self.fixed)
        )
        return draft._replace(size=size.astype(jnp.int32)), state


def sized_drafter(model, k: int, sizes: tuple, fixed: int = -1):
    base = specjax.drafters.small_model(model, k=k)
    spec, params = base.binder(None)
    return specjax.drafters.Drafter.fixed(
        "sized", SizedLMSpec(k=k, cfg=spec.cfg, sizes=sizes, fixed=fixed), params
    )


def make_drafter(name: str, target, draft):
    if name == "ar":
        return None
    if name == "ngram":
        return specjax.drafters.ngram(max_ngram=3, k=2)
    if name == "small_model":
        return specjax.drafters.small_model(draft, k=2)
    if name == "self":  # q == p; k = 1 so that every row's t3 is the bonus token
        return specjax.drafters.small_model(target, k=1)
    if name == "layer_skip":
        return specjax.drafters.layer_skip(layers=1, k=1)
    if name == "short_verify":  # drafts 2 tokens, verifies only the first (Draft.size = 1)
        return sized_drafter(draft, k=2, sizes=(1,), fixed=1)
    raise ValueError(name)


def assert_no_degenerate_boundary(logits, reach, mode, mode_kw):
    """In every reachable context (`reach` selects rows of `logits` [..., V]), no top-k / top-p
    cut-off lies within 1e-4 of a decision, so float rounding cannot change the kept set."""
    x = np.sort(np.asarray(logits, np.float64) / mode_kw["temperature"], axis=-1)[..., ::-1]
    x = x[reach]
    if mode.top_k is not None:
        gap = x[:, mode.top_k - 1] - x[:, mode.top_k]
        assert gap.min() > 1e-4, f"a top-k boundary is degenerate (logit gap {gap.min():.2g})"
        x = x[:, : mode.top_k]
    if mode.use_top_p:
        s = np.exp(x - x[:, :1])
        s /= s.sum(-1, keepdims=True)
        before = np.cumsum(s, -1) - s
        margin = np.abs(before[:, 1:] - mode_kw["top_p"]).min()
        assert margin > 1e-4, f"a top-p boundary is degenerate (margin {margin:.2g})"


def next_token_dists(model: specjax.Model, mode_kw: dict, check_margins: bool = False):
    """Exact processed next-token distributions after PROMPT, PROMPT+[a], PROMPT+[a, b]:
    -> p1 [V], p2 [V, V] (p2[a] = p(. | a)), p3 [V, V, V] (p3[a, b] = p(. | a, b)), float64.

    With `check_margins`, asserts that in every reachable context no top-k / top-p boundary is
    within float noise: the engine computes the same logits through the KV cache (they may differ
    by ~1e-6), and must arrive at the same support. Margins must exceed 1e-4."""
    mode, sp = make_sampling(mode_kw["temperature"], mode_kw["top_k"], mode_kw["top_p"])
    P = len(PROMPT)
    ab = np.array(list(itertools.product(range(V), repeat=2)), np.int32)
    ids = np.concatenate([np.tile(np.asarray(PROMPT, np.int32), (V * V, 1)), ab], axis=1)
    logits = model.logits(ids)[:, P - 1 : P + 2]  # [V*V, 3, V]
    probs = np.exp(np.asarray(process_logits(logits, mode, sp), np.float64))
    probs /= probs.sum(-1, keepdims=True)
    p1, p2, p3 = probs[0, 0], probs[::V, 1], probs[:, 2].reshape(V, V, V)
    if check_margins:
        reach = np.stack(
            [np.ones(V * V, bool), np.repeat(p1 > 0, V), (p1[:, None] * p2 > 0).ravel()], axis=1
        )  # [V*V, 3]
        assert_no_degenerate_boundary(logits, reach, mode, mode_kw)
    return p1, p2, p3


@pytest.fixture(scope="module")
def exact(models):
    """mode -> {"p": (p1, p2, p3) of the target, "q": the small draft model's, "joint": [V^3]}."""
    target, draft = models
    out = {}
    for name, kw in MODES.items():
        p1, p2, p3 = next_token_dists(target, kw, check_margins=True)
        q = next_token_dists(draft, kw)
        joint = p1[:, None, None] * p2[:, :, None] * p3
        assert abs(joint.sum() - 1) < 1e-9
        out[name] = {"p": (p1, p2, p3), "q": q, "joint": joint.ravel()}
    return out


def sample_rows(target, drafter, mode_kw, seed, prompt, new_tokens, n=N_ROWS):
    """-> (tokens [n, new_tokens] of n independent rows decoding `prompt`, generate stats).

    Compiled like the rest of the suite (conftest: XLA backend optimization 0), with YNNPACK's
    elementwise kernels (`conftest.MANY_ROWS_XLA`: 10-16% off the sampling files). XLA's default
    level runs these 8192-row programs ~3x faster but compiles them 3-5x slower: the 19 sampling
    tests of test_tree_sampling.py and test_hybrid.py took 225 s at level 2, 189 s at level 1 and
    194 s at level 0 (one core each, 2026-12-04); the VLM sampling tests 28.7 s at level 2, 25.8
    s at 0. The n copies of the prompt share one prefill (`engine.target_prefill_shared`:
    0.37 s instead of 1.6 s for 8192 rows once compiled); decoding runs every row."""
    with specjax.xla_options(**MANY_ROWS_XLA):
        out = specjax.generate(
            target, [prompt] * n, max_new_tokens=new_tokens, key=seed, drafter=drafter, **mode_kw
        )
    toks = np.asarray(out.tokens)
    assert toks.shape == (n, new_tokens)
    return toks, out.stats


def sample_joint(target, drafter, mode_kw, seed, n=N_ROWS):
    """-> (counts [V^3] of (t1, t2, t3) over n independent rows, generate stats)."""
    toks, stats = sample_rows(target, drafter, mode_kw, seed, PROMPT, NEW_TOKENS, n)
    idx = (toks[:, 0] * V + toks[:, 1]) * V + toks[:, 2]
    return np.bincount(idx, minlength=V**3), stats


def assert_follows_target(counts, joint, hist, label: str) -> Fit:
    """The chi-square check of `test_first_tokens_match_target` (shared with other drafters'
    test files): no impossible sample, enough bins, p-value above ALPHA."""
    fit = chi_square(counts, joint)
    print(f"{label}: {fit}, bins={fit.n_bins}, acceptance histogram={hist.tolist()}")
    assert fit.impossible == 0, f"{fit.impossible} samples outside the top-k/top-p support"
    assert fit.n_bins >= 15
    assert fit.pvalue > ALPHA, f"{label}: distribution differs from the target: {fit}"
    return fit


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("drafter", DRAFTERS)
def test_first_tokens_match_target(models, exact, drafter, mode):
    target, draft = models
    counts, st = sample_joint(
        target, make_drafter(drafter, target, draft), MODES[mode], SEEDS[drafter, mode]
    )
    hist = np.asarray(st["acceptance_histogram"])
    assert_follows_target(counts, exact[mode]["joint"], hist, f"{drafter}/{mode}")
    # The test exercises the paths it claims to.
    if drafter == "self":  # q == p (up to float noise): everything accepted
        assert hist[-1] >= 0.999 * hist.sum(), hist
    elif drafter != "ar":  # both rejections and acceptances happen, often
        assert hist[0] >= 0.05 * hist.sum() and hist[1:].sum() >= 0.05 * hist.sum(), hist
    if drafter == "short_verify":  # the second draft token was never verified
        assert hist[2] == 0, hist


def test_stated_power(exact):
    """The detectable effect sizes stated in the module docstring."""
    stated = {"plain": (156, 0.062), "topk5_topp0.8": (34, 0.047)}
    for mode, (n_bins, tv) in stated.items():
        bins = pooled_bins(exact[mode]["joint"], N_ROWS)
        assert bins.max() + 1 == n_bins
        assert detectable_tv(n_bins - 1, N_ROWS) <= tv, (mode, detectable_tv(n_bins - 1, N_ROWS))
    assert detectable_tv(483, UB) <= 0.0194 and detectable_tv(26, UB) <= 0.0112


# (flaw, drafter, mode): the engine-level negative controls.
BROKEN_CASES = [
    ("residual_is_p", "small_model", "topk5_topp0.8"),
    ("accept_all", "small_model", "plain"),
    ("bonus_off_by_one", "self", "plain"),
]


def broken_joint(flaw, drafter, exact_mode):
    """Exact law of (t1, t2, t3) that the broken rule produces in the setting of
    `test_first_tokens_match_target`. For an LM drafter q depends only on the prefix, and with
    k = 2 and 3 new tokens both t2 | t1 and t3 | t1, t2 are the first token of a verification
    (fresh, or continuing after an accepted d1) against the same (p, q): see `step_law`."""
    p1, p2, p3 = exact_mode["p"]
    if flaw == "bonus_off_by_one":
        assert drafter == "self"  # every d1 is accepted; t3 is then drawn from p(. | t1)
        return (p1[:, None, None] * p2[:, :, None] * p2[:, None, :]).ravel()
    assert drafter == "small_model"
    _, q2, q3 = exact_mode["q"]
    return (p1[:, None, None] * step_law(p2, q2, flaw)[:, :, None] * step_law(p3, q3, flaw)).ravel()


@pytest.mark.parametrize("flaw,drafter,mode", BROKEN_CASES)
def test_broken_rule_is_detected(models, exact, monkeypatch, flaw, drafter, mode):
    target, draft = models
    null = exact[mode]["joint"]
    tv, pw, lam = power(null, broken_joint(flaw, drafter, exact[mode]), N_ROWS)
    broken = broken_verify_chain(flaw)
    with patched_verify_chain(monkeypatch, broken):
        counts, _ = sample_joint(
            target, make_drafter(drafter, target, draft), MODES[mode], SEEDS[drafter, mode] + 5
        )
    assert broken.traced > 0, "the engine did not use the patched rule"
    fit = chi_square(counts, null)
    print(f"{flaw}/{drafter}/{mode}: TV={tv:.3f} lambda={lam:.0f} power={pw} {fit}")
    assert pw >= MIN_POWER, f"the test has too little power against {flaw}: {pw}"
    assert fit.pvalue < ALPHA, f"broken rule {flaw} was not detected: {fit}"
    # The computed law of the broken rule is the one the engine produced: its chi-square
    # statistic is typical of samples drawn from that law (so the power above is about the
    # right alternative).
    alt = np.bincount(fit.cells, weights=broken_joint(flaw, drafter, exact[mode]))
    expected = np.bincount(fit.cells, weights=null) * N_ROWS
    sims = np.random.default_rng(0).multinomial(N_ROWS, alt / alt.sum(), size=500)
    sim_stats = ((sims - expected) ** 2 / expected).sum(axis=1)
    z = (fit.stat - sim_stats.mean()) / sim_stats.std()
    print(f"  simulated under the broken law: chi2 {sim_stats.mean():.0f} +- {sim_stats.std():.0f}")
    assert abs(z) < 5, (fit.stat, sim_stats.mean(), sim_stats.std())


# ---------------------------------------------------------------------------------------------
# Unit level: verify_chain alone
# ---------------------------------------------------------------------------------------------

UV, UK, UB = 8, 2, 1 << 17
UNIT_MODES = {
    "plain": dict(temperature=1.0, top_k=None, top_p=None),
    "topk4_topp0.85": dict(temperature=0.9, top_k=4, top_p=0.85),
}
UNIT_DRAFTS = ("q_model", "q_onehot", "q_equals_p")


def unit_setup(draft_kind: str, mode_name: str):
    """-> (mode, sp, target_logits [K+1, V], draft_logits [K, V] or None, p [K+1, V],
    q [K, V]) with p, q the processed float64 distributions (q one-hot for a fixed draft)."""
    rng = np.random.default_rng(0)
    t_logits = (1.5 * rng.standard_normal((UK + 1, UV))).astype(np.float32)
    kw = UNIT_MODES[mode_name]
    mode, sp = make_sampling(kw["temperature"], kw["top_k"], kw["top_p"])
    proc = lambda x: np.exp(np.asarray(process_logits(jnp.asarray(x), mode, sp), np.float64))
    p = proc(t_logits)
    p /= p.sum(-1, keepdims=True)
    if draft_kind == "q_model":  # correlated with the target, but a different distribution
        d_logits = (0.7 * t_logits[:UK] + 1.5 * rng.standard_normal((UK, UV))).astype(np.float32)
        q = proc(d_logits)
    elif draft_kind == "q_equals_p":
        d_logits = t_logits[:UK].copy()
        q = proc(d_logits)
    elif draft_kind == "q_onehot":  # a likely token, then a token outside the support (or the
        d_logits = None  # least likely one)
        fixed = [int(np.argsort(p[0])[-2]), int(np.argmin(p[1]))]
        q = np.eye(UV)[fixed]
    else:
        raise ValueError(draft_kind)
    q /= q.sum(-1, keepdims=True)
    return mode, sp, t_logits, d_logits, p, q


def exact_emitted_law(p: np.ndarray, q: np.ndarray, flaw=None) -> dict:
    """Exact law of one verification's emitted tuple (n accepted draft tokens, then the bonus):
    {tuple of tokens: probability}; drafts d_i ~ q_i independently."""
    K = q.shape[0]
    a = np.minimum(p[:K], q)  # P(draft x at i and accept it) = q min(1, p / q)
    res = np.maximum(p[:K] - q, 0.0)
    mass = res.sum(-1, keepdims=True)
    res = np.where(mass > 0, res / np.where(mass > 0, mass, 1), p[:K])
    bonus = p[K]
    if flaw == "residual_is_p":
        res = p[:K]
    elif flaw == "accept_all":
        a = q
    elif flaw == "bonus_off_by_one":
        bonus = p[K - 1]
    elif flaw is not None:
        raise ValueError(flaw)
    rej = 1.0 - a.sum(-1)
    law = {}
    for m in range(1, K + 2):
        last = bonus if m == K + 1 else rej[m - 1] * res[m - 1]
        for x in itertools.product(range(p.shape[1]), repeat=m):
            pr = np.prod([a[i, x[i]] for i in range(m - 1)]) * last[x[m - 1]]
            if pr > 0:
                law[x] = pr
    return law


def completed_law(law: dict, p: np.ndarray) -> np.ndarray:
    """Law of the emitted tuple continued to K + 1 tokens with fresh samples from p: [V^(K+1)]."""
    K1, Vn = p.shape
    out = np.zeros((Vn,) * K1)
    for x, pr in law.items():
        tail = np.ones(())
        for i in range(len(x), K1):
            tail = np.multiply.outer(tail, p[i])
        out[x] += pr * tail
    return out.ravel()


def tuple_index(x) -> int:
    """Cell of a variable-length tuple: lengths 1..K+1 each get their own block of V^m cells."""
    m = len(x)
    return sum(UV**j for j in range(1, m)) + int(np.ravel_multi_index(x, (UV,) * m))


def law_vector(law: dict) -> np.ndarray:
    out = np.zeros(sum(UV**j for j in range(1, UK + 2)))
    for x, pr in law.items():
        out[tuple_index(x)] += pr
    return out


def run_verify(rule, draft_kind, mode_name, seed):
    """-> (emitted [B, K+1] completed with fresh p samples, n [B], p, q) for B = UB rows
    verified in one call by `rule` (verify_chain or a broken variant)."""
    mode, sp, t_logits, d_logits, p, q = unit_setup(draft_kind, mode_name)
    k_draft, k_verify, k_fill = jax.random.split(jax.random.key(seed), 3)
    B = UB
    tl = jnp.broadcast_to(jnp.asarray(t_logits), (B, UK + 1, UV))
    if d_logits is None:
        tokens = jnp.broadcast_to(jnp.asarray(np.argmax(q, -1), jnp.int32), (B, UK))
        dlogp = None
    else:
        dlogp = jnp.broadcast_to(process_logits(jnp.asarray(d_logits), mode, sp), (B, UK, UV))
        tokens = jax.random.categorical(k_draft, dlogp, axis=-1).astype(jnp.int32)
    acc = jax.jit(rule, static_argnums=(4,))(k_verify, tl, tokens, dlogp, mode, sp)
    n, bonus = np.asarray(acc.n), np.asarray(acc.bonus)
    fill = np.asarray(
        jax.random.categorical(k_fill, jnp.log(jnp.asarray(p, jnp.float32)), shape=(B, UK + 1))
    )
    tokens = np.asarray(tokens)
    j = np.arange(UK + 1)[None, :]
    padded = np.concatenate([tokens, np.zeros((B, 1), tokens.dtype)], axis=1)
    emitted = np.where(j < n[:, None], padded, np.where(j == n[:, None], bonus[:, None], fill))
    return emitted, n, p, q


def counts_of(emitted: np.ndarray) -> np.ndarray:
    return np.bincount(np.ravel_multi_index(emitted.T, (UV,) * (UK + 1)), minlength=UV ** (UK + 1))


def emitted_counts(emitted: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Counts of the variable-length emitted tuples (first n + 1 tokens of each row)."""
    out = np.zeros(sum(UV**j for j in range(1, UK + 2)), np.int64)
    for m in range(1, UK + 2):
        rows = emitted[n == m - 1, :m]
        if len(rows):
            idx = sum(UV**j for j in range(1, m)) + np.ravel_multi_index(rows.T, (UV,) * m)
            out += np.bincount(idx, minlength=len(out))
    return out


@pytest.mark.parametrize("mode", list(UNIT_MODES))
@pytest.mark.parametrize("draft_kind", UNIT_DRAFTS)
def test_verify_chain_is_lossless(draft_kind, mode):
    seed = 10 * UNIT_DRAFTS.index(draft_kind) + list(UNIT_MODES).index(mode)
    emitted, n, p, q = run_verify(accept.verify_chain, draft_kind, mode, seed)
    target = np.ravel(np.einsum("a,b,c->abc", *p))
    law = exact_emitted_law(p, q)
    # The exact law of the algorithm, completed with fresh target samples, is the target's.
    np.testing.assert_allclose(completed_law(law, p), target, atol=1e-12)
    fits = {
        "completed tuple vs p0 x p1 x p2": chi_square(counts_of(emitted), target),
        "first token vs p0": chi_square(np.bincount(emitted[:, 0], minlength=UV), p[0]),
        "emitted tuple vs exact law": chi_square(emitted_counts(emitted, n), law_vector(law)),
    }
    print(f"{draft_kind}/{mode}: acceptance histogram {np.bincount(n, minlength=UK + 1).tolist()}")
    for name, fit in fits.items():
        print(f"  {name}: {fit}")
    for name, fit in fits.items():
        assert fit.impossible == 0, f"{name}: samples outside the support: {fit}"
        assert fit.pvalue > ALPHA, f"{draft_kind}/{mode}: {name}: {fit}"
    if draft_kind == "q_equals_p":
        assert np.all(n == UK)
    else:
        assert 0 < np.mean(n == 0) < 1


@pytest.mark.parametrize("flaw", ["residual_is_p", "accept_all", "bonus_off_by_one"])
def test_verify_chain_broken_rule_is_detected(flaw):
    mode = "topk4_topp0.85"
    emitted, n, p, q = run_verify(broken_verify_chain(flaw), "q_model", mode, 99)
    target = np.ravel(np.einsum("a,b,c->abc", *p))
    tv, pw, lam = power(target, completed_law(exact_emitted_law(p, q, flaw), p), UB)
    fit = chi_square(counts_of(emitted), target)
    print(f"{flaw}: TV={tv:.3f} lambda={lam:.0f} power={pw} {fit}")
    assert pw >= MIN_POWER
    assert fit.pvalue < ALPHA, f"broken rule {flaw} was not detected: {fit}"
