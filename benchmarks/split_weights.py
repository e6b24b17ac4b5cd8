"""Does XLA CPU verify a block of T tokens faster when each weight matrix is held as column
blocks in separate arrays? A measurement for the "verify near the floor" work, not a layout the
engine uses yet.

Why it might: a step's profile (`jax.profiler.trace`, read with `jax.profiler.ProfileData`) shows
one-token products running as XLA's own matrix-vector kernel split over both cores, while the
products of a T >= 2 block run as YNNPACK fusions one after another on one thread. Products that
do not depend on each other (the column blocks of one weight) can run at the same time. Blocks
must be separate arrays: slicing a stacked [n, K, N/n] weight inside the program gave nothing.

Each variant runs SmolLM2-135M's verify forward (unrolled layout, float32, a cache of 256
committed tokens, causal block of T tokens, the block written) with its matrices as `Split`
pytrees whose `__rmatmul__` concatenates the blocks' products; `x @ w` in the model code is
unchanged. Programs are compiled first, then timed interleaved (10 rounds, alternating order),
medians; logits are checked against the baseline's.

    python benchmarks/split_weights.py [--blocks 2,4] [--sizes 1,2,4,9,16]

Measured on the 2-core VM (2026-12-04, 21:50, nothing else running; x = the baseline's T=1):
baseline 31.9 / 42.5 / 47.8 / 61.0 / 73.1 ms at T = 1 / 2 / 4 / 9 / 16 (1.33x, 1.50x, 1.91x,
2.29x); 2 blocks 37.7 / 36.7 / 42.4 / 54.9 / 63.7 ms (T=2 1.15x, T=4 1.33x, T=9 1.72x); 4 blocks
48.0 / 43.2 / 45.0 / 58.0 / 75.4; the head in blocks as well changes little. So two blocks take
5-10 ms off every verify of 2-16 tokens and add 6-9 ms to a one-token step: a verify program
would use blocked weights and the plain step the whole ones. Logits differ from the baseline's
by up to 1.5e-2 at T=9 (other product blockings round differently; the T=1 path is unchanged).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import specjax
from specjax.autotune import prefilled_cache
from specjax.models import forward

MATRICES = ("wqkv", "wo", "w_gate_up", "w_down")


class Split:
    """A [K, N] weight as column blocks (separate arrays); x @ Split = x @ W."""

    def __init__(self, blocks: tuple) -> None:
        self.blocks = tuple(blocks)

    def __rmatmul__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([x @ b for b in self.blocks], axis=-1)


jax.tree_util.register_pytree_node(Split, lambda s: (s.blocks, None), lambda _, b: Split(b))


def split(w: jax.Array, n: int) -> Split:
    w = np.asarray(w)
    cols = np.array_split(np.arange(w.shape[1]), n)
    return Split(tuple(jnp.asarray(np.ascontiguousarray(w[:, c])) for c in cols))


def variant(model: specjax.Model, n: int, head: bool) -> tuple[dict, object]:
    """The model's params with every layer matrix in n blocks (and, with `head`, an untied
    output head in n blocks) -> (params, config)."""
    params = dict(model.params, layers=[dict(lp) for lp in model.params["layers"]])
    cfg = model.config
    if n > 1:
        for lp in params["layers"]:
            for name in MATRICES:
                lp[name] = split(lp[name], n)
    if head:
        params["lm_head"] = split(np.asarray(model.params["embed"]).T, n)
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    return params, cfg


def program(T: int, cfg: object) -> Callable[..., tuple]:
    @functools.partial(jax.jit, donate_argnames=("cache",))
    def run(params: dict, tokens: jax.Array, cache: object) -> tuple:
        positions = cache.lengths[:, None] + jnp.arange(T)[None]
        logits, _, cache = forward(params, cfg, tokens, positions, cache, write=True)
        return logits, cache

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="2,4", help="comma-separated column block counts")
    ap.add_argument("--sizes", default="1,2,4,9,16", help="comma-separated block lengths T")
    args = ap.parse_args()
    sizes = [int(t) for t in args.sizes.split(",")]
    model = specjax.load_model("smollm2-135m").with_orientation("in_out")  # x @ w, [in, out]
    if not isinstance(model.params["layers"], list):
        raise SystemExit("needs the unrolled layout (the default)")
    variants = {"baseline": variant(model, 1, False)}
    for n in (int(b) for b in args.blocks.split(",")):
        variants[f"{n} blocks"] = variant(model, n, False)
        variants[f"{n} blocks + head"] = variant(model, n, True)
    cache = prefilled_cache(model, 1, 256, 256 + 128 + max(sizes) + 2, 0)
    start = np.asarray(cache.lengths)  # every call writes the block at the same slots
    calls = {
        (name, T): (program(T, cfg), params, jnp.ones((1, T), jnp.int32))
        for name, (params, cfg) in variants.items()
        for T in sizes
    }
    ref, err = {}, {}
    for key, (fn, params, tokens) in calls.items():
        for _ in range(2):
            logits, cache = fn(params, tokens, cache)
            jax.block_until_ready(logits)
            cache = cache.replace(lengths=jnp.asarray(start))
        ref.setdefault(key[1], logits)
        err[key] = float(jnp.max(jnp.abs(logits - ref[key[1]])))
    times = {key: [] for key in calls}
    for r in range(10):
        order = list(calls.items())
        for key, (fn, params, tokens) in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            logits, cache = fn(params, tokens, cache)
            jax.block_until_ready(logits)
            times[key].append(time.perf_counter() - t0)
            cache = cache.replace(lengths=jnp.asarray(start))
    base1 = 1e3 * np.median(times["baseline", sizes[0]])
    print(f"ms per verify forward (x the baseline's T={sizes[0]}); max |logit diff| vs baseline")
    print("| variant | " + " | ".join(f"T={T}" for T in sizes) + " | max diff |")
    print("|---" * (len(sizes) + 2) + "|")
    for name in variants:
        ms = [1e3 * np.median(times[name, T]) for T in sizes]
        cells = " | ".join(f"{m:.1f} ({m / base1:.2f}x)" for m in ms)
        print(f"| {name} | {cells} | {max(err[name, T] for T in sizes):.1e} |")


if __name__ == "__main__":
    main()
