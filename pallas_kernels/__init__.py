"""Pallas kernels for specjax, each with a float32 jnp reference beside it.

`tree_attention`: flash-attention style attention of T tree (or chain) tokens against a row's
KV cache, used by speculative verification. See `pallas_kernels/tree_attention.py`.
"""

from pallas_kernels.tree_attention import (
    BlockSizes,
    dense_tree_mask,
    tree_attention,
    tree_attention_reference,
    tree_mask_bits,
)

__all__ = [
    "BlockSizes",
    "dense_tree_mask",
    "tree_attention",
    "tree_attention_reference",
    "tree_mask_bits",
]
