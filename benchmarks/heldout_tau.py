"""Held-out tau of EAGLE drafters on a training recipe's held-out prompts (never trained on).

The same measurement the trainer logs every `eval_every` steps (`train.evaluate_tau`: greedy,
batch 1, the recipe's `eval_prompts` prompts and `eval_new_tokens` tokens, the dynamic tree the
recipe's kind evaluates with), for any drafter directories, so a new run can be compared with
the bundled drafter on the same prompts:

    python benchmarks/heldout_tau.py --config eagle3_smollm2_general \
        smollm2-135m-eagle3 runs/eagle3_general/drafter
"""

from __future__ import annotations

import argparse
import json

import specjax
from specjax import drafters
from specjax.train import data, load_configs
from specjax.train.trainer import evaluate_tau


def heldout_prompts(config: str) -> list[str]:
    """The recipe's held-out prompts, in the order the trainer evaluates them."""
    tc, dc = load_configs(config)
    prompts = data.mix_prompts(dc.mix, dc.seed) if dc.mix else data.load_prompts(dc.sources)
    _, rest = data.split_prompts(prompts, dc.prompts, dc.heldout + dc.given_prompts, dc.seed)
    return [p["prompt"] for p in rest[: dc.heldout]][: tc.eval_prompts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="eagle3_smollm2_general", help="training recipe")
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--nodes", type=int, default=8, help="dynamic tree nodes (trainer: 8)")
    ap.add_argument("drafters", nargs="+", help="bundled drafter names or exported directories")
    a = ap.parse_args()
    tc, _ = load_configs(a.config)
    target = specjax.load_model(a.target)
    prompts = heldout_prompts(a.config)
    for src in a.drafters:
        tree = drafters.DynamicTree(nodes=a.nodes, depth=4, top_k=3)
        tau = evaluate_tau(
            target, drafters.eagle(src, tree=tree), prompts, new_tokens=tc.eval_new_tokens
        )
        print(json.dumps({"drafter": src, "prompts": len(prompts), "tau": round(tau, 3)}))


if __name__ == "__main__":
    main()
