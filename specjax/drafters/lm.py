"""Drafters that run a Llama-family LM autoregressively: an independent small model sharing the
target's tokenizer, and layer-skip self-speculation (the target's first layers + its head).

State per row: the drafter's own KV cache plus 1 or 2 "pending" tokens that are emitted but not
yet in that cache. After a step accepts n of K draft tokens, the cache already holds
`last, d_1 .. d_min(n, K-1)`; the pending tokens are `bonus` (or `d_K, bonus` when all K were
accepted, since d_K was never fed). The first draft forward feeds both pending slots as one
2-token block and reads the logits at the last valid one, so shapes stay static.

Tree drafters (`LMTreeBase`) keep the same state and grow a tree instead of a chain: EAGLE-2
dynamic trees (`LMTreeSpec`) or fixed Medusa / EAGLE-1 shapes from choice lists
(`LMStaticTreeSpec`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import struct

from specjax.drafters.shapes import (
    StaticShaped,
    VerifySizing,
    chain_size,
    check_dynamic_tree,
    check_static_tree,
    dynamic_pool_size,
    grow_dynamic_tree,
)
from specjax.engine.protocol import (
    Draft,
    DrafterSpec,
    TargetPrefill,
    TargetStep,
    Tree,
    TreeDraft,
    Verified,
)
from specjax.models import compute_dtype, forward, is_unrolled
from specjax.models.cache import KVCache, gather_slots, init_cache
from specjax.models.config import ModelConfig
from specjax.sampling import SamplingMode, chosen_logp, pick_token, rank_logp

if TYPE_CHECKING:
    import numpy as np


@struct.dataclass
class LMDraftState:
    cache: KVCache
    pending: jax.Array  # [B, 2] int32
    n_pending: jax.Array  # [B] int32 in {1, 2}
    len_before: jax.Array  # [B] int32 cache length before the last propose


@dataclasses.dataclass(frozen=True)
class LMDrafterSpec(DrafterSpec):
    cfg: ModelConfig | None = None  # None only in a spec built to read its k (layer_skip)
    # Layer skip: start from the target's prefill cache (its first layers computed exactly what
    # the drafter would) instead of running a separate draft prefill.
    reuse_target_cache: bool = False
    # Verify per step only the prefix worth it (None: the whole chain or tree). Chains and
    # dynamic trees set it (a tree's from `DynamicTree.sizing`); static trees verify whole.
    sizing: VerifySizing | None = None
    # A small vision-language drafter: its prefill reads its own image features
    # (`PrefillInput.draft_embeds`) at the placeholder positions.
    own_images: bool = False

    @property
    def verify_sizes(self) -> tuple:
        return (self.nodes,) if self.sizing is None else self.sizing.sizes

    def check_compatible(self, target_cfg: ModelConfig, target_dtype: np.dtype) -> None:
        if self.cfg.vocab_size != target_cfg.vocab_size:
            raise ValueError(
                f"drafter vocabulary size {self.cfg.vocab_size} differs from the target's "
                f"{target_cfg.vocab_size}: the drafter must share the target's tokenizer"
            )

    def init(self, params: dict, prefill: TargetPrefill, max_len: int) -> LMDraftState:
        B, P = prefill.tokens.shape
        if self.reuse_target_cache:
            tc = prefill.cache
            n = self.cfg.num_layers
            cache = KVCache(k=tc.k[:n], v=tc.v[:n], lengths=prefill.lengths)
        else:
            cache = init_cache(
                self.cfg, B, max_len, compute_dtype(params), per_layer=is_unrolled(params)
            )
            positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
            inp = prefill.input
            own = self.own_images and inp.draft_embeds is not None
            _, _, cache = forward(
                params,
                self.cfg,
                prefill.tokens,
                positions,
                cache,
                logits_at=jnp.zeros((B, 1), jnp.int32),
                fresh=True,
                embeds=inp.draft_embeds if own else None,
                embed_mask=inp.embed_mask if own else None,
            )
            cache = cache.replace(lengths=prefill.lengths)
        pending = jnp.stack([prefill.first, jnp.zeros_like(prefill.first)], axis=1)
        return LMDraftState(
            cache=cache,
            pending=pending,
            n_pending=jnp.ones((B,), jnp.int32),
            len_before=cache.lengths,
        )

    def _feed_pending(self, params: dict, state: LMDraftState) -> tuple[jax.Array, KVCache]:
        """Feed the 1-2 pending tokens as one 2-token block -> (draft logits [B, V] after the
        newest one (`last`), cache with the pending tokens committed)."""
        cache = state.cache
        positions = cache.lengths[:, None] + jnp.arange(2, dtype=jnp.int32)[None, :]
        logits, _, cache = forward(
            params,
            self.cfg,
            state.pending,
            positions,
            cache,
            logits_at=(state.n_pending - 1)[:, None],
        )
        return logits[:, 0], cache.replace(lengths=cache.lengths + state.n_pending)

    def propose(
        self,
        params: dict,
        state: LMDraftState,
        last: jax.Array,
        key: jax.Array,
        mode: SamplingMode,
        sp: dict,
    ) -> tuple[Draft, LMDraftState]:
        cfg, K = self.cfg, self.k
        keys = jax.random.split(key, K)
        logits, cache = self._feed_pending(params, state)
        tok, logp = pick_token(logits, keys[0], mode, sp)
        conf = chosen_logp(logits, tok, logp)

        def step(
            carry: tuple[KVCache, jax.Array], k: jax.Array
        ) -> tuple[tuple[KVCache, jax.Array], tuple[jax.Array, jax.Array | None, jax.Array]]:
            cache, tok = carry  # tok [B]
            logits, _, cache = forward(params, cfg, tok[:, None], cache.lengths[:, None], cache)
            cache = cache.replace(lengths=cache.lengths + 1)
            nxt, lp = pick_token(logits[:, 0], k, mode, sp)
            return (cache, nxt), (nxt, lp, chosen_logp(logits[:, 0], nxt, lp))

        toks, logps, confs = (
            [tok[:, None]],
            [None if logp is None else logp[:, None]],
            [conf[:, None]],
        )
        if K > 1:
            (cache, _), (rest, rest_lp, rest_conf) = jax.lax.scan(step, (cache, tok), keys[1:])
            toks.append(rest.T)  # [B, K-1]
            confs.append(rest_conf.T)
            if rest_lp is not None:
                logps.append(jnp.swapaxes(rest_lp, 0, 1))  # [B, K-1, V]
        tokens = jnp.concatenate(toks, axis=1)  # [B, K]
        draft_logp = None if mode.greedy else jnp.concatenate(logps, axis=1)
        new_state = state.replace(cache=cache, len_before=state.cache.lengths)
        size = None if self.sizing is None else chain_size(self.sizing, confs, logp)
        return Draft(tokens=tokens, logp=draft_logp, size=size), new_state

    def rewind(
        self, params: dict, state: LMDraftState, n_drop: jax.Array, last: jax.Array
    ) -> LMDraftState:
        # The sequence is the cached tokens, then the 1-2 pending ones (the newest is `last`).
        keep = state.cache.lengths + state.n_pending - n_drop  # tokens before the new `last`
        # keep == lengths + 1 only when the older pending token survives (n_pending 2, n_drop 1)
        two = keep > state.cache.lengths
        return state.replace(
            cache=state.cache.replace(lengths=jnp.minimum(keep, state.cache.lengths)),
            pending=jnp.stack(
                [jnp.where(two, state.pending[:, 0], last), jnp.where(two, last, 0)], 1
            ),
            n_pending=jnp.where(two, 2, 1).astype(jnp.int32),
        )

    def commit(
        self,
        params: dict,
        state: LMDraftState,
        draft: Draft,
        verified: Verified,
        active: jax.Array,
        target: TargetStep,
    ) -> LMDraftState:
        K = self.k
        n, bonus = verified.n, verified.bonus
        # The last draft forward fed d_{K-1}; the cache holds pending + d_1..d_{K-1}.
        kept = state.len_before + state.n_pending + jnp.minimum(n, K - 1)
        all_in = n == K
        pending = jnp.where(
            all_in[:, None],
            jnp.stack([draft.tokens[:, K - 1], bonus], axis=1),
            jnp.stack([bonus, jnp.zeros_like(bonus)], axis=1),
        )
        n_pending = jnp.where(all_in, 2, 1).astype(jnp.int32)
        lengths = jnp.where(active, kept, state.len_before)
        return state.replace(
            cache=state.cache.replace(lengths=lengths),
            pending=jnp.where(active[:, None], pending, state.pending),
            n_pending=jnp.where(active, n_pending, state.n_pending),
        )


def layer_skip_params(target_params: dict, layers: int | Sequence[int]) -> dict:
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
class LMTreeBase(LMDrafterSpec):
    """What LM tree drafters share: the state (the LM state plus where each node's K/V sits in
    the draft window), candidate ranking, feeding one depth of the tree, and the commit.

    A propose feeds the pending tokens (the cache then ends at the window base, right after
    `last`), then grows the tree depth by depth: the nodes of one depth that get children are
    fed as one block written at `write_offset` inside the window, each seeing the committed
    cache plus its own ancestors' window slots (`block_mask` [B, T, W]). `fed[b, i]` records
    node i's window offset (-1: never fed, i.e. a leaf).
    """

    is_tree = True

    def init(self, params: dict, prefill: TargetPrefill, max_len: int) -> LMTreeState:
        lm = super().init(params, prefill, max_len)
        return LMTreeState(lm=lm, fed=jnp.full((prefill.tokens.shape[0], self.k), -1, jnp.int32))

    def _feed_depth(
        self, params: dict, cache: KVCache, tok: jax.Array, depth: int, vis: jax.Array, off: int
    ) -> tuple[jax.Array, KVCache]:
        """Feed tok [B, T] (tree nodes of depth `depth`) at window offset `off`, visibility
        vis [B, T, W] -> (logits [B, T, V], cache). `cache.lengths` is the window base."""
        B, T = tok.shape
        pos = jnp.broadcast_to(cache.lengths[:, None] + (depth - 1), (B, T))
        logits, _, cache = forward(
            params,
            self.cfg,
            tok,
            pos,
            cache,
            block_mask=vis,
            write_offset=jnp.full((B,), off, jnp.int32),
        )
        return logits, cache

    def commit(
        self,
        params: dict,
        state: LMTreeState,
        draft: TreeDraft,
        verified: Verified,
        active: jax.Array,
        target: TargetStep,
    ) -> LMTreeState:
        st = state.lm
        n, bonus, path = verified.n, verified.bonus, verified.path
        fed_path = jnp.where(
            path >= 0, jnp.take_along_axis(state.fed, jnp.maximum(path, 0), axis=1), -1
        )  # [B, D]
        m = jnp.sum(fed_path >= 0, axis=1)  # fed nodes form a prefix of the path
        cache = gather_slots(st.cache, jnp.maximum(fed_path, 0), jnp.zeros_like(m))
        leaf = jnp.take_along_axis(verified.tokens, jnp.maximum(n - 1, 0)[:, None], 1)[:, 0]
        two = n > m  # the accepted leaf was never fed: it goes first in the pending block
        pending = jnp.where(
            two[:, None], jnp.stack([leaf, bonus], 1), jnp.stack([bonus, jnp.zeros_like(bonus)], 1)
        )
        kept = st.len_before + st.n_pending + m
        lm = st.replace(
            cache=cache.replace(lengths=jnp.where(active, kept, st.len_before)),
            pending=jnp.where(active[:, None], pending, st.pending),
            n_pending=jnp.where(active, jnp.where(two, 2, 1), st.n_pending).astype(jnp.int32),
        )
        return state.replace(lm=lm)


@dataclasses.dataclass(frozen=True)
class LMTreeSpec(LMTreeBase):
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

    def __post_init__(self) -> None:
        super().__post_init__()
        check_dynamic_tree(self.k, self.depth, self.top_k)

    @property
    def pool_size(self) -> int:
        return dynamic_pool_size(self.depth, self.top_k)

    @property
    def max_accept(self) -> int:
        return self.depth

    @property
    def cache_slack(self) -> int:
        return max(self.k, (self.depth - 1) * self.top_k) + 2

    def propose(
        self,
        params: dict,
        state: LMTreeState,
        last: jax.Array,
        key: jax.Array,
        mode: SamplingMode,
        sp: dict,
    ) -> tuple[TreeDraft, LMTreeState]:
        st = state.lm
        logits, cache = self._feed_pending(params, st)  # cache.lengths: base of the tree window

        def feed(
            cache: KVCache, tok: jax.Array, _feat: None, depth: int, vis: jax.Array, off: int
        ) -> tuple[jax.Array, None, KVCache]:
            logits, cache = self._feed_depth(params, cache, tok, depth, vis, off)
            return rank_logp(logits, mode, sp), None, cache

        tree, fed, cache, score = grow_dynamic_tree(
            rank_logp(logits, mode, sp),
            feed,
            cache,
            None,
            top_k=self.top_k,
            depth=self.depth,
            nodes=self.k,
        )
        lm = st.replace(cache=cache, len_before=st.cache.lengths)
        size = None if self.sizing is None else self.sizing.choose(score)
        return TreeDraft(tree=tree, size=size), LMTreeState(lm=lm, fed=fed)


@dataclasses.dataclass(frozen=True)
class LMStaticTreeSpec(StaticShaped, LMTreeBase):
    """A static tree from an LM drafter (Medusa / EAGLE-1 style choice lists).

    Node i hangs under `parents[i]` (-1: under `last`) and takes the `rank[i]`-th best token
    of the draft distribution at its parent (see
    `specjax.drafters.shapes.parents_from_choices`). Depth 1
    reads the draft's top tokens after `last`; each further depth feeds the previous depth's
    nodes that have children as one block (window mask, as in `LMTreeSpec`) and hands each
    child its parent's rank-th candidate. The shape is the same every step, so nothing but
    the tokens is traced. Children are deterministic top-k candidates: verification under
    sampling uses the exact one-hot construction (`child_logp` None).
    """

    parents: tuple = ()
    rank: tuple = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_static_tree(self.k, self.parents, self.rank)

    @property
    def cache_slack(self) -> int:
        return max(self.k, self._schedule[3]) + 2  # pending tokens + the fed window

    def check_compatible(self, target_cfg: ModelConfig, target_dtype: np.dtype) -> None:
        super().check_compatible(target_cfg, target_dtype)
        top = max(self.rank) + 1
        if top > target_cfg.vocab_size:
            raise ValueError(
                f"static tree takes the top {top} tokens, more than the "
                f"vocabulary ({target_cfg.vocab_size})"
            )

    def propose(
        self,
        params: dict,
        state: LMTreeState,
        last: jax.Array,
        key: jax.Array,
        mode: SamplingMode,
        sp: dict,
    ) -> tuple[TreeDraft, LMTreeState]:
        exps, depth, fed_off, W = self._schedule
        st = state.lm
        B, N = last.shape[0], self.k
        logits, cache = self._feed_pending(params, st)  # cache.lengths: base of the tree window
        logits = logits[:, None]  # [B, 1, V]: the root's draft distribution
        tokens = jnp.zeros((B, N), jnp.int32)
        for d, e in enumerate(exps, start=1):
            if d > 1:
                vis = jnp.broadcast_to(jnp.asarray(e.vis), (B,) + e.vis.shape)  # [B, T, W]
                logits, cache = self._feed_depth(params, cache, tokens[:, e.fed], d - 1, vis, e.off)
            _, cand = jax.lax.top_k(rank_logp(logits, mode, sp), e.top)  # [B, T, top]
            tokens = tokens.at[:, e.kids].set(cand[:, e.slot, e.rank])
        row = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.int32), (B, N))  # noqa: E731
        tree = Tree(
            tokens=tokens, parents=row(self.parents), depth=row(depth), valid=jnp.ones((B, N), bool)
        )
        lm = st.replace(cache=cache, len_before=st.cache.lengths)
        return TreeDraft(tree=tree), LMTreeState(lm=lm, fed=row(fed_off))
