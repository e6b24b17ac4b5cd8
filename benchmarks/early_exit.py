"""The sized EAGLE-3 tree with and without its early exit (`VerifySizing.early_exit`), timed
interleaved against plain decoding on `auto`'s prompts (never the eval files):

    python benchmarks/early_exit.py [--max-new-tokens 96]

Both trees use the sizing `eagle3_tree_sized` caches for the model on this device; prints
tokens/s, tau and the paired t of each per-prompt speed (`autotune.lead_t`)."""

from __future__ import annotations

import argparse
import dataclasses

import specjax
from specjax import autotune, drafters
from specjax.drafters import registry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    a = ap.parse_args()
    model = specjax.load_model(a.model)
    shape = registry.eagle_tree(None, None)
    src = registry.bundled_for("eagle3", model)
    build = lambda t: drafters.eagle(src, tree=t, name=src)  # noqa: E731
    sizing = autotune.cached_sizing(model, f"eagle3_tree:{src}", build, shape)
    print(sizing)
    cands = {
        "none": None,
        "sized": build(dataclasses.replace(shape, sizing=sizing)),
        "early_exit": build(
            dataclasses.replace(shape, sizing=dataclasses.replace(sizing, early_exit=True))
        ),
    }
    _, table = autotune.tune_tree(
        model,
        cands.get,
        autotune.auto_prompts(),
        candidates=list(cands),
        max_new_tokens=a.max_new_tokens,
    )
    rows = {r["candidate"]: r for r in table}
    for r in table:
        t = autotune.lead_t(r["prompt_tokens_per_s"], rows["none"]["prompt_tokens_per_s"])
        print(f"{r['candidate']}: {r['tokens_per_s']:.1f} tok/s, tau {r['tau']:.2f}, t {t:.2f}")
    t = autotune.lead_t(
        rows["early_exit"]["prompt_tokens_per_s"], rows["sized"]["prompt_tokens_per_s"]
    )
    print(f"early_exit over sized: paired t {t:.2f}")


if __name__ == "__main__":
    main()
