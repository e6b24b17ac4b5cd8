"""How large EAGLE-3's draft vocabulary should be, measured: coverage against head cost.

A token outside the draft vocabulary can never be drafted, so the share of the target's
response tokens it covers caps every draft position's acceptance; each drafting level pays
the draft head ([rows, hidden] @ [hidden, V] and its top-k). Coverage is counted on held-out
rows of a self-distilled dataset (the vocabulary is fitted on the first 80% of the rows, as
`train.data.draft_vocab` does on a whole dataset); the head is timed in one jitted product
plus top-k at the row counts a dynamic tree drafts with (1 at the root, top_k after).

    python benchmarks/draft_vocab.py specjax/train/selfdistill/eagle3_smollm2_general
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from specjax.train import data


def coverage(dataset: str, sizes: list[int], vocab: int) -> dict[int, float]:
    tokens, mask = data.read_dataset(dataset)
    cut = int(0.8 * len(tokens))
    counts = np.bincount(tokens[:cut][mask[:cut]], minlength=vocab)
    held = tokens[cut:][mask[cut:]]
    order = np.argsort(-counts, kind="stable")
    out = {}
    for v in sizes:
        keep = np.zeros(vocab, bool)
        keep[order[:v]] = True
        out[v] = float(keep[held].mean())
    return out


def head_ms(v: int, rows: int, hidden: int, top_k: int, repeats: int = 50) -> float:
    f = jax.jit(lambda x, w: jax.lax.top_k(x @ w, top_k)[0])
    w = jnp.asarray(np.random.default_rng(0).standard_normal((hidden, v), np.float32))
    x = jnp.ones((rows, hidden), jnp.float32)
    f(x, w).block_until_ready()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x, w).block_until_ready()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", help="a dataset directory (shard_*.npz with loss masks)")
    ap.add_argument("--sizes", default="2048,4096,8192,16384")
    ap.add_argument("--vocab", type=int, default=49152, help="the target's vocabulary")
    ap.add_argument("--hidden", type=int, default=576, help="the drafter's hidden size")
    ap.add_argument("--depth", type=int, default=4, help="tree depth (drafting levels)")
    ap.add_argument("--top-k", type=int, default=3, help="tree top-k (rows after the root)")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    cov = coverage(a.dataset, sizes, a.vocab)
    print("| draft vocab | held-out coverage | head ms, 1 row | head ms, top-k rows | per step |")
    print("|---|---|---|---|---|")
    for v in sizes:
        one = head_ms(v, 1, a.hidden, a.top_k)
        k = head_ms(v, a.top_k, a.hidden, a.top_k)
        step = one + (a.depth - 1) * k
        print(f"| {v} | {cov[v]:.3f} | {one:.2f} | {k:.2f} | {step:.1f} |")


if __name__ == "__main__":
    main()
