"""Hybrid drafting, `switch` mode (SAM-Decoding, Arctic suffix decoding): per step and per row,
a retrieval chain (n-gram lookup over the prompt and the generated tokens) when its suffix
match is long enough, else the model drafter's tree.

Both drafters propose every step (their states follow the same sequence); each row's draft is
one of the two, laid out as one static tree of N = max(retrieval k, model nodes) nodes: the
chain is the tree whose node i continues node i - 1, padded with invalid nodes. The engine
verifies that tree as any other and both drafters commit what was accepted. Neither reads its
own draft at commit: the n-gram appends the emitted tokens, and an EAGLE tree feeds the
accepted path with the target's features at it, whichever draft it came from. (An LM tree's
commit reuses the K/V its own nodes left in its cache, so it cannot follow a path drafted by
retrieval: the model drafter is an EAGLE tree.)

Why it is exact at any temperature. Which draft a row takes depends only on the sequence so
far (the match length), never on the target. Both candidate sets are deterministic: the
retrieval chain is copied from the history, and the model's tree holds top-k candidates
(its `child_logp` is None). Verification of deterministic candidates is the engine's exact
one-hot construction (recursive rejection with q = the candidate's point mass), so every
row's output follows the target's law whichever draft it took. A model drafter whose tree
children are sampled (`child_logp` set) is refused: rows would need two verification rules.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import struct

from specjax.drafters.base import (
    Draft,
    Drafter,
    DrafterSpec,
    Params,
    TargetPrefill,
    TargetStep,
    Tree,
    TreeDraft,
    Verified,
)
from specjax.drafters.feature import EagleSpec
from specjax.drafters.ngram import NgramSpec, continuation_starts
from specjax.models.config import ModelConfig

if TYPE_CHECKING:
    import numpy as np

    from specjax.model import Model
    from specjax.sampling import SamplingMode

MODES = ("switch",)


@struct.dataclass
class HybridState:
    retrieval: Any
    model: Any
    chose: jax.Array  # [B] bool: the last propose's row took the retrieval chain
    # [4, B] int32: steps with the retrieval chain, its accepted tokens, steps with the model
    # tree, its accepted tokens (rows active in the target's step)
    counts: jax.Array


@dataclasses.dataclass(frozen=True)
class HybridSpec(DrafterSpec):
    retrieval: NgramSpec | None = None
    model: DrafterSpec | None = None
    min_match: int = 2  # suffix match length (tokens) from which a row takes the retrieval chain

    is_tree = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.min_match, int) or self.min_match < 1:
            raise ValueError(f"min_match must be a positive int, got {self.min_match!r}")

    @property
    def nodes(self) -> int:
        return self.k

    @property
    def max_accept(self) -> int:
        return max(self.retrieval.k, self.model.max_accept)

    @property
    def cache_slack(self) -> int:
        return max(self.k, self.retrieval.cache_slack, self.model.cache_slack)

    @property
    def verify_sizes(self) -> tuple:
        # A step where every row takes the chain verifies its k nodes, not the whole tree.
        return tuple(sorted({self.retrieval.k, self.k}))

    def check_compatible(self, target_cfg: ModelConfig, target_dtype: np.dtype) -> None:
        self.model.check_compatible(target_cfg, target_dtype)

    def init(self, params: Params, prefill: TargetPrefill, max_len: int) -> HybridState:
        B = prefill.first.shape[0]
        return HybridState(
            retrieval=self.retrieval.init(None, prefill, max_len),
            model=self.model.init(params, prefill, max_len),
            chose=jnp.zeros((B,), bool),
            counts=jnp.zeros((4, B), jnp.int32),
        )

    def propose(
        self,
        params: Params,
        state: HybridState,
        last: jax.Array,
        key: jax.Array,
        mode: SamplingMode,
        sp: dict,
    ) -> tuple[TreeDraft, HybridState]:
        ret = self.retrieval
        sizes = range(ret.max_ngram, ret.min_ngram - 1, -1)
        _, n = continuation_starts(state.retrieval.hist, state.retrieval.hist_len, sizes, 1)
        chain, rstate = ret.propose(None, state.retrieval, last, key, mode, sp)
        use = n[:, 0] >= self.min_match  # [B]

        def model_propose(_: None) -> tuple[TreeDraft, Any]:
            return self.model.propose(params, state.model, last, key, mode, sp)

        shape = jax.eval_shape(model_propose, None)
        if isinstance(shape[0], Draft) or shape[0].child_logp is not None:
            raise ValueError(
                "a hybrid's model drafter must draft a tree of deterministic candidates "
                "(an EAGLE dynamic tree)"
            )

        def skip(_: None) -> tuple[TreeDraft, Any]:
            # Every row takes the chain: the model's drafting is not run (its state only
            # wrote cache slots past its committed length, which its commit overwrites).
            draft = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape[0])
            return draft, state.model

        mdraft, mstate = jax.lax.cond(jnp.all(use), skip, model_propose, None)
        tree = _select(use, _chain_tree(chain.tokens, self.k), _pad(mdraft.tree, self.k))
        size = jnp.where(use, ret.k, self.k).astype(jnp.int32)
        draft = TreeDraft(tree=tree, size=size)
        return draft, state.replace(retrieval=rstate, model=mstate, chose=use)

    def commit(
        self,
        params: Params,
        state: HybridState,
        draft: TreeDraft,
        verified: Verified,
        active: jax.Array,
        target: TargetStep,
    ) -> HybridState:
        rstate = self.retrieval.commit(None, state.retrieval, draft, verified, active, target)
        mstate = self.model.commit(params, state.model, draft, verified, active, target)
        a = active.astype(jnp.int32)
        r = state.chose.astype(jnp.int32)
        step = jnp.stack([a * r, a * r * verified.n, a * (1 - r), a * (1 - r) * verified.n])
        return state.replace(retrieval=rstate, model=mstate, counts=state.counts + step)

    def stats(self, state: HybridState, rows: int) -> dict:
        c = jax.device_get(state.counts[:, :rows]).sum(axis=1).tolist()
        return {
            "hybrid": {
                "retrieval_steps": c[0],
                "retrieval_accepted": c[1],
                "model_steps": c[2],
                "model_accepted": c[3],
            }
        }


def _chain_tree(tokens: jax.Array, N: int) -> Tree:
    """A chain [B, k] as a tree of N >= k nodes (node i continues node i - 1; padding invalid)."""
    B, k = tokens.shape
    i = jnp.arange(N, dtype=jnp.int32)
    toks = jnp.pad(tokens, ((0, 0), (0, N - k)))
    return Tree(
        tokens=toks.astype(jnp.int32),
        parents=jnp.broadcast_to(i - 1, (B, N)),
        depth=jnp.broadcast_to(i + 1, (B, N)),
        valid=jnp.broadcast_to(i < k, (B, N)),
    )


def _pad(tree: Tree, N: int) -> Tree:
    """A tree of M <= N nodes padded with invalid nodes (children of the root)."""
    M = tree.tokens.shape[1]
    if M == N:
        return tree
    pad = ((0, 0), (0, N - M))
    return Tree(
        tokens=jnp.pad(tree.tokens, pad),
        parents=jnp.pad(tree.parents, pad, constant_values=-1),
        depth=jnp.pad(tree.depth, pad, constant_values=1),
        valid=jnp.pad(tree.valid, pad),
    )


def _select(use: jax.Array, a: Tree, b: Tree) -> Tree:
    return Tree(*(jnp.where(use[:, None], x, y) for x, y in zip(a, b)))


def hybrid(retrieval: Drafter, model: Drafter, mode: str = "switch", min_match: int = 2) -> Drafter:
    """`switch`: per step and row, `retrieval`'s chain (an n-gram drafter) when its longest
    suffix match has >= `min_match` tokens, else `model`'s tree (an EAGLE or LM dynamic tree).
    Lossless at any temperature (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"unknown hybrid mode {mode!r}; valid: {', '.join(MODES)}")

    def bind(target: Model) -> tuple[HybridSpec, Params]:
        rspec, _ = retrieval.bind(target)
        if not isinstance(rspec, NgramSpec) or rspec.is_tree:
            raise ValueError(
                f"a hybrid's retrieval drafter must be an n-gram chain, got {retrieval.name!r}"
            )
        rspec = dataclasses.replace(rspec, adaptive=False)  # the hybrid picks the chain itself
        mspec, mparams = model.bind(target)
        if not (isinstance(mspec, EagleSpec) and mspec.is_tree):
            raise ValueError(
                f"a hybrid's model drafter must be an EAGLE tree (eagle / eagle3 with a "
                f"DynamicTree), got {model.name!r}"
            )
        k = max(rspec.k, mspec.nodes)
        spec = HybridSpec(
            k=k,
            retrieval=rspec,
            model=mspec,
            min_match=min_match,
            hidden_layers=tuple(mspec.hidden_layers),
        )
        return spec, mparams

    k = max(retrieval.k, model.k)
    name = f"hybrid({retrieval.name} + {model.name}, {mode}, min_match={min_match})"
    return Drafter(name=name, k=k, binder=bind, tokenizer=model.tokenizer)
