"""Feature-level drafters: EAGLE-1/2 and EAGLE-3 (Li et al. 2024, 2025), drafting with the
network of `specjax.models.eagle` (one decoder layer on the target's features; its versions and
variants are described there).

- committed slots (j < target length) pair the **target's** features with the emitted tokens;
- draft slots pair the drafter's **own** previous output with the draft token it chose.

The target's embedding (and for version 1 its LM head) are bound when `generate` runs
(`specjax.models.eagle.bind_target`), never copied.

State per row: the drafter's one-layer KV cache whose committed length always equals the
target's, and `feat` = the drafter output at the last committed slot (it gives the first draft
distribution and is the input feature of the first draft token). The engine's verify forward
hands the block's target features to `commit`, which feeds the accepted path as one block of
pairs (static size: the longest accept plus the bonus, extra slots ignored).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from specjax.drafters.shapes import (
    DraftGate,
    GateState,
    StaticShaped,
    VerifySizing,
    chain_size,
    check_dynamic_tree,
    check_static_tree,
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
    no_draft,
)
from specjax.models.cache import KVCache, init_cache
from specjax.models.config import ModelConfig
from specjax.models.eagle import EagleConfig, draft_block, draft_logits, target_features
from specjax.sampling import SamplingMode, argmax, chosen_logp, pick_token, rank_logp


@struct.dataclass
class EagleState:
    cache: KVCache  # the drafter layer's cache; committed length = the target's
    feat: jax.Array  # [B, D] drafter output at the last committed slot
    gate: GateState | None = None  # with a gated sizing (`VerifySizing.gate`)
    # [B] int32: steps whose tree growth was skipped (`VerifySizing.early_exit`), else None
    skipped_growth: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class EagleSpec(DrafterSpec):
    """EAGLE drafting a chain of k tokens (each sampled from the drafter's distribution)."""

    # Both are always given to draft (None defaults: the base class's fields have defaults).
    eagle: EagleConfig | None = None
    target_cfg: ModelConfig | None = None
    # Verify per step only the prefix worth it (None: the whole chain or tree).
    sizing: VerifySizing | None = None

    @property
    def verify_sizes(self) -> tuple:
        return (self.nodes,) if self.sizing is None else self.sizing.sizes

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eagle is not None:  # the target layers the engine must return (version 3)
            layers = tuple(self.eagle.feature_layers) if self.eagle.version == 3 else ()
            object.__setattr__(self, "hidden_layers", layers)

    @property
    def cache_slack(self) -> int:
        return self.max_accept + self.k + 2  # the commit block, then the draft slots

    def check_compatible(self, target_cfg: ModelConfig, target_dtype: np.dtype) -> None:
        e = self.eagle
        if e.hidden != target_cfg.hidden_size:
            raise ValueError(
                f"EAGLE drafter hidden size {e.hidden} differs from the target's "
                f"{target_cfg.hidden_size}: it was trained for another model"
            )
        if e.version == 3 and max(e.feature_layers) > target_cfg.num_layers:
            raise ValueError(
                f"EAGLE-3 feature_layers {e.feature_layers} name layers beyond the "
                f"target's {target_cfg.num_layers}"
            )
        if e.version == 3 and e.draft_vocab > target_cfg.vocab_size:
            raise ValueError(
                f"EAGLE-3 draft vocabulary {e.draft_vocab} is larger than the "
                f"target's {target_cfg.vocab_size}"
            )
        if self.target_cfg is not None and self.target_cfg.vocab_size != target_cfg.vocab_size:
            raise ValueError(
                f"EAGLE drafter built for vocabulary {self.target_cfg.vocab_size}, "
                f"target has {target_cfg.vocab_size}"
            )

    def _logits(self, params: dict, out: jax.Array) -> jax.Array:
        return draft_logits(self.eagle, params, out, self.target_cfg)

    def _choose(
        self, params: dict, out: jax.Array, key: jax.Array, mode: SamplingMode, sp: dict
    ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        """The next chain token from output features out [B, D] -> (token, logp or None, the
        drafter's log-prob of the token [B])."""
        if self.eagle.version == 3 and mode.greedy:  # argmax on the draft vocabulary, no scatter
            small = draft_logits(self.eagle, params, out, self.target_cfg, full=False)
            tok = params["d2t"][argmax(small)].astype(jnp.int32)
            return tok, None, chosen_logp(small, tok, None)
        logits = self._logits(params, out)
        tok, logp = pick_token(logits, key, mode, sp)
        return tok, logp, chosen_logp(logits, tok, logp)

    def _feed_committed(
        self,
        params: dict,
        cache: KVCache,
        feat: jax.Array,
        tokens: jax.Array,
        last_idx: jax.Array,
        embeds: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Feed pairs (feat [B, T, D], tokens [B, T]) at the committed end of the cache; the
        first last_idx[b] + 1 are real -> (drafter output at last_idx [B, D], cache)."""
        B, T = tokens.shape
        positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        out, cache = draft_block(self.eagle, params, feat, tokens, positions, cache, embeds=embeds)
        at = jnp.take_along_axis(out, last_idx[:, None, None], axis=1)[:, 0]
        return at, cache

    def init(self, params: dict, prefill: TargetPrefill, max_len: int) -> EagleState:
        B, P = prefill.tokens.shape
        # The drafter computes in the target's dtype, whatever its matrices are stored in.
        dtype = prefill.hiddens.last.dtype
        cache = init_cache(self.eagle.layer, B, max_len, dtype, per_layer=True)
        feat = target_features(self.eagle, params, prefill.hiddens)  # [B, P, D]
        j = jnp.arange(P)[None, :]
        nxt = jnp.concatenate([prefill.tokens[:, 1:], jnp.zeros((B, 1), jnp.int32)], axis=1)
        last = (prefill.lengths - 1)[:, None]
        pair_tok = jnp.where(j == last, prefill.first[:, None], jnp.where(j < last, nxt, 0))
        embeds = None
        inp = prefill.input
        if inp.embeds is not None:
            # A VLM target's image features: slot j pairs with token j + 1, so shift them by
            # one, as vLLM's EAGLE feeds a multimodal target's projected image embeddings.
            shift = lambda a: jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)
            embeds = (shift(inp.embeds), shift(inp.embed_mask) & (j < last))
        out, cache = self._feed_committed(
            params, cache, feat, pair_tok, prefill.lengths - 1, embeds
        )
        gate = None if self._gate is None else self._gate.init(B)
        early = self.sizing is not None and self.sizing.early_exit and self.is_tree
        skipped = jnp.zeros((B,), jnp.int32) if early else None
        return EagleState(
            cache=cache.replace(lengths=prefill.lengths),
            feat=out,
            gate=gate,
            skipped_growth=skipped,
        )

    @property
    def _gate(self) -> DraftGate | None:
        return None if self.sizing is None else self.sizing.gate

    def propose(
        self,
        params: dict,
        state: EagleState,
        last: jax.Array,
        key: jax.Array,
        mode: SamplingMode,
        sp: dict,
        need: jax.Array | None = None,
    ) -> tuple[Draft | TreeDraft, EagleState]:
        """`draft`, or with a gate (`DraftGate`) nothing when it is closed: a draft of the same
        shapes asking for no verify (size 0), and the state as the last commit left it.
        `need` [B] bool: the rows that want a draft (a hybrid's model rows); when none does,
        the step drafts nothing."""
        if self._gate is None:
            return self.draft(params, state, last, key, mode, sp, need=need)
        # The draft's own cond does the skipping, after the first level's ranking: a second
        # cond around the whole draft made XLA copy the drafter's cache in the decode loop
        # every step (`anatomy.cache_copies`), as a hybrid's did.
        rows = self._gate.open_rows(state.gate)  # [B]
        rows = rows if need is None else rows & need
        draft, st = self.draft(params, state, last, key, mode, sp, need=rows)
        asked = jnp.where(jnp.any(rows), draft.size, -1)  # -1: the step did not draft
        return draft, st.replace(gate=st.gate._replace(asked=asked))

    def draft(
        self,
        params: dict,
        state: EagleState,
        last: jax.Array,
        key: jax.Array,
        mode: SamplingMode,
        sp: dict,
        need: jax.Array | None = None,
    ) -> tuple[Draft, EagleState]:
        """Draft a chain of k tokens (sized: `Draft.size` asks for the prefix worth verifying).
        `need` [B] bool: when no row needs a draft, nothing (size 0) after the first token's
        ranking, as `EagleTreeSpec.draft` does."""
        K = self.k
        keys = jax.random.split(key, K)
        tok, logp, conf = self._choose(params, state.feat, keys[0], mode, sp)
        if need is None:
            return self._chain(params, state, tok, logp, conf, keys, mode, sp)

        def full(_: None) -> tuple[Draft, EagleState]:
            return self._chain(params, state, tok, logp, conf, keys, mode, sp)

        shape = jax.eval_shape(full, None)
        return jax.lax.cond(jnp.any(need), full, lambda _: (no_draft(shape[0]), state), None)

    def _chain(
        self,
        params: dict,
        state: EagleState,
        tok: jax.Array,
        logp: jax.Array | None,
        conf: jax.Array,
        keys: jax.Array,
        mode: SamplingMode,
        sp: dict,
    ) -> tuple[Draft, EagleState]:
        """The chain after its first token (tok, logp, conf from `_choose`)."""
        K, cache = self.k, state.cache

        def step(
            carry: tuple[KVCache, jax.Array, jax.Array], k: jax.Array
        ) -> tuple[
            tuple[KVCache, jax.Array, jax.Array], tuple[jax.Array, jax.Array | None, jax.Array]
        ]:
            cache, feat, tok = carry  # feat [B, D], tok [B]
            out, cache = draft_block(
                self.eagle, params, feat[:, None], tok[:, None], cache.lengths[:, None], cache
            )
            cache = cache.replace(lengths=cache.lengths + 1)
            nxt, lp, c = self._choose(params, out[:, 0], k, mode, sp)
            return (cache, out[:, 0], nxt), (nxt, lp, c)

        toks, confs = [tok[:, None]], [conf[:, None]]
        logps = [None if logp is None else logp[:, None]]
        if K > 1:
            carry = (cache, state.feat, tok)
            (cache, _, _), (rest, rest_lp, rest_conf) = jax.lax.scan(step, carry, keys[1:])
            toks.append(rest.T)
            confs.append(rest_conf.T)
            if rest_lp is not None:
                logps.append(jnp.swapaxes(rest_lp, 0, 1))
        # The draft slots are scratch after the committed length, which does not move: the next
        # commit overwrites them with the accepted path's target features.
        draft_logp = None if mode.greedy else jnp.concatenate(logps, axis=1)
        size = None if self.sizing is None else chain_size(self.sizing, confs, logp)
        draft = Draft(tokens=jnp.concatenate(toks, axis=1), logp=draft_logp, size=size)
        return draft, state.replace(cache=cache.replace(lengths=state.cache.lengths))

    def commit(
        self,
        params: dict,
        state: EagleState,
        draft: Draft | TreeDraft,
        verified: Verified,
        active: jax.Array,
        target: TargetStep,
    ) -> EagleState:
        """Feed the accepted path as pairs (the target's feature at block offset i, the token
        after it): offset 0 is `last`, offset i + 1 the path's i-th node; the pair at offset n
        holds the bonus token. Chains and trees alike (a chain's path is 0, 1, ..)."""
        feats = target_features(self.eagle, params, target.hiddens)  # [B, T, D]
        n, path = verified.n, verified.path
        idx = jnp.concatenate([jnp.zeros_like(path[:, :1]), jnp.maximum(path, -1) + 1], 1)
        path_feats = jnp.take_along_axis(feats, idx[:, :, None], axis=1)  # [B, A+1, D]
        B, A1 = path_feats.shape[:2]
        i = jnp.arange(A1)[None, :]
        path_tok = jnp.concatenate([verified.tokens, jnp.zeros((B, 1), jnp.int32)], axis=1)
        pair_tok = jnp.where(
            i < n[:, None], path_tok, jnp.where(i == n[:, None], verified.bonus[:, None], 0)
        )
        out, cache = self._feed_committed(params, state.cache, path_feats, pair_tok, n)
        lengths = jnp.where(active, state.cache.lengths + n + 1, state.cache.lengths)
        feat = jnp.where(active[:, None], out, state.feat)
        gate = state.gate
        if gate is not None:  # what this step paid, by the size this drafter asked for
            cost = self.sizing.step_cost(jnp.maximum(gate.asked, 0), active)
            gate = self._gate.update(gate, n + 1, cost, active)
        return state.replace(cache=cache.replace(lengths=lengths), feat=feat, gate=gate)

    def stats(self, state: EagleState, rows: int) -> dict:
        from specjax.sharding import to_host

        out = {}
        if state.gate is not None:
            out["draft_skipped_steps"] = int(to_host(state.gate.skipped)[:rows].sum())
        if state.skipped_growth is not None:  # a batch-wide choice: every row counts it
            out["tree_growth_skipped_steps"] = int(to_host(state.skipped_growth)[:rows].max())
        return out


@dataclasses.dataclass(frozen=True)
class EagleTreeSpec(EagleSpec):
    """EAGLE-2: a dynamic tree grown from the drafter's confidence (see
    `specjax.drafters.shapes.grow_dynamic_tree`), every node drafting from its parent's output
    feature. Children are deterministic top-k candidates, so verification under sampling uses
    the exact one-hot construction (no `child_logp`)."""

    depth: int = 4
    top_k: int = 4

    is_tree = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_dynamic_tree(self.k, self.depth, self.top_k)

    @property
    def max_accept(self) -> int:
        return self.depth

    @property
    def cache_slack(self) -> int:
        return max(self.depth + 1, (self.depth - 1) * self.top_k) + 2

    def draft(
        self,
        params: dict,
        state: EagleState,
        last: jax.Array,
        key: jax.Array,
        mode: SamplingMode,
        sp: dict,
        need: jax.Array | None = None,
    ) -> tuple[TreeDraft, EagleState]:
        """Grow the dynamic tree (sized: `TreeDraft.size` asks for the prefix worth it).
        `need` [B] bool (a hybrid's rows that take the model's tree): when no row needs it,
        the step drafts nothing (size 0) after the root's ranking."""
        B = last.shape[0]

        # Rank candidates over the drafter's own vocabulary (version 3: 4096 of 49152 ids)
        # and map the winners to target ids, instead of scattering every node's logits into
        # the target vocabulary: any candidate ranking keeps verification exact.
        small = self.eagle.version == 3
        token_map = params["d2t"] if small else None

        def rank(out: jax.Array) -> jax.Array:
            logits = draft_logits(self.eagle, params, out, self.target_cfg, full=not small)
            return rank_logp(logits, mode, sp)

        def feed(
            cache: KVCache, tok: jax.Array, feat: jax.Array, depth: int, vis: jax.Array, off: int
        ) -> tuple[jax.Array, jax.Array, KVCache]:
            pos = jnp.broadcast_to(cache.lengths[:, None] + (depth - 1), tok.shape)
            out, cache = draft_block(
                self.eagle,
                params,
                feat,
                tok,
                pos,
                cache,
                block_mask=vis,
                write_offset=jnp.full((B,), off, jnp.int32),
            )
            return rank(out), out, cache

        root = rank(state.feat)

        def grow(_: None) -> tuple[TreeDraft, EagleState]:
            tree, _, cache, score = grow_dynamic_tree(
                root,
                feed,
                state.cache,
                state.feat,
                top_k=self.top_k,
                depth=self.depth,
                nodes=self.k,
                token_map=token_map,
            )
            # The window's K/V are scratch (`lengths` did not move): commit re-feeds the
            # accepted path with the target's features.
            size = None if self.sizing is None else self.sizing.choose(score)
            return TreeDraft(tree=tree, size=size), state.replace(cache=cache)

        early = self.sizing is not None and self.sizing.early_exit
        if need is None and not early:
            return grow(None)
        shape = jax.eval_shape(grow, None)
        rows_wanting = jnp.ones((B,), bool) if need is None else need

        def plain(_: None) -> tuple[TreeDraft, EagleState]:
            # No row's first level promises a draft worth verifying (or no row needs one): a
            # plain step (size 0) without the deeper levels' drafter forwards (the state is as
            # the commit left it). This one `lax.cond` is where every skip of the growth goes:
            # a second cond around the whole propose (a hybrid's chain-only steps) made XLA
            # copy the drafter's cache in the loop every step (`anatomy.cache_copies`).
            nothing = no_draft(shape[0])
            if state.skipped_growth is None:
                return nothing, state
            # counted when some row wanted a draft and the early exit said no
            wanted = jnp.any(rows_wanting).astype(jnp.int32)
            return nothing, state.replace(skipped_growth=state.skipped_growth + wanted)

        rows = rows_wanting
        if early:
            top = jnp.exp(jnp.max(root, axis=-1))  # [B] the best first-level candidate
            rows = rows & self.sizing.worth_growing(top)
        return jax.lax.cond(jnp.any(rows), grow, plain, None)


@dataclasses.dataclass(frozen=True)
class EagleStaticTreeSpec(StaticShaped, EagleSpec):
    """A static tree (a Medusa / EAGLE-1 choice list, `StaticTree`) drafted by an EAGLE drafter:
    node i hangs under `parents[i]` (-1: under `last`) and every node drafts from its parent's
    output feature, depth by depth (each depth's fed nodes one block, window mask as in
    `EagleTreeSpec`).

    Greedy: node i takes the `rank[i]`-th best token of its parent's draft distribution
    (deterministic candidates). Sampling: each fed position's children are *drawn without
    replacement* from the drafter's processed law q (the temperature / top-k / top-p of the
    target's sampling; Gumbel-top-k, so rank r is the r-th draw), and the draft carries q
    (`TreeDraft.child_logp`). The verifier then tests each sibling against the law it was
    drawn from (q less the earlier siblings' tokens; `engine.accept.verify_tree_sampling`),
    which is exact because (1) the tree's shape is fixed before any token is drawn (a shape or
    verify size chosen from drawn tokens would bias the output, as sized chains did), and (2)
    siblings are tried in the order drawn with ranks 0, 1, .. (checked here): a rank-2 sibling
    without its rank-1 one would be a draw whose law the verifier does not know.

    Where q is sure (high confidence) top-k candidates and draws coincide; where it is
    spread, draws follow the target's own law more closely than the top-k list does, which is
    what raises acceptance at temperature > 0 (SpecInfer; Jeon et al. 2024).
    """

    parents: tuple = ()
    rank: tuple = ()

    is_tree = True
    siblings_without_replacement = True  # Gumbel-top-k draws

    def __post_init__(self) -> None:
        super().__post_init__()
        check_static_tree(self.k, self.parents, self.rank)
        if self.sizing is not None:
            raise ValueError(
                "a static EAGLE tree verifies all its nodes (sizing=None): its sampled children "
                "would bias any size chosen after they were drawn"
            )
        kids: dict = {}
        for p, r in zip(self.parents, self.rank):
            kids.setdefault(p, []).append(r)
        for p, ranks in kids.items():
            if ranks != list(range(len(ranks))):
                where = "the root" if p < 0 else f"node {p}"
                raise ValueError(
                    f"the children of {where} have ranks {ranks}: a static EAGLE tree needs "
                    f"ranks 0, 1, .. in order under every node (sampled siblings are verified "
                    f"in the order they were drawn)"
                )

    @property
    def cache_slack(self) -> int:
        return max(self.max_accept + 1, self._schedule[3]) + 2  # the commit block or the window

    def draft(
        self,
        params: dict,
        state: EagleState,
        last: jax.Array,
        key: jax.Array,
        mode: SamplingMode,
        sp: dict,
        need: jax.Array | None = None,
    ) -> tuple[TreeDraft, EagleState]:
        """Draft the tree (`need` [B] bool: when no row needs it, nothing after the root's law,
        as `EagleTreeSpec.draft`)."""
        exps, depth, _, _ = self._schedule
        B, N = last.shape[0], self.k
        keys = jax.random.split(key, len(exps))
        # EAGLE-3 draws on its own vocabulary (4096 of SmolLM2's 49152 ids: the Gumbel noise
        # and the top-k read 12x less) and maps the draws to target ids; its law over the
        # target's vocabulary is the same one, -inf outside the draft vocabulary.
        small = self.eagle.version == 3
        V = self.target_cfg.vocab_size

        def law(out: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V'] log q, drafting ids
            logits = draft_logits(self.eagle, params, out, self.target_cfg, full=not small)
            return rank_logp(logits, mode, sp)

        def target_ids(lq: jax.Array) -> jax.Array:  # log q [B, T, V'] -> [B, T, V]
            if not small:
                return lq
            return jnp.full(lq.shape[:-1] + (V,), -jnp.inf, lq.dtype).at[..., params["d2t"]].set(lq)

        root = law(state.feat[:, None])  # [B, 1, V']

        def grow(_: None) -> tuple[TreeDraft, EagleState]:
            cache = state.cache
            tokens = jnp.zeros((B, N), jnp.int32)
            valid = jnp.ones((B, N), bool)
            # q at block offset 0 (`last`) and i + 1 (node i); leaves keep the root's (unread).
            child_logp = None if mode.greedy else jnp.broadcast_to(target_ids(root), (B, N + 1, V))
            outs = jnp.zeros((B, N) + state.feat.shape[1:], state.feat.dtype)
            lq = root
            for d, e in enumerate(exps, start=1):
                if d > 1:  # depth d - 1's nodes with children, each on its parent's output
                    par = np.asarray(self.parents)[e.fed]
                    feat = jnp.where(
                        jnp.asarray(par < 0)[None, :, None],
                        state.feat[:, None],
                        outs[:, np.maximum(par, 0)],
                    )
                    pos = jnp.broadcast_to(cache.lengths[:, None] + (d - 2), (B, len(e.fed)))
                    out, cache = draft_block(
                        self.eagle,
                        params,
                        feat,
                        tokens[:, e.fed],
                        pos,
                        cache,
                        block_mask=jnp.broadcast_to(jnp.asarray(e.vis), (B,) + e.vis.shape),
                        write_offset=jnp.full((B,), e.off, jnp.int32),
                    )
                    outs = outs.at[:, e.fed].set(out)
                    lq = law(out)  # [B, T, V']
                    if child_logp is not None:
                        child_logp = child_logp.at[:, e.fed + 1].set(target_ids(lq))
                # Greedy: the top candidates. Sampling: draws without replacement (Gumbel-top-k).
                noise = 0.0 if mode.greedy else jax.random.gumbel(keys[d - 1], lq.shape)
                _, cand = jax.lax.top_k(lq + noise, e.top)  # [B, T, top]
                kid = cand[:, e.slot, e.rank]  # [B, C] drafting ids
                kid_lq = jnp.take_along_axis(lq[:, e.slot], kid[:, :, None], axis=2)[:, :, 0]
                kid = params["d2t"][kid] if small else kid
                tokens = tokens.at[:, e.kids].set(kid.astype(jnp.int32))
                # a draw past q's support (fewer tokens than siblings) is no candidate
                valid = valid.at[:, e.kids].set(kid_lq > -jnp.inf)
            row = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.int32), (B, N))  # noqa: E731
            tree = Tree(tokens=tokens, parents=row(self.parents), depth=row(depth), valid=valid)
            # The window's K/V are scratch (`lengths` did not move), as in `EagleTreeSpec`.
            # With `need`, a size (all nodes), so that the skipping branch's size 0 is a plain step.
            size = None if need is None else jnp.full((B,), N, jnp.int32)
            draft = TreeDraft(tree=tree, child_logp=child_logp, size=size)
            return draft, state.replace(cache=cache)

        if need is None:
            return grow(None)
        shape = jax.eval_shape(grow, None)
        return jax.lax.cond(jnp.any(need), grow, lambda _: (no_draft(shape[0]), state), None)
