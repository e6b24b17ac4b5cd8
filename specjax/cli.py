"""The `specjax` command line.

    specjax demo                       load the default model, answer a few prompts, print tok/s
    specjax generate "prompt" ...      generate (add --stream to print text as it comes)
    specjax convert SRC DST            HF dir / GGUF / model name -> converted orbax checkpoint
    specjax bench-ar                   specjax AR decode vs HF transformers generate
    specjax bench                      AR vs drafters on Spec-Bench (JSON + Markdown + PNG)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

DEMO_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Summarize in two sentences: The Moon is Earth's only natural satellite. It formed about "
    "4.5 billion years ago, probably from debris of a collision between Earth and a Mars-sized "
    "body. The Moon's gravity causes the tides, and it is tidally locked to Earth, so the same "
    "side always faces us.",
]


def make_drafter(name: str, k, model=None):
    """CLI drafter names: ngram[:BRANCHES], layer_skip[:N], layer_skip_tree[:N],
    model:PATH_OR_NAME, model_tree:PATH_OR_NAME, none."""
    from specjax import drafters, load_model

    if name in (None, "", "none", "ar"):
        return None
    base, _, arg = name.partition(":")
    tree = drafters.DynamicTree(nodes=k or 8) if base.endswith("_tree") else None
    if base == "ngram":
        branches = int(arg) if arg else 1
        return drafters.ngram(k=k or (8 if branches == 1 else 4), branches=branches)
    if base in ("layer_skip", "layer_skip_tree"):
        return drafters.layer_skip(layers=int(arg) if arg else 8, k=k or 4, tree=tree)
    if base in ("model", "model_tree"):
        if not arg:
            raise SystemExit(f"--drafter {base}:PATH needs the draft model (name, HF dir, .gguf)")
        draft = load_model(arg, dtype=None if model is None else model.dtype)
        return drafters.small_model(draft, k=k or 5, tree=tree)
    raise SystemExit(f"unknown drafter {name!r}; valid: ngram[:BRANCHES], layer_skip[:LAYERS], "
                     f"layer_skip_tree[:LAYERS], model:PATH, model_tree:PATH, none")


def _add_sampling(p):
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)


def cmd_generate(a):
    from specjax import load_model
    from specjax.generate import generate, generate_stream

    model = load_model(a.model)
    drafter = make_drafter(a.drafter, a.k, model)
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
              top_p=a.top_p, key=a.seed, chat=not a.no_chat, drafter=drafter)
    if a.stream:
        for prompt in a.prompts:
            t0 = time.perf_counter()
            for piece in generate_stream(model, prompt, **kw):
                print(piece, end="", flush=True)
            print(f"\n[{time.perf_counter() - t0:.2f}s]", file=sys.stderr)
        return
    out = generate(model, a.prompts, **kw)
    for prompt, text in zip(a.prompts, out.text):
        print(f"### {prompt}\n{text}\n")
    s = out.stats
    print(f"[{s['new_tokens']} tokens in {s['total_s']:.2f}s: {s['tokens_per_s']:.1f} tok/s, "
          f"tau {s['tau']:.2f}, compiled={s['compiled']}]", file=sys.stderr)


def cmd_convert(a):
    from checkpoints_convert import save_converted
    from specjax import load_model

    model = load_model(a.src)
    import jax

    save_converted(a.dst, jax.device_get(model.params), model.config, model.tokenizer)
    print(f"converted {a.src} -> {os.path.abspath(a.dst)} ({model.config.model_type}, "
          f"{model.config.num_layers} layers)")


def cmd_demo(a):
    from specjax import load_model
    from specjax.generate import generate

    print(f"loading {a.model} ...", flush=True)
    model = load_model(a.model)
    drafter = make_drafter(a.drafter, None, model)
    for label, d in (("AR", None), (a.drafter, drafter)) if drafter else (("AR", None),):
        generate(model, DEMO_PROMPTS[0], max_new_tokens=a.max_new_tokens, drafter=d)  # compile
    for prompt in DEMO_PROMPTS:
        print(f"\n### {prompt}")
        ar = generate(model, prompt, max_new_tokens=a.max_new_tokens)
        print(ar.text[0])
        line = f"[AR: {ar.stats['tokens_per_s']:.1f} tok/s"
        if drafter is not None:
            sp = generate(model, prompt, max_new_tokens=a.max_new_tokens, drafter=drafter)
            same = "identical" if sp.tokens == ar.tokens else "DIFFERENT"
            line += (f" | {a.drafter}: {sp.stats['tokens_per_s']:.1f} tok/s, tau "
                     f"{sp.stats['tau']:.2f}, output {same}")
        print(line + "]")


def _bench_common(p):
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--questions", default=None, help="question .jsonl (default: Spec-Bench)")
    p.add_argument("--limit", type=int, default=None, help="questions per category")
    p.add_argument("--categories", default=None, help="comma-separated subset")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default="bench_out")


def cmd_bench(a, ar_only=False):
    from specjax import bench, load_model

    model = load_model(a.model)
    path = a.questions or bench.default_questions()
    cats = a.categories.split(",") if a.categories else None
    prompts = bench.load_questions(path, a.limit, cats)
    methods = {"ar": bench._spec_runner(model, None, a.max_new_tokens)}
    if not ar_only:
        for name in [d for d in a.drafters.split(",") if d]:
            methods[name] = bench._spec_runner(model, make_drafter(name, a.k, model),
                                               a.max_new_tokens)
    if ar_only or a.hf_baseline:
        hf = bench.load_hf_twin(model)
        eos = model.eos_token_ids
        methods["hf"] = bench._hf_runner(hf, a.max_new_tokens, eos)
        if not ar_only:
            methods["hf_lookup"] = bench._hf_runner(hf, a.max_new_tokens, eos,
                                                    prompt_lookup_num_tokens=a.hf_lookup_tokens)
            if a.hf_assistant:
                assistant = bench.load_hf_twin(load_model(a.hf_assistant))
                methods["hf_assisted"] = bench._hf_runner(hf, a.max_new_tokens, eos,
                                                          assistant_model=assistant)
    records = bench.run_bench(model, prompts, methods)
    meta = {"model": a.model, "questions": path, "limit": a.limit,
            "max_new_tokens": a.max_new_tokens, "dtype": str(model.dtype), "batch": 1,
            "command": " ".join(sys.argv)}
    md = bench.write_report(records, list(methods), a.out, meta)
    print(md)
    print(f"\nwrote {a.out}/results.json, results.md, speedup.png")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specjax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("prompts", nargs="+")
    g.add_argument("--model", default="smollm2-135m",
                   help="model name, HF checkpoint dir, .gguf file or converted dir")
    g.add_argument("--drafter", default="none",
                   help="none | ngram[:BRANCHES] | layer_skip[:LAYERS] | layer_skip_tree[:LAYERS] "
                        "| model:PATH | model_tree:PATH (speculative decoding; *_tree and "
                        "ngram:B>1 draft trees)")
    g.add_argument("--k", type=int, default=None,
                   help="draft tokens per step (chain), tokens per branch (ngram:B), or tree "
                        "nodes (*_tree)")
    g.add_argument("--stream", action="store_true", help="print text as it is produced")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    _add_sampling(g)
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("convert", help="convert a checkpoint to a specjax orbax checkpoint")
    c.add_argument("src", help="model name, HF checkpoint directory, or .gguf file")
    c.add_argument("dst", help="output directory")
    c.set_defaults(fn=cmd_convert)

    d = sub.add_parser("demo", help="load the default model, answer a few prompts, print tok/s")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--drafter", default="ngram")
    d.add_argument("--max-new-tokens", type=int, default=96)
    d.set_defaults(fn=cmd_demo)

    b = sub.add_parser("bench", help="AR vs drafters on Spec-Bench prompts (+ HF baselines)")
    _bench_common(b)
    b.add_argument("--drafters", default="ngram", help="comma-separated drafter names")
    b.add_argument("--k", type=int, default=None)
    b.add_argument("--hf-baseline", action="store_true",
                   help="also time HF transformers greedy and prompt lookup")
    b.add_argument("--hf-lookup-tokens", type=int, default=10)
    b.add_argument("--hf-assistant", default=None, help="small model for HF assisted generation")
    b.set_defaults(fn=cmd_bench)

    ar = sub.add_parser("bench-ar", help="specjax AR decode vs HF transformers generate")
    _bench_common(ar)
    ar.set_defaults(fn=lambda a: cmd_bench(a, ar_only=True), limit=None)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
