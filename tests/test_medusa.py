"""Medusa heads (`specjax.drafters.medusa_heads`; the constructor is `specjax.drafters.medusa`).

1. Greedy speculative decoding with Medusa heads (chain and static tree, random and zero head
   weights) emits exactly the tokens of greedy autoregressive decoding.
2. Bookkeeping: `init` / `commit` keep the target feature of the position whose logits produced
   the newest token (`last`), for chain and tree acceptances of every length, and leave
   inactive rows alone; zero-weight heads are the target's own next-token head.
3. Sampling is lossless: chi-square test of the joint law of the first 3 tokens against the exact
   target law, with the machinery, target and seeds conventions of test_spec_sampling.py (see its
   docstring for method, size and power: the same V = 16 target, PROMPT, N_ROWS, ALPHA and
   pooling). t2 is the first verified token; t3 an accepted second draft token (head 1, or a
   depth-2 tree node), a bonus token, or the first token of a second step. Heads are random
   (scale 0.5) so that every acceptance length occurs often (asserted). Negative control: a
   chain reporting the wrong head's distribution as q is detected.
4. `medusa_loss` against a direct per-position computation; heads trained with it get drafts
   accepted far more often than random heads; bad input.

"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax import drafters
from specjax.drafters.medusa_heads import (
    LOSS_DECAY,
    MedusaConfig,
    MedusaHeads,
    MedusaSpec,
    MedusaState,
    head_logits,
    init_params,
    medusa_loss,
)
from specjax.engine.protocol import PrefillInput, TargetPrefill, TargetStep, Verified
from specjax.models.llama import Hiddens, lm_head
from specjax.sampling import make_sampling

from conftest import RAGGED_PROMPTS

# Shared with the chain-drafter sampling test: statistics, the V = 16 target and its exact law.
from test_spec_sampling import (  # noqa: F401  (`models`, `exact` are pytest fixtures)
    ALPHA,
    MODES,
    assert_follows_target,
    chi_square,
    exact,
    models,
    sample_joint,
)

# Depth 3; node order (depth, then lexicographic): [0], [1], [0,0], [0,1], [0,0,0], parents
# -1, -1, 0, 0, 2.
TREE3 = drafters.StaticTree([[0], [1], [0, 0], [0, 1], [0, 0, 0]])
TREE3_PARENTS = [-1, -1, 0, 0, 2]


def random_heads(num_heads: int, hidden: int, scale: float, seed: int, dtype=jnp.float32):
    """Heads with w ~ N(0, scale^2 / D), b ~ N(0, scale^2): drafts that differ from the
    target's next-token head, but overlap with the target's distributions."""
    cfg = MedusaConfig(num_heads=num_heads, hidden=hidden)
    keys = iter(jax.random.split(jax.random.key(seed), 2 * num_heads))
    heads = [
        {
            "w": scale * jax.random.normal(next(keys), (1, hidden, hidden)) / hidden**0.5,
            "b": scale * jax.random.normal(next(keys), (1, hidden)),
        }
        for _ in range(num_heads)
    ]
    return MedusaHeads(cfg, jax.tree.map(lambda x: x.astype(dtype), {"heads": heads}))


def zero_heads(num_heads: int, hidden: int, dtype=jnp.float32):
    cfg = MedusaConfig(num_heads=num_heads, hidden=hidden)
    return MedusaHeads(cfg, init_params(cfg, jax.random.key(0), dtype))


# -------------------------------------------------------------- 1. greedy == AR greedy

NEW = 20


@pytest.fixture(scope="module")
def ar_out(target):
    return specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=NEW)


@pytest.mark.parametrize("weights", ["random", "zero"])
@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_greedy_equals_ar(target, ar_out, shape, weights):
    D = target.config.hidden_size
    heads = random_heads(3, D, 1.0, seed=3) if weights == "random" else zero_heads(3, D)
    d = drafters.medusa(heads, tree=TREE3 if shape == "tree" else None)
    out = specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=NEW, drafter=d)
    assert out.tokens == ar_out.tokens
    hist = out.stats["acceptance_histogram"]
    assert len(hist) == 4  # 3 heads: a chain of 3, or a tree of depth 3
    assert sum(hist) == sum(out.stats["target_forwards"]) - len(RAGGED_PROMPTS)


# ------------------------------------------------------------------ 2. bookkeeping

B, P, K = 4, 6, 3


def bound(target, heads, tree=None, k=None):
    """-> (spec, params) as `generate` binds them."""
    return drafters.medusa(heads, k=k, tree=tree).bind(target)


def test_state_reads_the_feature_that_produced_last(target):
    D = target.config.hidden_size
    spec, params = bound(target, random_heads(3, D, 1.0, seed=4))
    rng = np.random.default_rng(0)
    prompt_h = jnp.asarray(rng.standard_normal((B, P, D)), jnp.float32)
    lengths = jnp.asarray([6, 1, 3, 5], jnp.int32)
    pre = TargetPrefill(
        input=PrefillInput.from_tokens(jnp.zeros((B, P), jnp.int32), lengths),
        first=jnp.zeros((B,), jnp.int32),
        cache=None,
        hiddens=Hiddens(last=prompt_h, layers=None),
    )
    state = spec.init(params, pre, max_len=32)
    # The last prompt position's logits gave `first`.
    np.testing.assert_array_equal(state.feat, prompt_h[jnp.arange(B), jnp.asarray([5, 0, 2, 4])])

    # Chain: block [last, d1, d2, d3]; n accepted -> offset n produced the bonus. Row 3 is
    # inactive and keeps its feature.
    block_h = jnp.asarray(rng.standard_normal((B, K + 1, D)), jnp.float32)
    step = TargetStep(
        tokens=jnp.zeros((B, K + 1), jnp.int32), hiddens=Hiddens(last=block_h, layers=None)
    )
    n = jnp.asarray([0, 3, 1, 2], jnp.int32)
    i = jnp.arange(K)[None, :]
    acc = Verified(
        tokens=jnp.zeros((B, K), jnp.int32),
        n=n,
        bonus=jnp.zeros((B,), jnp.int32),
        path=jnp.where(i < n[:, None], i, -1),
    )
    active = jnp.asarray([True, True, True, False])
    new = spec.commit(params, state, None, acc, active, step)
    want = np.stack([block_h[0, 0], block_h[1, 3], block_h[2, 1], state.feat[3]])
    np.testing.assert_array_equal(new.feat, want)


def test_tree_state_reads_the_feature_that_produced_last(target):
    D = target.config.hidden_size
    spec, params = bound(target, random_heads(3, D, 1.0, seed=4), tree=TREE3)
    assert spec.is_tree and spec.max_accept == 3 and list(spec.parents) == TREE3_PARENTS
    N = len(TREE3_PARENTS)
    rng = np.random.default_rng(1)
    state = spec.init(
        params,
        TargetPrefill(
            input=PrefillInput.from_tokens(
                jnp.zeros((B, P), jnp.int32), jnp.full((B,), P, jnp.int32)
            ),
            first=jnp.zeros((B,), jnp.int32),
            cache=None,
            hiddens=Hiddens(
                last=jnp.asarray(rng.standard_normal((B, P, D)), jnp.float32), layers=None
            ),
        ),
        max_len=32,
    )
    block_h = jnp.asarray(rng.standard_normal((B, N + 1, D)), jnp.float32)
    step = TargetStep(
        tokens=jnp.zeros((B, N + 1), jnp.int32), hiddens=Hiddens(last=block_h, layers=None)
    )
    # Row 0: nothing accepted (bonus from `last`, offset 0). Row 1: node 1 ([1], offset 2).
    # Row 2: the whole depth-3 branch 0 -> 2 -> 4 (offset 5). Row 3: node 3 ([0, 1]), inactive.
    acc = Verified(
        tokens=jnp.zeros((B, 3), jnp.int32),
        n=jnp.asarray([0, 1, 3, 2], jnp.int32),
        path=jnp.asarray([[-1, -1, -1], [1, -1, -1], [0, 2, 4], [0, 3, -1]], jnp.int32),
        bonus=jnp.zeros((B,), jnp.int32),
    )
    active = jnp.asarray([True, True, True, False])
    new = spec.commit(params, state, None, acc, active, step)
    want = np.stack([block_h[0, 0], block_h[1, 2], block_h[2, 5], state.feat[3]])
    np.testing.assert_array_equal(new.feat, want)


def test_drafts_come_from_the_heads(target):
    """Zero heads are the target's next-token head (every chain token is argmax of the logits
    that produced `last`); a tree node at depth d, rank r is head d-1's r-th best token."""
    D = target.config.hidden_size
    mode, sp = make_sampling(0.0, None, None)
    feat = jnp.asarray(np.random.default_rng(2).standard_normal((B, D)), jnp.float32)
    state = MedusaState(feat=feat)
    last = jnp.zeros((B,), jnp.int32)
    spec, params = bound(target, zero_heads(3, D))
    draft, _ = spec.propose(params, state, last, jax.random.key(0), mode, sp)
    best = jnp.argmax(lm_head(target.params, target.config, feat), -1)
    np.testing.assert_array_equal(draft.tokens, np.repeat(np.asarray(best)[:, None], K, 1))

    spec, params = bound(target, random_heads(3, D, 1.0, seed=5), tree=TREE3)
    tree = spec.propose(params, state, last, jax.random.key(0), mode, sp)[0].tree
    order = [np.argsort(-np.asarray(head_i(params, target.config, feat, i)), -1) for i in range(3)]
    # (depth, rank) of each node of TREE3.
    for i, (d, r) in enumerate([(1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]):
        np.testing.assert_array_equal(tree.tokens[:, i], order[d - 1][:, r])
    np.testing.assert_array_equal(tree.parents[0], TREE3_PARENTS)
    np.testing.assert_array_equal(tree.depth[0], [1, 1, 2, 2, 3])


def head_i(params, target_cfg, feat, i):
    """Head i's logits at features feat [B, D] -> [B, V]."""
    return head_logits(params, target_cfg, feat, i + 1)[:, i]


# ------------------------------------------------------- 3. sampling is lossless

SEEDS = {
    ("chain", "plain"): 3000,
    ("chain", "topk5_topp0.8"): 3001,
    ("tree", "plain"): 3010,
    ("tree", "topk5_topp0.8"): 3011,
}
# Depth 2 (3 new tokens reach one depth-2 acceptance): two candidates per depth.
TREE2 = drafters.StaticTree([[0], [1], [0, 0], [0, 1], [1, 0]])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_sampling_matches_target(models, exact, shape, mode):
    target, _ = models
    heads = random_heads(2, target.config.hidden_size, 0.5, seed=6)
    d = drafters.medusa(heads, tree=TREE2 if shape == "tree" else None)
    counts, st = sample_joint(target, d, MODES[mode], SEEDS[shape, mode])
    hist = np.asarray(st["acceptance_histogram"])
    assert_follows_target(counts, exact[mode]["joint"], hist, f"medusa {shape}/{mode}")
    # Rejections, single acceptances and two-token acceptances (head 1 / depth 2) all occur.
    assert len(hist) == 3 and np.all(hist >= 0.1 * hist.sum()), hist


def test_wrong_draft_logp_is_detected(models, exact):
    """Negative control: a chain that samples token i from head i but reports the other head's
    distribution as q (rows of Draft.logp swapped) is rejected by the same test (observed
    chi2 ~ 10^4 on 155 df). The swapped drafter is a spec of its own class, so it compiles its
    own decode program (no jit cache is cleared or patched)."""
    target, _ = models
    calls = []

    class Swapped(MedusaSpec):
        def propose(self, *args):
            calls.append(1)
            draft, state = super().propose(*args)
            return draft._replace(logp=draft.logp[:, ::-1]), state

    base = drafters.medusa(random_heads(2, target.config.hidden_size, 0.5, seed=6))

    def bind(t):
        spec, params = base.binder(t)
        return Swapped(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}), params

    d = dataclasses.replace(base, binder=bind)
    counts, _ = sample_joint(target, d, MODES["plain"], SEEDS["chain", "plain"] + 5)
    assert calls, "the engine did not use the patched drafter"
    fit = chi_square(counts, exact["plain"]["joint"])
    print(f"swapped draft logp: {fit}")
    assert fit.pvalue < ALPHA, f"a wrong draft distribution was not detected: {fit}"


