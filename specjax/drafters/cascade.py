"""Vertical cascades: A drafts for B, B drafts for the target (and deeper: A -> B -> C -> target).

`cascade([A, B])` is a chain drafter whose draft comes from B, an LM drafter (`small_model`,
`layer_skip`), decoded speculatively with A as B's own drafter: each inner round A proposes a
chain continuing B's newest token, B scores [newest, a_1 .. a_kA] in one block forward of its
own cache and accepts by the exact rule (`verify_chain`: greedy argmax, or speculative sampling
against A's distribution), then adds its bonus token. Rounds repeat until every row holds at
least k + 1 of B's tokens; the first k are the draft the target verifies.

Why the target's check stays exact. Speculative decoding of B is lossless: the tokens it emits
are distributed exactly as B sampling one token at a time, so conditionally on the tokens
before it, draft token i follows q_B(. | d_<i), B's processed distribution at that position.
Those rows (from B's verify forward) are the draft's `logp`, and the target runs ordinary
speculative sampling against them. Greedy: B's emitted tokens are B's greedy continuation.

State. B's cache holds every token before the newest one (`last`, not yet fed); the lower
level's state follows the same sequence as the cascade at its level. After the target accepts
n of the k draft tokens, B keeps [last, d_1 .. d_n] (all in its cache: at least k + 1 tokens were
emitted, so d_1 .. d_k were fed) and the lower level drops what the target rejected with
`rewind`. A cascade can itself be the lower level of another (`rewind` below), which is how
depth >= 3 works: cascade([A, B, C]) = cascade([cascade([A, B]), C]).

The lower level may be any chain drafter with `rewind` (n-gram, small model, layer skip, or a
cascade) that reads no target features; the upper level is an LM chain drafter, or at the top of
a cascade an EAGLE chain drafter (below).

An EAGLE top level (`cascade([ngram, eagle3])`, `cascade([ngram, layer_skip, eagle3])`). Its
network pairs each token with the feature before it: the target's feature for committed tokens,
its own previous output for drafted ones, so the law of draft token i + 1 needs the output at
token i: a chain is sequential. A block of the lower level's tokens is scored by Jacobi passes
(`eagle_block`): pass 1 feeds every slot the pending slot's feature, pass m feeds slot i the
output of pass m - 1 at slot i - 1. Slot i's output is the sequential one from pass i + 1 on, so
`passes` >= the block's length gives the EAGLE chain's own law; fewer passes give another law,
still a function of the tokens before each slot (causal attention, features from earlier slots
only), which is all the exact check needs: each emitted token follows the law computed at its
slot, and that law is what the target is told. The EAGLE state follows the target: the pending
slot (the feature before `last`, and `last`) is re-fed at the start of every round, and the
commit feeds the accepted path with the target's features (as the EAGLE drafter's own commit).
Such a cascade reads the target's features, so it cannot be the lower level of another.

Lenient levels (`leniency` l > 1; CS Drafting's lenient reviewers, made exact at any
temperature). B accepts the lower level's token x with probability min(1, l p_B(x) / q(x))
instead of min(1, p_B(x) / q(x)) (greedy: when p_B(x) >= max p_B / l) and on rejection draws
from r = norm(max(p_B - q, 0)). B's emitted token then follows
    pi(x) = min(q(x), l p_B(x)) + (1 - sum_y min(q(y), l p_B(y))) r(x),
which is p_B only when l = 1. The law of each emitted token is what the target's check must be
told, so B hands the target pi (computed on device from q and p_B at that position) for tokens
from a lenient check, and p_B for its bonus token: the target's speculative sampling against
the law the draft really follows keeps the final output exactly the target's. More of the lower
level's draft survives per B forward; the target accepts B's draft a little less often.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import struct

from specjax.drafters.feature import EagleSpec, EagleTreeSpec
from specjax.drafters.lm import LMDrafterSpec
from specjax.engine.accept import Accepted, verify_chain
from specjax.engine.protocol import (
    Draft,
    Drafter,
    DrafterSpec,
    Params,
    TargetPrefill,
    TargetStep,
    Verified,
)
from specjax.models import forward
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.eagle import draft_block, draft_logits, target_features
from specjax.sampling import SamplingMode, argmax, process_logits

if TYPE_CHECKING:
    import numpy as np

    from specjax.model import Model


@struct.dataclass
class CascadeState:
    lower: Any  # the lower level's state (its sequence: the cascade's)
    cache: KVCache  # the upper model's cache: every token before `last`
    len_before: jax.Array  # [B] int32 upper cache length when the last propose began
    count: jax.Array  # [B] int32 tokens the last propose emitted (>= k + 1)
    last: jax.Array  # [B] int32 `last` of the last propose
    # Statistics of this level (the upper model checking the lower level's drafts), per row:
    # [B, 3] int32 (upper forwards, lower tokens drafted, of them accepted; batch first like
    # every per-row leaf, so `generate_pmap` can merge devices into rows); `step` holds the
    # last propose's, added to `total` for the rows active in the target's step.
    step: jax.Array
    total: jax.Array
    # An EAGLE top level: [B, D] the feature paired with `last` (the target's feature of the
    # token before it), the input of the slot every round starts with. None for an LM top.
    feat: jax.Array | None = None


@struct.dataclass
class _Carry:
    lower: Any
    cache: KVCache
    last: jax.Array  # [B] newest emitted token (not in the upper cache)
    count: jax.Array  # [B] tokens emitted so far
    stats: jax.Array  # [B, 3] rounds, drafted, accepted (live rows)
    tokens: jax.Array  # [B, W] emitted tokens
    logp: jax.Array | None  # [B, W, V] the upper level's processed log-probs at each one
    rounds: jax.Array  # [] int32
    feat: jax.Array | None  # [B, D] an EAGLE top level: the feature paired with `last`


@dataclasses.dataclass(frozen=True)
class CascadeSpec(DrafterSpec):
    lower: DrafterSpec | None = None
    upper: LMDrafterSpec | EagleSpec | None = None
    label: str = ""  # "lower > upper" drafter names, for statistics
    leniency: float = 1.0  # >= 1; > 1: this level accepts the lower draft leniently (above)
    # An EAGLE top level: Jacobi passes over a block of the lower level's draft (None: one per
    # block slot, the EAGLE chain's own law; see the module docstring).
    passes: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_leniency(self.leniency)
        if self.passes is not None:
            check_passes(self.passes)
        if self.upper is not None:  # an EAGLE-3 top level reads the target's layers
            object.__setattr__(self, "hidden_layers", self.upper.hidden_layers)

    @property
    def feature_top(self) -> bool:
        """The top level is an EAGLE drafter: it reads the target's features."""
        return isinstance(self.upper, EagleSpec)

    @property
    def n_passes(self) -> int:
        return self.lower.k + 1 if self.passes is None else min(self.passes, self.lower.k + 1)

    @property
    def vocab_size(self) -> int:
        up = self.upper
        return up.target_cfg.vocab_size if self.feature_top else up.cfg.vocab_size

    @property
    def width(self) -> int:
        """Emitted-token buffer: a round starts below k + 1 and adds at most lower.k + 1."""
        return self.k + self.lower.k + 1

    @property
    def cache_slack(self) -> int:
        # The upper cache runs up to width - 1 slots past the committed tokens plus a block of
        # lower.k + 1; the lower level's sequence grows by up to width, plus its own slack.
        return self.width + self.lower.k + 2 + self.lower.cache_slack

    def check_compatible(self, target_cfg: ModelConfig, target_dtype: np.dtype) -> None:
        self.upper.check_compatible(target_cfg, target_dtype)

    def init(self, params: Params, prefill: TargetPrefill, max_len: int) -> CascadeState:
        up = self.upper.init(params["upper"], prefill, max_len)  # cache: the prompt; first pending
        feat, cache = None, up.cache
        if self.feature_top:
            # The EAGLE state holds the prompt's slots up to (f_{P-1}, first); as a top level the
            # last of them is the pending slot, re-fed by the first round.
            cache = cache.replace(lengths=prefill.lengths - 1)
            feats = target_features(self.upper.eagle, params["upper"], prefill.hiddens)
            feat = jnp.take_along_axis(feats, cache.lengths[:, None, None], axis=1)[:, 0]
        lower_prefill = TargetPrefill(
            input=prefill.input,
            first=prefill.first,
            cache=prefill.cache if self.feature_top else up.cache,
            hiddens=None,
        )
        lower = self.lower.init(params["lower"], lower_prefill, max_len)
        B = prefill.first.shape[0]
        zeros = jnp.zeros((B,), jnp.int32)
        return CascadeState(
            lower=lower,
            cache=cache,
            feat=feat,
            len_before=cache.lengths,
            count=zeros,
            last=zeros,
            step=jnp.zeros((B, 3), jnp.int32),
            total=jnp.zeros((B, 3), jnp.int32),
        )

    def _round(
        self, params: Params, c: _Carry, key: jax.Array, mode: SamplingMode, sp: dict
    ) -> _Carry:
        """One inner round: the lower level drafts, the upper level verifies and adds a token."""
        up, K, KA, W = self.upper, self.k, self.lower.k, self.width
        k_draft, k_verify = jax.random.split(key)
        draft, lower = self.lower.propose(params["lower"], c.lower, c.last, k_draft, mode, sp)
        block = jnp.concatenate([c.last[:, None], draft.tokens], axis=1)  # [B, KA+1]
        positions = c.cache.lengths[:, None] + jnp.arange(KA + 1, dtype=jnp.int32)[None, :]
        if self.feature_top:
            out, cache = eagle_block(
                up, params["upper"], c.feat, block, positions, c.cache, self.n_passes
            )
            logits = draft_logits(up.eagle, params["upper"], out, up.target_cfg)
        else:
            logits, _, cache = forward(params["upper"], up.cfg, block, positions, c.cache)
        if self.leniency == 1.0:
            acc = verify_chain(k_verify, logits, draft.tokens, draft.logp, mode, sp)
            handed = None if c.logp is None else self._handed_logp(logits, draft, mode, sp)
        else:
            acc, law = lenient_chain(
                k_verify, logits, draft.tokens, draft.logp, mode, sp, float(self.leniency)
            )
            handed = None if c.logp is None else self._lenient_handed(law, logits, mode, sp)
        live = c.count < K + 1  # rows that still need tokens
        i = jnp.arange(KA + 1, dtype=jnp.int32)[None, :]
        # emitted this round: a_1 .. a_n, then the bonus (n + 1 tokens)
        padded = jnp.concatenate([draft.tokens, jnp.zeros_like(draft.tokens[:, :1])], axis=1)
        new = jnp.where(i < acc.n[:, None], padded, acc.bonus[:, None])
        col = jnp.where(live[:, None] & (i <= acc.n[:, None]), c.count[:, None] + i, W)  # W: drop
        rows = jnp.arange(block.shape[0])[:, None]
        tokens = c.tokens.at[rows, col].set(new, mode="drop")
        logp = c.logp
        if logp is not None:  # block row i: the law emitted token i follows
            logp = logp.at[rows, col].set(handed, mode="drop")
        path = jnp.where(i[:, :KA] < acc.n[:, None], i[:, :KA], -1)
        verified = Verified(tokens=draft.tokens, n=acc.n, bonus=acc.bonus, path=path)
        lower = self.lower.commit(
            params["lower"], lower, draft, verified, live, TargetStep(tokens=block, hiddens=None)
        )
        moved = jnp.where(live, acc.n + 1, 0)
        feat = c.feat
        if feat is not None:  # the next round's first slot pairs the output at slot n with bonus
            at = jnp.take_along_axis(out, acc.n[:, None, None], axis=1)[:, 0]
            feat = jnp.where(live[:, None], at, feat)
        return _Carry(
            lower=lower,
            cache=cache.replace(lengths=c.cache.lengths + moved),
            last=jnp.where(live, acc.bonus, c.last),
            count=c.count + moved,
            stats=c.stats
            + jnp.where(
                live[:, None], jnp.stack([jnp.ones_like(acc.n), KA + 0 * acc.n, acc.n], 1), 0
            ),
            tokens=tokens,
            logp=logp,
            rounds=c.rounds + 1,
            feat=feat,
        )

    def _handed_logp(
        self, logits: jax.Array, draft: Draft, mode: SamplingMode, sp: dict
    ) -> jax.Array:
        """[B, KA+1, V] the distribution each emitted token follows: the upper level's own
        (what the target's check must use; a test overrides this to break it on purpose)."""
        return process_logits(logits, mode, sp)

    def _lenient_handed(
        self, law: jax.Array, logits: jax.Array, mode: SamplingMode, sp: dict
    ) -> jax.Array:
        """[B, KA+1, V] what a lenient level hands the target: `law` (pi at the checked
        positions, q_B at the bonus); a test overrides this to hand q_B everywhere."""
        return law

    def propose(
        self,
        params: Params,
        state: CascadeState,
        last: jax.Array,
        key: jax.Array,
        mode: SamplingMode,
        sp: dict,
    ) -> tuple[Draft, CascadeState]:
        K, W = self.k, self.width
        B = last.shape[0]
        V = self.vocab_size
        logp = None if mode.greedy else jnp.zeros((B, W, V), jnp.float32)
        start = _Carry(
            lower=state.lower,
            cache=state.cache,
            last=last,
            count=jnp.zeros((B,), jnp.int32),
            stats=jnp.zeros((B, 3), jnp.int32),
            tokens=jnp.zeros((B, W), jnp.int32),
            logp=logp,
            rounds=jnp.zeros((), jnp.int32),
            feat=state.feat,
        )
        # Every live row gains >= 1 token per round, so K + 1 rounds always suffice.
        c = jax.lax.while_loop(
            lambda c: jnp.any(c.count < K + 1),
            lambda c: self._round(params, c, jax.random.fold_in(key, c.rounds), mode, sp),
            start,
        )
        draft = Draft(tokens=c.tokens[:, :K], logp=None if c.logp is None else c.logp[:, :K])
        new_state = state.replace(
            lower=c.lower,
            cache=c.cache,
            len_before=state.cache.lengths,
            count=c.count,
            last=last,
            step=c.stats,
        )
        return draft, new_state

    def commit(
        self,
        params: Params,
        state: CascadeState,
        draft: Draft,
        verified: Verified,
        active: jax.Array,
        target: TargetStep,
    ) -> CascadeState:
        n = verified.n
        # Kept: [last, d_1 .. d_n] in the upper cache; new `last` = the target's bonus. Inactive
        # rows go back to where the propose began (drop everything it emitted and `last`,
        # then put `last` back).
        lengths = jnp.where(active, state.len_before + 1 + n, state.len_before)
        n_drop = jnp.where(active, state.count - n, state.count + 1)
        new_last = jnp.where(active, verified.bonus, state.last)
        lower = self.lower.rewind(params["lower"], state.lower, n_drop, new_last)
        cache, feat = state.cache, state.feat
        if self.feature_top:
            cache, feat = self._commit_features(params["upper"], state, verified, active, target)
        return state.replace(
            lower=lower,
            cache=cache.replace(lengths=lengths),
            feat=feat,
            total=state.total + jnp.where(active[:, None], state.step, 0),
        )

    def _commit_features(
        self,
        params: dict,
        state: CascadeState,
        verified: Verified,
        active: jax.Array,
        target: TargetStep,
    ) -> tuple[KVCache, jax.Array]:
        """An EAGLE top level after the target's check: the accepted d_1 .. d_n fed after the
        pending slot, each paired with the target's feature before it (block offset i: the
        feature of `last` or of d_i), as the EAGLE drafter commits -> (cache, the feature paired
        with the new `last`, the bonus: the target's at offset n)."""
        feats = target_features(self.upper.eagle, params, target.hiddens)  # [B, K+1, D]
        n = verified.n
        B, K1 = feats.shape[:2]
        i = jnp.arange(K1)[None, :]
        toks = jnp.concatenate([verified.tokens, jnp.zeros((B, 1), jnp.int32)], axis=1)
        pair_tok = jnp.where(i < n[:, None], toks, verified.bonus[:, None])
        start = state.cache.replace(lengths=state.len_before + 1)
        _, cache = self.upper._feed_committed(params, start, feats, pair_tok, n)
        at = jnp.take_along_axis(feats, n[:, None, None], axis=1)[:, 0]
        return cache, jnp.where(active[:, None], at, state.feat)

    def stats(self, state: CascadeState, rows: int) -> dict:
        """Per level, smallest first: how the upper model of each level took the drafts of the
        level below it (over the first `rows` rows)."""
        below = self.lower.stats(state.lower, rows).get("cascade_levels", [])
        from specjax.sharding import to_host

        rounds, drafted, accepted = (int(x) for x in to_host(state.total)[:rows].sum(0))
        level = {
            "level": self.label,
            "upper_forwards": rounds,
            "drafted": drafted,
            "accepted": accepted,
            "acceptance": accepted / drafted if drafted else 0.0,
            # tokens the upper level emitted per forward of its own (its bonus included)
            "tau": (accepted + rounds) / rounds if rounds else 0.0,
        }
        return {"cascade_levels": [*below, level]}

    def rewind(
        self, params: Params, state: CascadeState, n_drop: jax.Array, last: jax.Array
    ) -> CascadeState:
        # The upper cache holds the sequence but its newest token: it keeps t - n_drop tokens.
        lengths = state.cache.lengths + 1 - n_drop
        lower = self.lower.rewind(params["lower"], state.lower, n_drop, last)
        return state.replace(lower=lower, cache=state.cache.replace(lengths=lengths))


