"""How fast the target answers training prompts at each batch size (the self-distillation's
`gen_batch`): greedy plain decoding of SmolLM2-135M over random-token prompts, tokens produced
per second of `generate` (compiled first, then one timed call per batch size; rows that stop at
EOS count only the tokens they produced).

    python benchmarks/gen_batch.py [--batches 16,64,128] [--prompt-len 60] [--new 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import specjax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="16,64,128")
    ap.add_argument("--prompt-len", type=int, default=60)
    ap.add_argument("--new", type=int, default=64)
    a = ap.parse_args()
    model = specjax.load_model("smollm2-135m")
    rng = np.random.default_rng(0)
    for batch in [int(b) for b in a.batches.split(",")]:
        prompts = [rng.integers(100, 40000, a.prompt_len).tolist() for _ in range(batch)]
        specjax.generate(model, prompts, max_new_tokens=a.new, chat=False)  # compile
        t = time.perf_counter()
        out = specjax.generate(model, prompts, max_new_tokens=a.new, chat=False)
        dt = time.perf_counter() - t
        n = sum(len(x) for x in out.tokens)
        print(f"batch {batch}: {dt:.2f} s, {n} tokens, {n / dt:.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
