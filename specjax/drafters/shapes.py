"""Draft tree shapes: what every tree drafter shares.

- `StaticTree`: a fixed tree from a Medusa / EAGLE-1 choice list (or a preset in
  specjax/configs/trees/), its validation (`check_static_tree`), the numpy schedule that drafts it
  depth by depth (`static_tree_schedule`) and node depths (`tree_depths`);
- `DynamicTree`: an EAGLE-2 tree grown from the draft's confidence, its validation
  (`check_dynamic_tree`) and the growth itself (`grow_dynamic_tree`), shared by every drafter that
  returns a distribution (LM drafters, EAGLE).

The tree a drafter hands the engine is a `specjax.engine.protocol.Tree` record; the structure the
engine derives from it for verification (masks, positions, paths) lives in `specjax.engine.tree`.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from specjax.engine.protocol import Tree
from specjax.engine.verify import size_index


class GateState(NamedTuple):
    """Per-row state of a `DraftGate` (batch first, as every drafter state leaf)."""

    value: jax.Array  # [B] float32 decayed mean of what drafted steps paid (1: a plain step's)
    wait: jax.Array  # [B] int32 steps left without drafting
    backoff: jax.Array  # [B] int32 the next wait, doubling while drafting keeps not paying
    asked: jax.Array  # [B] int32 the last propose's requested verify size (-1: it skipped)
    skipped: jax.Array  # [B] int32 steps without drafting (statistics)


@dataclasses.dataclass(frozen=True)
class DraftGate:
    """Draft only when it pays. `VerifySizing` makes a doubtful draft cost only a plain verify,
    but the drafting itself is paid every step (on the 2-core CPU an EAGLE tree's propose +
    commit is ~25% of a plain step), so where the drafter keeps missing (prose, for SmolLM2's
    EAGLE-3) a sized tree still loses to plain decoding. The gate keeps a
    per-row decayed mean of what each drafted step paid: tokens emitted x `plain` / the step's
    cost (`VerifySizing.costs` at the size verified, drafting included), so 1 = what a plain step
    without drafting pays. While it is below 1 the row waits `backoff` steps without drafting
    (the drafter only commits, so its state stays in step), then drafts once to look again;
    `backoff` doubles up to `max_wait` while that keeps failing and resets when drafting pays.
    A batch skips the drafting when every active row waits.

    Exact at any temperature: whether a step drafts depends only on earlier steps, and a step
    without a draft is a plain step. Measured on the 2-core CPU it neither wins nor loses (what
    it saves on skipped drafts it loses in drafts it does not make; benchmarks/RESULTS.md), so
    it is opt-in."""

    plain: float  # a plain decode step without drafting, in the unit of `VerifySizing.costs`
    decay: float = 0.5  # weight of the newest drafted step in `value`
    max_wait: int = 8

    def __post_init__(self) -> None:
        if not (
            isinstance(self.plain, numbers.Real) and self.plain > 0 and np.isfinite(self.plain)
        ):
            raise ValueError(f"DraftGate plain must be a positive cost, got {self.plain!r}")
        if not (isinstance(self.decay, numbers.Real) and 0 < self.decay <= 1):
            raise ValueError(f"DraftGate decay must be in (0, 1], got {self.decay!r}")
        if not (_is_int(self.max_wait) and self.max_wait >= 1):
            raise ValueError(f"DraftGate max_wait must be a positive int, got {self.max_wait!r}")

    def init(self, batch: int) -> GateState:
        zeros = jnp.zeros((batch,), jnp.int32)
        return GateState(jnp.ones((batch,), jnp.float32), zeros, zeros + 1, zeros - 1, zeros)

    def open_rows(self, g: GateState) -> jax.Array:
        """[B] bool: the rows that draft this step (finished rows always wait)."""
        return g.wait <= 0

    def closed(self, g: GateState) -> jax.Array:
        """[] bool: skip this step's drafting (every row waits)."""
        return ~jnp.any(self.open_rows(g))

    def update(
        self, g: GateState, tokens: jax.Array, cost: jax.Array, active: jax.Array
    ) -> GateState:
        """After a step: `tokens` [B] emitted, `cost` [] of the verify size the drafter asked
        for (`g.asked`, batch-wide), `active` [B] the rows that took part."""
        drafted = g.asked >= 0
        paid = tokens.astype(jnp.float32) * self.plain / cost
        value = jnp.where(drafted, (1 - self.decay) * g.value + self.decay * paid, g.value)
        bad = value < 1.0
        wait = jnp.where(drafted, jnp.where(bad, g.backoff, 0), jnp.maximum(g.wait - 1, 0))
        grown = jnp.minimum(2 * g.backoff, self.max_wait)
        backoff = jnp.where(drafted, jnp.where(bad, grown, 1), g.backoff)
        return GateState(
            value=jnp.where(active, value, g.value),
            # A finished row never holds the gate open for the others.
            wait=jnp.where(active, wait, self.max_wait),
            backoff=jnp.where(active, backoff, g.backoff),
            asked=g.asked,
            skipped=g.skipped + (active & ~drafted).astype(jnp.int32),
        )


