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
from specjax.models.llama import forward, is_unrolled
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
            cache = init_cache(self.cfg, B, max_len, params["embed"].dtype,
                               per_layer=is_unrolled(params))
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
    idx = list(range(layers)) if isinstance(layers, int) else [int(i) for i in layers]
    out = {k: v for k, v in target_params.items() if k != "layers"}
    if is_unrolled(target_params):  # per-layer dicts: share the target's arrays, no copy
        out["layers"] = [target_params["layers"][i] for i in idx]
    else:
        out["layers"] = jax.tree.map(lambda x: x[jnp.asarray(idx)], target_params["layers"])
    return out


@struct.dataclass
class LMTreeState:
    lm: LMDraftState
    fed: jax.Array  # [B, N] window offset where each proposed node's K/V sits (-1: not fed)


@dataclasses.dataclass(frozen=True)
class LMTreeSpec(LMDrafterSpec):
    """EAGLE-2 style dynamic tree from an LM drafter (Li et al. 2024, "EAGLE-2").

    Depth 1 takes the `top_k` best tokens of the draft distribution after `last`. Each further
    depth feeds the current frontier (`top_k` nodes) as one block with a tree mask, expands
    every frontier node by its `top_k` best tokens, and keeps the `top_k` expansions with the
    highest cumulative draft log-probability as the next frontier. Finally the `k` nodes with
    the highest cumulative log-probability over everything expanded form the tree. A child
    never scores above its parent (log-probs are <= 0) and ties rank the earlier-expanded
    parent first, so the kept set always contains every kept node's ancestors.

    Children are deterministic (top-k) candidates, so verification under sampling uses the
    one-hot construction (accept x with probability p(x), else remove x from p), which is exact
    for any candidate list chosen independently of the target's randomness.
    """

    depth: int = 4
    top_k: int = 4

    kind = "model_tree"
    is_tree = True

    def __post_init__(self):
        super().__post_init__()
        if self.depth < 1 or self.top_k < 1:
            raise ValueError(f"tree depth and top_k must be >= 1, got depth={self.depth}, "
                             f"top_k={self.top_k}")
        if self.k > self.pool_size:
            raise ValueError(f"a tree of {self.k} nodes needs more candidates than depth="
                             f"{self.depth}, top_k={self.top_k} expand ({self.pool_size})")

    @property
    def pool_size(self) -> int:
        return self.top_k + (self.depth - 1) * self.top_k ** 2

    @property
    def max_accept(self) -> int:
        return self.depth

    @property
    def cache_slack(self) -> int:
        return max(self.k, (self.depth - 1) * self.top_k) + 2

    def init(self, params, prefill: TargetPrefill, max_len: int) -> LMTreeState:
        lm = super().init(params, prefill, max_len)
        return LMTreeState(lm=lm, fed=jnp.full((prefill.tokens.shape[0], self.k), -1, jnp.int32))

    def _rank_logp(self, logits, mode, sp):
        # Rank candidates by the draft distribution that sampling would use.
        return jax.nn.log_softmax(logits, -1) if mode.greedy else process_logits(logits, mode, sp)

    def propose(self, params, state: LMTreeState, last, key, mode, sp):
        from specjax.drafters.base import TreeDraft
        from specjax.tree import Tree

        cfg, kk, D, N = self.cfg, self.top_k, self.depth, self.k
        st = state.lm
        cache = st.cache
        B = last.shape[0]
        positions = cache.lengths[:, None] + jnp.arange(2, dtype=jnp.int32)[None, :]
        logits, _, cache = forward(params, cfg, st.pending, positions, cache,
                                   logits_at=(st.n_pending - 1)[:, None])
        cache = cache.replace(lengths=cache.lengths + st.n_pending)  # base of the tree window
        score, tok = jax.lax.top_k(self._rank_logp(logits[:, 0], mode, sp), kk)  # [B, kk]
        pool_tok, pool_score = [tok], [score]
        pool_parent = [jnp.full((B, kk), -1, jnp.int32)]
        pool_depth = [jnp.ones((B, kk), jnp.int32)]
        fed_ids, fed_offs = [], []  # pool ids of each fed frontier and their window offsets
        front_idx = jnp.broadcast_to(jnp.arange(kk, dtype=jnp.int32), (B, kk))  # pool ids
        W = max((D - 1) * kk, 1)
        front_vis = jnp.zeros((B, kk, W), bool)  # window slots each frontier node may see
        for d in range(2, D + 1):
            off = (d - 2) * kk
            own = jax.nn.one_hot(off + jnp.arange(kk), W, dtype=bool)  # [kk, W]
            vis = front_vis | own[None]
            pos = jnp.broadcast_to(cache.lengths[:, None] + (d - 2), (B, kk))
            logits, _, cache = forward(params, cfg, tok, pos, cache, block_mask=vis,
                                       write_offset=jnp.full((B,), off, jnp.int32))
            fed_ids.append(front_idx)
            fed_offs.append(jnp.broadcast_to(off + jnp.arange(kk, dtype=jnp.int32), (B, kk)))
            child_lp, child_tok = jax.lax.top_k(self._rank_logp(logits, mode, sp), kk)  # [B,kk,kk]
            cum = (score[:, :, None] + child_lp).reshape(B, kk * kk)
            base = kk + (d - 2) * kk * kk
            pool_tok.append(child_tok.reshape(B, kk * kk))
            pool_score.append(cum)
            pool_parent.append(jnp.repeat(front_idx, kk, axis=1))
            pool_depth.append(jnp.full((B, kk * kk), d, jnp.int32))
            score, pick = jax.lax.top_k(cum, kk)  # next frontier
            tok = jnp.take_along_axis(child_tok.reshape(B, kk * kk), pick, axis=1)
            front_idx = base + pick
            front_vis = jnp.take_along_axis(vis, (pick // kk)[:, :, None], axis=1)
        cat = lambda xs: jnp.concatenate(xs, axis=1)  # noqa: E731
        p_tok, p_score, p_parent, p_depth = map(cat, (pool_tok, pool_score, pool_parent, pool_depth))
        # Only the frontiers of depths 1..D-1 were fed (their K/V sit in the window); the
        # other candidates are leaves.
        p_fed = jnp.full(p_tok.shape, -1, jnp.int32)
        if fed_ids:
            p_fed = p_fed.at[jnp.arange(B)[:, None], cat(fed_ids)].set(cat(fed_offs))
        # Keep the N best (stable: ties keep pool order, parents before children), then list
        # them in pool order, which is topological.
        keep = jnp.sort(jnp.argsort(-p_score, axis=1, stable=True)[:, :N], axis=1)  # [B, N]
        take = lambda x: jnp.take_along_axis(x, keep, axis=1)  # noqa: E731
        node_of = jnp.full((B, p_tok.shape[1]), -1, jnp.int32).at[
            jnp.arange(B)[:, None], keep].set(jnp.arange(N, dtype=jnp.int32)[None, :])
        par_pool = take(p_parent)
        parents = jnp.where(par_pool >= 0, jnp.take_along_axis(
            node_of, jnp.maximum(par_pool, 0), axis=1), -1)
        tree = Tree(tokens=take(p_tok), parents=parents, depth=take(p_depth),
                    valid=take(p_score) > -jnp.inf)
        lm = st.replace(cache=cache, len_before=st.cache.lengths)
        return TreeDraft(tree=tree), LMTreeState(lm=lm, fed=take(p_fed))

    def commit(self, params, state: LMTreeState, draft, acc, active, target):
        from specjax.models.cache import gather_slots

        st = state.lm
        fed_path = jnp.where(acc.path >= 0, jnp.take_along_axis(
            state.fed, jnp.maximum(acc.path, 0), axis=1), -1)  # [B, D]
        m = jnp.sum(fed_path >= 0, axis=1)  # fed nodes form a prefix of the path
        cache = gather_slots(st.cache, jnp.maximum(fed_path, 0), jnp.zeros_like(m))
        leaf = jnp.take_along_axis(draft.tree.tokens, jnp.maximum(acc.node, 0)[:, None], 1)[:, 0]
        two = acc.n > m  # the accepted leaf was never fed: it goes first in the pending block
        pending = jnp.where(two[:, None], jnp.stack([leaf, acc.bonus], 1),
                            jnp.stack([acc.bonus, jnp.zeros_like(acc.bonus)], 1))
        kept = st.len_before + st.n_pending + m
        lm = st.replace(
            cache=cache.replace(lengths=jnp.where(active, kept, st.len_before)),
            pending=jnp.where(active[:, None], pending, st.pending),
            n_pending=jnp.where(active, jnp.where(two, 2, 1), st.n_pending).astype(jnp.int32))
        return state.replace(lm=lm)
