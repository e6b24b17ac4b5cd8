"""One run on an accelerator: is specjax ready for it? (issue 13, point 7)

    bash benchmarks/device_check.sh          # on a machine with an NVIDIA GPU: < 8 minutes
    python benchmarks/device_check.py --tiny # tiny shapes, float32: the same code path on CPU

Sections (each prints its own table; a failing section prints its error and the run goes on):

  1. tree attention   the Pallas kernel against the XLA path at Llama-3-8B attention shapes
                      (bf16, 32 q heads, 8 kv heads, head_dim 128) for a few cache lengths S and
                      block sizes T: ms, achieved HBM bandwidth (K/V bytes read / time), max
                      error against the float32 reference
  model               a random-weight Llama-3-8B-shaped model (bf16, stacked layers run by
                      lax.scan; built from a ModelConfig, nothing downloaded) for 2-4
  2. verify forward   T = 1..64 tokens against a prefix, causal vs tree mask (autotune)
  3. step anatomy     the plain step and its bandwidth (weights + cache bytes / time), then
                      `specjax bench-step` pieces for AR and layer-skip drafters (chain, tree),
                      and the KV-cache-sized copies XLA put in each compiled decode loop body
  4. greedy identity  greedy speculative output vs plain greedy output in bf16: a self-drafting
                      layer-skip drafter (all layers) over random prompts; differing rows and
                      tokens (a verify forward over T tokens and a one-token step sum in
                      different orders, so near-ties can flip)

Without a GPU (and without --tiny) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from specjax.models.config import ModelConfig  # noqa: E402

if TYPE_CHECKING:
    from jax.typing import DTypeLike

    from specjax.anatomy import StepAnatomy
    from specjax.engine.protocol import Drafter
    from specjax.model import Model

LLAMA3_8B = ModelConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    model_type="llama",
)
TINY = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=1024,
    model_type="llama",
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures (`full`: the GPU run; `tiny`: the CPU smoke run)."""

    cfg: ModelConfig
    dtype: str
    attn_lengths: tuple[int, ...]  # cache slots S of the attention section
    attn_blocks: tuple[int, ...]  # block tokens T of the attention section
    attn_batch: int
    verify_sizes: tuple[int, ...]
    prompt_len: int
    max_new: int
    drafters: tuple[tuple[str, int, int, int], ...]  # (name, layers, k, tree nodes or 0)
    greedy_rows: int
    greedy_prompt: int
    greedy_new: int
    repeats: int
    interpret: bool  # Pallas in interpret mode (CPU)
    greedy_tree: bool = True  # also check a tree drafter's greedy output


FULL = Plan(
    cfg=LLAMA3_8B,
    dtype="bfloat16",
    attn_lengths=(1024, 4096, 16384),
    attn_blocks=(1, 8, 16, 64),
    attn_batch=1,
    verify_sizes=(1, 2, 4, 8, 16, 32, 64),
    prompt_len=512,
    max_new=128,
    drafters=(("none", 0, 0, 0), ("layer_skip:8@4", 8, 4, 0), ("layer_skip_tree:8@8", 8, 8, 8)),
    greedy_rows=8,
    greedy_prompt=64,
    greedy_new=64,
    repeats=10,
    interpret=False,
)
TINY_PLAN = Plan(
    cfg=TINY,
    dtype="float32",
    attn_lengths=(64,),
    attn_blocks=(4,),
    attn_batch=2,
    verify_sizes=(1, 2),
    prompt_len=16,
    max_new=16,
    drafters=(("layer_skip:1@2", 1, 2, 0),),
    greedy_rows=2,
    greedy_prompt=8,
    greedy_new=8,
    repeats=2,
    interpret=True,
    greedy_tree=False,
)


# ----------------------------------------------------------------------------- helpers


def section(title: str) -> None:
    print(f"\n## {title}\n", flush=True)