@dataclasses.dataclass(frozen=True)
class VerifySizing:
    """Verify only what is worth it: each step, on device, a drafter (a dynamic tree, whose
    nodes are listed best first, or a chain) verifies the prefix of its draft that maximises
    expected tokens per unit of cost, among a few static sizes (one compiled verify branch
    each) or none at all (a plain one-token step).

    The expected tokens of a prefix of n nodes are 1 + the sum of their draft probabilities
    (each node's cumulative draft probability: the chance, as far as the drafter knows, that the
    target agrees with its whole path), so a confident draft is verified long and a doubtful
    one short. `costs` are what a whole step costs at verify size 0 (plain), sizes[0], ...
    (drafting included, in any unit): measured per device by `specjax.autotune.measure_sizing`.
    Exactness does not depend on them: any prefix of a tree (or chain) is one, verified
    exactly, provided a chain whose tokens were sampled chooses its prefix before drawing them
    (`chain_size`: `choose_before_drawing`)."""

    sizes: tuple[int, ...]  # ascending verify sizes in nodes; the last is the tree's nodes
    costs: tuple[float, ...]  # len(sizes) + 1 step costs: plain step first, then per size
    gate: DraftGate | None = None  # skip the drafting itself while it does not pay
    # A dynamic tree grows past its first level only if `worth_growing` (else a plain step
    # without the tree's growth: measured 2-6% faster for SmolLM2's EAGLE-3 tree, 2026-12-06).
    early_exit: bool = False

    def __post_init__(self) -> None:
        sizes, costs = tuple(self.sizes), tuple(float(c) for c in self.costs)
        if (
            not sizes
            or not all(_is_int(s) and s >= 1 for s in sizes)
            or list(sizes) != sorted(set(sizes))
        ):
            raise ValueError(f"VerifySizing sizes must be ascending positive ints, got {sizes!r}")
        if len(costs) != len(sizes) + 1 or not all(c > 0 and np.isfinite(c) for c in costs):
            raise ValueError(
                f"VerifySizing needs {len(sizes) + 1} positive costs (plain step, then one per "
                f"size {sizes}), got {self.costs!r}"
            )
        if self.gate is not None and not isinstance(self.gate, DraftGate):
            raise TypeError(f"VerifySizing gate must be a DraftGate or None, got {self.gate!r}")
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "costs", costs)

    def choose(self, score: jax.Array) -> jax.Array:
        """score [B, N]: each node's cumulative draft log-prob, nodes best first -> [B] int32
        nodes worth verifying (0: a plain step)."""
        expected = jnp.cumsum(jnp.exp(score.astype(jnp.float32)), axis=1)  # [B, N]
        return self._best(1.0 + expected[:, jnp.asarray(self.sizes) - 1])

    def _best(self, gain: jax.Array) -> jax.Array:
        """gain [B, S]: expected tokens of verifying each size -> [B] int32 the size (or 0, a
        plain step's 1 token) with the most tokens per unit of cost."""
        plain = jnp.ones((gain.shape[0], 1), jnp.float32)
        ratio = jnp.concatenate([plain, gain], axis=1) / jnp.asarray(self.costs, jnp.float32)[None]
        return jnp.asarray((0,) + self.sizes, jnp.int32)[jnp.argmax(ratio, axis=1)]

    def _chain_gain(self, top: jax.Array) -> jax.Array:
        """top [B] -> [B, S] expected tokens of each size for a chain whose every position is
        as likely as `top` (top, top^2, ..): the estimate before the chain is drawn."""
        j = jnp.arange(1, self.sizes[-1] + 1, dtype=jnp.float32)
        chain = jnp.cumsum(top.astype(jnp.float32)[:, None] ** j[None], axis=1)  # [B, N]
        return 1.0 + chain[:, jnp.asarray(self.sizes) - 1]

    def choose_before_drawing(self, first_logp: jax.Array) -> jax.Array:
        """For a chain whose tokens are sampled from the drafter's law (temperature > 0):
        first_logp [B, V], the first position's draft log-probs, known before any token is
        drawn -> [B] int32 nodes worth verifying (0: a plain step), estimated as if every
        position were as likely as that law's best token (the chain top, top^2, ..).

        Why not `choose` on the drawn tokens' probabilities: a sampled token is tested against
        the draft law it was drawn from (accepted with probability min(1, p/q)), which is exact
        only if whether it is tested does not depend on the token itself. A size read from the
        drawn tokens keeps likely draws and drops unlikely ones, so the tested tokens no longer
        follow q and the output no longer follows the target (measured: a chi-square p-value of
        6e-50 at batch 1, tests/test_eagle.py's negative control). Deterministic candidates (greedy
        drafts, trees' top-k, n-gram tokens) are tested as point masses, exact whatever chose
        them: they keep `choose`."""
        top = jnp.exp(jnp.max(first_logp.astype(jnp.float32), axis=-1))  # [B]
        return self._best(self._chain_gain(top))

    def worth_growing(self, top: jax.Array) -> jax.Array:
        """top [B]: the best first-level candidate's draft probability -> [B] bool: some size
        would beat a plain step if every deeper level were as likely as that candidate (the
        chain top, top^2, ..: the estimate a tree's first level allows; `choose` then decides
        on the grown tree). Only an estimate: which drafts are verified never changes what is
        emitted."""
        costs = jnp.asarray(self.costs, jnp.float32)
        return jnp.any(self._chain_gain(top) / costs[None, 1:] > 1.0 / costs[0], axis=1)

    def step_cost(self, asked: jax.Array, active: jax.Array) -> jax.Array:
        """[] the cost of the step that verifies the smallest size covering every active row's
        request `asked` [B] (0: a plain step), as the engine's verify chooses it."""
        return jnp.asarray(self.costs, jnp.float32)[size_index(asked, active, self.sizes)]


