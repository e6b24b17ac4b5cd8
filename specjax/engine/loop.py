"""The on-device decode loop: prefill, then one `lax.while_loop` whose step reads top to bottom

    propose -> verify -> emit -> commit

until every row hit EOS or its budget.

Plain autoregressive decoding is the same step with no drafter: nothing is proposed, the
verified block is just `last`, nothing is accepted, and the bonus token is the ordinary next
token. So AR and speculative decoding share every line of bookkeeping, and their outputs are
comparable exactly.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp

from specjax.engine import xla
from specjax.engine.protocol import Params, PrefillInput, TargetPrefill, Verified
from specjax.engine.state import EngineConfig, LoopState, PrefillConfig
from specjax.engine.verify import verify, verify_index
from specjax.models import Hiddens, compute_dtype, forward, is_unrolled
from specjax.models.cache import KVCache, constrain_cache, grow_cache, init_cache
from specjax.sampling import sample_token

# Incremented each time a jitted entry point is traced (compiled, or traced into a caller's
# program: `start_and_decode` traces `start_loop`); tests read it.
TRACE_COUNTS: collections.Counter = collections.Counter()


def _is_eos(tokens: jax.Array, eos: tuple[int, ...]) -> jax.Array:
    if not eos:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos, jnp.int32))


@xla.jit(static_argnames=("pc",))
def target_prefill(
    params: dict, inp: PrefillInput, *, pc: PrefillConfig
) -> tuple[jax.Array, KVCache, Hiddens | None]:
    """Run the target over the padded prompts -> (logits [B, V] float32 at each row's last
    prompt token, a cache of the prompt's width P, hiddens (None unless a drafter reads them)).

    The cache holds just the prompt: a fresh prefill attends only within its block, so the
    cache's length changes nothing computed here, and leaving it out of the program lets
    every output budget and drafter slack share one compiled prefill. `start_loop` grows it."""
    TRACE_COUNTS["prefill"] += 1
    B, P = inp.tokens.shape
    cache = init_cache(pc.target, B, P, compute_dtype(params), per_layer=is_unrolled(params))
    cache = constrain_cache(cache, pc.kv_sharding)
    logits, hiddens, cache = forward(
        params,
        pc.target,
        inp.tokens,
        inp.positions,
        cache,
        logits_at=(inp.lengths - 1)[:, None],
        hidden_layers=pc.hidden_layers,
        impl=pc.impl,
        fresh=True,
        embeds=inp.embeds,
        embed_mask=inp.embed_mask,
    )
    return logits[:, 0], cache.replace(lengths=inp.lengths), hiddens if pc.with_hiddens else None


@xla.jit(static_argnames=("pc",))
def target_prefill_shared(
    params: dict,
    inp: PrefillInput,  # [U, P]: the distinct prompts of the batch
    rows: jax.Array,  # [B] int32: row b of the batch is prompt rows[b] of `inp`
    *,
    pc: PrefillConfig,
) -> tuple[jax.Array, KVCache, Hiddens | None]:
    """`target_prefill` for a batch that repeats prompts (n samples of one question): the
    target runs once per distinct prompt and each row gets its prompt's logits, cache and
    hiddens -> what `target_prefill` returns for the whole batch. (8192 samples of one prompt:
    a prefill of one row instead of 8192.)"""
    TRACE_COUNTS["prefill_shared"] += 1
    logits, cache, hiddens = target_prefill(params, inp, pc=pc)

    def pick(x: jax.Array, axis: int = 0) -> jax.Array:
        return jnp.take(x, rows, axis=axis)

    batch_axis = 0 if cache.per_layer else 1  # k, v: a tuple of [B, ...] or [L, B, ...]
    cache = KVCache(
        k=jax.tree.map(lambda x: pick(x, batch_axis), cache.k),
        v=jax.tree.map(lambda x: pick(x, batch_axis), cache.v),
        lengths=pick(cache.lengths),
    )
    cache = constrain_cache(cache, pc.kv_sharding)
    if hiddens is not None:  # last [B, P, D], layers [n, B, P, D]
        layers = None if hiddens.layers is None else pick(hiddens.layers, 1)
        hiddens = Hiddens(last=pick(hiddens.last), layers=layers)
    return pick(logits), cache, hiddens


@xla.jit(static_argnames=("pc", "width"))
def target_prefill_after(
    params: dict,
    inp: PrefillInput,
    start: jax.Array,  # [B] int32 prompt tokens whose K/V (and hiddens) are already in `cache`
    cache: KVCache,  # width P + width: slots [0, start[b]) hold row b's prefix
    hiddens: Hiddens | None,  # [.., B, P, D] valid before `start` (None unless pc.with_hiddens)
    *,
    pc: PrefillConfig,
    width: int,  # static: the block of prompt tokens computed here, >= max(lengths - start)
) -> tuple[jax.Array, KVCache, Hiddens | None]:
    """`target_prefill` for prompts whose first `start[b]` tokens were prefilled before (a
    prefix KV cache: the image of a follow-up question). Runs the target only over each row's
    tokens [start, length), attending to the cached prefix -> the same (logits [B, V], cache of
    width P, hiddens over the whole prompt) as `target_prefill`, up to float rounding (the
    suffix attends through the cache instead of inside one block)."""
    TRACE_COUNTS["prefill_after"] += 1
    B, P = inp.tokens.shape
    j = start[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]  # [B, W] prompt slots
    jc = jnp.minimum(j, P - 1)
    take = lambda x: jnp.take_along_axis(x, jc.reshape(B, width, *([1] * (x.ndim - 2))), axis=1)  # noqa: E731
    embeds = None if inp.embeds is None else take(inp.embeds)
    emask = None if inp.embed_mask is None else take(inp.embed_mask) & (j < P)
    logits, hid, cache = forward(
        params,
        pc.target,
        take(inp.tokens),
        take(inp.positions),
        constrain_cache(cache.replace(lengths=start), pc.kv_sharding),
        logits_at=(inp.lengths - 1 - start)[:, None],
        hidden_layers=pc.hidden_layers,
        impl=pc.impl,
        embeds=embeds,
        embed_mask=emask,
    )

    def trim(x: jax.Array) -> jax.Array:  # [..., P + W, hd] -> [..., P, hd]: garbage beyond P
        return x[..., :P, :]

    cache = cache.replace(
        k=jax.tree.map(trim, cache.k), v=jax.tree.map(trim, cache.v), lengths=inp.lengths
    )
    if not pc.with_hiddens:
        return logits[:, 0], cache, None

    def place(full: jax.Array, block: jax.Array) -> jax.Array:
        # full [..., B, P, D] <- block [..., B, W, D] at slots j (slots >= P dropped)
        rows = jnp.arange(B)[:, None]
        return full.at[..., rows, j, :].set(block, mode="drop")

    layers = None if hid.layers is None else place(hiddens.layers, hid.layers)
    return logits[:, 0], cache, Hiddens(last=place(hiddens.last, hid.last), layers=layers)


@xla.jit(static_argnames=("ec", "max_len"))
def start_loop(
    dparams: Params,
    inp: PrefillInput,
    logits: jax.Array,  # [B, V] float32 target logits after the prompt
    cache: KVCache,  # the prompt's cache (width P)
    hiddens: Hiddens | None,
    max_new: jax.Array,  # [B] int32 per-row budget
    key: jax.Array,
    sp: dict,
    *,
    ec: EngineConfig,
    max_len: int,
) -> LoopState:
    """The first token, the drafter's state and the loop's first state from the target's
    prefill; the cache grows to `max_len` slots. (Its own program for callers that step the
    loop themselves or run it in parts; inside `start_and_decode` it is part of that one.)"""
    TRACE_COUNTS["start_loop"] += 1
    B = logits.shape[0]
    cache = constrain_cache(grow_cache(cache, max_len), ec.kv_sharding)
    key, k0, _ = jax.random.split(key, 3)
    first = sample_token(k0, logits, ec.mode, sp)
    width = ec.max_new + ec.k + 1
    has_budget = max_new > 0
    out = jnp.zeros((B, width), jnp.int32).at[:, 0].set(jnp.where(has_budget, first, 0))
    n_out = has_budget.astype(jnp.int32)
    done = (~has_budget) | (n_out >= max_new) | _is_eos(first, ec.eos)
    dstate = None
    if ec.drafter is not None:
        pre = TargetPrefill(input=inp, first=first, cache=cache, hiddens=hiddens)
        dstate = ec.drafter.init(dparams, pre, max_len)
    return LoopState(
        out=out,
        n_out=n_out,
        max_new=max_new,
        done=done,
        last=first,
        pos=inp.next_position,
        cache=cache,
        dstate=dstate,
        key=key,
        steps=jnp.int32(0),
        row_steps=jnp.zeros((B,), jnp.int32),
        accept_hist=jnp.zeros((ec.max_accept + 1,), jnp.int32),
        size_hist=jnp.zeros((len(ec.verify_sizes) + 1,), jnp.int32),
    )


def prefill(
    params: dict,
    dparams: Params,
    inp: PrefillInput,
    max_new: jax.Array,  # [B] int32 per-row budget
    key: jax.Array,
    sp: dict,
    *,
    ec: EngineConfig,
    max_len: int,
) -> LoopState:
    """The target's prefill, then the drafter's start -> the loop's first state.

    Two programs, not one: the target's prefill depends only on the target, the prompt's
    shape and the hidden layers a drafter reads (`EngineConfig.prefill_config`), so sampling
    modes, output budgets and most drafters share one compiled prefill per shape bucket; only
    the small `start_loop` is compiled per drafter. (Inside a caller's `jax.jit` both are
    inlined into the caller's program.)"""
    logits, cache, hiddens = target_prefill(params, inp, pc=ec.prefill_config)
    return start_loop(
        dparams, inp, logits, cache, hiddens, max_new, key, sp, ec=ec, max_len=max_len
    )


def emit(state: LoopState, v: Verified, ec: EngineConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Write the n accepted draft tokens and the bonus token of each active row to the output,
    cut at EOS and at the row's budget -> (out, n_out, done); n_out grows by the tokens written."""
    B, A = v.tokens.shape
    active = ~state.done
    j = jnp.arange(A + 1)[None, :]
    padded = jnp.concatenate([v.tokens, jnp.zeros((B, 1), jnp.int32)], axis=1)  # [B, A+1]
    emitted = jnp.where(j < v.n[:, None], padded, v.bonus[:, None])
    count = v.n + 1
    eos_at = _is_eos(emitted, ec.eos) & (j < count[:, None])
    first_eos = jnp.where(eos_at.any(axis=1), jnp.argmax(eos_at, axis=1), A + 1)
    count = jnp.minimum(jnp.minimum(count, first_eos + 1), state.max_new - state.n_out)
    count = jnp.where(active, count, 0)
    col = jnp.where(j < count[:, None], state.n_out[:, None] + j, state.out.shape[1])  # drop
    out = state.out.at[jnp.arange(B)[:, None], col].set(emitted, mode="drop")
    n_out = state.n_out + count
    done = state.done | (active & ((first_eos <= v.n) | (n_out >= state.max_new)))
    return out, n_out, done


def decode_step(
    params: dict, dparams: Params, state: LoopState, sp: dict, ec: EngineConfig
) -> LoopState:
    """One propose -> verify -> emit -> commit step (no drafter: one plain decode step)."""
    key, k_draft, k_verify = jax.random.split(state.key, 3)
    active = ~state.done
    spec = ec.drafter

    # propose: the drafter continues `last` with a chain or a tree (nothing without a drafter)
    draft, dstate = None, state.dstate
    if spec is not None:
        draft, dstate = spec.propose(dparams, dstate, state.last, k_draft, ec.mode, sp)

    # verify: one target forward over [last, draft]; accept; the target cache keeps the
    # accepted tokens
    verified, cache, target_step = verify(params, state, draft, k_verify, sp, ec)

    # emit: accepted tokens, then the bonus token, into the output
    out, n_out, done = emit(state, verified, ec)

    # commit: the drafter catches up with what was emitted
    if spec is not None:
        dstate = spec.commit(dparams, dstate, draft, verified, active, target_step)
    moved = jnp.where(active, verified.n + 1, 0)
    return state.replace(
        out=out,
        n_out=n_out,
        done=done,
        last=jnp.where(active, verified.bonus, state.last),
        pos=state.pos + moved,
        cache=cache,
        dstate=dstate,
        key=key,
        steps=state.steps + 1,
        row_steps=state.row_steps + active.astype(jnp.int32),
        accept_hist=state.accept_hist.at[verified.n].add(active.astype(jnp.int32)),
        size_hist=state.size_hist.at[verify_index(draft, active, ec)].add(1),
    )


def _run_loop(
    params: dict, dparams: Params, state: LoopState, sp: dict, ec: EngineConfig
) -> LoopState:
    """The whole decode phase as one on-device `lax.while_loop` from `state`."""

    def cond(s: LoopState) -> jax.Array:
        # Every step emits >= 1 token for each active row, so max_new steps always suffice.
        return jnp.any(~s.done) & (s.steps < ec.max_new)

    return jax.lax.while_loop(cond, lambda s: decode_step(params, dparams, s, sp, ec), state)


@xla.jit(static_argnames=("ec",), donate_argnums=(2,))
def decode(
    params: dict, dparams: Params, state: LoopState, sp: dict, *, ec: EngineConfig
) -> LoopState:
    """The whole decode phase as one on-device `lax.while_loop`."""
    TRACE_COUNTS["decode"] += 1
    return _run_loop(params, dparams, state, sp, ec)


@xla.jit(static_argnames=("ec", "max_len"))
def start_and_decode(
    params: dict,
    dparams: Params,
    inp: PrefillInput,
    logits: jax.Array,  # [B, V] float32 target logits after the prompt
    cache: KVCache,  # the prompt's cache (width P)
    hiddens: Hiddens | None,
    max_new: jax.Array,  # [B] int32 per-row budget
    key: jax.Array,
    sp: dict,
    *,
    ec: EngineConfig,
    max_len: int,
) -> LoopState:
    """`start_loop` then `decode` as one program, from the target's prefill to the end: what
    `generate` runs. One compilation per drafter and shape bucket instead of two (a program's
    fixed cost of lowering and compiling is paid once), with the same tokens."""
    TRACE_COUNTS["decode"] += 1
    state = start_loop(
        dparams, inp, logits, cache, hiddens, max_new, key, sp, ec=ec, max_len=max_len
    )  # traced into this program
    return _run_loop(params, dparams, state, sp, ec)


@xla.jit(static_argnames=("ec",), donate_argnums=(2,))
def decode_one(
    params: dict, dparams: Params, state: LoopState, sp: dict, *, ec: EngineConfig
) -> LoopState:
    """The Python-loop twin: one step per call (streaming and debugging)."""
    TRACE_COUNTS["decode_one"] += 1
    return decode_step(params, dparams, state, sp, ec)