def timed_median(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
    """Median ms of `fn(*args)` after two warm-up calls."""
    import statistics

    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def random_params(cfg: ModelConfig, dtype: DTypeLike, seed: int = 0) -> dict:
    """Llama params in the stacked (scan) layout, drawn on the device: matrices ~ N(0, 1/fan_in),
    embeddings ~ N(0, 1), norm weights 1 (llama.py's names and shapes)."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    shapes = {
        "embed": (V, D),
        "lm_head": (D, V),
        "layers/wqkv": (L, D, qkv),
        "layers/wo": (L, cfg.num_heads * cfg.head_dim, D),
        "layers/w_gate_up": (L, D, 2 * F),
        "layers/w_down": (L, F, D),
    }
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    out = {
        "layers": {"attn_norm": jnp.ones((L, D), dtype), "mlp_norm": jnp.ones((L, D), dtype)},
        "final_norm": jnp.ones((D,), dtype),
    }
    for key, (name, shape) in zip(keys, shapes.items()):
        scale = 1.0 if name == "embed" else shape[-2] ** -0.5
        # One jitted draw per tensor: the bf16 result is made on the device, no f32 copy.
        x = jax.jit(
            lambda k, s=shape, c=scale: (jax.random.normal(k, s, jnp.float32) * c).astype(dtype)
        )(key)
        if "/" in name:
            out["layers"][name.split("/")[1]] = x
        else:
            out[name] = x
    return out


def random_model(plan: Plan) -> Model:
    from specjax.model import Model

    dtype = jnp.dtype(plan.dtype)
    params = jax.block_until_ready(random_params(plan.cfg, dtype))
    return Model(params=params, config=plan.cfg, tokenizer=None, name="llama3-8b-shaped-random")


def nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- 1. attention


def check_tree_attention(plan: Plan) -> None:
    from benchmarks.tree_attention_bench import causal_xla, random_tree_mask
    from pallas_kernels import dense_tree_mask, tree_attention, tree_attention_reference
    from specjax.models.llama import attention_xla

    cfg, dtype, B = plan.cfg, jnp.dtype(plan.dtype), plan.attn_batch
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rng = np.random.default_rng(0)
    print(
        f"B={B} H={H} KV={KV} hd={hd} {dtype.name}; rows ragged in [S/2, S-T]; GB/s = K+V "
        f"bytes of the visible prefix / time; err = max |x - float32 reference|"
        + (" (Pallas in interpret mode: its ms mean nothing)" if plan.interpret else "")
    )
    print(
        "| S | T | xla causal ms | xla tree ms | pallas tree ms | pallas chain ms | "
        "pallas GB/s | xla tree GB/s | pallas err | xla err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    xla_tree = jax.jit(
        lambda q, k, v, n, m: attention_xla(q, k, v, dense_tree_mask(n, m, k.shape[2]))
    )
    kern = jax.jit(lambda q, k, v, n, m: tree_attention(q, k, v, n, m, interpret=plan.interpret))
    for S in plan.attn_lengths:
        k = jnp.asarray(rng.normal(size=(B, KV, S, hd)), dtype)
        v = jnp.asarray(rng.normal(size=(B, KV, S, hd)), dtype)
        for T in plan.attn_blocks:
            q = jnp.asarray(rng.normal(size=(B, T, H, hd)), dtype)
            lengths = jnp.asarray(rng.integers(S // 2, S - T + 1, size=B), jnp.int32)
            tree = jnp.asarray(random_tree_mask(rng, B, T))
            chain = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
            ref = tree_attention_reference(q, k, v, lengths, tree).astype(jnp.float32)
            read = 2 * int(np.asarray(lengths + T).sum()) * KV * hd * dtype.itemsize
            cells = {}
            for name, fn, args in (
                ("xla causal", jax.jit(causal_xla), (q, k, v, lengths)),
                ("xla tree", xla_tree, (q, k, v, lengths, tree)),
                ("pallas tree", kern, (q, k, v, lengths, tree)),
                ("pallas chain", kern, (q, k, v, lengths, chain)),
            ):
                try:
                    cells[name] = timed_median(fn, *args, repeats=plan.repeats)
                except Exception as e:  # noqa: BLE001 - a kernel that fails to lower is a result
                    cells[name] = float("nan")
                    print(f"{name} S={S} T={T}: {type(e).__name__}: {str(e).splitlines()[0]}")
            errs = {}
            for name, fn in (("pallas", kern), ("xla", xla_tree)):
                try:
                    out = fn(q, k, v, lengths, tree).astype(jnp.float32)
                    errs[name] = float(jnp.max(jnp.abs(out - ref)))
                except Exception:  # noqa: BLE001 - reported above
                    errs[name] = float("nan")
            gbs = {n: read / (cells[n] * 1e-3) / 1e9 for n in ("pallas tree", "xla tree")}
            print(
                f"| {S} | {T} | {cells['xla causal']:.3f} | {cells['xla tree']:.3f} | "
                f"{cells['pallas tree']:.3f} | {cells['pallas chain']:.3f} | "
                f"{gbs['pallas tree']:.0f} | {gbs['xla tree']:.0f} | {errs['pallas']:.2e} | "
                f"{errs['xla']:.2e} |",
                flush=True,
            )


# ----------------------------------------------------------------------------- 2-4. model


def make_drafter(layers: int, k: int, nodes: int) -> Drafter | None:
    """A layer-skip drafter of `layers` layers (0: none), a chain of k or a tree of `nodes`."""
    from specjax import drafters

    if layers == 0:
        return None
    tree = drafters.DynamicTree(nodes=nodes, depth=4, top_k=3) if nodes else None
    return drafters.layer_skip(layers, k=k, tree=tree)


def print_floor(model: Model, plan: Plan, a: StepAnatomy, prompt: Sequence[int]) -> None:
    """The plain step against the bytes it must read (weights + the whole cache)."""
    from specjax.api import prepare

    cfg = plan.cfg
    max_len = prepare(model, [prompt], max_new_tokens=plan.max_new, chat=False)[1]["max_len"]
    weights = nbytes(model.params)
    cache = (
        2
        * cfg.num_layers
        * cfg.num_kv_heads
        * max_len
        * cfg.head_dim
        * jnp.dtype(plan.dtype).itemsize
    )  # K and V of every layer, batch 1
    rows = [("plain step (decode_one)", a.ms["plain step"])]
    if a.drafter == "none":  # its loop step is a plain step too
        rows.append(("plain step (in the loop)", a.ms["loop step"]))
    for what, ms in rows:
        print(
            f"{what}: {ms:.2f} ms; weights {weights / 1e9:.2f} GB + cache {cache / 1e9:.3f} "
            f"GB (S={max_len}) read per step -> {(weights + cache) / ms / 1e6:.0f} "
            f"GB/s achieved",
            flush=True,
        )


def check_verify(model: Model, plan: Plan) -> None:
    from specjax import autotune

    table = autotune.verify_cost_table(
        model,
        plan.verify_sizes,
        prompt_len=plan.prompt_len,
        repeats=plan.repeats,
        max_new=plan.max_new,
        progress=False,
    )
    print(f"prefix {plan.prompt_len}, batch 1, impl xla; tree = random tree of T tokens\n")
    print(autotune.cost_markdown(table), flush=True)


def check_anatomy(model: Model, plan: Plan) -> None:
    from specjax import anatomy

    prompt = list(np.random.default_rng(2).integers(0, plan.cfg.vocab_size, plan.prompt_len))
    results = []
    for name, layers, k, nodes in plan.drafters:
        d = make_drafter(layers, k, nodes)
        results.append(
            anatomy.measure_step(
                model,
                d,
                prompt,
                max_new_tokens=plan.max_new,
                warm_steps=2,
                loop_steps=8,
                repeats=plan.repeats,
                chat=False,
                name=name,
            )
        )
        if len(results) == 1:
            print_floor(model, plan, results[-1], prompt)
        copies = results[-1].loop_cache_copies
        print(
            f"{name}: {len(copies)} KV-cache-sized copies in the compiled decode loop body"
            + "".join(f"\n    {c.line[:160]}" for c in copies[:4]),
            flush=True,
        )
    print()
    print(anatomy.anatomy_markdown(results))
    over = anatomy.check_remainder(results)
    print("\nremainder > 10% of the step: " + ("; ".join(over) if over else "none"), flush=True)


# ----------------------------------------------------------------------------- 5. greedy


def check_greedy_identity(model: Model, plan: Plan) -> None:
    """Greedy speculative output vs plain greedy output, same dtype, same device."""
    from specjax import drafters
    from specjax.api import generate

    rng = np.random.default_rng(3)
    prompts = [
        rng.integers(0, plan.cfg.vocab_size, plan.greedy_prompt).tolist()
        for _ in range(plan.greedy_rows)
    ]
    ar = generate(model, prompts, max_new_tokens=plan.greedy_new, chat=False)
    L = plan.cfg.num_layers
    tree = drafters.layer_skip(L, tree=drafters.DynamicTree(nodes=8, depth=4, top_k=3))
    for d in (drafters.layer_skip(L, k=4),) + ((tree,) if plan.greedy_tree else ()):
        sp = generate(model, prompts, max_new_tokens=plan.greedy_new, chat=False, drafter=d)
        rows = [i for i in range(len(prompts)) if sp.tokens[i] != ar.tokens[i]]
        first = [
            next(j for j, (a, b) in enumerate(zip(ar.tokens[i], sp.tokens[i])) if a != b)
            for i in rows
        ]
        # Tokens after the first flip differ mostly because the contexts differ: count both.
        diff = sum(a != b for i in range(len(prompts)) for a, b in zip(ar.tokens[i], sp.tokens[i]))
        total = sum(len(t) for t in ar.tokens)
        print(
            f"{d.name}: tau {sp.stats['tau']:.2f}; rows differing from plain greedy "
            f"{len(rows)}/{len(prompts)} (first differing token at {first}); tokens "
            f"differing {diff}/{total}",
            flush=True,
        )


# ----------------------------------------------------------------------------- 5. layouts


def check_layouts(model: Model, plan: Plan) -> None:
    """The plain decode step in both layouts (stacked layers under lax.scan vs unrolled), timed
    inside `generate`'s while_loop: the weights and cache bytes one step must read over the
    measured ms. Shows whether slicing stacked weights per layer costs extra reads."""
    from specjax.api import generate

    prompt = np.random.default_rng(4).integers(0, plan.cfg.vocab_size, plan.prompt_len).tolist()
    weights = nbytes(model.params)
    print("| layout | ms per step | GB/s (weights / step) | tokens/s |")
    print("|---|---|---|---|")
    for layout in ("scan", "unrolled"):
        m = model if model.layout == layout else model.with_layout(layout)
        generate(m, [prompt], max_new_tokens=plan.max_new, chat=False)  # compile
        best = None
        for _ in range(3):
            st = generate(m, [prompt], max_new_tokens=plan.max_new, chat=False).stats
            ms = st["decode_s"] / max(st["steps"], 1) * 1e3
            best = ms if best is None else min(best, ms)
        print(
            f"| {layout} | {best:.2f} | {weights / best / 1e6:.0f} | {1e3 / best:.1f} |",
            flush=True,
        )
        del m


# ----------------------------------------------------------------------------- main


def run_section(title: str, fn: Callable[..., object], *args: Any) -> bool:
    section(title)
    t0 = time.perf_counter()
    try:
        fn(*args)
        ok = True
    except Exception:  # noqa: BLE001 - print it and go on: one run should show everything
        traceback.print_exc(file=sys.stdout)
        ok = False
    print(f"\n[{title}: {time.perf_counter() - t0:.1f} s{'' if ok else ', FAILED'}]", flush=True)
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="tiny shapes, float32, Pallas interpreted: runs anywhere (CPU smoke)",
    )
    ap.add_argument(
        "--only",
        default="1,2,3,4",
        help="sections to run, comma-separated (5: plain step by layout, not in the default run)",
    )
    ap.add_argument(
        "--layout",
        default="scan",
        choices=("scan", "unrolled"),
        help="the model's layer layout for sections 2-4 (scan compiles fastest)",
    )
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    if not only <= {"1", "2", "3", "4", "5"}:
        ap.error(f"--only {args.only!r}: sections are 1-5, comma-separated (e.g. 1,2,3,4)")
    backend = jax.default_backend()
    if backend != "gpu" and not args.tiny:
        print(
            f"device_check: no GPU here (jax backend {backend!r}); nothing to check. "
            f"(--tiny runs the same code at tiny shapes.)"
        )
        return 0
    plan = TINY_PLAN if args.tiny else FULL
    t0 = time.perf_counter()
    print(
        f"# specjax device check ({'tiny' if args.tiny else 'full'})\n\njax {jax.__version__}, "
        f"backend {backend}, device {jax.devices()[0].device_kind}, dtype {plan.dtype}"
    )
    ok = True
    if "1" in only:
        ok &= run_section("1. tree attention: Pallas vs XLA", check_tree_attention, plan)
    if not only & {"2", "3", "4", "5"}:
        print(f"\n# done in {time.perf_counter() - t0:.0f} s")
        return 0 if ok else 1
    section("model")
    model = random_model(plan)
    if args.layout != model.layout:
        model = model.with_layout(args.layout)
    print(
        f"random-weight model: {plan.cfg.num_layers} layers, hidden {plan.cfg.hidden_size}, "
        f"{nbytes(model.params) / 1e9:.2f} GB of {plan.dtype} weights, layout {model.layout}"
    )
    for key, title, fn in (
        ("2", "2. verify forward: causal vs tree mask", check_verify),
        ("3", "3. plain step, step anatomy, copies in the loop", check_anatomy),
        ("4", "4. greedy identity in " + plan.dtype, check_greedy_identity),
        ("5", "5. plain step by layout", check_layouts),
    ):
        if key in only:
            ok &= run_section(title, fn, model, plan)
    print(
        f"\n# done in {time.perf_counter() - t0:.0f} s" + ("" if ok else "; some sections FAILED")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
