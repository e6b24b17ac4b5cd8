"""The drafter protocol and the records the engine and drafters exchange.

A drafter is a frozen, hashable spec (static settings: passed to `jit` as a static argument) plus
a param pytree (traced). What users hold is a `Drafter`: a name, its draft size `k`, and
`bind(target) -> (spec, params)`, which builds both for one target model. The spec's three pure
functions run inside the decode `while_loop`:

    init(params, prefill: TargetPrefill, max_len) -> state
    propose(params, state, last [B], key, mode, sp) -> (Draft | TreeDraft, state)
    commit(params, state, draft, verified: Verified, active [B], target: TargetStep) -> state

and, for drafters that may be a lower level of a cascade, `rewind(params, state, n_drop, last)`.

`last[b]` is the newest token of row b: emitted, but not yet in the target's KV cache. A draft
continues it. After verification the first `verified.n[b]` draft tokens (`verified.tokens`) and
`verified.bonus[b]` were emitted; the drafter updates its own state (KV cache rollback, history)
for rows where `active[b]`, and must leave the other rows' state unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.family import Hiddens

if TYPE_CHECKING:
    import numpy as np

    from specjax.model import Model
    from specjax.sampling import SamplingMode

# A drafter's param pytree (nested dicts of arrays; None for a drafter without params, n-gram).
Params = Any


class Tree(NamedTuple):
    """A static-shape padded draft tree of N nodes per row (see `specjax.engine.tree`).

    Node i continues node `parents[i]` (-1: the row's newest token `last`); parents[i] < i, so
    nodes are topologically ordered and any prefix of them is a tree too."""

    tokens: jax.Array  # [B, N] int32
    parents: jax.Array  # [B, N] int32
    depth: jax.Array  # [B, N] int32, 1 for children of the root
    valid: jax.Array  # [B, N] bool, padding nodes are False (never accepted)


class Draft(NamedTuple):
    """A chain of K draft tokens."""

    tokens: jax.Array  # [B, K] int32
    logp: jax.Array | None  # [B, K, V] processed draft log-probs; None = deterministic (one-hot)
    # [B] int32, optional: how many leading draft tokens are worth verifying (0: none). The
    # engine verifies the smallest of the spec's `verify_sizes` (or 0: a plain one-token step)
    # that covers every active row's request, so a weak draft costs a short verify forward.
    # With `logp` set (tokens sampled from it), whether token i is verified must not depend on
    # token i or later ones: choose the size before drawing them (exactness; see
    # `VerifySizing.choose_before_drawing`). Deterministic tokens may be sized on anything.
    size: jax.Array | None = None

    def truncated(self, n: int) -> Draft:
        """The first n tokens (static n)."""
        return self._replace(
            tokens=self.tokens[:, :n],
            logp=None if self.logp is None else self.logp[:, :n],
            size=None,
        )


class TreeDraft(NamedTuple):
    """A padded tree of N draft nodes."""

    tree: Tree
    # [B, N+1, V] draft distribution the children of each block position were drawn from, or
    # None: the children are deterministic candidates (top-k, n-gram branches).
    child_logp: jax.Array | None = None
    # [B] int32, optional, as `Draft.size`: how many leading nodes are worth verifying (0: the
    # tree is not worth a verify forward and the engine may take a plain step instead).
    size: jax.Array | None = None
    # [B, N] bool, only with `child_logp`: nodes that are deterministic candidates among
    # children drawn from it (a retrieval chain beside a sampled model tree, `drafters.hybrid`);
    # each is tested as a point mass (`engine.accept.verify_tree_sampling`).
    point_mass: jax.Array | None = None

    def truncated(self, n: int) -> TreeDraft:
        """The first n nodes (static n): a tree again, since parents come before children."""
        t = self.tree
        tree = Tree(t.tokens[:, :n], t.parents[:, :n], t.depth[:, :n], t.valid[:, :n])
        logp = None if self.child_logp is None else self.child_logp[:, : n + 1]
        marked = None if self.point_mass is None else self.point_mass[:, :n]
        return TreeDraft(tree=tree, child_logp=logp, size=None, point_mass=marked)


def no_draft(shape: Draft | TreeDraft) -> Draft | TreeDraft:
    """A draft of `shape` (the `jax.eval_shape` of a propose) with every field zero, so size 0:
    what a `lax.cond` branch that skips drafting returns beside the branch that drafts (both
    branches must return the same shapes; the engine then takes a plain step)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)


