"""The on-device decode loop: prefill, then one `lax.while_loop` that drafts, verifies, accepts,
commits the KV caches and writes the emitted tokens, until every row hit EOS or its budget.

Plain autoregressive decoding is the same step with no drafter (K = 0): the "verified block" is
just `last`, nothing is accepted, and the bonus token is the ordinary next token. So AR and
speculative decoding share every line of bookkeeping, and their outputs are comparable exactly.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from specjax import tree as tree_lib
from specjax.drafters.base import Draft, DrafterSpec, TargetPrefill, TargetStep, TreeDraft
from specjax.models.cache import KVCache, gather_slots, init_cache
from specjax.models.config import ModelConfig
from specjax.models.llama import forward, is_unrolled
from specjax.sampling import SamplingMode, process_logits, sample_token
from specjax.verify import Accepted, verify_chain

# Incremented each time a jitted entry point is traced (= compiled); tests read it.
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static settings of one compiled decode program."""

    target: ModelConfig
    mode: SamplingMode
    max_new: int  # output capacity per row (a bucket, >= every row's max_new_tokens)
    eos: tuple[int, ...]
    drafter: Optional[DrafterSpec] = None
    impl: str = "xla"

    @property
    def k(self) -> int:
        """Draft tokens (chain) or nodes (tree) verified per step."""
        return 0 if self.drafter is None else self.drafter.k

    @property
    def max_accept(self) -> int:
        """Most draft tokens one step can accept (chain length or tree depth)."""
        return 0 if self.drafter is None else self.drafter.max_accept

    @property
    def hidden_layers(self) -> tuple:
        return () if self.drafter is None else tuple(self.drafter.hidden_layers)


@struct.dataclass
class LoopState:
    """Decode state carried by the while_loop (all arrays on device)."""

    out: jax.Array  # [B, max_new + K + 1] int32 emitted tokens (tail is scratch)
    n_out: jax.Array  # [B] int32 tokens emitted so far
    max_new: jax.Array  # [B] int32 per-row budget
    done: jax.Array  # [B] bool
    last: jax.Array  # [B] int32 newest token, not yet in the target cache
    cache: KVCache
    dstate: Any  # drafter state (None for AR)
    key: jax.Array
    steps: jax.Array  # [] int32 loop iterations (= target verify forwards)
    row_steps: jax.Array  # [B] int32 verify forwards while the row was active
    accept_hist: jax.Array  # [A+1] int32 how often n = 0..A draft tokens were accepted


def _is_eos(tokens: jax.Array, eos: tuple[int, ...]) -> jax.Array:
    if not eos:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos, jnp.int32))


@functools.partial(jax.jit, static_argnames=("ec", "max_len"))
def prefill(params, dparams, tokens, lengths, max_new, key, sp, *, ec: EngineConfig, max_len: int):
    """Run the target over the padded prompts and sample the first token -> LoopState."""
    TRACE_COUNTS["prefill"] += 1
    B, P = tokens.shape
    cfg = ec.target
    cache = init_cache(cfg, B, max_len, params["embed"].dtype, per_layer=is_unrolled(params))
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    logits, hiddens, cache = forward(params, cfg, tokens, positions, cache,
                                     logits_at=(lengths - 1)[:, None],
                                     hidden_layers=ec.hidden_layers, impl=ec.impl, fresh=True)
    cache = cache.replace(lengths=lengths)
    key, k0, kd = jax.random.split(key, 3)
    first = sample_token(k0, logits[:, 0], ec.mode, sp)
    width = ec.max_new + ec.k + 1
    has_budget = max_new > 0
    out = jnp.zeros((B, width), jnp.int32).at[:, 0].set(jnp.where(has_budget, first, 0))
    n_out = has_budget.astype(jnp.int32)
    done = (~has_budget) | (n_out >= max_new) | _is_eos(first, ec.eos)
    dstate = None
    if ec.drafter is not None:
        pre = TargetPrefill(tokens=tokens, lengths=lengths, first=first, cache=cache,
                            hiddens=hiddens)
        dstate = ec.drafter.init(dparams, pre, max_len)
    return LoopState(out=out, n_out=n_out, max_new=max_new, done=done, last=first, cache=cache,
                     dstate=dstate, key=key, steps=jnp.int32(0),
                     row_steps=jnp.zeros((B,), jnp.int32),
                     accept_hist=jnp.zeros((ec.max_accept + 1,), jnp.int32))


