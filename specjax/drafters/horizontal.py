"""Horizontal cascades (CS Drafting's per-position schedule): the first draft positions come from
a feature drafter, the later ones from a cheaper one.

`horizontal(first, later)` drafts a chain of first.k + later.k tokens: an EAGLE chain drafts
the first first.k tokens, then an n-gram lookup continues them (over the history with those
draft tokens appended, and its datastore if it has one) for later.k more. Later positions are
accepted less often, so a drafter that costs nothing there (the n-gram's lookup) is worth more
per millisecond than another EAGLE step; where the lookup finds nothing it repeats the last
token, which costs only its slot in the verify block.

Why it is exact at any temperature. The target checks the chain with ordinary speculative
sampling, which is exact when each draft token i was drawn from the law `logp[i]` it is checked
against, given the draft tokens before it. The EAGLE positions carry the EAGLE drafter's own
processed log-probs (or none: deterministic). An n-gram token is a function of the history and
the earlier draft tokens, so its law is the point mass on it: its `logp` row is log one-hot.

Both parts commit the accepted tokens whichever part drafted them: the n-gram appends them to
its history, and the EAGLE drafter feeds the accepted path with the target's features at it
(the same property the hybrid relies on). An LM drafter (small model, layer skip) could not
follow tokens it did not draft itself, so the first part is an EAGLE chain.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import struct

from specjax.drafters.feature import EagleSpec
from specjax.drafters.ngram import NgramSpec, NgramState
from specjax.engine.protocol import (
    Draft,
    Drafter,
    DrafterSpec,
    Params,
    TargetPrefill,
    TargetStep,
    Verified,
)
from specjax.models.config import ModelConfig

if TYPE_CHECKING:
    import numpy as np

    from specjax.model import Model
    from specjax.sampling import SamplingMode


@struct.dataclass
class HorizontalState:
    first: Any
    later: NgramState
    # [B, 4] int32 (batch first, as every per-row leaf) over the steps a row was active in:
    # steps, draft tokens accepted from the first part, steps that accepted all of the first
    # part's tokens (the later part's tokens were reachable), tokens accepted from the later.
    counts: jax.Array


@dataclasses.dataclass(frozen=True)
class HorizontalSpec(DrafterSpec):
    first: EagleSpec | None = None  # drafts positions 0 .. first.k - 1
    later: NgramSpec | None = None  # drafts the next later.k positions

    @property
    def cache_slack(self) -> int:
        # The first part's commit block is this chain's (k + 1 pairs), then its own draft slots.
        return max(self.first.cache_slack + self.k + 2, self.later.cache_slack)

    def check_compatible(self, target_cfg: ModelConfig, target_dtype: np.dtype) -> None:
        self.first.check_compatible(target_cfg, target_dtype)

    def init(self, params: Params, prefill: TargetPrefill, max_len: int) -> HorizontalState:
        return HorizontalState(
            first=self.first.init(params["first"], prefill, max_len),
            later=self.later.init(params["later"], prefill, max_len),
            counts=jnp.zeros((prefill.first.shape[0], 4), jnp.int32),
        )

    def propose(
        self,
        params: Params,
        state: HorizontalState,
        last: jax.Array,
        key: jax.Array,
        mode: SamplingMode,
        sp: dict,
    ) -> tuple[Draft, HorizontalState]:
        head, first = self.first.propose(params["first"], state.first, last, key, mode, sp)
        x = head.tokens  # [B, a]
        B, a = x.shape
        hist, hist_len = state.later.hist, state.later.hist_len
        cols = hist_len[:, None] + jnp.arange(a)[None, :]
        ext = NgramState(
            hist=hist.at[jnp.arange(B)[:, None], cols].set(x, mode="drop"),
            hist_len=jnp.minimum(hist_len + a, hist.shape[1]),
        )
        tail, _, _ = self.later.match(params["later"], ext, x[:, -1])  # [B, later.k]
        tokens = jnp.concatenate([x, tail], axis=1)
        logp = None
        if head.logp is not None:  # the n-gram's tokens are point masses: log one-hot rows
            V = head.logp.shape[-1]
            point = jnp.where(jax.nn.one_hot(tail, V, dtype=bool), 0.0, -jnp.inf)
            logp = jnp.concatenate([head.logp, point.astype(head.logp.dtype)], axis=1)
        return Draft(tokens=tokens, logp=logp), state.replace(first=first)

    def commit(
        self,
        params: Params,
        state: HorizontalState,
        draft: Draft,
        verified: Verified,
        active: jax.Array,
        target: TargetStep,
    ) -> HorizontalState:
        first = self.first.commit(params["first"], state.first, draft, verified, active, target)
        later = self.later.commit(params["later"], state.later, draft, verified, active, target)
        on, n, a = active.astype(jnp.int32), verified.n, self.first.k
        step = jnp.stack([on, jnp.minimum(n, a), n >= a, jnp.maximum(n - a, 0)], axis=1)
        return HorizontalState(first=first, later=later, counts=state.counts + on[:, None] * step)

    def stats(self, state: HorizontalState, rows: int) -> dict:
        """{"horizontal": steps, first_accepted, later_reached (steps that accepted every
        first-part token), later_accepted} over the first `rows` rows."""
        from specjax.sharding import to_host

        c = to_host(state.counts)[:rows].sum(axis=0).tolist()
        names = ("steps", "first_accepted", "later_reached", "later_accepted")
        return {"horizontal": dict(zip(names, c))}


def horizontal(first: Drafter, later: Drafter) -> Drafter:
    """A chain whose first `first.k` tokens come from `first` (an EAGLE / EAGLE-3 chain) and the
    next `later.k` from `later` (an n-gram chain continuing them). Lossless at any temperature
    (see the module docstring)."""
    for d, what in ((first, "first"), (later, "later")):
        if not isinstance(d, Drafter):
            raise ValueError(f"horizontal: {what} must be a Drafter, got {d!r}")

    def bind(target: Model) -> tuple[HorizontalSpec, Params]:
        fspec, fparams = first.bind(target)
        if not isinstance(fspec, EagleSpec) or fspec.is_tree or fspec.sizing is not None:
            raise ValueError(
                f"a horizontal cascade's first part must be an EAGLE chain (eagle / eagle3 "
                f"without a tree or sizing), got {first.name!r}"
            )
        lspec, lparams = later.bind(target)
        if not isinstance(lspec, NgramSpec) or lspec.is_tree:
            raise ValueError(
                f"a horizontal cascade's later part must be an n-gram chain, got {later.name!r}"
            )
        spec = HorizontalSpec(
            k=fspec.k + lspec.k,
            first=fspec,
            later=lspec,
            hidden_layers=tuple(fspec.hidden_layers),
        )
        return spec, {"first": fparams, "later": lparams}

    name = f"horizontal({first.name} then {later.name})"
    return Drafter(name=name, k=first.k + later.k, binder=bind, tokenizer=first.tokenizer)
