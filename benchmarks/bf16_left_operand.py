"""Which operand goes on the left of `llama.exact_bf16_product` in a whole verify forward:
SmolLM2-135M with its weights rounded to bfloat16 and stored so (`--bf16-weights`), one
verify forward of T tokens (prefix 256) with `llama.EXACT_BF16_W_LEFT_ROWS` at 0 (the pieces
always on the left), at the engine's default, and at 48 (the matrix on the left up to T = 16),
alternating rounds, medians of `--repeats` interleaved runs each.

    python benchmarks/bf16_left_operand.py [--sizes 1,2,4,8,16] [--rounds 2] [--repeats 8]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import specjax
from specjax import autotune
from specjax.models import llama


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,2,4,8,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=8)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    base = specjax.load_model("smollm2-135m")
    model = base.astype(jnp.bfloat16).astype(jnp.float32).with_storage(jnp.bfloat16)
    default = llama.EXACT_BF16_W_LEFT_ROWS
    for r in range(a.rounds):
        for rows in (0, default, 48):
            llama.EXACT_BF16_W_LEFT_ROWS = rows
            jax.clear_caches()  # the constant is read while tracing
            table = autotune.verify_cost_table(
                model, sizes, prompt_len=256, repeats=a.repeats, progress=False
            )
            ms = " ".join(f"T={T} {table[T][0]:.1f}" for T in sizes)
            print(f"round {r}, matrix on the left up to {rows:2d} bf16 rows: {ms} ms", flush=True)
    llama.EXACT_BF16_W_LEFT_ROWS = default


if __name__ == "__main__":
    main()
