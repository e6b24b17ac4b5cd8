"""Drafters that run a Llama-family LM autoregressively: an independent small model sharing the
target's tokenizer, and layer-skip self-speculation (the target's first layers + its head).

State per row: the drafter's own KV cache plus 1 or 2 "pending" tokens that are emitted but not
yet in that cache. After a step accepts n of K draft tokens, the cache already holds
`last, d_1 .. d_min(n, K-1)`; the pending tokens are `bonus` (or `d_K, bonus` when all K were
accepted, since d_K was never fed). The first draft forward feeds both pending slots as one
2-token block and reads the logits at the last valid one, so shapes stay static.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from specjax.drafters.base import Draft, DrafterSpec, TargetPrefill
from specjax.models.cache import KVCache, init_cache
from specjax.models.config import ModelConfig
from specjax.models.llama import forward
from specjax.sampling import SamplingMode, process_logits


@struct.dataclass
class LMDraftState:
    cache: KVCache
    pending: jax.Array  # [B, 2] int32
    n_pending: jax.Array  # [B] int32 in {1, 2}
    len_before: jax.Array  # [B] int32 cache length before the last propose


def _pick(logits: jax.Array, key, mode: SamplingMode, sp):
    """-> (token [B], processed log-probs [B, V] or None when greedy)."""
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    logp = process_logits(logits, mode, sp)
    return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32), logp


@dataclasses.dataclass(frozen=True)
class LMDrafterSpec(DrafterSpec):
    cfg: ModelConfig = None
    # Layer skip: start from the target's prefill cache (its first layers computed exactly what
    # the drafter would) instead of running a separate draft prefill.
    reuse_target_cache: bool = False

    kind = "model"

    def check_compatible(self, target_cfg: ModelConfig, target_dtype) -> None:
        if self.cfg.vocab_size != target_cfg.vocab_size:
            raise ValueError(
                f"drafter vocabulary size {self.cfg.vocab_size} differs from the target's "
                f"{target_cfg.vocab_size}: the drafter must share the target's tokenizer")

    def init(self, params, prefill: TargetPrefill, max_len: int) -> LMDraftState:
        B, P = prefill.tokens.shape
        if self.reuse_target_cache:
            tc = prefill.cache
            n = self.cfg.num_layers
            cache = KVCache(k=tc.k[:n], v=tc.v[:n], lengths=prefill.lengths)
        else:
            cache = init_cache(self.cfg, B, max_len, params["embed"].dtype)
            positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
            _, _, cache = forward(params, self.cfg, prefill.tokens, positions, cache,
                                  logits_at=jnp.zeros((B, 1), jnp.int32))
            cache = cache.replace(lengths=prefill.lengths)
        pending = jnp.stack([prefill.first, jnp.zeros_like(prefill.first)], axis=1)
        return LMDraftState(cache=cache, pending=pending, n_pending=jnp.ones((B,), jnp.int32),
                            len_before=cache.lengths)

    def propose(self, params, state: LMDraftState, last, key, mode, sp):
        cfg, K = self.cfg, self.k
        cache = state.cache
        B = last.shape[0]
        keys = jax.random.split(key, K)
        positions = cache.lengths[:, None] + jnp.arange(2, dtype=jnp.int32)[None, :]
        logits, _, cache = forward(params, cfg, state.pending, positions, cache,
                                   logits_at=(state.n_pending - 1)[:, None])
        cache = cache.replace(lengths=cache.lengths + state.n_pending)
        tok, logp = _pick(logits[:, 0], keys[0], mode, sp)

        def step(carry, k):
            cache, tok = carry
            logits, _, cache = forward(params, cfg, tok[:, None], cache.lengths[:, None], cache)
            cache = cache.replace(lengths=cache.lengths + 1)
            nxt, lp = _pick(logits[:, 0], k, mode, sp)
            return (cache, nxt), (nxt, lp)

        toks, logps = [tok[:, None]], [None if logp is None else logp[:, None]]
        if K > 1:
            (cache, _), (rest, rest_lp) = jax.lax.scan(step, (cache, tok), keys[1:])
            toks.append(rest.T)  # [B, K-1]
            if rest_lp is not None:
                logps.append(jnp.swapaxes(rest_lp, 0, 1))  # [B, K-1, V]
        tokens = jnp.concatenate(toks, axis=1)  # [B, K]
        draft_logp = None if mode.greedy else jnp.concatenate(logps, axis=1)
        new_state = state.replace(cache=cache, len_before=state.cache.lengths)
        return Draft(tokens=tokens, logp=draft_logp), new_state

    def commit(self, params, state: LMDraftState, draft, acc, active, target):
        K = self.k
        # The last draft forward fed d_{K-1}; the cache holds pending + d_1..d_{K-1}.
        kept = state.len_before + state.n_pending + jnp.minimum(acc.n, K - 1)
        all_in = acc.n == K
        pending = jnp.where(all_in[:, None],
                            jnp.stack([draft.tokens[:, K - 1], acc.bonus], axis=1),
                            jnp.stack([acc.bonus, jnp.zeros_like(acc.bonus)], axis=1))
        n_pending = jnp.where(all_in, 2, 1).astype(jnp.int32)
        lengths = jnp.where(active, kept, state.len_before)
        return state.replace(
            cache=state.cache.replace(lengths=lengths),
            pending=jnp.where(active[:, None], pending, state.pending),
            n_pending=jnp.where(active, n_pending, state.n_pending))


def layer_skip_params(target_params: dict, layers) -> dict:
    """The target's first `layers` layers (or the chosen subset) with its final norm and head."""
    idx = jnp.arange(layers) if isinstance(layers, int) else jnp.asarray(tuple(layers))
    out = {k: v for k, v in target_params.items() if k != "layers"}
    out["layers"] = jax.tree.map(lambda x: x[idx], target_params["layers"])
    return out