class Verified(NamedTuple):
    """The outcome of verifying one draft, the same record for every draft shape (a plain step
    is a draft of nothing: n = 0). Padded to A = the most draft tokens one step can accept."""

    tokens: jax.Array  # [B, A] int32 drafted tokens on the accepted path (only the first n count)
    n: jax.Array  # [B] int32 accepted draft tokens
    bonus: jax.Array  # [B] int32 the target's token after them (its correction, or a free one)
    path: jax.Array  # [B, A] int32 draft node of each accepted token (-1 past n); chains: i

    @property
    def deepest(self) -> jax.Array:
        """[B] the deepest accepted draft node (-1: none); block offset deepest + 1 is the
        position whose logits gave `bonus`."""
        if self.path.shape[1] == 0:
            return jnp.full(self.n.shape, -1, jnp.int32)
        last = jnp.take_along_axis(self.path, jnp.maximum(self.n - 1, 0)[:, None], axis=1)[:, 0]
        return jnp.where(self.n > 0, last, -1)


@struct.dataclass
class PrefillInput:
    """What the target reads over the prompt: token ids, and optionally embeddings that replace
    the token embeddings at chosen positions (image features of a vision-language model), and
    position ids (which need not equal cache slots: image tokens, M-RoPE)."""

    tokens: jax.Array  # [B, P] int32 right-padded prompts
    lengths: jax.Array  # [B] int32 prompt lengths (cache slots used)
    positions: jax.Array  # [B, P] int32 position ids
    embeds: jax.Array | None = None  # [B, P, D] used where `embed_mask`
    embed_mask: jax.Array | None = None  # [B, P] bool
    # [B, P, Dd] a drafter's own image features where `embed_mask` (a small vision-language
    # drafter with its own tower); None for every other drafter
    draft_embeds: jax.Array | None = None

    @classmethod
    def from_tokens(cls, tokens: jax.Array, lengths: jax.Array) -> PrefillInput:
        B, P = tokens.shape
        return cls(
            tokens=tokens,
            lengths=lengths,
            positions=jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P)),
        )

    @property
    def next_position(self) -> jax.Array:
        """[B] position id of the first generated token."""
        last = jnp.take_along_axis(self.positions, (self.lengths - 1)[:, None], axis=1)[:, 0]
        return last + 1


@struct.dataclass
class TargetPrefill:
    """What a drafter may read when it starts: the target's input and its prefill."""

    input: PrefillInput
    first: jax.Array  # [B] int32 first generated token (= `last` at the first propose)
    cache: KVCache  # target cache after the prefill (lengths = prompt lengths)
    hiddens: Hiddens  # target hidden states over the prompt

    @property
    def tokens(self) -> jax.Array:
        return self.input.tokens  # [B, P]

    @property
    def lengths(self) -> jax.Array:
        return self.input.lengths  # [B]


@struct.dataclass
class TargetStep:
    """The target's verify forward, for drafters that read target features (EAGLE, Medusa)."""

    tokens: jax.Array  # [B, T] the verified block: last, then the draft (padded to K+1)
    hiddens: Hiddens


