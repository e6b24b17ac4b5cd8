"""The `specjax` command line.

specjax demo                       load the default model, answer a few prompts, print tok/s
specjax generate "prompt" ...      generate (add --stream to print text as it comes)
specjax convert SRC DST            HF dir / GGUF / model name -> converted orbax checkpoint
specjax bench-ar                   specjax AR decode vs HF transformers generate
specjax bench                      AR vs drafters on Spec-Bench (JSON + Markdown + PNG)
specjax bench-verify               cost of one verify forward of T tokens, causal vs tree mask
specjax bench-step                 step anatomy: ms of propose, verify, accept/emit, commit
specjax tune-tree                  pick the draft-tree size with the best measured tokens/s
specjax train-drafter              train an EAGLE / EAGLE-3 / Medusa drafter for a target (optax)
specjax magpie                     Magpie-style training requests the target writes itself
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from specjax.drafters.shapes import DynamicTree
    from specjax.engine.protocol import Drafter
    from specjax.model import Model

DEMO_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Summarize in two sentences: The Moon is Earth's only natural satellite. It formed about "
    "4.5 billion years ago, probably from debris of a collision between Earth and a Mars-sized "
    "body. The Moon's gravity causes the tides, and it is tidally locked to Earth, so the same "
    "side always faces us.",
]


def make_drafter(
    name: str,
    k: int | None,
    model: Model | None = None,
    temperature: float = 0.0,
    batch: int = 1,
) -> Drafter | None:
    """A `--drafter` value -> Drafter (None for none): `NAME[:ARG][@K]` from the drafter registry
    (`specjax.drafters.registry`); `@K` overrides `k`. `auto` is chosen for `temperature` and
    `batch` rows."""
    from specjax.drafters import registry

    try:
        return registry.make(name, k, model, temperature=temperature, batch=batch)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def drafter_arg(text: str) -> str:
    """argparse type for --drafter: checked against the registry before any model loads."""
    from specjax.drafters import registry

    try:
        registry.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def drafter_list_arg(text: str) -> str:
    for name in (n for n in text.split(",") if n):
        drafter_arg(name)
    return text


def _drafter_usage() -> str:
    from specjax.drafters import registry

    return " | ".join(registry.names() + ["none"])


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def _number_in(ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """argparse type: a float for which `ok(value)` holds (NaN never does), else `what`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_temperature = _number_in(lambda v: 0 <= v < float("inf"), "a number >= 0 (0 = greedy)")
_top_p = _number_in(lambda v: 0 < v <= 1, "a number in (0, 1]")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    _add_sampling_params(p)


def _add_sampling_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=_top_p, default=None)
    p.add_argument("--seed", type=int, default=0)


def mesh_arg(text: str) -> tuple[int, int]:
    """--mesh D or DxM (data x model devices)."""
    data, _, model = text.lower().partition("x")
    try:
        d, m = int(data), int(model or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad mesh {text!r}: use D (batch over D devices) or DxM, e.g. 4x2 (M-way tensor "
            "parallel)"
        ) from None
    if d <= 0 or m <= 0:
        raise argparse.ArgumentTypeError(f"bad mesh {text!r}: sizes must be positive")
    return d, m


def _add_distributed(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mesh",
        type=mesh_arg,
        default=None,
        help="D or DxM: the batch over D devices, M-way tensor parallel (all processes' devices)",
    )
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-host)")
    p.add_argument("--num-processes", type=positive_int, default=None)
    p.add_argument("--process-id", type=int, default=None)


def _start_distributed(a: argparse.Namespace) -> Any:
    """Join the other processes (before any device is touched) and build the mesh -> Mesh|None."""
    import specjax

    if a.coordinator is not None or a.num_processes is not None or a.process_id is not None:
        specjax.distributed.initialize(a.coordinator, a.num_processes, a.process_id)
    if a.mesh is None:
        return None
    data, model = a.mesh
    return specjax.make_mesh(data=data, model=model)


