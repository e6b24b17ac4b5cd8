#!/usr/bin/env python
"""How much one prompt's speed varies between runs, next to what `auto`'s candidates gain: the
candidates on `auto`'s 21 prompts (`autotune.auto_prompts()`, never the eval files), greedy,
96 new tokens, interleaved after compiling each (`autotune.tune_tree`), with plain decoding
run twice in a row as the noise control. Prints each candidate's per-prompt speed over plain
decoding's and the paired test `auto` applies (`autotune._clearly_faster`: mean log ratio in
standard errors, `autotune.lead_t`), against plain decoding and against the n-gram chain.

    python benchmarks/auto_noise.py [--out table.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import specjax
from specjax import autotune
from specjax.drafters import registry

NAMES = ["none", "none (again)", "ngram", "eagle3_tree_sized", "hybrid:ngram+eagle3_tree_sized"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the measured table as JSON")
    a = ap.parse_args()
    model = specjax.load_model("smollm2-135m")
    make = lambda n: None if n.startswith("none") else registry.make(n, None, model)  # noqa: E731
    prompts = autotune.auto_prompts()
    _, table = autotune.tune_tree(model, make, prompts, candidates=NAMES, max_new_tokens=96)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(table, f, indent=1)
    speeds = {r["candidate"]: r["prompt_tokens_per_s"] for r in table}
    plain = np.asarray(speeds["none"])
    print("| candidate | tok/s | per-prompt speed / plain | t vs plain | t vs ngram |")
    print("|---|---|---|---|---|")
    for r in table[1:]:
        ratios = " ".join(f"{x:.2f}" for x in np.asarray(speeds[r["candidate"]]) / plain)
        vs_ngram = (
            ""
            if r["candidate"] == "ngram"
            else f"{autotune.lead_t(speeds[r['candidate']], speeds['ngram']):.2f}"
        )
        print(
            f"| {r['candidate']} | {r['tokens_per_s']:.1f} | {ratios} | "
            f"{autotune.lead_t(speeds[r['candidate']], speeds['none']):.2f} | {vs_ngram} |"
        )


if __name__ == "__main__":
    main()