# ------------------------------------------------------------- 4. loss, bad input


def test_loss_matches_direct_computation(target):
    cfg_t = target.config
    heads = random_heads(3, cfg_t.hidden_size, 1.0, seed=7)
    rng = np.random.default_rng(3)
    Bl, T = 2, 7
    h = jnp.asarray(rng.standard_normal((Bl, T, cfg_t.hidden_size)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, cfg_t.vocab_size, (Bl, T)), jnp.int32)
    mask = jnp.asarray(rng.random((Bl, T)) < 0.8)
    params = drafters.medusa(heads).bind(target)[1]
    loss, acc = jax.jit(medusa_loss, static_argnums=(0, 2))(
        heads.config, params, cfg_t, h, tokens, mask
    )
    want_loss, want_acc = 0.0, []
    for i in range(3):
        nll, hit = [], []
        for b in range(Bl):
            for t in range(T - 2 - i):
                if mask[b, t + 2 + i]:
                    logits = np.asarray(head_i(params, cfg_t, h[b, t][None], i))[0]
                    logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
                    nll.append(-logp[tokens[b, t + 2 + i]])
                    hit.append(logits.argmax() == tokens[b, t + 2 + i])
        want_loss += LOSS_DECAY**i * np.mean(nll)
        want_acc.append(np.mean(hit))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, want_acc, rtol=1e-6)
    # Zero heads: head i's loss is the target head's cross-entropy two or more tokens ahead.
    zero = drafters.medusa(zero_heads(1, cfg_t.hidden_size)).bind(target)[1]
    l0, _ = medusa_loss(
        MedusaConfig(1, cfg_t.hidden_size), zero, cfg_t, h, tokens, jnp.ones((Bl, T), bool)
    )
    lp = jax.nn.log_softmax(lm_head(target.params, cfg_t, h[:, :-2]), -1)
    np.testing.assert_allclose(
        l0,
        -np.mean(np.take_along_axis(np.asarray(lp), np.asarray(tokens[:, 2:, None]), -1)),
        rtol=1e-5,
    )


