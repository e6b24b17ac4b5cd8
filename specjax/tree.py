"""Static-shape padded draft trees.

A tree of N draft nodes per row continues the row's newest token `last` (the root, block index
0). Node i sits at block index i + 1. Arrays (DESIGN.md):

    tokens  [B, N] int32
    parents [B, N] int32   node index of the parent, -1 for children of the root; parents[i] < i
    depth   [B, N] int32   1 for children of the root
    valid   [B, N] bool    padding nodes are False (never accepted)

A chain of K tokens is the tree with parents[i] = i - 1. Everything below is derived from
`parents`: the ancestor-or-self attention mask over the verify block, position ids
(`length + depth`), and the root-to-node paths used to commit the accepted branch.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Tree(NamedTuple):
    tokens: jax.Array  # [B, N]
    parents: jax.Array  # [B, N]
    depth: jax.Array  # [B, N]
    valid: jax.Array  # [B, N]


def chain_parents(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int32) - 1


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


TREES_DIR = Path(__file__).resolve().parent / "configs" / "trees"


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
        raise ValueError(f"{what}; available presets: {', '.join(available_trees()) or '(none)'} "
                         f"(or give a path to a .yaml file)")
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise ValueError(f"{path}: a tree file needs a `choices:` list of lists of ints")
    return data["choices"]


def depth_from_parents(parents: jax.Array) -> jax.Array:
    """[..., N] parents (topologically ordered) -> [..., N] depth (root children = 1)."""
    N = parents.shape[-1]
    depth = jnp.zeros(parents.shape, jnp.int32)
    for i in range(N):  # N is small and static; parents[i] < i
        p = parents[..., i]
        d = jnp.where(p < 0, 1, jnp.take_along_axis(depth, jnp.maximum(p, 0)[..., None], -1)[..., 0] + 1)
        depth = depth.at[..., i].set(d)
    return depth


def ancestor_matrix(parents: jax.Array) -> jax.Array:
    """[B, N] parents -> [B, N, N] bool, A[b, i, j] = node j is node i or one of its ancestors."""
    B, N = parents.shape
    eye = jnp.broadcast_to(jnp.eye(N, dtype=bool), (B, N, N))
    parent_onehot = jax.nn.one_hot(parents, N, dtype=jnp.int32) > 0  # -1 -> all False
    anc = eye
    # Path doubling: after r rounds, A covers ancestors up to 2^r - 1 levels up.
    reach = parent_onehot
    for _ in range(max(1, int(np.ceil(np.log2(N + 1))))):
        anc = anc | jnp.einsum("bij,bjk->bik", anc.astype(jnp.int32), reach.astype(jnp.int32)) > 0
        reach = jnp.einsum("bij,bjk->bik", reach.astype(jnp.int32), reach.astype(jnp.int32)) > 0
    return anc


def block_mask(parents: jax.Array) -> jax.Array:
    """Ancestor-or-self mask [B, N+1, N+1] over the verify block [root, node_0 .. node_{N-1}]."""
    B, N = parents.shape
    anc = ancestor_matrix(parents)
    top = jnp.zeros((B, 1, N + 1), bool).at[:, :, 0].set(True)  # the root sees itself
    rows = jnp.concatenate([jnp.ones((B, N, 1), bool), anc], axis=2)  # nodes see the root
    return jnp.concatenate([top, rows], axis=1)


def block_positions(depth: jax.Array, lengths: jax.Array) -> jax.Array:
    """Position ids [B, N+1] of the verify block: the root at `length`, node i at length+depth."""
    root = jnp.zeros((depth.shape[0], 1), depth.dtype)  # also right for a tree of 0 nodes
    return lengths[:, None] + jnp.concatenate([root, depth], axis=1)


def path_to(parents: jax.Array, node: jax.Array, max_depth: int) -> jax.Array:
    """Node indices [B, max_depth] on the root-to-`node` path, in depth order (-1 padded).

    node [B] (-1 = the root itself: empty path)."""
    B, N = parents.shape
    walk = [node]
    for _ in range(max_depth - 1):
        prev = walk[-1]
        walk.append(jnp.where(prev >= 0,
                              jnp.take_along_axis(parents, jnp.maximum(prev, 0)[:, None], 1)[:, 0],
                              -1))
    up = jnp.stack(walk, axis=1)  # [B, max_depth]: node, parent, grandparent, ...
    n = jnp.sum(up >= 0, axis=1)  # path length
    # Reverse the first n entries so the path starts at depth 1.
    idx = jnp.clip(n[:, None] - 1 - jnp.arange(max_depth)[None, :], 0, max_depth - 1)
    path = jnp.take_along_axis(up, idx, axis=1)
    return jnp.where(jnp.arange(max_depth)[None, :] < n[:, None], path, -1)


# ----------------------------------------------------------------------------- verification

class TreeAccepted(NamedTuple):
    node: jax.Array  # [B] deepest accepted node (-1: none, only the bonus token is emitted)
    n: jax.Array  # [B] accepted draft tokens (= depth of `node`)
    path: jax.Array  # [B, D] accepted nodes root-to-leaf (-1 padded)
    bonus: jax.Array  # [B] target token after the accepted path


def verify_tree_greedy(target_logits: jax.Array, tree: Tree, max_depth: int) -> TreeAccepted:
    """Temperature 0: accept the deepest node whose whole root path agrees with the target
    argmax at each parent. target_logits [B, N+1, V] over the block [root, nodes]."""
    best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, N+1]
    at_parent = jnp.take_along_axis(best, tree.parents + 1, axis=1)  # [B, N]
    correct = (tree.tokens == at_parent) & tree.valid
    anc = ancestor_matrix(tree.parents)
    ok = jnp.all(jnp.where(anc, correct[:, None, :], True), axis=2)  # [B, N]
    score = jnp.where(ok, tree.depth, 0)
    n = jnp.max(score, axis=1)
    node = jnp.where(n > 0, jnp.argmax(score, axis=1), -1).astype(jnp.int32)
    bonus = jnp.take_along_axis(best, (node + 1)[:, None], axis=1)[:, 0]
    return TreeAccepted(node=node, n=n.astype(jnp.int32), path=path_to(tree.parents, node, max_depth),
                        bonus=bonus)


def verify_tree_sampling(key: jax.Array, target_logp: jax.Array, tree: Tree,
                         child_logp, max_depth: int, without_replacement: bool) -> TreeAccepted:
    """Recursive rejection sampling over siblings (SpecInfer, Miao et al. 2024; Jeon et al. 2024).

    target_logp [B, N+1, V]: processed target log-probs at the block positions.
    child_logp [B, N+1, V]: the draft distribution q from which the children of each block
    position were drawn, or None when children are deterministic candidates.

    Walk from the root. At the current node, try its children in order: accept child x with
    probability min(1, p(x)/q(x)); on rejection replace p by norm(max(p - q, 0)) and try the next
    sibling. Exactness of the sibling loop depends on how siblings were drawn:
      * i.i.d. from q (with replacement): q stays the same for every sibling (SpecInfer).
      * without replacement from q: after rejecting x, q becomes q with x removed and
        renormalized (Jeon et al., "Recursive Speculative Decoding") — each sibling is then a
        draw from exactly that conditional q, so every step is a standard exact rejection step.
      * deterministic candidates (`child_logp` None): q is one-hot on x, so acceptance is p(x)
        and the residual is p with x removed.
    When a child is accepted, p and q move to that child's position. When the current node's
    children are exhausted, the bonus token is drawn from the current (residual) p.
    """
    B, N = tree.tokens.shape
    keys = jax.random.split(key, N + 1)
    p = jnp.exp(target_logp[:, 0])  # [B, V]
    q = None if child_logp is None else jnp.exp(child_logp[:, 0])
    cur = jnp.full((B,), -1, jnp.int32)
    b_idx = jnp.arange(B)
    for i in range(N):  # nodes are topologically ordered; N is small and static
        x = tree.tokens[:, i]
        is_child = (tree.parents[:, i] == cur) & tree.valid[:, i]
        p_x = p[b_idx, x]
        q_vec = jax.nn.one_hot(x, p.shape[-1], dtype=p.dtype) if q is None else q
        q_x = q_vec[b_idx, x]
        u = jax.random.uniform(keys[i], (B,))
        accept = is_child & (u * q_x < p_x)
        reject = is_child & ~accept
        # Rejected: residual target distribution (and, without replacement, residual draft).
        resid = jnp.maximum(p - q_vec, 0.0)
        resid = resid / jnp.maximum(resid.sum(-1, keepdims=True), 1e-30)
        new_p = jnp.where(accept[:, None], jnp.exp(target_logp[:, i + 1]),
                          jnp.where(reject[:, None], resid, p))
        if q is not None:
            q_next = jnp.exp(child_logp[:, i + 1])
            if without_replacement:
                q_wo = q.at[b_idx, x].set(0.0)
                q_wo = q_wo / jnp.maximum(q_wo.sum(-1, keepdims=True), 1e-30)
            else:
                q_wo = q
            q = jnp.where(accept[:, None], q_next, jnp.where(reject[:, None], q_wo, q))
        p = new_p
        cur = jnp.where(accept, i, cur)
    bonus = jax.random.categorical(keys[N], jnp.log(p), axis=-1).astype(jnp.int32)
    depth = jnp.where(cur >= 0, jnp.take_along_axis(tree.depth, jnp.maximum(cur, 0)[:, None], 1)[:, 0], 0)
    return TreeAccepted(node=cur, n=depth.astype(jnp.int32),
                        path=path_to(tree.parents, cur, max_depth), bonus=bonus)
