"""End to end by weight orientation: AR, ngram and EAGLE-3 trees of 8 and 7 nodes on SmolLM2-135M,
layer matrices [in, out] vs [out, in] (4 questions of our own, 96 new tokens, batch 1, greedy,
every program warmed first, 2 interleaved rounds, medians). Prints tok/s, tau, and whether the
tokens agree across orientations and with AR.

    python benchmarks/orientation_e2e.py
"""

import statistics
import time

import specjax

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how vaccines train the immune system, in simple terms.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "A farmer has 17 sheep and buys 5 more, then sells 8. How many sheep are left? Explain.",
]
base = specjax.load_model("smollm2-135m")
models = {o: base.with_orientation(o) for o in ("in_out", "out_in")}
drafters = {
    "ar": None,
    "ngram": "ngram",
    "eagle3_tree": "eagle3_tree",
    "eagle3_tree7": specjax.drafters.eagle(
        "smollm2-135m-eagle3", tree=specjax.drafters.DynamicTree(nodes=7, depth=4, top_k=3)
    ),
}
toks, times = {}, {}
for m in models.values():  # warm
    for dr in drafters.values():
        for p in PROMPTS:
            specjax.generate(m, p, max_new_tokens=96, drafter=dr)
for r in range(2):
    for o, m in models.items():
        for d, dr in drafters.items():
            t0 = time.perf_counter()
            outs = [specjax.generate(m, p, max_new_tokens=96, drafter=dr) for p in PROMPTS]
            dt = time.perf_counter() - t0
            n = sum(len(x.tokens[0]) for x in outs)
            times.setdefault((o, d), []).append(n / dt)
            toks[(o, d)] = [x.tokens[0] for x in outs]
            print(
                r,
                o,
                d,
                f"{n / dt:.1f} tok/s",
                f"tau {statistics.mean(x.stats['tau'] for x in outs):.2f}" if dr else "",
                flush=True,
            )
for d in drafters:
    a, b = statistics.median(times[("in_out", d)]), statistics.median(times[("out_in", d)])
    same = toks[("in_out", d)] == toks[("out_in", d)]
    as_ar = toks[("out_in", d)] == toks[("out_in", "ar")]
    print(f"{d:12s} in_out {a:.1f}  out_in {b:.1f}  ({b / a:.2f}x)  same: {same}, as AR: {as_ar}")