def test_trained_heads_are_accepted(target):
    """Heads trained with `medusa_loss` (Adam, 200 steps) on the target's own greedy
    continuations of 64 random prompts learn to predict 2-4 tokens ahead, and then get drafts
    accepted on the (unseen) RAGGED_PROMPTS far more often than random heads (tau 1.33 / 1.41
    for chain / tree, vs 1.01 / 1.04 with the random heads of `test_greedy_equals_ar`), with
    acceptances of 1 and >= 2 tokens, and the output still equals AR."""
    import optax

    from specjax.drafters.medusa_heads import bind_target
    from specjax.models import is_unrolled
    from specjax.models.cache import init_cache
    from specjax.models.llama import forward_hidden

    cfg_t, rng = target.config, np.random.default_rng(0)
    prompts = [rng.integers(0, cfg_t.vocab_size, 4).tolist() for _ in range(64)]
    out = specjax.generate(target, prompts, max_new_tokens=32)
    seqs = jnp.asarray([p + o for p, o in zip(prompts, out.tokens)], jnp.int32)  # [64, 36]
    Bt, T = seqs.shape
    cache = init_cache(cfg_t, Bt, T, target.dtype, per_layer=is_unrolled(target.params))
    hid, _ = forward_hidden(
        target.params, cfg_t, seqs, jnp.broadcast_to(jnp.arange(T), (Bt, T)), cache
    )
    mask = jnp.arange(T)[None, :] >= 4  # labels: the generated tokens only
    cfg = MedusaConfig(num_heads=3, hidden=cfg_t.hidden_size)
    shared = bind_target({}, target.params)
    opt = optax.adam(1e-2)

    @jax.jit
    def step(heads, opt_state):
        def loss(h):
            return medusa_loss(cfg, dict(shared, heads=h), cfg_t, hid.last, seqs, mask)

        (value, acc), grads = jax.value_and_grad(loss, has_aux=True)(heads)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(heads, updates), opt_state, value, acc

    heads = init_params(cfg, jax.random.key(0))["heads"]
    opt_state = opt.init(heads)
    _, _, first_loss, first_acc = step(heads, opt_state)
    for _ in range(200):
        heads, opt_state, value, acc = step(heads, opt_state)
    print(
        f"loss {float(first_loss):.2f} -> {float(value):.2f}, accuracy per head "
        f"{np.asarray(first_acc).round(2)} -> {np.asarray(acc).round(2)}"
    )
    assert value < first_loss - 2.0 and acc[0] > first_acc[0] + 0.2
    ar = specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=NEW)
    trained = MedusaHeads(cfg, {"heads": heads})
    for tree in (None, TREE3):
        got = specjax.generate(
            target, RAGGED_PROMPTS, max_new_tokens=NEW, drafter=drafters.medusa(trained, tree=tree)
        )
        hist = got.stats["acceptance_histogram"]
        print(f"{'tree' if tree else 'chain'}: tau {got.stats['tau']:.2f}, histogram {hist}")
        assert got.tokens == ar.tokens
        assert got.stats["tau"] > 1.25 and hist[1] > 0 and sum(hist[2:]) > 0, hist


