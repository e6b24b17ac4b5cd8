"""`specjax.decode_fn`: the decode as a pure function over arrays, composed into user programs.

Inside a user's `jax.jit` and inside `lax.scan` it must give `generate`'s tokens exactly
(greedy, sampling with the same key, with and without drafters, with EOS), and its jaxpr must
hold the one decode while_loop and no host callback."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax import drafters
from specjax.api import make_key
from specjax.model import Model

from conftest import RAGGED_PROMPTS

NEW = 12


def padded(prompts: list[list[int]]) -> tuple[jax.Array, jax.Array]:
    """Right-padded [B, P] tokens and [B] lengths, P = 16 (the bucket `generate` uses here)."""
    tokens = np.zeros((len(prompts), 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


def as_lists(out: jax.Array, n: jax.Array) -> list[list[int]]:
    out, n = np.asarray(out), np.asarray(n)
    return [out[i, : n[i]].tolist() for i in range(len(n))]


CASES = {
    "ar-greedy": (lambda t, o: None, {}),
    "ngram-greedy": (lambda t, o: drafters.ngram(k=3), {}),
    "small_model-sampled": (
        lambda t, o: drafters.small_model(o, k=2),
        dict(temperature=0.8, top_p=0.9),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_under_user_jit_equals_generate(target, other, case):
    make, kw = CASES[case]
    fn = specjax.decode_fn(target, drafter=make(target, other), max_new_tokens=NEW, **kw)
    tokens, lengths = padded(RAGGED_PROMPTS)

    @jax.jit
    def user_program(params, dparams, tokens, lengths, key):
        out, n, stats = fn(params, dparams, tokens, lengths, key)
        return out, n, stats["steps"], jnp.sum(out * (out > 0))  # something of the user's own

    out, n, steps, _ = user_program(fn.params, fn.dparams, tokens, lengths, make_key(3))
    ref = specjax.generate(
        target, RAGGED_PROMPTS, max_new_tokens=NEW, drafter=make(target, other), key=3, **kw
    )
    assert as_lists(out, n) == ref.tokens
    assert int(steps) == ref.stats["steps"]
    assert np.all(np.asarray(out)[np.arange(NEW)[None, :] >= np.asarray(n)[:, None]] == 0)


def test_inside_lax_scan_each_key_equals_generate(target):
    """An RL-style loop: sample completions for several keys on device, in one scan."""
    fn = specjax.decode_fn(target, max_new_tokens=NEW, temperature=1.0, top_k=20)
    tokens, lengths = padded(RAGGED_PROMPTS)
    keys = jnp.stack([make_key(s) for s in (5, 6, 7)])

    @jax.jit
    def sample_all(params, keys):
        def body(carry, key):
            out, n, _ = fn(params, None, tokens, lengths, key)
            return carry + n.sum(), (out, n)

        return jax.lax.scan(body, jnp.int32(0), keys)

    total, (outs, ns) = sample_all(fn.params, keys)
    for i, seed in enumerate((5, 6, 7)):
        ref = specjax.generate(
            target, RAGGED_PROMPTS, max_new_tokens=NEW, temperature=1.0, top_k=20, key=seed
        )
        assert as_lists(outs[i], ns[i]) == ref.tokens
    assert int(total) == 3 * len(RAGGED_PROMPTS) * NEW
    assert len({tuple(np.asarray(o).ravel()) for o in outs}) == 3  # the keys matter


def test_eos_rows_stop_and_are_padded(target):
    ar = specjax.generate(target, RAGGED_PROMPTS, max_new_tokens=NEW)
    eos = ar.tokens[1][3]  # a token the second row emits early
    model = Model(
        params=target.params,
        config=dataclasses.replace(target.config, eos_token_ids=(eos,)),
        name="tiny-llama-eos",
    )
    fn = specjax.decode_fn(model, max_new_tokens=NEW, pad_id=-1)
    out, n, _ = jax.jit(fn)(fn.params, fn.dparams, *padded(RAGGED_PROMPTS), make_key(0))
    ref = specjax.generate(model, RAGGED_PROMPTS, max_new_tokens=NEW)
    assert as_lists(out, n) == ref.tokens
    assert int(n[1]) <= 4 and np.all(np.asarray(out)[1, int(n[1]) :] == -1)


def _subjaxprs(params: dict) -> list:
    """The jaxprs an equation's params hold (loop bodies, branches, nested jit calls)."""
    out = []
    for v in params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                out.append(x.jaxpr)
            elif isinstance(x, jax.extend.core.Jaxpr):
                out.append(x)
    return out


def _walk(jaxpr, into_loops: bool = True):
    """Every equation of `jaxpr` and its sub-jaxprs (not inside while loops unless
    `into_loops`)."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name == "while" and not into_loops:
            continue
        for sub in _subjaxprs(eqn.params):
            yield from _walk(sub, into_loops)


def test_jaxpr_holds_one_decode_loop_and_no_callbacks(target, other):
    fn = specjax.decode_fn(
        target, drafter=drafters.small_model(other, k=3), max_new_tokens=NEW, temperature=0.7
    )
    closed = jax.make_jaxpr(fn)(fn.params, fn.dparams, *padded(RAGGED_PROMPTS), make_key(0))
    outer = [e.primitive.name for e in _walk(closed.jaxpr, into_loops=False)]
    assert outer.count("while") == 1, outer
    names = {e.primitive.name for e in _walk(closed.jaxpr)}
    assert not {p for p in names if "callback" in p}, names


def test_bad_shapes_are_named(target):
    fn = specjax.decode_fn(target, max_new_tokens=NEW)
    tokens, lengths = padded(RAGGED_PROMPTS)
    with pytest.raises(ValueError, match=r"tokens must be \[B, P\] and lengths \[B\]"):
        fn(fn.params, None, tokens[0], lengths, make_key(0))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        specjax.decode_fn(target, max_new_tokens=250)(fn.params, None, tokens, lengths, make_key(0))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        specjax.decode_fn(target, max_new_tokens=0)