@dataclasses.dataclass(frozen=True)
class DynamicTree:
    """EAGLE-2 style dynamic draft tree: `nodes` kept out of the candidates expanded over
    `depth` levels with `top_k` children per frontier node and a frontier of `top_k` nodes.
    With `sizing`, each step verifies only the prefix of the tree worth it (`VerifySizing`)."""

    nodes: int = 8
    depth: int = 4
    top_k: int = 3
    sizing: VerifySizing | None = None

    def __post_init__(self) -> None:
        check_dynamic_tree(self.nodes, self.depth, self.top_k)
        if self.sizing is not None:
            if not isinstance(self.sizing, VerifySizing):
                raise TypeError(f"sizing must be a VerifySizing or None, got {self.sizing!r}")
            if self.sizing.sizes[-1] != self.nodes:
                raise ValueError(
                    f"the largest verify size must be the tree's {self.nodes} nodes, got "
                    f"sizes {self.sizing.sizes}"
                )


def chain_size(
    sizing: VerifySizing, confs: Sequence[jax.Array], first_logp: jax.Array | None
) -> jax.Array:
    """[B] int32: how many tokens of a drafted chain are worth verifying. `confs`: the drawn
    tokens' draft log-probs ([B, n] pieces, in chain order); `first_logp`: the first position's
    draft log-probs [B, V] when the tokens were sampled, None when they are deterministic
    (greedy). Deterministic tokens: `VerifySizing.choose` on their cumulative probabilities;
    sampled ones: `VerifySizing.choose_before_drawing` (a choice that read the drawn tokens
    would bias what is emitted)."""
    if first_logp is None:
        return sizing.choose(jnp.cumsum(jnp.concatenate(list(confs), axis=1), axis=1))
    return sizing.choose_before_drawing(first_logp)


def _is_rank(c: object) -> bool:
    return isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 0