def _verify(params, dparams, state: LoopState, draft, sp, ec: EngineConfig, key):
    """One target forward over [last, draft] -> (accepted tokens [B, A], Accepted-like with .n
    and .bonus, target cache with the accepted path committed, hiddens, block)."""
    cfg, cache = ec.target, state.cache
    lengths = cache.lengths
    if draft is None:  # plain AR step
        block = state.last[:, None]
        logits, hiddens, cache = forward(params, cfg, block, lengths[:, None], cache,
                                         hidden_layers=ec.hidden_layers, impl=ec.impl)
        acc = Accepted(n=jnp.zeros_like(lengths), bonus=sample_token(key, logits[:, 0], ec.mode, sp))
        cache = cache.replace(lengths=lengths + (~state.done).astype(jnp.int32))
        return jnp.zeros((block.shape[0], 0), jnp.int32), acc, cache, hiddens, block
    if isinstance(draft, TreeDraft):
        t, D = draft.tree, ec.max_accept
        block = jnp.concatenate([state.last[:, None], t.tokens], axis=1)  # [B, N+1]
        logits, hiddens, cache = forward(
            params, cfg, block, tree_lib.block_positions(t.depth, lengths), cache,
            block_mask=tree_lib.block_mask(t.parents), hidden_layers=ec.hidden_layers,
            impl=ec.impl)
        if ec.mode.greedy:
            acc = tree_lib.verify_tree_greedy(logits, t, D)
        else:
            acc = tree_lib.verify_tree_sampling(key, process_logits(logits, ec.mode, sp), t,
                                                draft.child_logp, D, ec.drafter.without_replacement)
        tokens = jnp.take_along_axis(t.tokens, jnp.maximum(acc.path, 0), axis=1)  # [B, D]
        # Compact the accepted branch: block offset 0 (`last`) stays, path node i -> offset i+1.
        src = jnp.concatenate([jnp.zeros_like(acc.path[:, :1]), jnp.maximum(acc.path, -1) + 1], 1)
        cache = gather_slots(cache, src, jnp.where(~state.done, acc.n + 1, 0))
        return tokens, acc, cache, hiddens, block
    K = draft.tokens.shape[1]  # ec.k, or fewer (see _verify_sized)
    block = jnp.concatenate([state.last[:, None], draft.tokens], axis=1)  # [B, K+1]
    positions = lengths[:, None] + jnp.arange(K + 1, dtype=jnp.int32)[None, :]
    logits, hiddens, cache = forward(params, cfg, block, positions, cache,
                                     hidden_layers=ec.hidden_layers, impl=ec.impl)
    acc = verify_chain(key, logits, draft.tokens, draft.logp, ec.mode, sp)
    # A chain's accepted tokens are already in place after `last`.
    cache = cache.replace(lengths=lengths + jnp.where(~state.done, acc.n + 1, 0))
    return draft.tokens, acc, cache, hiddens, block


def verify_bucket(size: jax.Array, active: jax.Array, sizes: tuple) -> jax.Array:
    """Index into (0,) + sizes of the smallest verify length covering every active row's
    request `size` [B] (0 = a plain step)."""
    need = jnp.max(jnp.where(active, size, 0))
    return jnp.minimum(jnp.sum(jnp.asarray((0,) + sizes) < need), len(sizes))


def _verify_sized(params, dparams, state: LoopState, draft: Draft, sp, ec: EngineConfig, key):
    """Verify only as many draft tokens as the drafter asked for (`Draft.size`), rounded up to
    one of its static `verify_sizes`; every length is its own branch of a `lax.switch`, so a
    short verify costs a short forward. -> (accepted [B, K] zero-padded, Accepted, cache)."""
    K, sizes = ec.k, tuple(ec.drafter.verify_sizes)
    if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] != K:
        raise ValueError(f"verify_sizes must ascend from >= 1 to k={K}, got {sizes}")

    def branch(n: int):
        def run(_):
            if n == 0:
                _, acc, cache, _, _ = _verify(params, dparams, state, None, sp, ec, key)
                return jnp.zeros((state.last.shape[0], K), jnp.int32), acc, cache
            short = draft._replace(tokens=draft.tokens[:, :n],
                                   logp=None if draft.logp is None else draft.logp[:, :n])
            tokens, acc, cache, _, _ = _verify(params, dparams, state, short, sp, ec, key)
            return jnp.pad(tokens, ((0, 0), (0, K - n))), acc, cache
        return run

    idx = verify_bucket(draft.size, ~state.done, sizes)
    return jax.lax.switch(idx, [branch(n) for n in (0,) + sizes], None)


