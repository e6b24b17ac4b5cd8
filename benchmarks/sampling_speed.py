"""Decode speed of SmolLM2-135M when sampling with temperature / top-k / top-p, AR and the
bundled EAGLE-3 tree, next to greedy: the cost of `specjax.sampling.process_logits`.

    python benchmarks/sampling_speed.py [--new-tokens 64] [--repeats 2]

Each setting decodes the same two prompts (one row each, key 1) after a warm-up call per prompt
(compilation excluded); prints decode tokens/s per setting and drafter as one JSON line. To
compare two versions of specjax, run it with each on PYTHONPATH, one after the other.
"""

from __future__ import annotations

import argparse
import json

import specjax

PROMPTS = [
    "Write a short story about a dragon who learns to paint.",
    "Give me three tips for staying focused while studying.",
]
SETTINGS = {
    "greedy": {},
    "T0.7_topp0.9": dict(temperature=0.7, top_p=0.9),
    "T0.7_topk50_topp0.9": dict(temperature=0.7, top_k=50, top_p=0.9),
    "T1.0": dict(temperature=1.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    model = specjax.load_model("smollm2-135m")
    tree = specjax.drafters.DynamicTree(nodes=8, depth=4, top_k=3)
    drafters = {"ar": None, "eagle3_tree": specjax.drafters.eagle("smollm2-135m-eagle3", tree=tree)}
    res = {}
    for name, kw in SETTINGS.items():
        for dname, d in drafters.items():
            run = lambda p, d=d, kw=kw: specjax.generate(  # noqa: E731
                model, p, max_new_tokens=a.new_tokens, drafter=d, key=1, **kw
            )
            for p in PROMPTS:
                run(p)  # compile this prompt's bucket
            toks = secs = 0.0
            for _ in range(a.repeats):
                for p in PROMPTS:
                    out = run(p)
                    assert not out.stats["compiled"]
                    toks += len(out.tokens[0])
                    secs += out.stats["decode_s"]
            res[f"{name}/{dname}"] = round(toks / secs, 1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
