"""Verify cost by weight orientation: SmolLM2-135M's layer matrices stored [in, out] (the
checkpoint orientation) against [out, in] (`Model.with_orientation("out_in")`, the default on
CPU), where `llama.times_out_in` writes products of 2-16 rows as a row reduction.

Each round times `autotune.verify_cost_table` (a causal verify forward of T tokens against a
cache of 256 committed tokens, the block written) for both orientations one after the other,
with JAX's caches cleared between them; the table gives each T's median over the rounds and
its ratio to T = 1 of the same orientation. Interleaving matters on a VM whose speed drifts.

    python benchmarks/verify_orientation.py [--rounds 3] [--sizes 1,2,4,8,9,16]
"""

from __future__ import annotations

import argparse
import statistics

import jax

import specjax
from specjax import autotune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="1,2,4,8,9,16")
    ap.add_argument("--repeats", type=int, default=8)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    base = specjax.load_model("smollm2-135m")
    models = {o: base.with_orientation(o) for o in ("in_out", "out_in")}
    ms: dict[str, dict[int, list[float]]] = {o: {t: [] for t in sizes} for o in models}
    for r in range(a.rounds):
        for o, m in models.items():
            jax.clear_caches()
            table = autotune.verify_cost_table(m, sizes=sizes, repeats=a.repeats, progress=False)
            for t in sizes:
                ms[o][t].append(table[t][0])
            print(f"round {r} {o}: " + ", ".join(f"T={t} {ms[o][t][-1]:.1f}" for t in sizes))
    print("\n| T | " + " | ".join(f"{o} ms (x T=1)" for o in models) + " |")
    print("|---|" + "---|" * len(models))
    med = {o: {t: statistics.median(v) for t, v in ms[o].items()} for o in models}
    for t in sizes:
        cells = [f"{med[o][t]:.1f} ({med[o][t] / med[o][sizes[0]]:.2f}x)" for o in models]
        print(f"| {t} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
