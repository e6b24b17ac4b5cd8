"""Cascades against their top level alone on SmolLM2 (README "Cascades"; the runs:
benchmarks/RESULTS.md), exact and with a lenient middle level: 2 prompts, 64 new tokens, greedy;
the second call of each is timed; outputs checked against plain decoding. `--eagle`: the n-gram
drafting for the bundled EAGLE-3 chain instead, by 1, 2 and a pass per slot (`passes`), against
the EAGLE chain alone.

    python benchmarks/cascade_smollm2.py [--eagle]
"""

import sys
import time

import specjax
from specjax import drafters
from specjax.drafters import registry

m = specjax.load_model("smollm2-135m")
prompts = [
    "Write a Python function that checks whether a number is prime.",
    "Give me three tips for staying focused while studying.",
]
ar = specjax.generate(m, prompts, max_new_tokens=64)


def cascade(lower: str, upper: str, leniency: float) -> drafters.Drafter:
    levels = [registry.make(lower, model=m), registry.make(upper, model=m)]
    return drafters.cascade(levels, leniency=leniency)


if "--eagle" in sys.argv:
    cands = {"eagle3@4": registry.make("eagle3@4", model=m)}
    for lower in ("ngram@2", "ngram@3"):
        for passes in (None, 2, 1):
            levels = [registry.make(lower, model=m), registry.make("eagle3@4", model=m)]
            name = f"cascade:{lower}>eagle3@4 passes {passes or 'per slot'}"
            cands[name] = drafters.cascade(levels, passes=passes)
else:
    cands = {"layer_skip:20@3": registry.make("layer_skip:20@3", model=m)}
    for lower in ("ngram@2", "layer_skip:6@2"):
        for leniency in (1.0, 2.0, 4.0):
            name = f"cascade:{lower}>layer_skip:20@3 leniency {leniency:g}"
            cands[name] = cascade(lower, "layer_skip:20@3", leniency)
for name, d in cands.items():
    out = specjax.generate(m, prompts, max_new_tokens=64, drafter=d)
    t = time.time()
    out = specjax.generate(m, prompts, max_new_tokens=64, drafter=d)
    dt = time.time() - t
    print(
        name,
        out.tokens == ar.tokens,
        round(out.stats["tau"], 2),
        round(dt, 2),
        [
            (l["level"], round(l["acceptance"], 2), round(l["tau"], 2))
            for l in out.stats.get("cascade_levels", [])
        ],
        flush=True,
    )
t = time.time()
specjax.generate(m, prompts, max_new_tokens=64)
print("ar", round(time.time() - t, 2))
