#!/usr/bin/env python
"""The switch hybrid's chain rows verified as the n-gram chain's own rule asks (k after a long
match, `short` after a weak one; the default since 2026-12-06) against the whole chain after
any match (`ngram(adaptive=False)`, the rule before), next to plain decoding and the chain
alone: the package's 16 tuning questions (never the eval files), 96 new tokens, greedy,
batch 1, interleaved after compiling each (`autotune.tune_tree`).

    python benchmarks/hybrid_chain_rule.py
"""

import json

import specjax
from specjax import autotune, drafters
from specjax.bench import tune_questions
from specjax.drafters import registry


def main() -> None:
    model = specjax.load_model("smollm2-135m")
    with open(tune_questions()) as f:
        questions = [json.loads(line)["turns"][0] for line in f if line.strip()]
    tree = registry.make("eagle3_tree_sized", None, model)
    candidates = {
        "none": None,
        "ngram": registry.make("ngram", None, model),
        "hybrid (chain's own rule)": drafters.hybrid(drafters.ngram(), tree),
        "hybrid (whole chain)": drafters.hybrid(drafters.ngram(adaptive=False), tree),
    }
    _, table = autotune.tune_tree(
        model, candidates.get, questions, candidates=list(candidates), max_new_tokens=96
    )
    plain = table[0]["tokens_per_s"]
    print("| drafter | tok/s | vs plain | tau |\n|---|---|---|---|")
    for r in table:
        tps = r["tokens_per_s"]
        print(f"| {r['candidate']} | {tps:.1f} | {tps / plain:.3f}x | {r['tau']:.2f} |")


if __name__ == "__main__":
    main()
