"""The hybrids (switch: SAM-style; merge: one tree) on SmolLM2-135M against their parts, and
min_match by measurement (`--min-match 1,2,3`; default 2); with `--horizontal`, the horizontal
cascade (EAGLE-3 chain of 2, then an n-gram continuation of 4) against EAGLE-3 chains instead.

Prompts: `autotune.AUTO_PROMPTS` (six built-in prompts, not the eval files); 96 new tokens,
greedy, batch 1; every prompt once per candidate to compile its length bucket (before
2026-12-04 only the first prompt was: later buckets compiled inside the first timed repeat),
then 2 repeats of every prompt, candidates interleaved;
decode tokens/s (prefill excluded) and tau. Every output is asserted equal to AR's.

    python benchmarks/hybrid_smollm2.py [--min-match 1,2,3] [--horizontal]
"""

from __future__ import annotations

import argparse

import specjax
from specjax import drafters
from specjax.autotune import AUTO_PROMPTS

NEW = 96
REPEATS = 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-match", default="2", help="comma-separated suffix match lengths")
    ap.add_argument("--horizontal", action="store_true", help="the horizontal cascade instead")
    args = ap.parse_args()
    min_match = [int(x) for x in args.min_match.split(",")]
    model = specjax.load_model("smollm2-135m")
    if args.horizontal:
        chain = lambda k: drafters.eagle("smollm2-135m-eagle3", k=k)  # noqa: E731
        cands = {"ar": None, "eagle3@2": chain(2), "eagle3@6": chain(2 + 4)}
        cands["horizontal eagle3@2 + ngram@4"] = drafters.horizontal(
            chain(2), drafters.ngram(max_ngram=3, k=4)
        )
    else:
        tree = drafters.DynamicTree(nodes=8, depth=4, top_k=3)
        eagle = drafters.eagle("smollm2-135m-eagle3", tree=tree)
        cands = {"ar": None, "ngram": "ngram", "eagle3_tree": eagle}
        for mode in ("switch", "merge"):
            for mm in min_match:
                ngram = drafters.ngram(max_ngram=3, k=6)
                d = drafters.hybrid(ngram, eagle, mode=mode, min_match=mm)
                cands[f"hybrid {mode} min_match={mm}"] = d
    for d in cands.values():  # compile every prompt's length bucket before timing
        for p in AUTO_PROMPTS:
            specjax.generate(model, p, max_new_tokens=NEW, drafter=d)
    ref: dict[int, list] = {}
    total = {k: [0.0, 0, 0.0] for k in cands}  # decode s, tokens, sum of tau
    for _ in range(REPEATS):
        for i, p in enumerate(AUTO_PROMPTS):
            for name, d in cands.items():
                o = specjax.generate(model, p, max_new_tokens=NEW, drafter=d)
                assert not o.stats["compiled"], f"{name} compiled while timed (prompt {i})"
                ref.setdefault(i, o.tokens)
                assert o.tokens == ref[i], f"{name} differs from AR on prompt {i}"
                total[name][0] += o.stats["decode_s"]
                total[name][1] += o.lengths[0]
                total[name][2] += o.stats["tau"]
    ar = total["ar"][1] / total["ar"][0]
    runs = REPEATS * len(AUTO_PROMPTS)
    print("| decoding | decode tok/s | vs AR | tau |\n|---|---|---|---|")
    for name, (s, n, tau) in total.items():
        print(f"| {name} | {n / s:.1f} | {n / s / ar:.2f}x | {tau / runs:.2f} |")


if __name__ == "__main__":
    main()
