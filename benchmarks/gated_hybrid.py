"""The hybrid with its model tree gated (`DraftGate`: the tree drafts only while it pays)
against the hybrid with the sized tree's early exit, the n-gram chain and plain decoding, on
our 16 tuning questions (`specjax/configs/tune_questions.jsonl`, never the eval files), 96 new
tokens, greedy, batch 1, the registry's names (as `auto` and the CLI build them); every output
checked against plain decoding's first, then timed interleaved (`compare.exact_then_timed`).

    python benchmarks/gated_hybrid.py [REPEATS]
"""

from __future__ import annotations

import sys

from compare import exact_then_timed

import specjax
from specjax import bench
from specjax.drafters import registry

NAMES = ["none", "ngram", "hybrid:ngram+eagle3_tree_sized", "hybrid:ngram+eagle3_tree_gated"]


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    model = specjax.load_model("smollm2-135m")
    prompts = [q["prompt"] for q in bench.load_questions(bench.tune_questions())]
    cands = {n: registry.make(n, None, model) for n in NAMES}
    print(exact_then_timed(model, cands, prompts, 96, repeats))


if __name__ == "__main__":
    main()
