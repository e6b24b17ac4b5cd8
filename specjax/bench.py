"""Benchmarks: specjax AR and speculative decoding (and optionally HF transformers) on question
files such as Spec-Bench, batch 1, after warm-up, in one process. Writes JSON, a Markdown table
and a PNG plot.

Each method sees the same prompts (first turn, chat template). tokens/s is total new tokens over
total wall time (prefill + decode) per category; speedup is relative to specjax AR; tau is mean
tokens emitted per target forward (Spec-Bench's "mean accepted tokens", bonus included).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np

DATA_ENV = "SPECJAX_DATA"


def data_file(sub: str) -> Optional[str]:
    """$SPECJAX_DATA/SUB, else ../shared/data/SUB (from the working directory or from the
    repository); None when absent."""
    roots = [os.environ.get(DATA_ENV, ""), os.path.join(os.getcwd(), "..", "shared", "data"),
             os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")]
    for root in roots:
        path = os.path.join(root, sub)
        if root and os.path.exists(path):
            return os.path.abspath(path)
    return None


def default_questions() -> str:
    """The Spec-Bench file: $SPECJAX_DATA/eval/spec_bench.jsonl, else ../shared/data/eval/."""
    path = data_file(os.path.join("eval", "spec_bench.jsonl"))
    if path:
        return path
    raise FileNotFoundError("Spec-Bench questions not found: pass --questions FILE or set "
                            f"${DATA_ENV} to the data folder (holding eval/spec_bench.jsonl)")


def load_questions(path: str, limit: Optional[int] = None,
                   categories: Optional[Sequence[str]] = None) -> list[dict]:
    """First turn of each question, at most `limit` per category, in file order."""
    name = os.path.splitext(os.path.basename(path))[0]
    per_cat: dict = collections.defaultdict(int)
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            q = json.loads(line)
            cat = q.get("category") or name
            if categories and cat not in categories:
                continue
            if limit is not None and per_cat[cat] >= limit:
                continue
            per_cat[cat] += 1
            out.append({"id": q.get("question_id"), "category": cat, "prompt": q["turns"][0]})
    if not out:
        raise ValueError(f"no questions selected from {path!r} (categories={categories})")
    return out


@dataclasses.dataclass
class Record:
    method: str
    category: str
    qid: object
    new_tokens: int
    seconds: float
    tau: float
    forwards: int


def _spec_runner(model, drafter, max_new_tokens: int) -> Callable:
    from specjax.generate import generate

    def run(ids):
        out = generate(model, [ids], max_new_tokens=max_new_tokens, drafter=drafter)
        s = out.stats
        return out.tokens[0], s["total_s"], s["tau"], s["target_forwards"][0]

    return run


def _hf_runner(hf_model, max_new_tokens: int, eos: Sequence[int], **gen_kwargs) -> Callable:
    import torch

    def run(ids):
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.no_grad():
            y = hf_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                  max_new_tokens=max_new_tokens, eos_token_id=list(eos),
                                  pad_token_id=eos[0], **gen_kwargs)
        dt = time.perf_counter() - t0
        new = y[0, len(ids):].tolist()
        return new, dt, float("nan"), 0

    return run


def load_hf_twin(model):
    """The HF transformers model with the same weights as a named specjax model (GGUF)."""
    import torch
    import transformers

    from specjax.model import KNOWN_MODELS, find_gguf

    if model.name not in KNOWN_MODELS:
        raise ValueError(f"--hf-baseline needs a named model ({', '.join(KNOWN_MODELS)}), got "
                         f"{model.name!r}")
    path = find_gguf(model.name)
    folder, fname = os.path.split(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname,
                                                           dtype=torch.float32).eval()
    return hf


def run_bench(model, prompts: list[dict], methods: dict, *, warmup: bool = True,
              progress: bool = True) -> list[Record]:
    """methods: name -> runner(ids) -> (new_tokens, seconds, tau, forwards)."""
    from tqdm import tqdm

    from specjax.generate import MIN_PROMPT_BUCKET, bucket

    encoded = [model.encode(p["prompt"], chat=True) for p in prompts]
    if warmup:
        # Compile every prompt-length bucket once per method so timings exclude compilation.
        seen = {}
        for ids in encoded:
            seen.setdefault(bucket(len(ids), MIN_PROMPT_BUCKET, half_steps=True), ids)
        for name, run in tqdm(list(methods.items()), desc="warm-up", disable=not progress):
            for ids in seen.values():
                run(ids)
    records = []
    bar = tqdm(total=len(prompts) * len(methods), desc="bench", disable=not progress)
    for p, ids in zip(prompts, encoded):
        for name, run in methods.items():
            toks, secs, tau, fwd = run(ids)
            records.append(Record(name, p["category"], p["id"], len(toks), secs, tau, fwd))
            bar.set_postfix(method=name, tok_s=f"{len(toks) / max(secs, 1e-9):.1f}")
            bar.update()
    bar.close()
    return records


def summarize(records: list[Record], baseline: str = "ar") -> dict:
    """-> {category: {method: {"tokens_per_s", "speedup", "tau"}}} plus an "overall" row."""
    table: dict = collections.defaultdict(dict)
    groups = collections.defaultdict(list)
    for r in records:
        groups[(r.category, r.method)].append(r)
        groups[("overall", r.method)].append(r)
    for (cat, method), rs in groups.items():
        toks = sum(r.new_tokens for r in rs)
        secs = sum(r.seconds for r in rs)
        taus = [r.tau for r in rs if not np.isnan(r.tau)]
        table[cat][method] = {"tokens_per_s": toks / secs if secs else 0.0,
                              "tau": float(np.mean(taus)) if taus else float("nan"),
                              "prompts": len(rs), "new_tokens": toks}
    for cat, row in table.items():
        base = row.get(baseline, {}).get("tokens_per_s")
        for stats in row.values():
            stats["speedup"] = stats["tokens_per_s"] / base if base else float("nan")
    cats = sorted(c for c in table if c != "overall") + ["overall"]
    return {c: table[c] for c in cats}


def markdown(summary: dict, methods: Sequence[str]) -> str:
    head = "| category | " + " | ".join(f"{m} tok/s | {m} speedup | {m} tau" for m in methods)
    lines = [head + " |", "|" + "---|" * (1 + 3 * len(methods))]
    for cat, row in summary.items():
        cells = []
        for m in methods:
            s = row.get(m)
            if s is None:
                cells += ["", "", ""]
                continue
            tau = "" if np.isnan(s["tau"]) else f"{s['tau']:.2f}"
            cells += [f"{s['tokens_per_s']:.1f}", f"{s['speedup']:.2f}x", tau]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, methods: Sequence[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(summary)
    x = np.arange(len(cats))
    w = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(cats)), 4))
    for i, m in enumerate(methods):
        vals = [summary[c].get(m, {}).get("speedup", np.nan) for c in cats]
        ax.bar(x + i * w - 0.4 + w / 2, vals, w, label=m)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(x, cats, rotation=20)
    ax.set_ylabel("speedup over specjax AR")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(records: list[Record], methods: Sequence[str], out_dir: str, meta: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(records)
    md = markdown(summary, methods)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "summary": summary,
                   "records": [dataclasses.asdict(r) for r in records]}, f, indent=1,
                  default=float)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md + "\n")
    plot(summary, methods, os.path.join(out_dir, "speedup.png"))
    return md
