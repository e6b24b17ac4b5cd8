"""Verification: one target forward over [last, draft], the acceptance rule, the target cache
commit. One verifier per draft shape, one record (`Verified`) for all of them, and one place
(`verify`) that decides how much of a draft is worth a forward.

Draft shapes and their verifiers:

    None (a plain step)  block [last]                       n = 0, bonus = next token
    Draft (a chain)      block [last, d_1 .. d_K], causal   accepted tokens stay in place
    TreeDraft (a tree)   block [last, nodes], tree mask     the accepted path is compacted
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from specjax.engine import tree as tree_lib
from specjax.engine.protocol import Draft, TargetStep, TreeDraft, Verified
from specjax.engine.state import EngineConfig, LoopState
from specjax.models import forward
from specjax.models.cache import BlockKV, KVCache, gather_slots, pad_block, write_kv
from specjax.models.config import ModelConfig
from specjax.sampling import process_logits, sample_token

AnyDraft = Draft | TreeDraft | None


class Block(NamedTuple):
    """What the target reads for one verification."""

    tokens: jax.Array  # [B, T] last, then the draft
    positions: jax.Array  # [B, T]
    mask: jax.Array | None  # [B, T, T] among the block's tokens (None: causal)


class Verifier(NamedTuple):
    """How one draft shape is verified: its block, its acceptance, its cache commit."""

    block: Callable  # (draft, last [B], pos [B]) -> Block
    accept: Callable  # (key, logits [B, T, V], draft, sp, ec) -> Verified padded to ec.max_accept
    commit: Callable  # (cache with the block written, Verified, active [B]) -> cache


def _pad(x: jax.Array, width: int, value: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=value)


def _advance(cache: KVCache, v: Verified, active: jax.Array) -> KVCache:
    """Chains (and plain steps): the accepted tokens already sit right after `last`."""
    return cache.replace(lengths=cache.lengths + jnp.where(active, v.n + 1, 0))


# ----------------------------------------------------------------------------- plain step


def _plain_block(draft: None, last: jax.Array, pos: jax.Array) -> Block:
    return Block(last[:, None], pos[:, None], None)


def _plain_accept(
    key: jax.Array, logits: jax.Array, draft: None, sp: dict, ec: EngineConfig
) -> Verified:
    B, A = logits.shape[0], ec.max_accept
    return Verified(
        tokens=jnp.zeros((B, A), jnp.int32),
        n=jnp.zeros((B,), jnp.int32),
        bonus=sample_token(key, logits[:, 0], ec.mode, sp),
        path=jnp.full((B, A), -1, jnp.int32),
    )


# ----------------------------------------------------------------------------- chain


def _chain_block(draft: Draft, last: jax.Array, pos: jax.Array) -> Block:
    T = draft.tokens.shape[1] + 1
    tokens = jnp.concatenate([last[:, None], draft.tokens], axis=1)  # [B, K+1]
    return Block(tokens, pos[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :], None)


def _chain_accept(
    key: jax.Array, logits: jax.Array, draft: Draft, sp: dict, ec: EngineConfig
) -> Verified:
    acc = ec.rules.chain(key, logits, draft.tokens, draft.logp, ec.mode, sp)
    K, A = draft.tokens.shape[1], ec.max_accept
    i = jnp.arange(K, dtype=jnp.int32)[None, :]
    path = jnp.where(i < acc.n[:, None], i, -1)
    return Verified(
        tokens=_pad(draft.tokens, A, 0), n=acc.n, bonus=acc.bonus, path=_pad(path, A, -1)
    )


# ----------------------------------------------------------------------------- tree


def _tree_block(draft: TreeDraft, last: jax.Array, pos: jax.Array) -> Block:
    t = draft.tree
    tokens = jnp.concatenate([last[:, None], t.tokens], axis=1)  # [B, N+1]
    return Block(tokens, tree_lib.block_positions(t.depth, pos), tree_lib.block_mask(t.parents))


def _tree_accept(
    key: jax.Array, logits: jax.Array, draft: TreeDraft, sp: dict, ec: EngineConfig
) -> Verified:
    t, D = draft.tree, ec.max_accept
    if ec.mode.greedy:
        acc = ec.rules.tree_greedy(logits, t, D)
    else:
        # `point_mass` only when a draft marks nodes (rules written without it keep working)
        marked = {} if draft.point_mass is None else {"point_mass": draft.point_mass}
        acc = ec.rules.tree_sampling(
            key,
            process_logits(logits, ec.mode, sp),
            t,
            draft.child_logp,
            D,
            ec.drafter.siblings_without_replacement,
            **marked,
        )
    tokens = jnp.take_along_axis(t.tokens, jnp.maximum(acc.path, 0), axis=1)  # [B, D]
    return Verified(tokens=tokens, n=acc.n, bonus=acc.bonus, path=acc.path)


def _compact(cache: KVCache, v: Verified, active: jax.Array) -> KVCache:
    """Move the accepted branch into place: block offset 0 (`last`) stays, the path's node i
    (block offset i + 1) goes to offset i + 1 of the committed run."""
    src = jnp.concatenate([jnp.zeros_like(v.path[:, :1]), jnp.maximum(v.path, -1) + 1], axis=1)
    return gather_slots(cache, src, jnp.where(active, v.n + 1, 0))


PLAIN = Verifier(_plain_block, _plain_accept, _advance)
CHAIN = Verifier(_chain_block, _chain_accept, _advance)
TREE = Verifier(_tree_block, _tree_accept, _compact)


def verifier_for(draft: AnyDraft) -> Verifier:
    if draft is None:
        return PLAIN
    if isinstance(draft, Draft):
        return CHAIN
    if isinstance(draft, TreeDraft):
        return TREE
    raise TypeError(f"a drafter proposed a {type(draft).__name__}; expected Draft or TreeDraft")


# ----------------------------------------------------------------------------- verification


def target_forward(
    params: dict, state: LoopState, draft: AnyDraft, ec: EngineConfig, write: bool = True
) -> tuple[jax.Array, TargetStep, KVCache | BlockKV]:
    """The target's forward over the block the engine verifies for `draft` (None: a plain
    step) -> (logits [B, T, V], TargetStep, cache with the block written, uncommitted; or,
    with `write=False`, the block's K/V and the cache left as it was)."""
    blk = verifier_for(draft).block(draft, state.last, state.pos)
    logits, hiddens, cache = forward(
        params,
        ec.target,
        blk.tokens,
        blk.positions,
        state.cache,
        block_mask=blk.mask,
        hidden_layers=ec.hidden_layers,
        impl=ec.impl,
        write=write,
    )
    return logits, TargetStep(blk.tokens, hiddens), cache


def verify_block(
    params: dict, state: LoopState, draft: AnyDraft, key: jax.Array, sp: dict, ec: EngineConfig
) -> tuple[Verified, KVCache, TargetStep]:
    """Verify the whole of `draft` (None: a plain step) -> (Verified, target cache with the
    accepted tokens committed, TargetStep of the forward)."""
    v = verifier_for(draft)
    logits, step, cache = target_forward(params, state, draft, ec)
    verified = v.accept(key, logits, draft, sp, ec)
    return verified, v.commit(cache, verified, ~state.done), step


def verify_index(draft: AnyDraft, active: jax.Array, ec: EngineConfig) -> jax.Array:
    """Index into (0,) + ec.verify_sizes of what `verify` verifies for `draft` (0: a plain
    step; a draft without `size`: the whole draft)."""
    if draft is None:
        return jnp.int32(0)
    if draft.size is None:
        return jnp.int32(len(ec.verify_sizes))
    return size_index(draft.size, active, ec.verify_sizes)


def size_index(size: jax.Array, active: jax.Array, sizes: tuple) -> jax.Array:
    """Index into (0,) + sizes of the smallest verify size covering every active row's
    request `size` [B] (0 = a plain step)."""
    need = jnp.max(jnp.where(active, size, 0))
    return jnp.minimum(jnp.sum(jnp.asarray((0,) + sizes) < need), len(sizes))


def _pad_axis(x: jax.Array, axis: int, width: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, width - x.shape[axis])
    return jnp.pad(x, pad)


def _padded_step(step: TargetStep, width: int) -> TargetStep:
    """A verify forward's block and hidden states padded to `width` positions, so that every
    verify size hands the drafter the same shapes (it reads only the first n + 1)."""
    h = step.hiddens
    layers = None if h.layers is None else _pad_axis(h.layers, 2, width)  # [n, B, T, D]
    return TargetStep(
        tokens=_pad_axis(step.tokens, 1, width),
        hiddens=h._replace(last=_pad_axis(h.last, 1, width), layers=layers),
    )


def verify(
    params: dict, state: LoopState, draft: AnyDraft, key: jax.Array, sp: dict, ec: EngineConfig
) -> tuple[Verified, KVCache, TargetStep]:
    """The one place that decides what to verify. A draft without `size` is verified whole. A
    draft with `size` [B] is verified at the smallest of the drafter's static `verify_sizes`
    covering every active row's request, or replaced by a plain one-token step when no active
    row asks for any: one `lax.switch` branch per size, so a short verify costs a short
    forward. -> (Verified, target cache, TargetStep)."""
    if draft is None or draft.size is None:
        return verify_block(params, state, draft, key, sp, ec)
    sizes, K = tuple(ec.drafter.verify_sizes), ec.drafter.nodes
    if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] != K:
        raise ValueError(f"verify_sizes must ascend from >= 1 to the draft size {K}, got {sizes}")
    idx = verify_index(draft, ~state.done, ec)
    parts = [None if n == 0 else draft if n == K else draft.truncated(n) for n in (0,) + sizes]
    if ec.impl != "xla":  # the kernel reads the block from the cache: each branch writes it

        def written(part: AnyDraft) -> Callable[[], tuple[Verified, KVCache, TargetStep]]:
            def run() -> tuple[Verified, KVCache, TargetStep]:
                verified, cache, step = verify_block(params, state, part, key, sp, ec)
                return verified, cache, _padded_step(step, K + 1)

            return run

        return jax.lax.switch(idx, [written(p) for p in parts])

    # Each branch only reads the cache and returns its block's K/V; the one write and the
    # commit follow the switch. (Branches that wrote the cache made XLA copy every layer's K
    # and V into and out of the chosen branch on every step: tests/test_step_anatomy.py.)
    def read_only(part: AnyDraft) -> Callable[[], tuple[Verified, BlockKV, TargetStep]]:
        def run() -> tuple[Verified, BlockKV, TargetStep]:
            logits, step, kv = target_forward(params, state, part, ec, write=False)
            verified = verifier_for(part).accept(key, logits, part, sp, ec)
            return verified, pad_block(kv, K + 1), _padded_step(step, K + 1)

        return run

    verified, kv, step = jax.lax.switch(idx, [read_only(p) for p in parts])
    cache = write_kv(state.cache, kv, state.cache.lengths)
    return verified, verifier_for(draft).commit(cache, verified, ~state.done), step


# A verify forward on its own, outside the loop: what `autotune` and `specjax.storage` time.
@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("cache",))
def verify_forward(
    params: dict,
    tokens: jax.Array,
    parents: jax.Array | None,
    cache: KVCache,
    *,
    cfg: ModelConfig,
    impl: str = "xla",
) -> tuple[jax.Array, KVCache]:
    """The engine's verify forward over the block `tokens` [B, T] written at `cache.lengths`.

    `parents` None: a chain (causal mask, positions length + i; the engine's chain verifier).
    `parents` [B, T-1]: a tree whose nodes are tokens[:, 1:] under the root tokens[:, 0]
    (ancestor-or-self mask and positions built from `parents` on device, as the tree path does).
    -> (logits [B, T, V], cache with the block's K/V written; the cache is donated).
    """
    lengths, T = cache.lengths, tokens.shape[1]
    if parents is None:
        positions = lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        mask = None
    else:
        depth = tree_lib.depth_from_parents(parents)
        positions = tree_lib.block_positions(depth, lengths)
        mask = tree_lib.block_mask(parents)
    logits, _, cache = forward(params, cfg, tokens, positions, cache, block_mask=mask, impl=impl)
    return logits, cache
