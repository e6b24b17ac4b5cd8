"""Products over the GGUF's 4-bit codes against float32 weights, at SmolLM2-135M's shapes.

SmolLM2's bundled GGUF stores its layer matrices as Q4_1: per block of 32 weights a float16
scale `d` and minimum `m` and 4-bit codes `q`, the weight being `d * q + m`. `d * q` is exact in
float32 (11 x 4 significant bits), so a program that reads the codes and rebuilds the weights
inside its products computes with exactly the float32 weights the engine loads, from ~5 bits a
weight instead of 32. This times whether XLA CPU makes that pay: a jitted chain of the 30
layers' four products ([out, in] = qkv [960, 576], attention output [576, 576], gate/up
[3072, 576], down [576, 1536]; distinct random codes) for T rows, written as

- `f32`: float32 weights, the engine's forms (a matrix-vector product for one row, a row
  reduction for 2-16);
- `rebuilt`: codes one a byte [out, in/32, 32], rebuilt inside the row reduction;
- `block_minor`: codes stored [out, 32, in/32], so the scales broadcast along a middle axis;
- `dot`: rebuilt, then a matrix product;
- `factored`: the scale taken out of each block's sum (sum_j q x, then d and m once a block);
- `packed`: two codes a byte, unpacked with shifts inside the same fusion;
- `pieces`: each float32 matrix as the exact sum of bfloat16 matrices (two for every Q4_1
  matrix, here as in SmolLM2's GGUF: ~16 significant bits a weight; the script stacks as many
  as a matrix needs), stored [P, out, in], and `x` as the exact sum of three
  bfloat16 rows, so one bfloat16 product with float32 accumulation (YNNPACK's bf16 kernel on
  this AVX-512-BF16 / AMX CPU) forms every exact partial product `x_a w_b`: float32's result
  summed in another order, at float32's bytes;
- `bf16`: the weights rounded to one bfloat16 (half the bytes; a different model, so its `diff`
  is the rounding's, not the product's), `x` in three pieces as above: what a bfloat16
  checkpoint (exactly one piece) costs computed exactly in float32 (`Model.with_storage`:
  `llama.exact_bf16_product`); `bf16_wleft` / `bf16_xleft` the same with the matrix / the
  pieces always on the left of the product (the engine picks by rows).

The printed `diff` is the largest difference of each chain's output from `f32`'s.

    python benchmarks/q4_codes.py [--rows 1,8] [--forms f32,rebuilt,...] [--repeats 7]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from specjax.models import llama

LAYERS = 30
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) of each layer product
F32 = jnp.float32


def random_layers(seed: int = 0) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Per layer and product: codes [out, in/32, 32] uint8 in [0, 16), d and m [out, in/32],
    quantized as Q4_1 does it from random weights (m the block's minimum, d its range / 15)."""
    rng = np.random.default_rng(seed)

    def q4_1(o: int, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w = rng.normal(0.0, 0.05, (o, i // 32, 32)).astype(np.float32)
        m = w.min(-1).astype(np.float16)
        d = ((w.max(-1) - m.astype(np.float32)) / 15).astype(np.float16)
        q = np.rint((w - m[..., None]) / d.astype(np.float32)[..., None])
        return np.clip(q, 0, 15).astype(np.uint8), d, m

    return [[q4_1(o, i) for o, i in SHAPES] for _ in range(LAYERS)]


def rebuild(c: jax.Array, d: jax.Array, m: jax.Array) -> jax.Array:
    """[out, nb, 32] codes -> float32 weights [out, nb, 32], exactly as the GGUF reader does."""
    return c.astype(F32) * d.astype(F32)[..., None] + m.astype(F32)[..., None]


def times_f32(x: jax.Array, w: jax.Array) -> jax.Array:
    if x.shape[0] == 1:
        return jnp.einsum("ti,oi->to", x, w)
    return jnp.sum(w[None] * x[:, None, :], axis=-1)


def times_rebuilt(x: jax.Array, q: tuple) -> jax.Array:
    w = rebuild(*q)
    return jnp.sum(w[None] * x.reshape(x.shape[0], 1, *w.shape[1:]), axis=(-2, -1))


def times_block_minor(x: jax.Array, q: tuple) -> jax.Array:
    c, d, m = q  # c [out, 32, nb]
    w = c.astype(F32) * d.astype(F32)[:, None, :] + m.astype(F32)[:, None, :]
    xt = x.reshape(x.shape[0], -1, 32).transpose(0, 2, 1)  # [T, 32, nb]
    return jnp.sum(w[None] * xt[:, None], axis=(-2, -1))


def times_dot(x: jax.Array, q: tuple) -> jax.Array:
    w = rebuild(*q)
    return jnp.einsum("ti,oi->to", x, w.reshape(w.shape[0], -1))


def times_factored(x: jax.Array, q: tuple) -> jax.Array:
    c, d, m = q
    x3 = x.reshape(x.shape[0], -1, 32)  # [T, nb, 32]
    inner = jnp.sum(c.astype(F32)[None] * x3[:, None], -1)  # [T, out, nb]
    return jnp.sum(inner * d.astype(F32) + x3.sum(-1)[:, None] * m.astype(F32), -1)


def times_packed(x: jax.Array, q: tuple) -> jax.Array:
    p, d, m = q  # p [out, nb, 16]: the low nibble holds the even code
    c = jnp.stack([p & 15, p >> 4], -1).reshape(*p.shape[:-1], 32)
    return times_rebuilt(x, (c, d, m))


def times_pieces(x: jax.Array, w: jax.Array) -> jax.Array:
    """w [P, out, in] bfloat16 -> x @ (the sum of the P pieces).T, float32 [T, out]."""
    P, out, n_in = w.shape
    y = llama.exact_bf16_product(x, w.reshape(P * out, n_in))
    return jnp.sum(y.reshape(x.shape[0], P, out)[:, ::-1], axis=1)  # smallest pieces first


def times_bf16(x: jax.Array, w: jax.Array, w_left: bool | None = None) -> jax.Array:
    return llama.exact_bf16_product(x, w[0], w_left=w_left)


FORMS = {
    "f32": times_f32,
    "rebuilt": times_rebuilt,
    "block_minor": times_block_minor,
    "dot": times_dot,
    "factored": times_factored,
    "packed": times_packed,
    "pieces": times_pieces,
    "bf16": times_bf16,
    "bf16_wleft": functools.partial(times_bf16, w_left=True),
    "bf16_xleft": functools.partial(times_bf16, w_left=False),
}


def operands(form: str, layers: list) -> list:
    """Each form's stored weights, on device."""

    def one(c: np.ndarray, d: np.ndarray, m: np.ndarray) -> object:
        if form == "f32" or form.startswith(("pieces", "bf16")):
            w = c.astype(np.float32) * d.astype(np.float32)[..., None]
            w = jnp.asarray((w + m.astype(np.float32)[..., None]).reshape(c.shape[0], -1))
            if form == "f32":
                return w
            parts, rest = [], w
            while bool(jnp.any(rest != 0)) and (form == "pieces" or not parts):
                parts.append(rest.astype(jnp.bfloat16))
                rest = rest - parts[-1].astype(F32)
            return jnp.stack(parts)
        if form == "block_minor":
            c = np.ascontiguousarray(c.transpose(0, 2, 1))
        if form == "packed":
            c = c[..., 0::2] | (c[..., 1::2] << 4)
        return tuple(jnp.asarray(a) for a in (c, d, m))

    return [[one(*q) for q in layer] for layer in layers]


def chain(times: object, weights: list, x: jax.Array) -> jax.Array:
    """Every product of every layer in order, each feeding the next input (x [T, 1536])."""
    for layer in weights:
        for w, (_, n_in) in zip(layer, SHAPES):
            y = times(x[:, :n_in], w)
            x = x + 1e-3 * jnp.concatenate([y[:, :576]] * 3, axis=1)[:, :1536]
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    layers = random_layers()
    forms = a.forms.split(",")
    weights = {f: operands(f, layers) for f in forms}
    for rows in [int(r) for r in a.rows.split(",")]:
        x = jnp.full((rows, 1536), 0.01, F32)
        ref = None
        for form in forms:
            fn = jax.jit(functools.partial(chain, FORMS[form]))
            out = fn(weights[form], x).block_until_ready()
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                fn(weights[form], x).block_until_ready()
                times.append(time.perf_counter() - t)
            ref = out if ref is None else ref
            diff = float(jnp.abs(out - ref).max())
            ms = statistics.median(times) * 1e3
            print(f"T={rows:<3d} {form:<12s} {ms:8.2f} ms   diff {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
