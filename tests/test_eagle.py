"""EAGLE-1/2 and EAGLE-3 drafters: exactness (greedy identity, sampling law), and the feature
bookkeeping that decides their acceptance rate.

Greedy identity and the chi-square law test prove the engine stays lossless with these
drafters whatever they propose. They cannot see a drafter that reads the wrong features (it
would only draft worse), so `test_state_follows_cache_free_reference` checks the state after
prefill and after commits against a cache-free teacher-forced run of the drafter over the
whole sequence, for chain and tree acceptances.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_tree_sampling import PROMPT, cell_counts, exact, sample_tokens  # noqa: F401  (a fixture)

import specjax
from specjax import drafters
from specjax.drafters import feature as E
from specjax.engine.protocol import PrefillInput, TargetPrefill, TargetStep, Tree, Verified
from specjax.models import eagle as N
from specjax.models.cache import init_cache
from specjax.models.llama import forward_hidden

from conftest import RAGGED_PROMPTS
from test_spec_sampling import ALPHA, MODES, chi_square, models  # noqa: F401  (`models` is a pytest fixture)

NEW = 20


def random_eagle(target, version, seed=0, draft_vocab=None, depth=1):
    """A random EAGLE drafter for `target`; version 3 gets a reduced vocabulary of a random
    subset of target ids (so d2t is not the identity). With depth > 1 the added layers get
    random output projections too (init_params starts them as the identity)."""
    V_t = target.config.vocab_size
    dv = draft_vocab or V_t
    cfg = N.make_config(target.config, version, draft_vocab=dv, num_layers=depth)
    d2t = None
    if version == 3:
        d2t = np.sort(np.random.default_rng(seed).choice(V_t, dv, replace=False)).astype(np.int32)
    params = N.init_params(cfg, jax.random.key(seed), d2t=d2t)
    for i, lp in enumerate(params.get("layers", ())):
        for j, name in enumerate(("wo", "w_down")):
            k = jax.random.key(1000 * seed + 10 * i + j)
            lp[name] = jax.random.normal(k, lp[name].shape) / np.sqrt(lp[name].shape[0])
    return cfg, params


def echo_eagle1(target):
    """An EAGLE-1 drafter that passes the target's feature through (fc = [0; I], the layer's
    output projections zero), so it drafts what the target predicted one position earlier:
    accepted where the target repeats itself (random tiny targets often do), which a random
    drafter never is."""
    cfg = N.make_config(target.config, 1)
    p = N.init_params(cfg, jax.random.key(0))
    D = cfg.hidden
    p["fc"] = jnp.concatenate([jnp.zeros((D, D)), jnp.eye(D)], 0).astype(p["fc"].dtype)
    p["layer"]["wo"] = jnp.zeros_like(p["layer"]["wo"])
    p["layer"]["w_down"] = jnp.zeros_like(p["layer"]["w_down"])
    return cfg, p


# A static tree of 7 nodes: three children under `last`, a spine below the first.
STATIC_7 = ([0], [1], [2], [0, 0], [1, 0], [0, 0, 0], [0, 0, 0, 0])

CASES = {  # name -> (version, draft vocab, chain k or tree[, decoder layers])
    "eagle1-chain-k3": (1, None, 3),
    "eagle3-chain-k4": (3, 80, 4),
    "eagle1-tree-8": (1, None, drafters.DynamicTree(nodes=8, depth=3, top_k=3)),
    # three decoder layers (one-layer EAGLE-3 trees: tests/test_smollm2.py, bundled drafter)
    "eagle3-tree-6-3layers": (3, 80, drafters.DynamicTree(nodes=6, depth=4, top_k=2), 3),
    # a static tree (`EagleStaticTreeSpec`): top candidates when greedy; EAGLE-3 ranks its own
    # vocabulary and maps the winners to target ids, EAGLE-1 ranks the target's
    "eagle3-static-7": (3, 80, drafters.StaticTree(STATIC_7)),
    "eagle1-static-7": (1, None, drafters.StaticTree(STATIC_7)),
}


def make(target, case, seed=0):
    version, dv, shape, *depth = CASES[case]
    weights = random_eagle(target, version, seed, dv, *depth)
    if isinstance(shape, int):
        return drafters.eagle(weights, k=shape)
    return drafters.eagle(weights, tree=shape)


@pytest.fixture(scope="module")
def ar(target):
    return specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=NEW)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_ar(case, target, ar):
    out = specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=NEW, drafter=make(target, case))
    assert out.tokens == ar.tokens
    hist = out.stats["acceptance_histogram"]
    assert sum(hist) == sum(out.stats["target_forwards"]) - len(RAGGED_PROMPTS)


# ------------------------------------------------------------------ state bookkeeping


def _reference_outputs(target, cfg, params, seq):
    """Cache-free teacher-forced drafter run: out[j] for pairs (g_j, seq[j+1]), j < T-1."""
    tp = target.params
    T = len(seq)
    toks = jnp.asarray([seq], jnp.int32)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    hid, _ = forward_hidden(
        tp,
        target.config,
        toks,
        pos,
        init_cache(target.config, 1, T, per_layer=True),
        hidden_layers=cfg.feature_layers,
    )
    feats = N.target_features(cfg, params, hid)[:, : T - 1]
    cache = init_cache(cfg.layer, 1, T, per_layer=True)
    out, _ = N.draft_block(cfg, params, feats, toks[:, 1:], pos[:, : T - 1], cache)
    return np.asarray(out[0]), hid


@pytest.mark.parametrize("version,depth", [(1, 1), (3, 2)])
def test_state_follows_cache_free_reference(target, version, depth):
    cfg, raw = random_eagle(target, version, seed=3, draft_vocab=60, depth=depth)
    params = N.bind_target(raw, target.params)
    rng = np.random.default_rng(version)
    seq = rng.integers(0, target.config.vocab_size, 24).tolist()
    ref, hid = _reference_outputs(target, cfg, params, seq)
    P, K = 9, 3
    spec = E.EagleSpec(k=K, eagle=cfg, target_cfg=target.config)
    tok = jnp.asarray([seq[:P] + [0] * 7], jnp.int32)  # right-padded prompt of P tokens
    sl = (
        lambda h, a, b: type(h)(
            last=h.last[:, a:b],  # noqa: E731
            layers=None if h.layers is None else h.layers[:, :, a:b],
        )
    )
    pre = TargetPrefill(
        input=PrefillInput.from_tokens(tok, jnp.asarray([P])),
        first=jnp.asarray([seq[P]]),
        cache=None,
        hiddens=sl(hid, 0, 16),
    )
    st = spec.init(params, pre, 64)
    np.testing.assert_allclose(st.feat[0], ref[P - 1], atol=1e-4)
    n_len = P  # target cache length; `last` = seq[n_len]
    active = jnp.asarray([True])
    for n_acc in (0, K, 1):  # chain commits: rejected at once, all accepted, one accepted
        block = seq[n_len : n_len + K + 1]
        draft = specjax.drafters.Draft(tokens=jnp.asarray([block[1:]]), logp=None)
        acc = Verified(
            tokens=draft.tokens,
            n=jnp.asarray([n_acc]),
            bonus=jnp.asarray([seq[n_len + n_acc + 1]]),
            path=jnp.asarray([[i if i < n_acc else -1 for i in range(K)]]),
        )
        step = TargetStep(tokens=jnp.asarray([block]), hiddens=sl(hid, n_len, n_len + K + 1))
        st = spec.commit(params, st, draft, acc, active, step)
        n_len += n_acc + 1
        assert int(st.cache.lengths[0]) == n_len
        np.testing.assert_allclose(st.feat[0], ref[n_len - 1], atol=1e-4)
    # An inactive row keeps its state.
    same = spec.commit(params, st, draft, acc, jnp.asarray([False]), step)
    np.testing.assert_array_equal(same.feat, st.feat)
    assert int(same.cache.lengths[0]) == n_len
    # A tree commit: the accepted path is nodes 1 -> 3 of a 5-node tree whose block puts the
    # sequence's next tokens at offsets 2 and 4 (the others are decoys).
    tspec = E.EagleTreeSpec(k=5, depth=3, top_k=2, eagle=cfg, target_cfg=target.config)
    nxt = seq[n_len + 1 : n_len + 3]
    node_tok = [7, nxt[0], 9, nxt[1], 11]
    tree = Tree(
        tokens=jnp.asarray([node_tok]),
        parents=jnp.asarray([[-1, -1, 0, 1, 1]]),
        depth=jnp.asarray([[1, 1, 2, 2, 2]]),
        valid=jnp.ones((1, 5), bool),
    )
    order = [0, 0, 1, 0, 2, 0]  # block offset -> which true position its hidden state is
    true_hid = sl(hid, n_len, n_len + 3)
    pick = jnp.asarray(order)
    fake = type(hid)(
        last=true_hid.last[:, pick],
        layers=None if hid.layers is None else true_hid.layers[:, :, pick],
    )
    tacc = Verified(
        tokens=jnp.asarray([[nxt[0], nxt[1], node_tok[0]]]),
        n=jnp.asarray([2]),
        path=jnp.asarray([[1, 3, -1]]),
        bonus=jnp.asarray([seq[n_len + 3]]),
    )
    tstep = TargetStep(tokens=jnp.asarray([[seq[n_len]] + node_tok]), hiddens=fake)
    st = tspec.commit(params, st, specjax.engine.protocol.TreeDraft(tree=tree), tacc, active, tstep)
    n_len += 3
    assert int(st.cache.lengths[0]) == n_len
    np.testing.assert_allclose(st.feat[0], ref[n_len - 1], atol=1e-4)


# ------------------------------------------------------------------ sampling law

SAMPLED_TREE = ([0], [1], [2], [0, 0], [0, 1], [1, 0])

SAMPLING = {  # drafter -> (version, draft vocab, chain k or tree[, decoder layers])
    "eagle3-chain-reduced-2layers": (3, 12, 2, 2),
    # A static tree whose children are drawn without replacement (Gumbel-top-k) from the
    # drafter's processed law (both modes: the mode changes that law): three draws under
    # `last`, two under the first, one under the second.
    "eagle3-static-sampled": (3, 12, drafters.StaticTree(SAMPLED_TREE)),
    "eagle1-static-sampled": (1, None, drafters.StaticTree(SAMPLED_TREE)),  # target vocabulary
    "eagle1-tree": (1, None, drafters.DynamicTree(nodes=6, depth=3, top_k=2)),
    # Verify sizes 2 or 6 nodes or a plain step, chosen per step (`VerifySizing`); with 8192
    # rows a step verifies the largest size any row asks for, and the whole tree's cost here is
    # prohibitive: the steps verify the truncated 2-node tree (asserted below).
    "eagle3-tree-sized": (
        3,
        12,
        drafters.DynamicTree(
            nodes=6, depth=3, top_k=2, sizing=drafters.VerifySizing((2, 6), (1.0, 1.1, 100.0))
        ),
    ),
    # The same with a draft gate that drafting never pays (a plain step costs 0.01 against
    # 1.0-1.1): every row backs off, so the batch drafts at steps 1, 3, 6, 11, .. and takes
    # plain steps between them; t2..t4 come from both kinds of step. (With 8192 rows the gate
    # closes only when every row waits; its choice depending on acceptance is covered by the
    # argument in `DraftGate` and the greedy tests in test_verify_sizing.py.)
    "eagle3-tree-gated": (
        3,
        12,
        drafters.DynamicTree(
            nodes=6,
            depth=3,
            top_k=2,
            sizing=drafters.VerifySizing((2, 6), (1.0, 1.1, 100.0), drafters.DraftGate(0.01)),
        ),
    ),
}


# The chain and the sampled static tree in both modes (they draw their drafts from the
# drafter's processed law, which the mode changes); the dynamic trees in one mode (top-k/top-p,
# the processed distributions): their candidates are deterministic, verified by the tree rule
# that tests/test_tree_sampling.py fits in both modes, and the sized and gated trees' choice of
# verify size does not depend on it.
SAMPLING_CASES = [
    (name, mode) for name in SAMPLING for mode in MODES if not ("tree" in name and mode == "plain")
]


@pytest.mark.parametrize(("name", "mode"), SAMPLING_CASES)
def test_sampling_matches_target(models, exact, name, mode):
    """Chi-square tests of (t1, t2, t3) and (t2, t3, t4) against the exact target law (setup,
    size and power as in test_tree_sampling.py: 8192 rows, alpha 1e-3)."""
    target, _ = models
    version, dv, shape, *depth = SAMPLING[name]
    weights = random_eagle(target, version, 11, dv, *depth)
    d = (
        drafters.eagle(weights, k=shape)
        if isinstance(shape, int)
        else drafters.eagle(weights, tree=shape)
    )
    toks, st = sample_tokens(target, d, MODES[mode], seed=2024 + len(name) + len(mode))
    hist = np.asarray(st["acceptance_histogram"])
    ex = exact[mode]
    for cols, law in (((0, 1, 2), ex["joint123"]), ((1, 2, 3), ex["marg234"])):
        fit = chi_square(cell_counts(toks, cols), law)
        print(f"{name}/{mode} {cols}: {fit}, histogram {hist.tolist()}")
        assert fit.impossible == 0
        assert fit.pvalue > ALPHA, f"{name}/{mode}: differs from the target: {fit}"
    # Both verification outcomes happen often, so p/q and the residual are exercised.
    assert hist[0] >= 0.05 * hist.sum() and hist[1:].sum() >= 0.05 * hist.sum(), hist
    if "sized" in name:  # the truncated tree is what is verified
        sizes = np.asarray(st["verify_size_histogram"])
        print(f"  verify sizes (0, 2, 6): {sizes.tolist()}")
        assert sizes[2] == 0 and sizes[1] >= 0.5 * sizes.sum(), sizes
    if "gated" in name:  # drafted and plain steps, the truncated tree when drafted
        sizes = np.asarray(st["verify_size_histogram"])
        print(f"  verify sizes (0, 2, 6): {sizes.tolist()}, skipped {st['draft_skipped_steps']}")
        assert sizes[2] == 0 and sizes[1] >= 2 and sizes[0] >= 1, sizes
        assert st["draft_skipped_steps"] >= 8192 // 2, st["draft_skipped_steps"]


@dataclasses.dataclass(frozen=True)
class _WrongLaw(E.EagleStaticTreeSpec):
    """The broken rule: children drawn from the processed law q but handed to the verifier with
    the law at twice the temperature (a flatter q', as when a drafter reports its raw
    distribution instead of the one it sampled from). (Dropping the law altogether would not
    do: the verifier would test each draw as a deterministic candidate, which is exact
    whatever chose the candidates, only less often accepted.)"""

    def draft(self, *args, **kwargs):
        draft, state = super().draft(*args, **kwargs)
        flat = jax.nn.log_softmax(draft.child_logp / 2.0, axis=-1)
        return draft._replace(child_logp=flat), state


def test_sampled_static_tree_with_a_wrong_law_is_detected(models, exact):
    """Negative control: the sampled static tree verified against a law its children were not
    drawn from fails the same test."""
    target, _ = models
    d = drafters.eagle(random_eagle(target, 3, 11, 12), tree=drafters.StaticTree(SAMPLED_TREE))

    def bind(t):
        spec, params = d.bind(t)
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
        return _WrongLaw(**fields), params

    broken = drafters.Drafter(name="wrong-law", k=d.k, binder=bind)
    toks, _ = sample_tokens(target, broken, MODES["plain"], seed=2024 + 21 + 5)
    fit = chi_square(cell_counts(toks, (0, 1, 2)), exact["plain"]["joint123"])
    print(f"wrong law: {fit}")
    assert fit.pvalue < ALPHA, fit


# ------------------------------------------------------- sized sampled chains, one row at a time

# A chain whose tokens are sampled from the drafter's law may verify only a prefix of itself
# (`VerifySizing`), but the choice must not read the drawn tokens: a token is tested against
# the law it was drawn from, so a size that keeps likely draws and drops unlikely ones biases
# what is emitted (`VerifySizing.choose_before_drawing`). A batch verifies the largest size any
# row asks for, which hides one row's choice among 8192 rows; so these rows are decoded one at
# a time (`N_BATCH1` batch-1 decodes, each with its own key). The costs (a plain step, one, two)
# split each drafter's range of first-law best probabilities t so that a row asks for nothing,
# one token or both (small model: t < 0.45 / < 0.55 / above; the random EAGLE-3: 0.28 / 0.33),
# each in >= 5% of the steps (asserted; measured 48/14/38% and 69/23/9%). Two more cases whose
# per-row choices the one-batch tests (test_sampling_matches_target) cannot show either: the
# EAGLE-3 chain with a draft gate too (it closes on a row after a rejection: 12% of the steps
# drafted nothing), and a sized EAGLE-3 tree (deterministic candidates, tested as point masses,
# so any size is exact; 2 or 6 nodes, about half each).
N_BATCH1 = 8192
CHAIN_SIZING = {
    "small_model": drafters.VerifySizing((1, 2), (1.0, 1.45, 1.73)),
    "eagle3": drafters.VerifySizing((1, 2), (1.0, 1.28, 1.385)),
}


def sized_chain(kind: str, target, draft, sizing=None):
    sizing = sizing or CHAIN_SIZING.get(kind)
    if kind == "small_model":
        return drafters.small_model(draft, k=2, sizing=sizing)
    weights = random_eagle(target, 3, 11, 12)
    if kind == "eagle3":
        return drafters.eagle(weights, k=2, sizing=sizing)
    if kind == "eagle3_gated":  # the chain's sizing, and a gate that closes after a rejection
        gated = dataclasses.replace(CHAIN_SIZING["eagle3"], gate=drafters.DraftGate(1.0))
        return drafters.eagle(weights, k=2, sizing=gated)
    # a sized tree: deterministic candidates, any size exact (point masses)
    tree_sizing = drafters.VerifySizing((2, 6), (1.0, 1.3, 1.5))
    return drafters.eagle(weights, tree=drafters.DynamicTree(6, 3, 2, tree_sizing))


def sample_one_at_a_time(target, drafter, mode_kw, seed, n=N_BATCH1, skipped=None):
    """-> (tokens [n, 3] of n rows decoded at batch 1, steps per verify size summed): one
    `decode_fn` call per row inside one `lax.map` (a compiled loop of batch-1 decodes, ~4x
    faster than as many `generate` calls). A list `skipped` gets each row's steps without
    drafting (a gate's, which `generate`'s stats report: decoded through it then)."""
    if skipped is None:
        fn = specjax.decode_fn(target, drafter=drafter, max_new_tokens=3, **mode_kw)
        tokens, lengths = jnp.asarray([PROMPT], jnp.int32), jnp.asarray([len(PROMPT)], jnp.int32)

        @jax.jit
        def rows_of(params, dparams, keys):
            def one(key):
                out, _, stats = fn(params, dparams, tokens, lengths, key)
                return out[0], stats["size_hist"]

            return jax.lax.map(one, keys)

        keys = jax.random.split(jax.random.key(seed), n)
        toks, hists = rows_of(fn.params, fn.dparams, keys)
        return np.asarray(toks), np.asarray(hists).sum(axis=0)
    rows, sizes = [], 0
    for i in range(n):
        out = specjax.generate(
            target, [PROMPT], max_new_tokens=3, key=seed + i, drafter=drafter, **mode_kw
        )
        rows.append(out.tokens[0])
        sizes = sizes + np.asarray(out.stats["verify_size_histogram"])
        if skipped is not None:
            skipped.append(out.stats["draft_skipped_steps"])
    return np.asarray(rows), sizes


@pytest.mark.parametrize("kind", ["small_model", "eagle3", "eagle3_gated", "eagle3_tree"])
def test_sized_drafts_at_batch_1_match_target(models, exact, kind):
    """Chi-square of (t1, t2, t3) against the exact target law (temperature 0.7), 8192 rows:
    132 cells after pooling, so any law at TV >= 0.059 from the target fails with probability
    >= 0.99 (`detectable_tv(131, 8192)`); the rule that read the drawn tokens (below) gave
    p = 6e-50 on half the rows."""
    target, draft = models
    skipped = [] if kind == "eagle3_gated" else None
    toks, sizes = sample_one_at_a_time(
        target, sized_chain(kind, target, draft), MODES["plain"], 5000, skipped=skipped
    )
    fit = chi_square(cell_counts(toks, (0, 1, 2)), exact["plain"]["joint123"])
    print(f"sized {kind}: {fit}, verify sizes {sizes.tolist()}, skipped {skipped and sum(skipped)}")
    assert fit.impossible == 0
    assert fit.pvalue > ALPHA, f"sized {kind} differs from the target: {fit}"
    # rows choose differently: at least two sizes (plain, then each verify size) in >= 5% of
    # the steps; plain, 1 and 2 tokens all for the chains sized by their law alone
    common = sizes >= 0.05 * sizes.sum()
    assert common.all() if kind in CHAIN_SIZING else common.sum() >= 2, sizes
    if skipped is not None:  # the gate closed on some rows' second step
        assert sum(skipped) >= 0.05 * sizes.sum(), sum(skipped)


def test_sized_chain_reading_its_draws_is_detected(models, exact, monkeypatch):
    """Negative control: a small-model chain sized from its drawn tokens' probabilities
    (`VerifySizing.choose` on them, the rule before 2026-12-07) fails the same test on half
    the rows (p = 6e-50)."""
    from specjax.drafters import lm

    def from_draws(sizing, confs, first_logp):
        return sizing.choose(jnp.cumsum(jnp.concatenate(list(confs), axis=1), axis=1))

    monkeypatch.setattr(lm, "chain_size", from_draws)
    target, draft = models
    # other costs than the test above: a drafter of its own, so a program of its own
    sizing = drafters.VerifySizing((1, 2), (1.0, 1.3, 1.61))
    toks, sizes = sample_one_at_a_time(
        target, sized_chain("small_model", target, draft, sizing), MODES["plain"], 5000, 4096
    )
    fit = chi_square(cell_counts(toks, (0, 1, 2)), exact["plain"]["joint123"])
    print(f"sized from the draws: {fit}, verify sizes (0, 1, 2) {sizes.tolist()}")
    assert fit.pvalue < ALPHA, fit


# ------------------------------------------------------------------ bad input


def test_bad_eagle_input(target, make_hf_model):
    cfg, p = random_eagle(target, 3, draft_vocab=50)
    with pytest.raises(ValueError, match="positive int"):
        drafters.eagle((cfg, p), k=0)
    with pytest.raises(TypeError, match="a DynamicTree, a StaticTree or None"):
        drafters.eagle((cfg, p), tree="eagle_small")
    from specjax.drafters import registry

    with pytest.raises(ValueError, match="eagle3_static drafts the 7-node tree 'eagle_static7'"):
        registry.make("eagle3_static@5", None, target)
    with pytest.raises(ValueError, match=r"the root have ranks \[0, 2\]: .* ranks 0, 1, \.\."):
        specjax.generate(
            target,
            [[1, 2, 3]],
            max_new_tokens=4,
            drafter=drafters.eagle((cfg, p), tree=drafters.StaticTree([[0], [2]])),
        )
    wide = specjax.model_from_hf(
        make_hf_model(
            "llama", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, eos_token_id=None
        )
    )
    with pytest.raises(ValueError, match="hidden size 32 differs from the target's 48"):
        specjax.generate(wide, [[1, 2, 3]], max_new_tokens=4, drafter=drafters.eagle((cfg, p)))
    with pytest.raises(ValueError, match="neither a directory nor a bundled drafter"):
        specjax.generate(
            target, [[1, 2, 3]], max_new_tokens=4, drafter=drafters.eagle("/no/such/dir")
        )
    with pytest.raises(ValueError, match="EAGLE version"):
        N.EagleConfig(version=2, layer=cfg.layer)
