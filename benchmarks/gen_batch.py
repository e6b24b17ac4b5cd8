"""How fast the target answers a recipe's training prompts at each batch size (the
self-distillation's `gen_batch`): the last `--prompts` training prompts of the recipe, sorted by
length as `build_dataset` batches them, answered greedily, each with its own room (seq_len
minus its prompt, per-row budgets), as `build_dataset` answers them. Each batch size runs
twice, interleaved; the second round is compiled.

    SPECJAX_DATA=../shared/data python benchmarks/gen_batch.py \
        [--config eagle3_smollm2_general_c] [--batches 16,64] [--prompts 64]
"""

from __future__ import annotations

import argparse
import time

from specjax import load_model
from specjax.train import data, load_configs, select_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="eagle3_smollm2_general_c")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--prompts", type=int, default=64)
    a = ap.parse_args()
    model = load_model("smollm2-135m")
    _, dc = load_configs(a.config)
    train_p, _, _ = select_prompts(dc)
    enc = sorted((model.encode(p["prompt"]) for p in train_p[-a.prompts :]), key=len)
    for rnd in (1, 2):
        for batch in [int(b) for b in a.batches.split(",")]:
            t, answers = time.perf_counter(), []
            for i in range(0, len(enc), batch):
                chunk = enc[i : i + batch]
                room = [min(dc.max_new_tokens, dc.seq_len - len(p)) for p in chunk]
                answers += data.model_generate(model, chunk, room)
            dt = time.perf_counter() - t
            n = sum(map(len, answers))
            print(
                f"round {rnd} batch {batch}: {dt:.1f} s, {n} answer tokens "
                f"({n / len(enc):.0f} a prompt), {n / dt:.0f} tokens/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
