"""Why a verify block of T tokens costs more than one token on XLA CPU: is a small-row
product's time its memory stream plus its arithmetic, or the larger of the two?

Thirty [6144, 576] float32 matrices (13.5 MiB each, 405 MiB in all: about SmolLM2-135M's
layer weights) multiply a block of T rows one after the other, each product in the engine's form
(`specjax.models.llama.times_out_in`: a matrix-vector product for one row, a row reduction
for 2-16). Three programs per T:

- `stream`: thirty distinct matrices, read from DRAM (what a verify forward does);
- `resident`: one matrix used thirty times, so it stays in cache (L2/L3): the arithmetic alone;
- `stream+touch`: `stream` plus a cheap read of the next matrix (every cache line) that
  depends only on the current product's input, so the executor may run it beside the product
  and the product would then find its matrix in L3 (a software prefetch made of XLA ops).

An ideal kernel would take max(stream(1), resident(T)); a kernel that reads, then computes,
takes stream(1) + resident(T) - resident(1). Run with `taskset -c 0` for one core.

    python benchmarks/verify_overlap.py [--sizes 1,2,4,8,16] [--repeats 15]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from device_check import timed_median

from specjax.models.llama import times_out_in

LAYERS, OUT, IN = 30, 6144, 576


def _next_input(y: jax.Array) -> jax.Array:
    """[T, OUT] -> [T, IN]: the next product's input depends on this product's output."""
    return jnp.tanh(y[:, :IN] + y[:, IN : 2 * IN])


def _touch(w: jax.Array) -> jax.Array:
    """Read one float of every 64-byte line of w (a reduction XLA cannot skip)."""
    return jnp.max(w.reshape(-1, 16)[:, 0])


@jax.jit
def stream(ws: list, x: jax.Array) -> jax.Array:
    for w in ws:
        x = _next_input(times_out_in(x, w))
    return x


@jax.jit
def resident(w: jax.Array, x: jax.Array) -> jax.Array:
    for _ in range(LAYERS):
        w_i, x = jax.lax.optimization_barrier((w, x))  # one matrix, re-read each time
        x = _next_input(times_out_in(x, w_i))
    return x


@jax.jit
def stream_touch(ws: list, x: jax.Array) -> jax.Array:
    acc = _touch(ws[0])
    w = ws[0]
    for i in range(LAYERS):
        if i + 1 < LAYERS:  # the next matrix's read needs only x: free to run beside the product
            w_next, _ = jax.lax.optimization_barrier((ws[i + 1], x))
            p = _touch(w_next)
        x = _next_input(times_out_in(x, w))
        if i + 1 < LAYERS:  # the next product waits for the read
            w, x, p = jax.lax.optimization_barrier((w_next, x, p))
            acc = acc + p
    return x + 0 * acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    keys = jax.random.split(jax.random.PRNGKey(0), LAYERS + 1)
    ws = [jax.random.normal(k, (OUT, IN)) * 0.02 for k in keys[:LAYERS]]
    mib = LAYERS * OUT * IN * 4 / 2**20
    print(f"{LAYERS} products of [{OUT}, {IN}] float32 ({mib:.0f} MiB), medians of {a.repeats}")
    print("| T | stream ms | resident ms | stream+touch ms | additive ms | ideal ms |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for T in sizes:
        x = jax.random.normal(keys[-1], (T, IN))
        rows[T] = (
            timed_median(stream, ws, x, repeats=a.repeats),
            timed_median(resident, ws[0], x, repeats=a.repeats),
            timed_median(stream_touch, ws, x, repeats=a.repeats),
        )
    s1, r1 = rows[sizes[0]][0], rows[sizes[0]][1]
    for T, (s, r, st) in rows.items():
        additive, ideal = s1 + r - r1, max(s1, r)
        print(f"| {T} | {s:.2f} | {r:.2f} | {st:.2f} | {additive:.2f} | {ideal:.2f} |")
    gflop = {T: 2 * LAYERS * OUT * IN * T / 1e9 for T in rows}
    print(
        "resident GFLOP/s by T: "
        + ", ".join(f"{T}: {gflop[T] / (r / 1e3):.0f}" for T, (_, r, _) in rows.items())
        + f"; stream GB/s at T={sizes[0]}: {mib * 2**20 / 1e9 / (s1 / 1e3):.1f}"
    )


if __name__ == "__main__":
    main()