def cmd_generate(a: argparse.Namespace) -> None:
    import jax

    from specjax import load_model
    from specjax.api import generate, generate_stream, padded_batch

    if a.stream and a.mesh is not None:
        raise ValueError("--stream decodes on one device; drop --mesh or --stream")
    if a.stream and a.image:
        raise ValueError("--stream does not take --image; drop one")
    mesh = _start_distributed(a)
    model = load_model(a.model)
    # `auto` chooses for the rows each device decodes, as `generate` pads and splits them
    data = 1 if mesh is None else dict(mesh.shape).get("data", 1)
    rows = 1 if a.stream else padded_batch(len(a.prompts), data) // data
    drafter = make_drafter(a.drafter, a.k, model, a.temperature, batch=rows)
    prompts = list(a.prompts)
    images = None
    if a.image:
        from specjax.multimodal import open_images, with_placeholders

        imgs = open_images(a.image)
        prompts = [with_placeholders(model, p, len(imgs)) for p in prompts]
        images = [imgs] * len(prompts)  # every prompt asks about the same images
    kw = dict(
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        key=a.seed,
        chat=not a.no_chat,
        drafter=drafter,
    )
    if mesh is not None:
        kw["mesh"] = mesh
    if a.stream:
        for prompt in a.prompts:
            t0 = time.perf_counter()
            for piece in generate_stream(model, prompt, **kw):
                print(piece, end="", flush=True)
            print(f"\n[{time.perf_counter() - t0:.2f}s]", file=sys.stderr)
        return
    if images is not None:
        kw["images"] = images
    out = generate(model, prompts, **kw)
    if jax.process_index() != 0:  # every process holds the same tokens; one prints them
        return
    for prompt, text in zip(a.prompts, out.text):
        print(f"### {prompt}\n{text}\n")
    s = out.stats
    # A first call of a shape bucket compiles inside it: say so, or its tok/s reads as speed.
    note = "; includes compiling this shape bucket" if s["compiled"] else ""
    print(
        f"[{s['new_tokens']} tokens in {s['total_s']:.2f}s: {s['tokens_per_s']:.1f} tok/s, "
        f"tau {s['tau']:.2f}{note}]",
        file=sys.stderr,
    )


def cmd_convert(a: argparse.Namespace) -> None:
    from checkpoints_convert import check_destination, save_converted
    from specjax import load_model

    # Refused before the (slow) load: DST must not be a file, a folder of other files, the
    # source or a folder holding it; a checkpoint is replaced only with --overwrite.
    sources = [a.src] if os.path.exists(a.src) else []
    try:
        check_destination(a.dst, a.overwrite, sources)
    except FileExistsError as e:
        raise SystemExit(f"specjax convert: {e}") from None
    model = load_model(a.src, storage=None)  # stored as computed; the loader chooses later
    if getattr(model, "vlm_config", None) is not None:
        # The orbax format holds a language model only: converting would drop the towers.
        raise SystemExit(
            f"specjax convert: {a.src} is a vision-language checkpoint "
            f"({model.vlm_config.model_type}); the converted format holds language models "
            f"only. Load the HF directory directly: load_model streams it tensor by tensor"
        )
    import jax

    save_converted(
        a.dst, jax.device_get(model.params), model.config, model.tokenizer, overwrite=a.overwrite
    )
    print(
        f"converted {a.src} -> {os.path.abspath(a.dst)} ({model.config.model_type}, "
        f"{model.config.num_layers} layers)"
    )


def cmd_demo(a: argparse.Namespace) -> None:
    from specjax import load_model
    from specjax.api import generate

    print(f"loading {a.model} ...", flush=True)
    model = load_model(a.model)
    a.drafter = a.drafter or "auto"
    drafter = make_drafter(a.drafter, None, model)
    if a.drafter == "auto":
        from specjax.autotune import choose_drafter

        print(f"auto: {choose_drafter(model, progress=False)[0]} (measured on this device)")
    # Compile every prompt's shape bucket first, so the printed speeds exclude compilation.
    for prompt in DEMO_PROMPTS:
        for d in (None, drafter) if drafter else (None,):
            generate(model, prompt, max_new_tokens=a.max_new_tokens, drafter=d)
    for prompt in DEMO_PROMPTS:
        print(f"\n### {prompt}")
        ar = generate(model, prompt, max_new_tokens=a.max_new_tokens)
        print(ar.text[0])
        line = f"[AR: {ar.stats['tokens_per_s']:.1f} tok/s"
        if drafter is not None:
            sp = generate(model, prompt, max_new_tokens=a.max_new_tokens, drafter=drafter)
            same = "identical" if sp.tokens == ar.tokens else "DIFFERENT"
            line += (
                f" | {a.drafter}: {sp.stats['tokens_per_s']:.1f} tok/s, tau "
                f"{sp.stats['tau']:.2f}, output {same}"
            )
        print(line + "]")