@dataclasses.dataclass(frozen=True)
class StaticTree:
    """A fixed draft tree given as a Medusa / EAGLE-1 choice list: each choice is the path of
    sibling ranks from the root, e.g. [[0], [1], [0, 0]] = the two best tokens after `last`
    and the best token after the first of them. Every prefix of a choice must be listed too.
    `choices` may also name a preset in specjax/configs/trees/ (or a YAML path): see
    `load_choices`."""

    choices: str | tuple
    name: str | None = None

    def __post_init__(self) -> None:
        choices, name = self.choices, self.name
        if isinstance(choices, str):
            choices, name = load_choices(choices), name or choices
        if not isinstance(choices, (list, tuple)):
            raise ValueError(f"tree choices must be a list of lists of ints, got {choices!r}")
        norm = []
        for ch in choices:
            if not isinstance(ch, (list, tuple)) or not ch or not all(map(_is_rank, ch)):
                raise ValueError(
                    f"invalid tree choice {ch!r}: each choice must be a non-empty "
                    f"list of sibling ranks (ints >= 0)"
                )
            norm.append(tuple(int(c) for c in ch))
        dup = sorted({c for c in norm if norm.count(c) > 1})
        if dup:
            raise ValueError(f"tree choices listed more than once: {[list(c) for c in dup]}")
        parents_from_choices(norm)  # raises on an empty list or a missing parent
        object.__setattr__(self, "choices", tuple(norm))
        object.__setattr__(self, "name", name)

    @property
    def parents_rank(self) -> tuple[tuple, tuple]:
        parents, rank = parents_from_choices(self.choices)
        return tuple(parents.tolist()), tuple(rank.tolist())

    @property
    def nodes(self) -> int:
        return len(self.choices)

    @property
    def depth(self) -> int:
        return max(len(c) for c in self.choices)

    def __str__(self) -> str:
        return f"StaticTree({self.name or 'custom'}, nodes={self.nodes}, depth={self.depth})"


def tree_depths(parents: Sequence[int]) -> np.ndarray:
    """Static parents [N] (topologically ordered: parents[i] < i, -1 = under the root) -> depth
    [N] (1 for the root's children)."""
    depth = np.zeros(len(parents), np.int32)
    for i, p in enumerate(parents):
        depth[i] = 1 if p < 0 else depth[p] + 1
    return depth


def check_static_tree(k: int, parents: Sequence[int], rank: Sequence[int]) -> None:
    """Raise ValueError unless (parents, rank) describe a valid static tree of k nodes: every
    parent comes before its child and sibling ranks are distinct ints >= 0."""
    par, rk = tuple(parents), tuple(rank)
    if len(par) != k or len(rk) != k:
        raise ValueError(
            f"a static tree of k={k} nodes needs {k} parents and ranks, got "
            f"{len(par)} and {len(rk)}"
        )
    seen = set()
    for i, (p, r) in enumerate(zip(par, rk)):
        if not (_is_int(p) and _is_int(r)):
            raise ValueError(
                f"static tree parents and ranks must be ints, node {i} has parent {p!r}, rank {r!r}"
            )
        if not -1 <= p < i:
            raise ValueError(
                f"node {i} has parent {p}: parents must come first (-1 <= parent < index)"
            )
        if r < 0 or (p, r) in seen:
            raise ValueError(
                f"node {i} has rank {r} under parent {p}: ranks must be >= 0 "
                f"and distinct among siblings"
            )
        seen.add((p, r))


def dynamic_pool_size(depth: int, top_k: int) -> int:
    """Candidates an EAGLE-2 growth of `depth` levels with `top_k` expands."""
    return top_k + (depth - 1) * top_k**2


