"""What the engine derives from a draft tree's `parents` to verify it.

A tree of N draft nodes per row (`specjax.engine.protocol.Tree`) continues the row's newest token
`last` (the root, block index 0); node i sits at block index i + 1. A chain of K tokens is the
tree with parents[i] = i - 1. From `parents` come the ancestor-or-self attention mask over the
verify block, position ids (`position of last + depth`) and the root-to-node paths used to commit
the accepted branch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def chain_parents(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int32) - 1


def depth_from_parents(parents: jax.Array) -> jax.Array:
    """[..., N] parents (topologically ordered) -> [..., N] depth (root children = 1)."""
    N = parents.shape[-1]
    depth = jnp.zeros(parents.shape, jnp.int32)
    for i in range(N):  # N is small and static; parents[i] < i
        p = parents[..., i]
        d = jnp.where(
            p < 0, 1, jnp.take_along_axis(depth, jnp.maximum(p, 0)[..., None], -1)[..., 0] + 1
        )
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


def block_positions(depth: jax.Array, pos: jax.Array) -> jax.Array:
    """Position ids [B, N+1] of the verify block: the root at `pos` (the position of `last`),
    node i at pos + depth."""
    root = jnp.zeros((depth.shape[0], 1), depth.dtype)  # also right for a tree of 0 nodes
    return pos[:, None] + jnp.concatenate([root, depth], axis=1)


def path_to(parents: jax.Array, node: jax.Array, max_depth: int) -> jax.Array:
    """Node indices [B, max_depth] on the root-to-`node` path, in depth order (-1 padded).

    node [B] (-1 = the root itself: empty path)."""
    B, N = parents.shape
    walk = [node]
    for _ in range(max_depth - 1):
        prev = walk[-1]
        walk.append(
            jnp.where(
                prev >= 0, jnp.take_along_axis(parents, jnp.maximum(prev, 0)[:, None], 1)[:, 0], -1
            )
        )
    up = jnp.stack(walk, axis=1)  # [B, max_depth]: node, parent, grandparent, ...
    n = jnp.sum(up >= 0, axis=1)  # path length
    # Reverse the first n entries so the path starts at depth 1.
    idx = jnp.clip(n[:, None] - 1 - jnp.arange(max_depth)[None, :], 0, max_depth - 1)
    path = jnp.take_along_axis(up, idx, axis=1)
    return jnp.where(jnp.arange(max_depth)[None, :] < n[:, None], path, -1)
