"""Time tree attention: Pallas kernel vs XLA tree attention vs XLA causal attention, equal shapes.

    python benchmarks/tree_attention_bench.py                      # SmolLM2-135M-like heads
    python benchmarks/tree_attention_bench.py --batch 8 --max-len 4096 --tree 64 --dtype bfloat16

K/V are [B, KV, S, hd] (one layer of the model's head-major cache). Rows of the table (median ms
over --iters calls, each jitted and warmed up):
  xla causal      attention_xla with a causal mask from iota compares (the chain baseline)
  xla tree        attention_xla with the dense [B, T, S] tree mask precomputed (the model's path:
                  the mask is built once per forward and shared by all layers)
  xla tree+mask   the same plus building the mask (gathers from block_mask)
  reference f32   tree_attention_reference (float32 HIGHEST: the test oracle, not a fast path)
  pallas tree     tree_attention, random trees       } GPU/TPU only: on CPU Pallas runs only in
  pallas chain    tree_attention, causal block mask  } interpret mode, whose timing is meaningless

sglang-jax saw verify with a tree mask run 61x slower than causal verify until the
mask handling was fixed -- compare "pallas tree" against "xla causal", not only against the
reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import BlockSizes, dense_tree_mask, tree_attention, tree_attention_reference  # noqa: E402
from specjax.models.llama import attention_xla  # noqa: E402


def random_tree_mask(rng: np.random.Generator, B: int, T: int) -> np.ndarray:
    """Ancestor-or-self masks [B, T, T] of random trees (parent[i] uniform in [0, i))."""
    masks = np.zeros((B, T, T), bool)
    for b in range(B):
        parents = [-1] + [int(rng.integers(0, i)) for i in range(1, T)]
        for t in range(T):
            u = t
            while u >= 0:
                masks[b, t, u] = True
                u = parents[u]
    return masks


def causal_xla(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array) -> jax.Array:
    """Chain verification: slot s visible to block token t iff s <= lengths + t (no gather).
    q [B, T, H, hd], k, v [B, KV, S, hd], lengths [B] -> [B, T, H, hd]."""
    T, S = q.shape[1], k.shape[2]  # k [B, KV, S, hd]
    slot = jnp.arange(S)[None, None, :]
    mask = slot <= (lengths[:, None] + jnp.arange(T)[None, :])[:, :, None]  # [B, T, S]
    return attention_xla(q, k, v, mask)


def time_ms(fn: Callable[..., Any], *args: Any, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=1024, help="cache slots S")
    ap.add_argument("--tree", type=int, default=16, help="tree tokens T")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 elsewhere")
    ap.add_argument("--block-k", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    dtype = jnp.dtype(args.dtype or ("float32" if backend == "cpu" else "bfloat16"))
    B, S, T, H, KV, hd = (
        args.batch,
        args.max_len,
        args.tree,
        args.heads,
        args.kv_heads,
        args.head_dim,
    )
    rng = np.random.default_rng(args.seed)
    q = jnp.asarray(rng.normal(size=(B, T, H, hd)), dtype)
    k = jnp.asarray(rng.normal(size=(B, KV, S, hd)), dtype)  # head-major, as the model's cache
    v = jnp.asarray(rng.normal(size=(B, KV, S, hd)), dtype)
    lengths = jnp.asarray(rng.integers(S // 2, S - T + 1, size=B), jnp.int32)  # ragged rows
    tree = jnp.asarray(random_tree_mask(rng, B, T))
    chain = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    mask = dense_tree_mask(lengths, tree, S)

    print(
        f"backend={backend} device={jax.devices()[0].device_kind} dtype={dtype.name} "
        f"B={B} S={S} T={T} H={H} KV={KV} hd={hd} lengths={np.asarray(lengths).tolist()}"
    )
    rows = [
        ("xla causal", jax.jit(causal_xla), (q, k, v, lengths)),
        ("xla tree", jax.jit(attention_xla), (q, k, v, mask)),
        (
            "xla tree+mask",
            jax.jit(lambda q, k, v, n, m: attention_xla(q, k, v, dense_tree_mask(n, m, S))),
            (q, k, v, lengths, tree),
        ),
        ("reference f32", tree_attention_reference, (q, k, v, lengths, tree)),
    ]
    if backend == "cpu":
        note = (
            "CPU: Pallas runs only in interpret mode here, whose timing says nothing about "
            "the kernel; only the XLA paths are timed."
        )
    else:
        bs = BlockSizes(block_k=args.block_k)
        kern = jax.jit(lambda q, k, v, n, m: tree_attention(q, k, v, n, m, block_sizes=bs))
        rows += [
            ("pallas tree", kern, (q, k, v, lengths, tree)),
            ("pallas chain", kern, (q, k, v, lengths, chain)),
        ]
        note = None

    results = []
    for name, fn, fargs in rows:
        try:
            results.append((name, time_ms(fn, *fargs, iters=args.iters), ""))
        except Exception as e:  # noqa: BLE001 - a failed lowering is a result worth printing
            results.append((name, float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0]}"))
    base = results[0][1]
    print(f"{'path':<15} {'ms':>9} {'vs causal':>10}")
    for name, ms, err in results:
        print(f"{name:<15} {ms:9.3f} {ms / base:9.2f}x {err}".rstrip())
    if note:
        print(note)


if __name__ == "__main__":
    main()
