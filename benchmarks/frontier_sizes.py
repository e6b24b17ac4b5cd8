"""The sized EAGLE-3 tree with the verify sizes `autotune.frontier_sizes` picks from this
device's measured costs, against the fixed 1, 2, 4, 7 nodes it used before (both with the
costs of one `measure_sizing` run and the early exit of `eagle3_tree_sized`), the n-gram chain
and plain decoding, on our 16 tuning questions (never the eval files), 96 new tokens, greedy,
batch 1; every output checked against plain decoding's first, then timed interleaved
(`compare.exact_then_timed`).

    python benchmarks/frontier_sizes.py [REPEATS]
"""

from __future__ import annotations

import dataclasses
import sys

from compare import exact_then_timed

import specjax
from specjax import autotune, bench
from specjax.drafters import Drafter, VerifySizing, eagle, registry


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    model = specjax.load_model("smollm2-135m")
    src = registry.bundled_for("eagle3", model)
    shape = registry.eagle_tree(None, None)
    build = lambda t: eagle(src, tree=t, name=src)  # noqa: E731
    frontier, rec = autotune.measure_sizing(model, build, shape)
    v = {int(T): ms for T, ms in rec["verify_ms"].items()}
    fixed = (1, 2, 4, shape.nodes)
    costs = autotune.step_costs(rec["draft_ms"] + rec["plain_ms"], v, fixed)
    print(
        f"verify ms (tree mask) by T: { {T: round(ms[1], 2) for T, ms in sorted(v.items())} }; "
        f"frontier sizes {frontier.sizes}, costs {tuple(round(c, 2) for c in frontier.costs)}; "
        f"fixed sizes {fixed}, costs {tuple(round(c, 2) for c in costs)}"
    )

    def sized(s: VerifySizing) -> Drafter:  # as `eagle3_tree_sized` builds it: with the early exit
        return build(dataclasses.replace(shape, sizing=dataclasses.replace(s, early_exit=True)))

    cands = {
        "none": None,
        "ngram": registry.make("ngram", None, model),
        f"tree sizes {fixed}": sized(VerifySizing(fixed, costs)),
        f"tree sizes {frontier.sizes}": sized(frontier),
    }
    prompts = [q["prompt"] for q in bench.load_questions(bench.tune_questions())]
    print(exact_then_timed(model, cands, prompts, 96, repeats))


if __name__ == "__main__":
    main()
