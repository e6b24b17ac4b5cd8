"""Attention over the KV cache in other forms, timed against the engine's: 30 layers of
SmolLM2-135M's attention alone (3 KV heads, 3 query heads each, head_dim 64, a cache of S
slots of which 300 are visible), chained so that each layer's output feeds the next query, at a
block of T query tokens. For the speed issue's "attention over the cache" lever: a one-token
step spends ~3.3 ms of ~28 in it on the 2-core CPU (benchmarks/verify_profile.py), two
YNNPACK products a layer with a fixed cost each.

Forms (same outputs to float32 rounding, checked):
- engine: scores as `einsum(q, K)` with K [KV, S, hd], softmax, values as `einsum(V, p)` (V the
  left operand, what llama.attention_xla does);
- k_t: K stored transposed, [KV, hd, S], so the score product has the slots as its wide side;
- k_t_p_left: that, and the value product with p as the left operand;
- mul_sum: both products as a multiply and a sum (XLA fuses them into loops);
- engine_ynn_off / engine_ynn_reduce: the engine's form compiled with YNNPACK off, or for
  reductions only (`xla_cpu_experimental_ynn_fusion_type`), so XLA's own kernels run the dots.

    python benchmarks/attention_forms.py [--slots 402] [--tokens 1,8] [--rounds 15]

Medians of interleaved rounds, ms per 30-layer chain.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

LAYERS, KV, G, HD, VISIBLE = 30, 3, 3, 64, 300
LO = float(jnp.finfo(jnp.float32).min)


def softmax_masked(s: jax.Array, m: jax.Array) -> jax.Array:
    """s [1, KV, G, T, S] scores, m [1, T, S] visibility -> probabilities."""
    return jax.nn.softmax(jnp.where(m[:, None, None], s, LO), axis=-1)


def einsum_form(scores: str, values: str, p_left: bool = False) -> Callable:
    """A form with both products as einsums: `scores` (q, K) -> [1, KV, G, T, S], then
    `values` (V, p), or (p, V) when `p_left`."""

    def form(q: jax.Array, k: jax.Array, v: jax.Array, m: jax.Array) -> jax.Array:
        T = q.shape[1]
        qg = q.reshape(1, T, KV, G, HD) / np.sqrt(HD)
        p = softmax_masked(jnp.einsum(scores, qg, k), m)
        o = jnp.einsum(values, p, v) if p_left else jnp.einsum(values, v, p)
        return o.reshape(1, T, -1)

    return form


# k, v [1, KV, S, hd]: what llama.attention_xla does (values as the left operand)
engine = einsum_form("btkgd,bksd->bkgts", "bksd,bkgts->btkgd")
# K stored [1, KV, hd, S]
k_t = einsum_form("btkgd,bkds->bkgts", "bksd,bkgts->btkgd")
k_t_p_left = einsum_form("btkgd,bkds->bkgts", "bkgts,bksd->btkgd", p_left=True)


def mul_sum(q: jax.Array, k: jax.Array, v: jax.Array, m: jax.Array) -> jax.Array:
    T = q.shape[1]
    qg = q.reshape(1, T, KV, G, HD).transpose(0, 2, 3, 1, 4) / np.sqrt(HD)  # [1, KV, G, T, hd]
    s = jnp.sum(qg[:, :, :, :, None, :] * k[:, :, None, None], -1)  # [1, KV, G, T, S]
    p = softmax_masked(s, m)
    o = jnp.sum(p[..., None] * v[:, :, None, None], -2)  # [1, KV, G, T, hd]
    return o.transpose(0, 3, 1, 2, 4).reshape(1, T, -1)


def chain(form: Callable) -> Callable:
    """30 layers of `form`, each layer's output (scaled) added to the next query."""

    def run(q: jax.Array, ks: jax.Array, vs: jax.Array, m: jax.Array) -> jax.Array:
        h = q
        for layer in range(LAYERS):
            h = h + 1e-3 * form(h, ks[layer], vs[layer], m)
        return h

    return run


def programs(slots: int, tokens: int) -> dict:
    """Form name -> (its compiled 30-layer chain, the arguments it runs on)."""
    rng = np.random.default_rng(0)
    k = rng.standard_normal((LAYERS, 1, KV, slots, HD), np.float32)
    v = rng.standard_normal((LAYERS, 1, KV, slots, HD), np.float32)
    q = jnp.asarray(rng.standard_normal((1, tokens, KV * G * HD), np.float32))
    m = jnp.broadcast_to(jnp.arange(slots)[None, None] < VISIBLE, (1, tokens, slots))
    k, kt, v = jnp.asarray(k), jnp.asarray(np.swapaxes(k, -1, -2)), jnp.asarray(v)
    args = {"engine": (q, k, v, m), "k_t": (q, kt, v, m), "k_t_p_left": (q, kt, v, m)}
    args["mul_sum"] = (q, k, v, m)
    fns = {
        name: jax.jit(chain(f))
        for name, f in [
            ("engine", engine),
            ("k_t", k_t),
            ("k_t_p_left", k_t_p_left),
            ("mul_sum", mul_sum),
        ]
    }
    progs = {name: (fns[name].lower(*a).compile(), a) for name, a in args.items()}
    low = jax.jit(chain(engine)).lower(q, k, v, m)
    for name, ynn in [("engine_ynn_off", ""), ("engine_ynn_reduce", "LIBRARY_FUSION_TYPE_REDUCE")]:
        opts = {"xla_cpu_experimental_ynn_fusion_type": ynn}
        progs[name] = (low.compile(compiler_options=opts), args["engine"])
    return progs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=402)
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    for T in (int(t) for t in a.tokens.split(",")):
        progs = programs(a.slots, T)
        ref = progs["engine"][0](*progs["engine"][1])
        for name, (f, args) in progs.items():
            err = float(jnp.max(jnp.abs(f(*args) - ref)))
            assert err < 1e-5, (name, err)
        times = {name: [] for name in progs}
        for _ in range(a.rounds):
            for name, (f, args) in progs.items():
                t0 = time.perf_counter()
                f(*args).block_until_ready()
                times[name].append(time.perf_counter() - t0)
        cells = "  ".join(f"{n} {1e3 * np.median(t):.2f}" for n, t in times.items())
        print(f"S={a.slots} T={T}: {cells}")


if __name__ == "__main__":
    main()
