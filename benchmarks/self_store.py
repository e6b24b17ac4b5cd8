"""Prompt lookup with a datastore of the target's own answers: SmolLM2's answers to the
self-distillation prompts (the committed shards in specjax/train/selfdistill/, training prompts
only, never the eval files), indexed REST-style (`drafters.ngram(datastore=...)`).

On our tune questions (`specjax/configs/tune_questions.jsonl`), greedy, batch 1: every output is
checked against plain decoding's, then `autotune.tune_tree` times the candidates interleaved
(compilation excluded; tokens/s over wall time, prefill included, as `specjax bench`).

    python benchmarks/self_store.py [--max-new-tokens 96] [SETTING ...]

A SETTING adds a store candidate with other `drafters.ngram` arguments, e.g. `k=4,short=2`.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
from compare import exact_then_timed

import specjax
from specjax import bench, drafters

SHARDS = Path(__file__).resolve().parents[1] / "specjax/train/selfdistill"


def answers() -> list[list[int]]:
    """Every committed self-distillation answer (the loss-masked tokens of each row)."""
    docs = []
    for f in sorted(glob.glob(str(SHARDS / "*/shard_self_*.npz"))):
        d = np.load(f)
        for tokens, mask in zip(d["tokens"], d["loss_mask"]):
            ids = tokens[mask.astype(bool)]
            if len(ids):
                docs.append(ids.tolist())
    return docs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("settings", nargs="*", help="extra store candidates: k=4,short=2 ...")
    args = ap.parse_args()
    model = specjax.load_model("smollm2-135m")
    docs = answers()
    print(f"datastore: {len(docs)} answers, {sum(map(len, docs)):,} tokens")
    prompts = [q["prompt"] for q in bench.load_questions(bench.tune_questions())]
    cands = {"none": None, "ngram": drafters.ngram(), "store": drafters.ngram(datastore=docs)}
    for spec in args.settings:
        kw = {k: int(v) for k, v in (x.split("=") for x in spec.split(","))}
        cands[f"store {spec}"] = drafters.ngram(datastore=docs, **kw)
    print(exact_then_timed(model, cands, prompts, args.max_new_tokens))


if __name__ == "__main__":
    main()