def _add_bf16_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bf16-weights",
        action="store_true",
        help="round the model's weights to bfloat16, as a bfloat16 checkpoint holds them (a "
        "model of its own, not the float32 one), and store them so while computing in float32 "
        "(Model.with_storage): what a bfloat16 checkpoint decodes at; HF gets the same weights",
    )


def _bench_model(a: argparse.Namespace) -> Model:
    """The model a bench command measures: `--model`, with `--bf16-weights` rounded to
    bfloat16 and stored so."""
    import jax.numpy as jnp

    from specjax import load_model

    model = load_model(a.model)
    if a.bf16_weights:  # every bench command has the flag
        model = model.astype(jnp.bfloat16).astype(model.dtype).with_storage(jnp.bfloat16)
    return model


def _bench_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    _add_bf16_weights(p)
    p.add_argument("--questions", default=None, help="question .jsonl (default: Spec-Bench)")
    p.add_argument("--limit", type=positive_int, default=None, help="questions per category")
    p.add_argument("--categories", default=None, help="comma-separated subset")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--out", default="bench_out")
    _add_sampling_params(p)


def _costs_arg(text: str) -> str | dict[int, float]:
    """--verify-costs: "auto", "none" or T:COST pairs (checked while parsing the command)."""
    from specjax import bench

    if text in ("auto", "none"):
        return text
    try:
        return bench.parse_costs(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _verify_costs(
    a: argparse.Namespace, model: Model, prompts: list[dict]
) -> dict[int, float] | None:
    from specjax import bench

    choice = getattr(a, "verify_costs", "none")
    if choice == "auto":
        return bench.measure_verify_costs(model, prompts, a.max_new_tokens)
    return None if choice == "none" else choice


def cmd_bench(a: argparse.Namespace, ar_only: bool = False) -> None:
    from specjax import bench, load_model

    path = a.questions or bench.default_questions()
    cats = a.categories.split(",") if a.categories else None
    prompts = _questions(path, a.limit, cats)  # a bad file is reported before the model loads
    if not ar_only and a.batch != (1,):
        return _bench_batches(a, path, prompts)
    model = _bench_model(a)
    sampling = _bench_sampling(a)
    methods = {"ar": bench._spec_runner(model, None, a.max_new_tokens, sampling)}
    if not ar_only:
        for name in [d for d in a.drafters.split(",") if d]:
            methods[name] = bench._spec_runner(
                model, make_drafter(name, a.k, model, a.temperature), a.max_new_tokens, sampling
            )
    if ar_only or a.hf_baseline:
        hf = bench.load_hf_twin(model, bf16_weights=a.bf16_weights)
        eos = model.eos_token_ids
        methods["hf"] = bench._hf_runner(hf, a.max_new_tokens, eos, sampling)
        if not ar_only:
            methods["hf_lookup"] = bench._hf_runner(
                hf, a.max_new_tokens, eos, sampling, prompt_lookup_num_tokens=a.hf_lookup_tokens
            )
            if a.hf_assistant:
                assistant = bench.load_hf_twin(load_model(a.hf_assistant))
                methods["hf_assisted"] = bench._hf_runner(
                    hf, a.max_new_tokens, eos, sampling, assistant_model=assistant
                )
    costs = _verify_costs(a, model, prompts)
    records = bench.run_bench(model, prompts, methods, verify_costs=costs)
    meta = _bench_meta(a, path, model, batch=1, verify_costs=costs, sampling=sampling)
    print(f"machine: {meta['machine']}")
    md = bench.write_report(records, list(methods), a.out, meta)
    print(md)
    print(f"\nwrote {a.out}/results.json, results.md, speedup.png")


def _bench_sampling(a: argparse.Namespace) -> dict | None:
    """`bench --temperature T [--top-k K] [--top-p P] [--seed S]` -> `generate`'s sampling
    keywords (None: greedy, the default)."""
    if a.temperature == 0:
        return None
    return {"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "key": a.seed}


def _bench_meta(a: argparse.Namespace, path: str, model: Model, **extra: object) -> dict:
    """What a bench report records about its run: model, prompts, command and machine."""
    from specjax import bench

    return {
        "model": a.model,
        "questions": path,
        "limit": a.limit,
        "max_new_tokens": a.max_new_tokens,
        "dtype": str(model.dtype),
        "command": " ".join(sys.argv),
        "machine": bench.machine(),
        **extra,
    }


def _bench_batches(a: argparse.Namespace, path: str, prompts: list[dict]) -> None:
    """`bench --batch 1,4,16`: AR and the drafters at each batch size (bench_batch.py)."""
    from specjax import bench_batch

    if a.hf_baseline:
        raise SystemExit("specjax: --hf-baseline runs at batch 1 only; drop it or use --batch 1")
    if a.temperature > 0:
        raise SystemExit(
            f"specjax: --temperature {a.temperature} runs at batch 1 only (the batch table "
            "compares greedy rows with AR's); drop --batch or use --temperature 0"
        )
    try:
        bench_batch.usable_rows(len(prompts), a.batch)
    except ValueError as e:
        raise SystemExit(f"specjax: {e}") from None
    model = _bench_model(a)
    from specjax.drafters import registry

    methods: dict = {"ar": None}
    for name in [d for d in a.drafters.split(",") if d]:
        parsed = registry.parse(name)
        if parsed is not None and parsed.entry.per_decode:  # `auto`: chosen per batch size
            methods[name] = lambda b, name=name: make_drafter(name, a.k, model, batch=b)
        else:
            methods[name] = make_drafter(name, a.k, model)
    records = bench_batch.run_batch_bench(
        model, [p["prompt"] for p in prompts], methods, a.batch, a.max_new_tokens
    )
    meta = _bench_meta(a, path, model, batch=list(a.batch))
    print(f"machine: {meta['machine']}")
    md = bench_batch.write_batch_report(records, a.out, meta)
    print(md)
    print(f"\nwrote {a.out}/results_batch.json, results_batch.md")


def _batch_arg(text: str) -> tuple[int, ...]:
    from specjax import bench_batch

    try:
        return bench_batch.parse_batches(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_bench_verify(a: argparse.Namespace) -> None:
    import jax

    from specjax import autotune

    model = _bench_model(a)
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    table = autotune.verify_cost_table(
        model, sizes, prompt_len=a.prompt_len, batch=a.batch, impl=a.impl, repeats=a.repeats
    )
    print(
        f"One verify forward of T tokens: {a.model} ({model.dtype}, {jax.default_backend()}), "
        f"prefix {a.prompt_len}, batch {a.batch}, impl {a.impl}; medians of {a.repeats} "
        f"interleaved runs; tree = ancestor-or-self mask of a random tree of T tokens.\n"
    )
    print(autotune.cost_markdown(table))
    if 1 in table:
        print("\n" + autotune.floor_line(model, a.prompt_len, table[1][0], a.batch))


def cmd_bench_step(a: argparse.Namespace) -> None:
    import jax

    from specjax import anatomy

    model = _bench_model(a)
    names = [d for d in a.drafters.split(",") if d]
    results = [
        anatomy.measure_step(
            model,
            make_drafter(n, None, model),
            a.prompt or anatomy.DEFAULT_PROMPT,
            max_new_tokens=a.max_new_tokens,
            warm_steps=a.warm_steps,
            loop_steps=a.loop_steps,
            repeats=a.repeats,
            impl=a.impl,
            name=n,
        )
        for n in names
    ]
    print(
        f"Step anatomy: {a.model} ({model.dtype}, {jax.default_backend()}), batch 1, greedy, "
        f"impl {a.impl}; state after prefill + {a.warm_steps} steps of the prompt; medians of "
        f"{a.repeats} interleaved runs (loop step: {a.loop_steps} steps of engine.decode).\n"
    )
    print(anatomy.anatomy_markdown(results))
    over = anatomy.check_remainder(results)
    print("\nremainder > 10% of the step: " + ("; ".join(over) if over else "none"))


def tree_factory(name: str, model: Model) -> Callable[[DynamicTree], Drafter]:
    """`tune-tree` drafter names -> a function DynamicTree -> Drafter (any registered drafter
    that drafts a dynamic tree; ngram: a candidate of N nodes and top_k K drafts K branches of
    N // K tokens)."""
    from specjax.drafters import registry

    try:
        parsed = registry.parse(name)
        if parsed is None or not parsed.entry.tree:
            raise ValueError(
                f"tune-tree needs a tree drafter, got {name!r}; valid: "
                f"{', '.join(e.usage for e in registry.REGISTRY.values() if e.tree)}"
            )
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return lambda t: registry.make(name, None, model, tree=t)


def _parse_candidates(text: str) -> tuple[DynamicTree, ...]:
    from specjax.drafters import DynamicTree

    out = []
    for c in (c for c in text.split(",") if c.strip()):
        parts = c.split(":")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise SystemExit(f"bad tree candidate {c!r}: expected NODES:DEPTH:TOP_K, e.g. 7:4:3")
        try:
            out.append(DynamicTree(*(int(p) for p in parts)))
        except ValueError as e:
            raise SystemExit(f"bad tree candidate {c!r}: {e}") from None
    return tuple(out)


def _questions(
    path: str, limit: int | None = None, categories: Sequence[str] | None = None
) -> list[dict]:
    """bench.load_questions, with a bad or missing file reported as a one-line CLI error."""
    from specjax import bench

    try:
        return bench.load_questions(path, limit, categories)
    except (OSError, ValueError) as e:
        raise SystemExit(f"specjax: {e}") from None


def _spread_prompts(path: str, limit: int) -> list[str]:
    """The first `limit` questions taken round-robin over the categories (first turns)."""
    import itertools

    groups: dict = {}
    for q in _questions(path):
        groups.setdefault(q["category"], []).append(q["prompt"])
    spread = [p for tier in itertools.zip_longest(*groups.values()) for p in tier if p is not None]
    return spread[:limit]


def cmd_tune_tree(a: argparse.Namespace) -> None:
    from specjax import autotune, bench, load_model

    cands = _parse_candidates(a.candidates) if a.candidates else autotune.DEFAULT_CANDIDATES
    prompts = _spread_prompts(a.questions or bench.tune_questions(), a.limit)
    model = load_model(a.model)
    best, table = autotune.tune_tree(
        model,
        tree_factory(a.drafter, model),
        prompts,
        cands,
        max_new_tokens=a.max_new_tokens,
        repeats=a.repeats,
    )
    print(f"{a.drafter} on {len(prompts)} prompts, {a.max_new_tokens} new tokens each:\n")
    print(autotune.tune_markdown(table, best))
    print(f"\nchosen: {best}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specjax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("prompts", nargs="+")
    g.add_argument(
        "--model",
        default="smollm2-135m",
        help="model name, HF checkpoint dir, .gguf file or converted dir",
    )
    g.add_argument(
        "--drafter",
        default="none",
        type=drafter_arg,
        help=_drafter_usage() + " (speculative decoding; *_tree and "
        "ngram:B>1 draft trees; eagle* without PATH: the model's bundled "
        "drafter)",
    )
    g.add_argument(
        "--k",
        type=positive_int,
        default=None,
        help="draft tokens per step (chain), tokens per branch (ngram:B), or tree nodes (*_tree)",
    )
    g.add_argument("--stream", action="store_true", help="print text as it is produced")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image file for a LLaVA-style model (repeatable); every prompt asks about "
        "these images (a prompt without the model's image placeholder gets one per image)",
    )
    _add_sampling(g)
    _add_distributed(g)
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("convert", help="convert a checkpoint to a specjax orbax checkpoint")
    c.add_argument("src", help="model name, HF checkpoint directory, or .gguf file")
    c.add_argument(
        "dst",
        help="output directory (new, empty, or a specjax checkpoint to replace with --overwrite)",
    )
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DST when it already holds a specjax checkpoint",
    )
    c.set_defaults(fn=cmd_convert)

    d = sub.add_parser("demo", help="load the default model, answer a few prompts, print tok/s")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument(
        "--drafter",
        default=None,
        type=drafter_arg,
        help="default: auto (the drafter measured fastest for the model on this device, "
        "measured once and cached; plain decoding if none wins)",
    )
    d.add_argument("--max-new-tokens", type=positive_int, default=96)
    d.set_defaults(fn=cmd_demo)

    b = sub.add_parser("bench", help="AR vs drafters on Spec-Bench prompts (+ HF baselines)")
    _bench_common(b)
    b.add_argument(
        "--drafters",
        default="ngram",
        type=drafter_list_arg,
        help="comma-separated drafter names: " + _drafter_usage(),
    )
    b.add_argument("--k", type=positive_int, default=None)
    b.add_argument(
        "--hf-baseline",
        action="store_true",
        help="also time HF transformers greedy and prompt lookup",
    )
    b.add_argument("--hf-lookup-tokens", type=positive_int, default=10)
    b.add_argument(
        "--verify-costs",
        default="auto",
        type=_costs_arg,
        help="verify cost per block length for the lookup bound: auto (measure "
        "here), none, or T:COST pairs in any unit (scaled so T=1 costs 1), "
        "e.g. 1:1,2:1.6,9:2.8",
    )
    b.add_argument("--hf-assistant", default=None, help="small model for HF assisted generation")
    b.add_argument(
        "--batch",
        default=(1,),
        type=_batch_arg,
        help="batch sizes, e.g. 1,4,16,64: AR and the drafters at each size, on the same "
        "rows (a multiple of the largest size); default 1, the per-category table",
    )
    b.set_defaults(fn=cmd_bench)

    ar = sub.add_parser("bench-ar", help="specjax AR decode vs HF transformers generate")
    _bench_common(ar)
    ar.set_defaults(fn=lambda a: cmd_bench(a, ar_only=True), limit=None)

    bv = sub.add_parser(
        "bench-verify", help="cost of one verify forward of T tokens, causal vs tree mask"
    )
    bv.add_argument("--model", default="smollm2-135m")
    _add_bf16_weights(bv)
    bv.add_argument("--sizes", default="1,2,4,8,16,32", help="comma-separated block lengths T")
    bv.add_argument(
        "--prompt-len", type=positive_int, default=256, help="committed tokens in the cache"
    )
    bv.add_argument("--batch", type=positive_int, default=1)
    bv.add_argument("--impl", default="xla", choices=("xla", "pallas"), help="attention")
    bv.add_argument("--repeats", type=positive_int, default=20)
    bv.set_defaults(fn=cmd_bench_verify)

    bs = sub.add_parser("bench-step", help="step anatomy: ms of each piece of one decode step")
    bs.add_argument("--model", default="smollm2-135m")
    _add_bf16_weights(bs)
    bs.add_argument(
        "--drafters",
        default="none,ngram,eagle3_tree",
        type=drafter_list_arg,
        help="comma-separated drafter names (one column each): " + _drafter_usage(),
    )
    bs.add_argument("--prompt", default=None, help="one prompt (default: a story request)")
    bs.add_argument(
        "--max-new-tokens", type=positive_int, default=128, help="sizes the cache as generate does"
    )
    bs.add_argument(
        "--warm-steps",
        type=positive_int,
        default=4,
        help="real decode steps before the measured state",
    )
    bs.add_argument("--loop-steps", type=positive_int, default=16)
    bs.add_argument("--repeats", type=positive_int, default=20)
    bs.add_argument("--impl", default="xla", choices=("xla", "pallas"), help="attention")
    bs.set_defaults(fn=cmd_bench_step)

    tt = sub.add_parser("tune-tree", help="pick the draft tree with the best measured tokens/s")
    tt.add_argument("--model", default="smollm2-135m")
    tt.add_argument(
        "--drafter",
        default="layer_skip_tree:8",
        type=drafter_arg,
        help="a drafter that drafts a dynamic tree: layer_skip_tree[:LAYERS] | "
        "model_tree:PATH | eagle3_tree[:PATH] | eagle_tree[:PATH] | ngram",
    )
    tt.add_argument(
        "--candidates",
        default=None,
        help="comma-separated NODES:DEPTH:TOP_K (default: 4:3:2,7:4:3,11:5:3,15:6:4)",
    )
    tt.add_argument(
        "--questions",
        default=None,
        help="question .jsonl (default: the package's own tuning questions, never the eval files)",
    )
    tt.add_argument(
        "--limit", type=positive_int, default=4, help="prompts (round-robin over categories)"
    )
    tt.add_argument("--max-new-tokens", type=positive_int, default=64)
    tt.add_argument("--repeats", type=positive_int, default=1)
    tt.set_defaults(fn=cmd_tune_tree)

    tr = sub.add_parser(
        "train-drafter", help="train an EAGLE / EAGLE-3 / Medusa drafter (optax, orbax)"
    )
    tr.add_argument("--target", default="smollm2-135m", help="target model (name or path)")
    tr.add_argument("--kind", default=None, help="eagle3 | eagle | medusa (default: from --config)")
    tr.add_argument("--out", required=True, help="run directory (resumed when it exists)")
    tr.add_argument(
        "--config",
        default="eagle3_smollm2",
        help="training config: a name in specjax/configs/train/ or a YAML path",
    )
    tr.add_argument("--steps", type=positive_int, default=None)
    tr.add_argument("--batch", type=positive_int, default=None)
    tr.add_argument("--lr", type=float, default=None)
    tr.add_argument(
        "--init-from",
        default=None,
        metavar="RUN_DIR|DRAFTER",
        help="start from the params of another run's latest checkpoint (same kind and data), "
        "or of an exported drafter: a path or a bundled name (e.g. smollm2-135m-eagle3)",
    )
    tr.add_argument(
        "--prompts", type=positive_int, default=None, help="training prompts (self-distilled)"
    )
    tr.add_argument("--heldout", type=int, default=None, help="held-out prompts for tau")
    tr.add_argument(
        "--image-prompts",
        default=None,
        metavar="JSONL",
        help='a vision-language target\'s training prompts: {"prompt": "<image>\\n...", '
        '"images": ["a.jpg"]} per line (image paths relative to the file)',
    )
    tr.add_argument(
        "--responses",
        default=None,
        choices=("self", "given"),
        help="self (regenerate) | given (teacher-forced)",
    )
    tr.add_argument(
        "--dataset",
        default=None,
        help="existing dataset directory (default: OUT/data, built if missing)",
    )
    tr.add_argument(
        "--features",
        default=None,
        help="feature cache to share (default: OUT/features); one written for more "
        "target layers serves drafters that read fewer",
    )
    tr.set_defaults(fn=cmd_train_drafter)

    mg = sub.add_parser(
        "magpie", help="training prompts written by the target itself (Magpie), leak-checked"
    )
    mg.add_argument("--target", default="smollm2-135m", help="target model (name or path)")
    mg.add_argument("--batches", type=positive_int, default=150, help="batches to sample")
    mg.add_argument("--batch", type=positive_int, default=32, help="messages per batch")
    mg.add_argument("--seed", type=int, default=0)
    mg.add_argument("--work", required=True, help="JSONL of raw samples (resumed when it exists)")
    mg.add_argument("--out", required=True, help="the prompt set to write (.jsonl.gz)")
    mg.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="SET",
        help="an earlier prompt set (.jsonl.gz) whose messages are not repeated (repeatable)",
    )
    mg.set_defaults(fn=cmd_magpie)
    return p


def cmd_magpie(a: argparse.Namespace) -> None:
    from specjax import load_model
    from specjax.train.magpie import build_prompt_set, read_prompts

    try:
        exclude = [t for path in a.exclude for t in read_prompts(path)]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"specjax: --exclude: {e}") from None
    counts = build_prompt_set(
        load_model(a.target), a.work, a.out, a.batches, batch=a.batch, seed=a.seed, exclude=exclude
    )
    print(json.dumps(counts))


