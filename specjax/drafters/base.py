"""The drafter protocol.

A drafter is a frozen, hashable spec (static settings: passed to `jit` as a static argument) plus
a param pytree (traced). Its three pure functions run inside the decode `while_loop`:

    init(params, prefill: TargetPrefill, max_len) -> state
    propose(params, state, last [B], key, mode, sp) -> (Draft, state)
    commit(params, state, draft, accepted, active [B], target: TargetStep) -> state

`last[b]` is the newest token of row b: emitted, but not yet in the target's KV cache. A draft of
K tokens continues it. After verification the first `accepted.n[b]` draft tokens and
`accepted.bonus[b]` were emitted; the drafter updates its own state (KV cache rollback, history)
for rows where `active[b]`, and must leave the other rows' state unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
from flax import struct

from specjax.models.config import ModelConfig
from specjax.models.llama import Hiddens
from specjax.models.cache import KVCache


class Draft(NamedTuple):
    """A chain of K draft tokens."""

    tokens: jax.Array  # [B, K] int32
    logp: Optional[jax.Array]  # [B, K, V] processed draft log-probs; None = deterministic (one-hot)
    # [B] int32, optional: how many leading draft tokens are worth verifying (0: none). The
    # engine verifies the smallest of the spec's `verify_sizes` (or 0: a plain one-token step)
    # that covers every active row's request, so a weak draft costs a short verify forward.
    # Only for drafters that read no target features.
    size: Optional[jax.Array] = None


class TreeDraft(NamedTuple):
    """A padded tree of N draft nodes (see specjax.tree)."""

    tree: Any  # specjax.tree.Tree
    # [B, N+1, V] draft distribution the children of each block position were drawn from, or
    # None: the children are deterministic candidates (top-k, n-gram branches).
    child_logp: Optional[jax.Array] = None
    # [B] bool, optional: whether the tree is worth a verify forward; when no active row's is,
    # the engine takes a plain one-token step (drafters that read no target features only).
    worth: Optional[jax.Array] = None


@struct.dataclass
class TargetPrefill:
    """What a drafter may read when it starts: the padded prompt and the target's prefill."""

    tokens: jax.Array  # [B, P] int32 right-padded prompts
    lengths: jax.Array  # [B] int32 prompt lengths
    first: jax.Array  # [B] int32 first generated token (= `last` at the first propose)
    cache: KVCache  # target cache after the prefill (lengths = prompt lengths)
    hiddens: Hiddens  # target hidden states over the prompt


@struct.dataclass
class TargetStep:
    """The target's verify forward, for drafters that read target features (EAGLE, Medusa)."""

    tokens: jax.Array  # [B, K+1] the verified block: last, then the draft
    hiddens: Hiddens


@dataclasses.dataclass(frozen=True)
class DrafterSpec:
    """Base of every drafter spec. Subclasses are frozen dataclasses with hashable fields."""

    k: int  # draft tokens per step (static)

    kind = "base"
    hidden_layers: tuple = ()  # target hidden states the drafter reads (HF hidden_states index)

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k <= 0:
            raise ValueError(f"draft length k must be a positive int, got {self.k!r}")

    # A chain drafter proposes k tokens and can have all k accepted. A tree drafter proposes k
    # nodes (`is_tree`), of which at most `max_accept` (the tree depth) lie on one path.
    is_tree = False
    # Tree drafters that sample siblings without replacement from `child_logp` set this (see
    # specjax.tree.verify_tree_sampling); ignored for deterministic candidates.
    without_replacement = False

    @property
    def max_accept(self) -> int:
        return self.k

    @property
    def cache_slack(self) -> int:
        """Cache slots the drafter's own state may use beyond the committed tokens."""
        return self.k

    @property
    def verify_sizes(self) -> tuple:
        """Static verify block lengths (draft tokens, ascending, the last = k) a chain drafter
        that sets `Draft.size` may be verified with; each is one compiled branch."""
        return (self.k,)

    def init(self, params, prefill: TargetPrefill, max_len: int) -> Any:
        raise NotImplementedError

    def propose(self, params, state, last, key, mode, sp):
        raise NotImplementedError

    def commit(self, params, state, draft: Draft, accepted, active, target: TargetStep):
        raise NotImplementedError

    def check_compatible(self, target_cfg: ModelConfig, target_dtype) -> None:
        """Raise ValueError when this drafter cannot serve the target."""


@dataclasses.dataclass(frozen=True, eq=False)
class Drafter:
    """What users pass as `generate(..., drafter=...)`: a spec plus its params."""

    spec: DrafterSpec
    params: Any = None
    name: str = ""
    tokenizer: Any = None  # the drafter's tokenizer, when it has one (checked against the target)

    @property
    def k(self) -> int:
        return self.spec.k
