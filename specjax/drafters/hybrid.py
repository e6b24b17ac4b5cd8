"""Hybrid drafting: a retrieval chain (n-gram lookup over the prompt and the generated tokens)
and a model drafter's tree, in one of two modes.

`switch` (SAM-Decoding, Arctic suffix decoding): per step and per row, the retrieval chain when
its suffix match is long enough, verified as far as the n-gram chain's own rule asks (all k
tokens after a long match, `short` after a weak one), else the model drafter's tree.

`merge`: one tree holding both, verified in one forward: the model's M nodes first (their
indices unchanged), then the retrieval chain grafted onto them: the chain's longest prefix that
is already a path of the model's tree is not drafted twice, and the rest of the chain hangs
below the deepest node of that path (at the root when the first token differs). A row whose
suffix match is shorter than `min_match` drafts no chain nodes.

Both drafters propose every step (their states follow the same sequence). In `switch` each
row's draft is one of the two, laid out as one static tree of N = max(retrieval k, model nodes)
nodes: the chain is the tree whose node i continues node i - 1, padded with invalid nodes; in
`merge` the tree has N = retrieval k + model nodes. The engine
verifies that tree as any other and both drafters commit what was accepted. A model tree with
its own verify sizing (`DynamicTree(sizing=...)`, e.g. `eagle3_tree_sized`) keeps it: a row
drafting the model's tree asks for the prefix its sizing finds worth verifying, or a plain step
(a batch verifies the smallest size covering every row's request), so a step where retrieval
has no long match and the model is unsure costs what plain decoding does. Neither reads its
own draft at commit: the n-gram appends the emitted tokens, and an EAGLE tree feeds the
accepted path with the target's features at it, whichever draft it came from. (An LM tree's
commit reuses the K/V its own nodes left in its cache, so it cannot follow a path drafted by
retrieval: the model drafter is an EAGLE tree.)

Why both are exact at any temperature. Which draft a row takes, and which chain nodes a merged
tree holds, depend only on the sequence so far (the match length) and, in `merge`, on the model
nodes that come before them, never on the target. The retrieval chain is copied from the
history: its nodes are deterministic candidates, tested as point masses (the engine's exact
one-hot construction: recursive rejection with q = the candidate's point mass). A model tree
of top-k candidates (an EAGLE dynamic tree, `child_logp` None) is tested the same way. A model
tree whose children are drawn from the drafter's law (an EAGLE static tree at temperature > 0,
`child_logp` set, siblings drawn without replacement) keeps that law, and the chain's nodes are
marked (`TreeDraft.point_mass`), so the verifier tests every sibling against its own proposal
law: q (less the earlier rejected draws) for a drawn one, the point mass for a chain node
(`engine.accept.verify_tree_sampling`). That is exact when each sibling, given the siblings
tried before it and their coins, follows the law it is tested against. A chain node always
comes after the model's nodes (switch: a row is all chain or all model; merge: chain nodes are
numbered after the model's M), so under any node the drawn siblings come first, and the chain
node, when present, last: its presence and place depend only on the history and on the draws
before it (the graft follows the chain down the model's tree while its tokens were drawn there,
a shared node staying a drawn node), and its token is fixed by the history, so its law is the
point mass; the draws after it, of which there are none, cannot be conditioned by it. Tested by
chi-square (tests/test_hybrid.py), with the chain nodes tested as draws from q as the negative
control.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import struct

from specjax.drafters.feature import EagleSpec
from specjax.drafters.ngram import NgramSpec
from specjax.engine.protocol import (
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
from specjax.models.config import ModelConfig

if TYPE_CHECKING:
    import numpy as np

    from specjax.model import Model
    from specjax.sampling import SamplingMode

MODES = ("switch", "merge")


@struct.dataclass
class HybridState:
    retrieval: Any
    model: Any
    chose: jax.Array  # [B] bool: the last propose's row took the retrieval chain
    # [B, 4] int32 (batch first, as every per-row leaf): steps with the retrieval chain (merge:
    # with chain nodes in the tree), tokens accepted from it, steps with the model tree only,
    # tokens accepted from it (rows active in the target's step). Merge counts each accepted
    # token by the origin of its node (a prefix the chain shares with the model's tree is the
    # model's), over all steps.
    counts: jax.Array


@dataclasses.dataclass(frozen=True)
class HybridSpec(DrafterSpec):
    retrieval: NgramSpec | None = None
    model: DrafterSpec | None = None
    min_match: int = 2  # suffix match length (tokens) from which a row takes the retrieval chain
    mode: str = "switch"  # see the module docstring

    is_tree = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.min_match, int) or self.min_match < 1:
            raise ValueError(f"min_match must be a positive int, got {self.min_match!r}")
        if self.mode not in MODES:
            raise ValueError(f"unknown hybrid mode {self.mode!r}; valid: {', '.join(MODES)}")

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
        # A model tree with its own sizing (`DynamicTree(sizing=...)`) keeps its sizes: a row
        # that drafts the model's tree asks for the prefix worth verifying (or a plain step).
        sized = set(self.model.verify_sizes) if self.model.sizing is not None else set()
        if self.mode == "merge":  # the model's tree alone (no row kept chain nodes), or all
            return tuple(sorted(sized | {self.model.nodes, self.k}))
        # A step where every row takes the chain verifies what the n-gram chain's own rule
        # asks for (its k nodes, or fewer after a weak match), not the whole tree.
        return tuple(sorted(sized | set(self.retrieval.verify_sizes) | {self.k}))

    def check_compatible(self, target_cfg: ModelConfig, target_dtype: np.dtype) -> None:
        self.model.check_compatible(target_cfg, target_dtype)

    def init(self, params: Params, prefill: TargetPrefill, max_len: int) -> HybridState:
        B = prefill.first.shape[0]
        return HybridState(
            retrieval=self.retrieval.init(None, prefill, max_len),
            model=self.model.init(params["model"], prefill, max_len),
            chose=jnp.zeros((B,), bool),
            counts=jnp.zeros((B, 4), jnp.int32),
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
        chain, n, known = ret.match(params["retrieval"], state.retrieval, last)  # history (+ store)
        # Switch: a row takes the chain when its match has `min_match` tokens and the n-gram
        # chain's own rule would verify some of it, as many tokens as that rule asks for (k
        # after a long match, fewer after a weak one: on a CPU a verify of 8 costs 1.68 plain
        # steps, and the hybrid verifying all k after every 2-token match lost to the n-gram
        # chain alone where the model's drafts were weak, benchmarks/RESULTS.md).
        want = ret.request(n, known)  # [B]
        use = (n >= self.min_match) & (want > 0)  # [B]

        def model_propose(need: jax.Array | None) -> tuple[TreeDraft, Any]:
            return self.model.propose(params["model"], state.model, last, key, mode, sp, need=need)

        shape = jax.eval_shape(model_propose, None)
        if isinstance(shape[0], Draft):
            raise ValueError("a hybrid's model drafter must draft a tree (an EAGLE tree)")
        M = self.model.nodes

        if self.mode == "merge":
            mdraft, mstate = model_propose(None)
            tree = _graft(mdraft.tree, chain, use, self.k)
            drafted = jnp.any(tree.valid[:, M:], axis=1)  # [B] chain nodes kept
            # Chain nodes come last: a step where no row kept any verifies the model's tree
            # (or the prefix of it its sizing chose).
            size = jnp.where(drafted, self.k, self._model_size(mdraft)).astype(jnp.int32)
            marked = jnp.broadcast_to(jnp.arange(self.k) >= M, tree.tokens.shape)
            draft = _with_law(TreeDraft(tree=tree, size=size), mdraft.child_logp, marked)
            return draft, state.replace(model=mstate, chose=drafted)
        # A step where every row takes the chain skips the tree's growth (its root is ranked).
        mdraft, mstate = model_propose(~use)
        tree = _select(use, _chain_tree(chain, self.k), _pad(mdraft.tree, self.k))
        size = jnp.where(use, want, self._model_size(mdraft, self.k)).astype(jnp.int32)
        marked = jnp.broadcast_to(use[:, None], tree.tokens.shape)  # a chain row: all its nodes
        draft = _with_law(TreeDraft(tree=tree, size=size), mdraft.child_logp, marked)
        return draft, state.replace(model=mstate, chose=use)

    @property
    def siblings_without_replacement(self) -> bool:  # how the model drafter draws its children
        return self.model.siblings_without_replacement

    def _model_size(self, mdraft: TreeDraft, whole: int | None = None) -> jax.Array | int:
        """Nodes a row drafting the model's tree asks to verify: its sizing's choice ([B], 0 =
        a plain step), or the whole tree (`whole`, default the model's nodes)."""
        if self.model.sizing is None:
            return self.model.nodes if whole is None else whole
        return mdraft.size

    def commit(
        self,
        params: Params,
        state: HybridState,
        draft: TreeDraft,
        verified: Verified,
        active: jax.Array,
        target: TargetStep,
    ) -> HybridState:
        rstate = self.retrieval.commit(
            params["retrieval"], state.retrieval, draft, verified, active, target
        )
        mstate = self.model.commit(params["model"], state.model, draft, verified, active, target)
        a = active.astype(jnp.int32)
        r = state.chose.astype(jnp.int32)
        if self.mode == "merge":  # accepted tokens by the origin of their node
            j = jnp.arange(verified.path.shape[1])[None, :]
            on_path = j < verified.n[:, None]
            chain = jnp.sum(on_path & (verified.path >= self.model.nodes), axis=1)
            got = jnp.stack([chain, verified.n - chain])
        else:  # the whole step's tokens came from the one draft the row took
            got = jnp.stack([r * verified.n, (1 - r) * verified.n])
        step = jnp.stack([a * r, a * got[0], a * (1 - r), a * got[1]], axis=1)
        return state.replace(retrieval=rstate, model=mstate, counts=state.counts + step)

    def stats(self, state: HybridState, rows: int) -> dict:
        from specjax.sharding import to_host

        c = to_host(state.counts)[:rows].sum(axis=0).tolist()
        return {
            "hybrid": {
                "retrieval_steps": c[0],
                "retrieval_accepted": c[1],
                "model_steps": c[2],
                "model_accepted": c[3],
            },
            **self.model.stats(state.model, rows),  # e.g. the tree's skipped growths
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


def _graft(model: Tree, chain: jax.Array, use: jax.Array, N: int) -> Tree:
    """The model's tree of M nodes and a retrieval chain [B, k] as one tree of N = M + k nodes:
    model nodes keep their indices; chain token j is node M + j, invalid when the chain's first
    j + 1 tokens already are a path of the model's tree (or the row does not `use` its chain),
    and otherwise the child of the previous chain node, or of that path's last model node when
    it is the first token off the path. Parents still precede children."""
    B, M = model.tokens.shape
    k = chain.shape[1]
    assert N == M + k, (N, M, k)
    on = jnp.full((B,), -1, jnp.int32)  # model node equal to the chain so far (-1: the root)
    dup = jnp.ones((B,), bool)  # the chain so far is a path of the model's tree
    parents, valid = [], []
    for j in range(k):  # k is small and static
        parents.append(jnp.where(dup, on, M + j - 1))
        hit = (model.parents == on[:, None]) & (model.tokens == chain[:, j : j + 1]) & model.valid
        found = dup & jnp.any(hit, axis=1)
        valid.append(use & ~found)
        on = jnp.where(found, jnp.argmax(hit, axis=1).astype(jnp.int32), on)
        dup = found
    i = jnp.arange(k, dtype=jnp.int32)
    return Tree(
        tokens=jnp.concatenate([model.tokens, chain.astype(jnp.int32)], axis=1),
        parents=jnp.concatenate([model.parents, jnp.stack(parents, axis=1)], axis=1),
        depth=jnp.concatenate([model.depth, jnp.broadcast_to(i + 1, (B, k))], axis=1),
        valid=jnp.concatenate([model.valid, jnp.stack(valid, axis=1)], axis=1),
    )


def _with_law(draft: TreeDraft, child_logp: jax.Array | None, marked: jax.Array) -> TreeDraft:
    """A hybrid's draft of N nodes with the model's sampling law [B, M + 1, V] (None: its
    candidates are deterministic, and so is every node) padded to N + 1 positions (the padding
    repeats the root's law; no drawn child reads it: chain nodes' children are chain nodes),
    and `marked` [B, N] (the chain's nodes) tested as point masses."""
    if child_logp is None:
        return draft
    B, M1, V = child_logp.shape
    N = draft.tree.tokens.shape[1]
    pad = jnp.broadcast_to(child_logp[:, :1], (B, N + 1 - M1, V))
    return draft._replace(child_logp=jnp.concatenate([child_logp, pad], axis=1), point_mass=marked)


def _select(use: jax.Array, a: Tree, b: Tree) -> Tree:
    return Tree(*(jnp.where(use[:, None], x, y) for x, y in zip(a, b)))


def hybrid(retrieval: Drafter, model: Drafter, mode: str = "switch", min_match: int = 2) -> Drafter:
    """`switch`: per step and row, `retrieval`'s chain (an n-gram drafter) when its longest
    suffix match has >= `min_match` tokens, else `model`'s tree (an EAGLE tree: dynamic, or
    static, whose children are drawn from the drafter's law at temperature > 0). `merge`:
    `model`'s tree with that chain grafted onto it (where the match is long enough), verified
    in one forward. Lossless at any temperature (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"unknown hybrid mode {mode!r}; valid: {', '.join(MODES)}")

    def bind(target: Model) -> tuple[HybridSpec, Params]:
        rspec, rparams = retrieval.bind(target)
        if not isinstance(rspec, NgramSpec) or rspec.is_tree:
            raise ValueError(
                f"a hybrid's retrieval drafter must be an n-gram chain, got {retrieval.name!r}"
            )
        if mode == "merge":  # every chain node is grafted: the chain's own sizing is not used
            rspec = dataclasses.replace(rspec, adaptive=False)
        mspec, mparams = model.bind(target)
        if not (isinstance(mspec, EagleSpec) and mspec.is_tree):
            raise ValueError(
                f"a hybrid's model drafter must be an EAGLE tree (eagle / eagle3 with a "
                f"DynamicTree or a StaticTree), got {model.name!r}"
            )
        k = rspec.k + mspec.nodes if mode == "merge" else max(rspec.k, mspec.nodes)
        spec = HybridSpec(
            k=k,
            retrieval=rspec,
            model=mspec,
            min_match=min_match,
            mode=mode,
            hidden_layers=tuple(mspec.hidden_layers),
        )
        return spec, {"retrieval": rparams, "model": mparams}

    k = retrieval.k + model.k if mode == "merge" else max(retrieval.k, model.k)
    name = f"hybrid({retrieval.name} + {model.name}, {mode}, min_match={min_match})"
    return Drafter(name=name, k=k, binder=bind, tokenizer=model.tokenizer)
