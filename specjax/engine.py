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

from specjax.drafters.base import Draft, DrafterSpec, TargetPrefill, TargetStep
from specjax.models.cache import KVCache, init_cache
from specjax.models.config import ModelConfig
from specjax.models.llama import forward
from specjax.sampling import SamplingMode, sample_token
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
        return 0 if self.drafter is None else self.drafter.k

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
    accept_hist: jax.Array  # [K+1] int32 how often n = 0..K draft tokens were accepted


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
    cache = init_cache(cfg, B, max_len, params["embed"].dtype)
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    logits, hiddens, cache = forward(params, cfg, tokens, positions, cache,
                                     logits_at=(lengths - 1)[:, None],
                                     hidden_layers=ec.hidden_layers, impl=ec.impl)
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
                     accept_hist=jnp.zeros((ec.k + 1,), jnp.int32))


def decode_step(params, dparams, state: LoopState, sp, ec: EngineConfig) -> LoopState:
    """One draft -> verify -> accept -> commit step (K = 0: one plain decode step)."""
    cfg, K = ec.target, ec.k
    key, k_draft, k_verify = jax.random.split(state.key, 3)
    if ec.drafter is not None:
        draft, dstate = ec.drafter.propose(dparams, state.dstate, state.last, k_draft, ec.mode, sp)
        block = jnp.concatenate([state.last[:, None], draft.tokens], axis=1)  # [B, K+1]
    else:
        draft, dstate, block = None, None, state.last[:, None]  # [B, 1]
    B = block.shape[0]
    positions = state.cache.lengths[:, None] + jnp.arange(K + 1, dtype=jnp.int32)[None, :]
    logits, hiddens, cache = forward(params, cfg, block, positions, state.cache,
                                     hidden_layers=ec.hidden_layers, impl=ec.impl)
    if ec.drafter is not None:
        acc = verify_chain(k_verify, logits, draft.tokens, draft.logp, ec.mode, sp)
    else:
        acc = Accepted(n=jnp.zeros((B,), jnp.int32),
                       bonus=sample_token(k_verify, logits[:, 0], ec.mode, sp))
    active = ~state.done

    # Emitted this step: the n accepted draft tokens, then the bonus token.
    j = jnp.arange(K + 1)[None, :]
    drafted = block[:, 1:] if K else jnp.zeros((B, 0), jnp.int32)
    drafted = jnp.concatenate([drafted, jnp.zeros((B, 1), jnp.int32)], axis=1)  # [B, K+1]
    emitted = jnp.where(j < acc.n[:, None], drafted, acc.bonus[:, None])  # [B, K+1]
    count = acc.n + 1
    eos_at = _is_eos(emitted, ec.eos) & (j < count[:, None])
    first_eos = jnp.where(eos_at.any(axis=1), jnp.argmax(eos_at, axis=1), K + 1)
    count = jnp.minimum(jnp.minimum(count, first_eos + 1), state.max_new - state.n_out)
    count = jnp.where(active, count, 0)
    b_idx = jnp.arange(B)[:, None]
    col = jnp.where(j < count[:, None], state.n_out[:, None] + j, state.out.shape[1])  # drop
    out = state.out.at[b_idx, col].set(emitted, mode="drop")
    n_out = state.n_out + count
    done = state.done | (active & ((first_eos <= acc.n) | (n_out >= state.max_new)))

    # Commit: `last` and the accepted draft tokens are already in place in the target cache.
    cache = cache.replace(lengths=cache.lengths + jnp.where(active, acc.n + 1, 0))
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