@dataclasses.dataclass(frozen=True)
class DrafterSpec:
    """Base of every drafter spec. Subclasses are frozen dataclasses with hashable fields."""

    k: int  # draft tokens (chain) or nodes (tree) per step (static)

    hidden_layers: tuple = ()  # target hidden states the drafter reads (HF hidden_states index)

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0:
            raise ValueError(f"draft length k must be a positive int, got {self.k!r}")

    # A chain drafter proposes k tokens and can have all k accepted. A tree drafter proposes k
    # nodes (`is_tree`), of which at most `max_accept` (the tree depth) lie on one path.
    is_tree = False
    # A tree drafter that samples children (`TreeDraft.child_logp` set) says how it drew
    # siblings, so that the verifier's rejection rule matches: False i.i.d. from q (SpecInfer),
    # True without replacement (q renormalised without each drawn token, as Gumbel-top-k draws;
    # Jeon et al.). Deterministic candidates (`child_logp` None) ignore it.
    siblings_without_replacement = False

    @property
    def nodes(self) -> int:
        """Draft tokens in one verify block after `last` (a tree's nodes; k unless a drafter
        drafts several branches of k tokens)."""
        return self.k

    @property
    def max_accept(self) -> int:
        return self.k

    @property
    def cache_slack(self) -> int:
        """Cache slots the drafter's own state may use beyond the committed tokens."""
        return self.k

    @property
    def verify_sizes(self) -> tuple:
        """Static verify sizes (draft tokens or nodes, ascending, the last = `nodes`) a drafter
        that sets `size` on its drafts may be verified with; each is one compiled branch."""
        return (self.nodes,)

    def init(self, params: Params, prefill: TargetPrefill, max_len: int) -> Any:
        raise NotImplementedError

    def propose(
        self,
        params: Params,
        state: Any,
        last: jax.Array,  # [B] int32
        key: jax.Array,
        mode: SamplingMode,
        sp: dict,
    ) -> tuple[Draft | TreeDraft, Any]:
        raise NotImplementedError

    def commit(
        self,
        params: Params,
        state: Any,
        draft: Draft | TreeDraft,
        verified: Verified,
        active: jax.Array,  # [B] bool
        target: TargetStep,
    ) -> Any:
        raise NotImplementedError

    def rewind(self, params: Params, state: Any, n_drop: jax.Array, last: jax.Array) -> Any:
        """Only for drafters that can be a lower level of a cascade (`drafters.cascade`).

        A committed state stands for a sequence x_1 .. x_t whose newest token x_t is the next
        propose's `last`. Return the state of x_1 .. x_{t - n_drop[b]}, last[b]: the newest
        `n_drop` tokens (>= 1, `last` among them) are dropped and `last` appended. The dropped
        tokens' cache slots may hold stale entries; the state must not read them again."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot be a lower level of a cascade (no `rewind`)"
        )

    def stats(self, state: Any, rows: int) -> dict:
        """Drafter statistics for `generate`'s stats, read from the final state (first `rows`
        rows); none by default."""
        return {}

    @property
    def can_rewind(self) -> bool:
        return type(self).rewind is not DrafterSpec.rewind

    def check_compatible(self, target_cfg: ModelConfig, target_dtype: np.dtype) -> None:
        """Raise ValueError when this drafter cannot serve the target."""


@dataclasses.dataclass(frozen=True, eq=False)
class Drafter:
    """What users pass as `generate(..., drafter=...)`.

    `bind(target)` builds (spec, params) for a target `Model` (every drafter is bound the same
    way: a drafter that shares the target's layers or head takes them here); `k` is the draft
    size per step (chain tokens or tree nodes), known before binding."""

    name: str
    k: int
    binder: Callable[[Any], tuple]  # target Model -> (DrafterSpec, params)
    tokenizer: Any = None  # the drafter's tokenizer, when it has one (checked against the target)
    # A drafter that encodes images itself (a small VisionLanguageModel): `generate` runs its
    # tower (through its own feature cache) and hands it `PrefillInput.draft_embeds`.
    vision: Any = None

    def bind(self, target: Model) -> tuple[DrafterSpec, Params]:
        """-> (spec, params) for `target`, after the spec's compatibility check."""
        spec, params = self.binder(target)
        spec.check_compatible(target.config, target.dtype)
        return spec, params

    @classmethod
    def fixed(
        cls,
        name: str,
        spec: DrafterSpec,
        params: Params = None,
        tokenizer: Any = None,
        vision: Any = None,
    ) -> Drafter:
        """A drafter whose spec and params do not depend on the target."""
        return cls(
            name=name,
            k=spec.k,
            binder=lambda target: (spec, params),
            tokenizer=tokenizer,
            vision=vision,
        )