def eagle_block(
    up: EagleSpec,
    params: dict,
    feat: jax.Array,
    block: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    passes: int,
) -> tuple[jax.Array, KVCache]:
    """An EAGLE network over a block of tokens [B, T] at `positions`, the first paired with
    feat [B, D], slot i > 0 with the output at slot i - 1, by `passes` Jacobi passes (module
    docstring; passes >= T: the sequential outputs) -> (outputs [B, T, D], cache holding the last
    pass's K/V at the block's slots)."""
    B, T = block.shape
    first = feat[:, None]
    inputs = jnp.broadcast_to(first, (B, T, feat.shape[-1]))
    out, new_cache = None, cache
    for _ in range(passes):  # each pass writes the block's slots over the same cache
        out, new_cache = draft_block(up.eagle, params, inputs, block, positions, cache)
        inputs = jnp.concatenate([first, out[:, :-1]], axis=1)
    return out, new_cache


def check_passes(value: Any) -> int:
    """Jacobi passes of an EAGLE top level: a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"passes must be a positive int (None: exact sequential), got {value!r}")
    return value


def lenient_chain(
    key: jax.Array,
    logits: jax.Array,
    draft_tokens: jax.Array,
    draft_logp: jax.Array | None,
    mode: SamplingMode,
    sp: dict,
    leniency: float,
) -> tuple[Accepted, jax.Array | None]:
    """A lenient check of a chain (module docstring): -> (accepted prefix and the token after
    it, [B, K+1, V] log of the law each emitted token follows, or None when greedy).
    logits [B, K+1, V] the checking level's; draft_logp [B, K, V] or None (point masses)."""
    B, K = draft_tokens.shape
    if mode.greedy:
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        best = argmax(logits)  # [B, K+1]
        top = jnp.max(logp, axis=-1)
        lp_d = jnp.take_along_axis(logp[:, :K], draft_tokens[..., None], axis=-1)[..., 0]
        n = jnp.sum(jnp.cumprod((lp_d + jnp.log(leniency) >= top[:, :K]).astype(jnp.int32), 1), 1)
        bonus = jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]
        return Accepted(n=n, bonus=bonus), None
    logp = process_logits(logits, mode, sp)  # [B, K+1, V]
    p = jnp.exp(logp)
    V = p.shape[-1]
    if draft_logp is None:
        q = jax.nn.one_hot(draft_tokens, V, dtype=p.dtype)
    else:
        q = jnp.exp(draft_logp)
    kept = jnp.minimum(q, leniency * p[:, :K])  # [B, K, V] accepted mass per token
    resid = jnp.maximum(p[:, :K] - q, 0.0)
    mass = jnp.sum(resid, axis=-1, keepdims=True)
    resid = jnp.where(mass > 0, resid / jnp.where(mass > 0, mass, 1.0), p[:, :K])
    law = kept + (1.0 - jnp.sum(kept, axis=-1, keepdims=True)) * resid  # pi [B, K, V]
    k_acc, k_res = jax.random.split(key)
    q_d = jnp.take_along_axis(q, draft_tokens[..., None], axis=-1)[..., 0]
    kept_d = jnp.take_along_axis(kept, draft_tokens[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_acc, (B, K))
    n = jnp.sum(jnp.cumprod((u * q_d < kept_d).astype(jnp.int32), axis=1), axis=1)
    # The token after the accepted prefix: from r at a rejection, from p_B after all K.
    at = jnp.minimum(n, K - 1)
    r_n = jnp.take_along_axis(resid, at[:, None, None], axis=1)[:, 0]
    p_last = p[:, K]
    dist = jnp.where((n < K)[:, None], r_n, p_last)
    bonus = jax.random.categorical(k_res, jnp.log(dist), axis=-1).astype(jnp.int32)
    handed = jnp.concatenate([jnp.log(law), logp[:, K:]], axis=1)
    return Accepted(n=n, bonus=bonus), handed


def _as_model(spec: LMDrafterSpec, params: dict, target: Model) -> Model:
    """The upper level as a `Model`, for binding the level below it (its target)."""
    from specjax.model import Model

    return Model(params=params, config=spec.cfg, tokenizer=target.tokenizer, name="cascade-level")


def _check_lower(spec: DrafterSpec, name: str) -> None:
    if isinstance(spec, CascadeSpec) and spec.feature_top:
        raise ValueError(
            f"cascade level {name!r} has an EAGLE top level, which reads the target's features: "
            "an EAGLE drafter can only be the top level of a cascade"
        )
    if spec.is_tree:
        raise ValueError(f"cascade level {name!r} drafts a tree; a lower level must draft a chain")
    if spec.hidden_layers:
        raise ValueError(
            f"cascade level {name!r} reads target hidden states; a lower level cannot (the level "
            "above it does not produce them)"
        )
    if not spec.can_rewind:
        raise ValueError(
            f"cascade level {name!r} ({type(spec).__name__}) cannot be a lower level: it has no "
            "`rewind`; valid lower levels: ngram, small_model, layer_skip chains, or a cascade"
        )


def _check_upper(spec: DrafterSpec, name: str) -> None:
    # An EAGLE chain is refused below the top by `_check_lower` (its cascade reads features).
    eagle_chain = isinstance(spec, EagleSpec) and not isinstance(spec, EagleTreeSpec)
    if not (isinstance(spec, LMDrafterSpec) or eagle_chain) or spec.is_tree:
        raise ValueError(
            f"cascade level {name!r} ({type(spec).__name__}) cannot verify a lower level: an "
            "upper level must be an LM chain drafter (small_model or layer_skip without a tree) "
            "or, at the top, an EAGLE chain (eagle or eagle3 without a tree)"
        )
    if spec.sizing is not None:
        raise ValueError(f"cascade level {name!r}: an upper level drafts whole chains (no sizing)")


def _short(d: Drafter) -> str:
    """A level's name without the cascade wrapper (labels of nested levels)."""
    return d.name[len("cascade(") : -1] if d.name.startswith("cascade(") else d.name


def check_leniency(value: Any) -> float:
    """A level's leniency as a float: a finite number >= 1 (1: the exact rule). NaN and inf
    are refused (inf would weigh a token the level gives probability 0 by 0 * inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value < math.inf:
        raise ValueError(f"leniency must be a finite number >= 1, got {value!r}")
    return float(value)


def cascade(levels: Sequence[Drafter], leniency: float = 1.0, passes: int | None = None) -> Drafter:
    """A vertical cascade, smallest level first: `cascade([A, B])` drafts with B, which A
    drafts for; `cascade([A, B, C])` = A -> B -> C -> target. The draft size is the last
    level's k (each level's k is what it proposes to the level above). `leniency` > 1: every
    level accepts the draft below it leniently (the target's own check stays exact; see the
    module docstring). `passes`: with an EAGLE top level, the Jacobi passes it scores a block
    of the level below with (None: as many as the block has slots, the EAGLE chain's own law;
    fewer are cheaper and draft by another law, equally exact)."""
    levels = list(levels)
    if len(levels) < 2 or not all(isinstance(d, Drafter) for d in levels):
        raise ValueError(f"cascade needs a list of >= 2 drafters, smallest first; got {levels!r}")
    leniency = check_leniency(leniency)
    if passes is not None:
        check_passes(passes)
    lower_d = levels[0] if len(levels) == 2 else cascade(levels[:-1], leniency)
    upper_d = levels[-1]

    def bind(target: Model) -> tuple[CascadeSpec, dict]:
        upper, p_upper = upper_d.bind(target)
        _check_upper(upper, upper_d.name)
        # An EAGLE level drafts for the target with the target's own vocabulary and embedding:
        # the level below it drafts for the target model itself.
        below = target if isinstance(upper, EagleSpec) else _as_model(upper, p_upper, target)
        lower, p_lower = lower_d.bind(below)
        _check_lower(lower, lower_d.name)
        label = f"{_short(lower_d)} > {_short(upper_d)}"
        spec = CascadeSpec(
            k=upper.k,
            lower=lower,
            upper=upper,
            label=label,
            leniency=float(leniency),
            passes=passes,
        )
        return spec, {"lower": p_lower, "upper": p_upper}

    lenient = f", leniency={leniency:g}" if leniency != 1 else ""
    lenient += f", passes={passes}" if passes is not None else ""
    name = f"cascade({lower_d.name} > {upper_d.name}{lenient})"
    return Drafter(name=name, k=upper_d.k, binder=bind, tokenizer=upper_d.tokenizer)