def test_bad_input_is_rejected(target):
    D = target.config.hidden_size
    two = random_heads(2, D, 1.0, seed=8)
    with pytest.raises(ValueError, match=f"hidden size 48 but the target's is {D}"):
        specjax.generate(
            target,
            RAGGED_PROMPTS,
            max_new_tokens=2,
            drafter=drafters.medusa(random_heads(2, 48, 1.0, seed=8)),
        )
    with pytest.raises(ValueError, match="tree of depth 3 needs that many heads, there are 2"):
        drafters.medusa(two, tree=TREE3)
    for k in (0, -1):
        with pytest.raises(ValueError, match="draft length k must be a positive int"):
            drafters.medusa(two, k=k)
    with pytest.raises(ValueError, match="chain of k=3 tokens needs k heads, there are 2"):
        drafters.medusa(two, k=3)
    with pytest.raises(TypeError, match="tree must be a StaticTree"):
        drafters.medusa(two, tree=drafters.DynamicTree())
    with pytest.raises(TypeError, match=r"MedusaHeads or a \(MedusaConfig, params\) pair"):
        drafters.medusa(two.params)
    with pytest.raises(ValueError, match="list of 3 heads"):
        drafters.medusa((MedusaConfig(3, D), two.params))
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        MedusaConfig(num_heads=0, hidden=D)
    cfg = MedusaConfig(num_heads=4, hidden=D, num_layers_per_head=2)
    assert MedusaConfig.from_dict(cfg.to_dict()) == cfg
