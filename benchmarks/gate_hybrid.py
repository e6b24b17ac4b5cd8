"""The draft gate (`DraftGate`) and the hybrid's `min_match`, chosen by measurement on our own
questions (`specjax/configs/tune_questions.jsonl`, never the eval files).

Candidates on SmolLM2-135M with the bundled EAGLE-3 drafter and its default tree: plain decoding,
prompt lookup (`ngram`), the sized tree, the sized tree with the gate, and the hybrid of prompt
lookup with either, at each `--min-match`. Interleaved timing by `autotune.tune_tree`
(compilation excluded; tokens/s over wall time, prefill included, as `specjax bench`), greedy,
batch 1. Every output is checked against plain decoding's.

    python benchmarks/gate_hybrid.py [--min-match 2,3,4] [--no-gate] [--no-hybrid] [--limit 16]
"""

from __future__ import annotations

import argparse

from compare import exact_then_timed

import specjax
from specjax import bench, drafters
from specjax.drafters import registry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-match", default="2,4", help="comma-separated suffix match lengths")
    ap.add_argument("--limit", type=int, default=16, help="tune questions (16: all)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-hybrid", action="store_true", help="the tree alone, gated or not")
    ap.add_argument("--no-gate", action="store_true", help="without the gated tree")
    args = ap.parse_args()
    model = specjax.load_model("smollm2-135m")
    prompts = [q["prompt"] for q in bench.load_questions(bench.tune_questions())][: args.limit]
    sized = registry.make("eagle3_tree_sized", None, model)
    gated = registry.make("eagle3_tree_gated", None, model)
    trees = {"sized": sized} if args.no_gate else {"sized": sized, "gated": gated}
    cands = {"none": None, "ngram": registry.make("ngram", None, model)}
    cands.update({f"eagle3_tree_{label}": tree for label, tree in trees.items()})
    if not args.no_hybrid:
        for mm in (int(x) for x in args.min_match.split(",")):
            for label, tree in trees.items():
                d = drafters.hybrid(drafters.ngram(k=8), tree, "switch", mm)
                cands[f"hybrid ngram+{label} min_match={mm}"] = d
    print(exact_then_timed(model, cands, prompts, args.max_new_tokens, args.repeats))


if __name__ == "__main__":
    main()
