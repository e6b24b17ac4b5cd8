"""Cascades against their top level alone on SmolLM2 (README "Cascades"): 2 prompts, 64 new
tokens, greedy; the second call of each is timed; outputs checked against plain decoding."""

import time

import specjax
from specjax.drafters import registry

m = specjax.load_model("smollm2-135m")
prompts = [
    "Write a Python function that checks whether a number is prime.",
    "Give me three tips for staying focused while studying.",
]
ar = specjax.generate(m, prompts, max_new_tokens=64)
for name in [
    "layer_skip:20@3",
    "cascade:ngram@2>layer_skip:20@3",
    "cascade:layer_skip:6@2>layer_skip:20@3",
]:
    d = registry.make(name, model=m)
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