def cmd_train_drafter(a: argparse.Namespace) -> None:
    from specjax import load_model
    from specjax.train import run_training

    target = load_model(a.target)
    overrides = dict(kind=a.kind, steps=a.steps, batch=a.batch, lr=a.lr, init_from=a.init_from)
    data_over = dict(
        prompts=a.prompts, heldout=a.heldout, responses=a.responses, image_prompts=a.image_prompts
    )
    ecfg, _, hist = run_training(
        target,
        a.config,
        a.out,
        dataset=a.dataset,
        features=a.features,
        train_overrides=overrides,
        data_overrides=data_over,
    )
    last = [r for r in hist if "loss" in r][-1:]
    taus = [r["tau"] for r in hist if "tau" in r]
    what = f"EAGLE-{ecfg.version}" if hasattr(ecfg, "version") else "Medusa"
    print(
        f"trained {what} drafter -> {os.path.join(a.out, 'drafter')}"
        + (f"; final loss {last[0]['loss']:.3f}, acc {last[0]['acc']}" if last else "")
        + (f"; held-out tau {taus[-1]:.2f}" if taus else "")
    )
    name = {1: "eagle_tree", 3: "eagle3_tree"}.get(getattr(ecfg, "version", 0), "medusa_tree")
    print(f'use it: specjax generate --drafter {name}:{os.path.join(a.out, "drafter")} "..."')


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