def check_dynamic_tree(nodes: int, depth: int, top_k: int) -> None:
    """Raise ValueError unless a dynamic tree of `nodes` nodes can be grown over `depth` levels
    with `top_k` children per frontier node."""
    for name, v in (("nodes", nodes), ("depth", depth), ("top_k", top_k)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"DynamicTree {name} must be a positive int, got {v!r}")
    pool = dynamic_pool_size(depth, top_k)
    if nodes > pool:
        raise ValueError(
            f"a tree of {nodes} nodes needs more candidates than depth={depth}, "
            f"top_k={top_k} expand ({pool})"
        )


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def parents_from_choices(choices: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Medusa / EAGLE-1 choice lists -> (parents [N], rank [N]).

    Each choice is the path of sibling ranks from the root: [0] is the root's best child,
    [0, 1] the second-best child of that node. Nodes are sorted by depth, then lexicographically,
    so parents come before children. `rank[i]` is node i's rank among its siblings (which top-k
    candidate of its parent's distribution it takes).
    """
    paths = sorted({tuple(int(c) for c in ch) for ch in choices}, key=lambda p: (len(p), p))
    if not paths:
        raise ValueError("tree choices are empty")
    index = {p: i for i, p in enumerate(paths)}
    parents, rank = [], []
    for p in paths:
        if any(c < 0 for c in p) or len(p) == 0:
            raise ValueError(f"invalid tree choice {list(p)}: ranks must be >= 0, path non-empty")
        if len(p) > 1 and p[:-1] not in index:
            raise ValueError(f"tree choice {list(p)} has no parent {list(p[:-1])} in the list")
        parents.append(index[p[:-1]] if len(p) > 1 else -1)
        rank.append(p[-1])
    return np.asarray(parents, np.int32), np.asarray(rank, np.int32)


TREES_DIR = Path(__file__).resolve().parents[1] / "configs" / "trees"


def available_trees() -> list[str]:
    """Names of the tree presets in specjax/configs/trees/ (NAME.yaml)."""
    return sorted(p.stem for p in TREES_DIR.glob("*.yaml"))


def load_choices(name_or_path: str) -> list[list[int]]:
    """A named tree preset (specjax/configs/trees/NAME.yaml) or a YAML file path -> its choice
    list. The file holds `{name, description, choices: [[0], [1], [0, 0], ...]}`."""
    import yaml

    path = Path(name_or_path)
    is_path = path.suffix in (".yaml", ".yml") or len(path.parts) > 1
    if not is_path:
        path = TREES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        what = f"no tree file {str(path)!r}" if is_path else f"unknown tree {name_or_path!r}"
        raise ValueError(
            f"{what}; available presets: {', '.join(available_trees()) or '(none)'} "
            f"(or give a path to a .yaml file)"
        )
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise ValueError(f"{path}: a tree file needs a `choices:` list of lists of ints")
    return data["choices"]


class _Expansion(NamedTuple):
    """How one depth d of a static tree is drafted (all static numpy)."""

    fed: np.ndarray  # [T] depth d-1 nodes fed as one block (empty for d = 1: the root)
    off: int  # their window offset
    vis: np.ndarray  # [T, W] window slots each fed node sees (its ancestors and itself)
    kids: np.ndarray  # [C] the depth-d nodes
    slot: np.ndarray  # [C] index of each kid's parent in `fed` (0 = the root for d = 1)
    rank: np.ndarray  # [C] which candidate of its parent each kid takes
    top: int  # candidates per fed node (max rank + 1)


# (expansions per depth 1..D, depth [N], window offset [N] (-1: leaf), window size W)
StaticSchedule = tuple[tuple[_Expansion, ...], np.ndarray, np.ndarray, int]


@functools.cache
def static_tree_schedule(parents: tuple, rank: tuple) -> StaticSchedule:
    """-> (expansions per depth 1..D, depth [N], window offset [N] (-1: leaf, never fed), W).

    Window layout: the fed nodes (those with children) depth by depth, so each depth's block is
    contiguous and written at one `write_offset`."""
    par, rk = np.asarray(parents, np.int32), np.asarray(rank, np.int32)
    N = len(par)
    depth = tree_depths(parents)
    has_kids = np.zeros(N, bool)
    has_kids[par[par >= 0]] = True
    fed_off = np.full(N, -1, np.int32)
    W = int(has_kids.sum())
    exps, off = [], 0
    for d in range(1, int(depth.max()) + 1):
        kids = np.flatnonzero(depth == d).astype(np.int32)
        if d == 1:
            fed = np.zeros(0, np.int32)
            slot = np.zeros(len(kids), np.int32)
        else:
            fed = np.flatnonzero((depth == d - 1) & has_kids).astype(np.int32)
            fed_off[fed] = off + np.arange(len(fed))
            slot = np.searchsorted(fed, par[kids]).astype(np.int32)
        vis = np.zeros((len(fed), W), bool)
        for j, f in enumerate(fed):
            a = f
            while a >= 0:  # itself and its ancestors, all fed at earlier depths
                vis[j, fed_off[a]] = True
                a = par[a]
        exps.append(
            _Expansion(
                fed=fed,
                off=off,
                vis=vis,
                kids=kids,
                slot=slot,
                rank=rk[kids],
                top=int(rk[kids].max()) + 1,
            )
        )
        off += len(fed)
    return tuple(exps), depth, fed_off, W


class StaticShaped:
    """What a drafter of a static tree derives from its `parents` and `rank` fields (LM and
    EAGLE static trees): the depth-by-depth schedule and the longest accept (the depth)."""

    @property
    def _schedule(self) -> StaticSchedule:
        return static_tree_schedule(tuple(self.parents), tuple(self.rank))

    @property
    def max_accept(self) -> int:
        return len(self._schedule[0])  # the tree depth


def grow_dynamic_tree(
    root_lp: jax.Array,
    feed: Callable[..., tuple[jax.Array, jax.Array | None, Any]],
    carry: Any,
    root_feat: jax.Array | None,
    *,
    top_k: int,
    depth: int,
    nodes: int,
    token_map: jax.Array | None = None,
) -> tuple[Tree, jax.Array, Any]:
    """EAGLE-2 tree growth shared by every drafter that returns a distribution.

    root_lp [B, V]: ranking log-probs after `last`. `feed(carry, tok [B, kk], feat [B, kk, ...]
    or None, frontier_depth, vis [B, kk, W], off)` feeds one frontier as a block at window
    offset `off` and returns (log-probs of its children [B, kk, V], per-node output features
    [B, kk, ...] or None, carry). A frontier node's `feat` is its parent's output feature
    (`root_feat` [B, ...] for depth 1; feature drafters such as EAGLE draft on their own
    features; LM drafters pass None). `token_map` [V'] maps the log-prob axis to target ids
    when the drafter ranks over its own smaller vocabulary (EAGLE-3's draft vocabulary).
    -> (Tree of `nodes` nodes listed best first, window offset of each node's K/V [B, nodes]
    (-1: leaf), carry, cumulative log-prob of each node [B, nodes]).
    """
    kk, D, N = top_k, depth, nodes
    B = root_lp.shape[0]
    ids = (lambda t: t) if token_map is None else (lambda t: token_map[t])  # noqa: E731
    score, tok = jax.lax.top_k(root_lp, kk)  # [B, kk]
    tok = ids(tok)
    feat = None if root_feat is None else jnp.repeat(root_feat[:, None], kk, axis=1)
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
        child_all, out_feat, carry = feed(carry, tok, feat, d - 1, vis, off)
        fed_ids.append(front_idx)
        fed_offs.append(jnp.broadcast_to(off + jnp.arange(kk, dtype=jnp.int32), (B, kk)))
        child_lp, child_tok = jax.lax.top_k(child_all, kk)  # [B, kk, kk]
        child_tok = ids(child_tok)
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
        if out_feat is not None:  # each new frontier node drafts from its parent's output
            idx = (pick // kk).reshape((B, kk) + (1,) * (out_feat.ndim - 2))
            feat = jnp.take_along_axis(out_feat, idx, axis=1)
    cat = lambda xs: jnp.concatenate(xs, axis=1)  # noqa: E731
    p_tok, p_score, p_parent, p_depth = map(cat, (pool_tok, pool_score, pool_parent, pool_depth))
    # Only the frontiers of depths 1..D-1 were fed (their K/V sit in the window); the other
    # candidates are leaves.
    p_fed = jnp.full(p_tok.shape, -1, jnp.int32)
    if fed_ids:
        p_fed = p_fed.at[jnp.arange(B)[:, None], cat(fed_ids)].set(cat(fed_offs))
    # Keep the N best, best first (a `VerifySizing` verifies prefixes of this order). The order
    # is topological: a child never scores above its parent (log-probs are <= 0), and a stable
    # sort puts the parent (earlier in the pool) first on a tie.
    keep = jnp.argsort(-p_score, axis=1, stable=True)[:, :N]  # [B, N]
    take = lambda x: jnp.take_along_axis(x, keep, axis=1)  # noqa: E731
    node_of = (
        jnp.full((B, p_tok.shape[1]), -1, jnp.int32)
        .at[jnp.arange(B)[:, None], keep]
        .set(jnp.arange(N, dtype=jnp.int32)[None, :])
    )
    par_pool = take(p_parent)
    parents = jnp.where(
        par_pool >= 0, jnp.take_along_axis(node_of, jnp.maximum(par_pool, 0), axis=1), -1
    )
    tree = Tree(
        tokens=take(p_tok), parents=parents, depth=take(p_depth), valid=take(p_score) > -jnp.inf
    )
    return tree, take(p_fed), carry, take(p_score)
