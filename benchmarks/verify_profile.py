"""Where a verify forward of T tokens spends its time, by XLA operation: SmolLM2-135M's verify
forward (the engine's, `autotune.verify_forward`: a causal block of T tokens against a cache of
256 committed tokens, the block written) traced with `jax.profiler.trace` and read back with
`jax.profiler.ProfileData`. Every traced XLA operation is grouped by its kind, result shape and
the ops of its fused computation (from the compiled HLO) and summed per forward; a product's
read rate is its matrix bytes over its time (benchmarks/RESULTS.md: "Where a verify of 8
tokens spends its time").

    python benchmarks/verify_profile.py [--sizes 1,8] [--runs 8] [--top 12]

For the "verify near the floor" work of the speed issue: it says which part of a T-token
forward grows with T (products, attention, head) on this device.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import re
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import specjax
from specjax import autotune
from specjax.models.cache import KVCache


def fused_kinds(hlo: str) -> dict[str, str]:
    """Operation name -> "kind shape ops" (its fused computation's dot/reduce/exp ops)."""
    bodies = {
        m.group(1).lstrip("%"): m.group(2)
        for m in re.finditer(r"^(%?[\w.\-]+) .*?\{\n(.*?)\n\}", hlo, re.M | re.S)
    }
    kinds = {}
    for m in re.finditer(
        r"^\s*%?([\w.\-]+) = (\S+) (?:fusion|custom-call)\(.*?calls=%?([\w.\-]+)", hlo, re.M
    ):
        ops = sorted(
            set(re.findall(r"= \S+ (dot|reduce|exponential)\(", bodies.get(m.group(3), "")))
        )
        kinds[m.group(1)] = f"{m.group(1).split('.')[0]} {m.group(2).split('{')[0]} {'/'.join(ops)}"
    return kinds


def run_once(fn: Callable[[KVCache], tuple[jax.Array, KVCache]], cache: KVCache) -> KVCache:
    """One forward to completion -> the cache (donated to `fn`; the forward writes the block at
    the committed length without advancing it, so every call sees the same prefix)."""
    logits, cache = fn(cache)
    logits.block_until_ready()
    return cache


def profile(
    fn: Callable[[KVCache], tuple[jax.Array, KVCache]], cache: KVCache, runs: int
) -> tuple[collections.Counter, collections.Counter, KVCache]:
    """ms per forward by operation name, how many times each ran per forward, and the cache
    (`fn` donates it)."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(runs):
                cache = run_once(fn, cache)
        data = jax.profiler.ProfileData.from_file(
            glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0]
        )
    ms, count = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):  # XLA's worker threads only
                continue
            for ev in line.events:
                if "Execute" not in ev.name and "Await" not in ev.name:
                    ms[ev.name] += ev.duration_ns / runs / 1e6
                    count[ev.name] += 1
    return ms, count, cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,8")
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    model = specjax.load_model("smollm2-135m")
    cfg, rng = model.config, np.random.default_rng(0)
    cache = autotune.prefilled_cache(model, 1, 256, 256 + 128 + 18)
    for T in [int(t) for t in a.sizes.split(",")]:
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, T)), jnp.int32)
        fn = jax.jit(
            functools.partial(autotune.verify_forward, model.params, tokens, None, cfg=cfg),
            donate_argnums=0,
        )
        kinds = fused_kinds(fn.lower(cache).compile().as_text())
        for _ in range(3):  # compile and warm
            cache = run_once(fn, cache)
        ms, count, cache = profile(fn, cache, a.runs)
        by_kind, n_kind = collections.Counter(), collections.Counter()
        for name, v in ms.items():
            k = kinds.get(name, name.split(".")[0])
            by_kind[k] += v
            n_kind[k] += count[name] // a.runs
        print(f"\nT = {T}: {sum(ms.values()):.1f} ms of traced XLA work per forward")
        print("| ms | ops | operation (kind, result shape, fused ops) |")
        print("|---|---|---|")
        for k, v in by_kind.most_common(a.top):
            print(f"| {v:.2f} | {n_kind[k]} | {k} |")


if __name__ == "__main__":
    main()