def decode_step(params, dparams, state: LoopState, sp, ec: EngineConfig) -> LoopState:
    """One draft -> verify -> accept -> commit step (K = 0: one plain decode step)."""
    key, k_draft, k_verify = jax.random.split(state.key, 3)
    draft, dstate = None, None
    if ec.drafter is not None:
        draft, dstate = ec.drafter.propose(dparams, state.dstate, state.last, k_draft, ec.mode, sp)
    active = ~state.done
    if isinstance(draft, Draft) and draft.size is not None:
        accepted, acc, cache = _verify_sized(params, dparams, state, draft, sp, ec, k_verify)
        hiddens = block = None  # such drafters read no target features
    elif isinstance(draft, TreeDraft) and draft.worth is not None:
        # The drafter says whether its draft is worth verifying (an n-gram drafter that found
        # no match is not): when no active row's is, take a plain one-token step instead of
        # paying for a (K+1)-token verify that can only yield the bonus token.
        def spec(_):
            accepted, acc, cache, _, _ = _verify(params, dparams, state, draft, sp, ec, k_verify)
            return accepted, acc, cache

        def plain(_):
            none, acc, cache, _, _ = _verify(params, dparams, state, None, sp, ec, k_verify)
            B, D = none.shape[0], ec.max_accept
            # the same record as the tree branch returns
            acc = tree_lib.TreeAccepted(node=jnp.full((B,), -1, jnp.int32), n=acc.n,
                                        path=jnp.full((B, D), -1, jnp.int32), bonus=acc.bonus)
            return jnp.zeros((B, D), jnp.int32), acc, cache

        accepted, acc, cache = jax.lax.cond(jnp.any(draft.worth & active), spec, plain, None)
        hiddens = block = None  # such drafters read no target features
    else:
        accepted, acc, cache, hiddens, block = _verify(params, dparams, state, draft, sp, ec,
                                                       k_verify)
    B, A = accepted.shape

    # Emitted this step: the n accepted draft tokens, then the bonus token.
    j = jnp.arange(A + 1)[None, :]
    padded = jnp.concatenate([accepted, jnp.zeros((B, 1), jnp.int32)], axis=1)  # [B, A+1]
    emitted = jnp.where(j < acc.n[:, None], padded, acc.bonus[:, None])
    count = acc.n + 1
    eos_at = _is_eos(emitted, ec.eos) & (j < count[:, None])
    first_eos = jnp.where(eos_at.any(axis=1), jnp.argmax(eos_at, axis=1), A + 1)
    count = jnp.minimum(jnp.minimum(count, first_eos + 1), state.max_new - state.n_out)
    count = jnp.where(active, count, 0)
    col = jnp.where(j < count[:, None], state.n_out[:, None] + j, state.out.shape[1])  # drop
    out = state.out.at[jnp.arange(B)[:, None], col].set(emitted, mode="drop")
    n_out = state.n_out + count
    done = state.done | (active & ((first_eos <= acc.n) | (n_out >= state.max_new)))

    if ec.drafter is not None:
        dstate = ec.drafter.commit(dparams, dstate, draft, acc, active,
                                   TargetStep(tokens=block, hiddens=hiddens))
    return state.replace(
        out=out, n_out=n_out, done=done, last=jnp.where(active, acc.bonus, state.last),
        cache=cache, dstate=dstate, key=key, steps=state.steps + 1,
        row_steps=state.row_steps + active.astype(jnp.int32),
        accept_hist=state.accept_hist.at[acc.n].add(active.astype(jnp.int32)))


@functools.partial(jax.jit, static_argnames=("ec",), donate_argnums=(2,))
def decode(params, dparams, state: LoopState, sp, *, ec: EngineConfig) -> LoopState:
    """The whole decode phase as one on-device `lax.while_loop`."""
    TRACE_COUNTS["decode"] += 1

    def cond(s):
        # Every step emits >= 1 token for each active row, so max_new steps always suffice.
        return jnp.any(~s.done) & (s.steps < ec.max_new)

    return jax.lax.while_loop(cond, lambda s: decode_step(params, dparams, s, sp, ec), state)


@functools.partial(jax.jit, static_argnames=("ec",), donate_argnums=(2,))
def decode_one(params, dparams, state: LoopState, sp, *, ec: EngineConfig) -> LoopState:
    """The Python-loop twin: one step per call (streaming and debugging)."""
    TRACE_COUNTS["decode_one"] += 1
    return decode_step(params, dparams, state, sp, ec)
