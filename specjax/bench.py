"""Benchmarks: specjax AR and speculative decoding (and optionally HF transformers) on question
files such as Spec-Bench, batch 1, after warm-up, in one process. Writes JSON, a Markdown table
and a PNG plot.

Each method sees the same prompts (first turn, chat template). tokens/s is total new tokens over
total wall time (prefill + decode) per category; speedup is relative to specjax AR; tau is mean
tokens emitted per target forward (Spec-Bench's "mean accepted tokens", bonus included).
decode speedup compares decode time alone (prefill excluded). The lookup ceiling (from the AR
outputs) bounds what any prompt-lookup drafter could reach on the same prompts.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from specjax.paths import DATA_ENV, data_file, tune_questions  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import transformers

    from specjax.engine.protocol import Drafter
    from specjax.model import Model


def default_questions() -> str:
    """The Spec-Bench file: $SPECJAX_DATA/eval/spec_bench.jsonl, else ../shared/data/eval/."""
    path = data_file(os.path.join("eval", "spec_bench.jsonl"))
    if path:
        return path
    raise FileNotFoundError(
        "Spec-Bench questions not found: pass --questions FILE or set "
        f"${DATA_ENV} to the data folder (holding eval/spec_bench.jsonl)"
    )


def load_questions(
    path: str, limit: int | None = None, categories: Sequence[str] | None = None
) -> list[dict]:
    """First turn of each question, at most `limit` per category, in file order. A bad line is
    reported as FILE:LINE: what is wrong."""
    name = os.path.splitext(os.path.basename(path))[0]
    per_cat: dict = collections.defaultdict(int)
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            q = parse_question(line, f"{path}:{lineno}")
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


def parse_question(line: str, where: str) -> dict:
    """One line of a question file: a JSON object with "turns", a non-empty list of strings."""
    try:
        q = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(q, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(q).__name__}")
    turns = q.get("turns")
    if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
        raise ValueError(
            f'{where}: "turns" must be a non-empty list of strings (the prompts), got {turns!r}'
            if "turns" in q
            else f'{where}: no "turns" (expected {{"turns": ["prompt", ...]}})'
        )
    return q


@dataclasses.dataclass
class Run:
    """One method on one prompt. prefill_s is NaN where the method does not split its time."""

    tokens: list
    seconds: float
    tau: float = float("nan")
    forwards: int = 0
    prefill_s: float = float("nan")
    compiled: bool = False


@dataclasses.dataclass
class Record:
    method: str
    category: str
    qid: object
    new_tokens: int
    seconds: float
    tau: float
    forwards: int
    prefill_s: float = float("nan")
    tokens: list = dataclasses.field(default_factory=list)  # the Run fields, then:
    # AR records only: fewest decode steps any prompt-lookup drafter could have used, and the
    # least decode cost (in single-token forwards) at the run's measured verify costs.
    ceiling_steps: int | None = None
    ceiling_cost: float | None = None
    compiled: bool = False  # the timed call traced/compiled something (warm-up missed a shape)


def _spec_runner(
    model: Model, drafter: Drafter | None, max_new_tokens: int, sampling: dict | None = None
) -> Callable[[list[int]], Run]:
    """sampling: `generate`'s temperature / top_k / top_p / key (None: greedy). Every prompt
    and method decodes with the same key."""
    from specjax.api import generate

    def run(ids: list[int]) -> Run:
        out = generate(
            model, [ids], max_new_tokens=max_new_tokens, drafter=drafter, **(sampling or {})
        )
        s = out.stats
        return Run(
            out.tokens[0],
            s["total_s"],
            s["tau"],
            s["target_forwards"][0],
            s["prefill_s"],
            s["compiled"],
        )

    return run


def _hf_runner(
    hf_model: transformers.PreTrainedModel,
    max_new_tokens: int,
    eos: Sequence[int],
    sampling: dict | None = None,
    **gen_kwargs: Any,
) -> Callable[[list[int]], Run]:
    """sampling: as `_spec_runner`'s; HF samples with the same temperature / top-k / top-p (no
    top-k or top-p unless given: HF's own default top-k of 50 is switched off) and torch
    seeded with the key before each prompt."""
    import torch

    sampling = dict(sampling or {})
    seed = sampling.pop("key", 0)
    if sampling.get("temperature", 0.0) > 0:
        gen_kwargs = dict(
            gen_kwargs,
            do_sample=True,
            temperature=sampling["temperature"],
            top_k=sampling.get("top_k") or 0,
            top_p=sampling.get("top_p") or 1.0,
        )
    else:
        gen_kwargs = dict(gen_kwargs, do_sample=False)

    def run(ids: list[int]) -> Run:
        x = torch.tensor([ids])
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            y = hf_model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                eos_token_id=list(eos),
                pad_token_id=eos[0],
                **gen_kwargs,
            )
        dt = time.perf_counter() - t0
        return Run(y[0, len(ids) :].tolist(), dt)

    return run


def load_hf_twin(model: Model, bf16_weights: bool = False) -> transformers.PreTrainedModel:
    """The HF transformers model with the same weights as a named specjax model (GGUF), in
    float32; `bf16_weights`: each rounded to bfloat16 as `specjax bench --bf16-weights` does."""
    import torch
    import transformers

    from specjax.model import KNOWN_MODELS, find_gguf

    if model.name not in KNOWN_MODELS:
        raise ValueError(
            f"--hf-baseline needs a named model ({', '.join(KNOWN_MODELS)}), got {model.name!r}"
        )
    from checkpoints_convert.gguf_file import parsed_once

    path = find_gguf(model.name)
    folder, fname = os.path.split(path)
    with parsed_once():  # one metadata parse instead of two: 17.5 -> 7.3 s for SmolLM2
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=fname, dtype=torch.float32
        ).eval()
    if bf16_weights:
        with torch.no_grad():
            for p in hf.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return hf


def machine() -> str:
    """The processor and core count, plus the library versions that set the speed."""
    import platform

    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores", f"jax {jax.__version__} ({jax.default_backend()})"]
    try:
        import torch
        import transformers

        parts.append(f"torch {torch.__version__}, transformers {transformers.__version__}")
    except ImportError:
        pass
    return "; ".join(parts)


def run_bench(
    model: Model,
    prompts: list[dict],
    methods: dict[str, Callable[[list[int]], Run]],
    *,
    warmup: bool = True,
    progress: bool = True,
    verify_costs: dict | None = None,
) -> list[Record]:
    """methods: name -> runner(ids) -> Run. The "ar" method also gets its lookup ceiling, and
    with verify_costs ({T: relative cost}, see `lookup_bound`) its cost-aware bound."""
    from tqdm import tqdm

    from specjax.decode import MIN_PROMPT_BUCKET, bucket

    encoded = [model.encode(p["prompt"], chat=True) for p in prompts]
    if warmup:
        # Compile every prompt-length bucket once per method so timings exclude compilation.
        seen = {}
        for ids in encoded:
            seen.setdefault(bucket(len(ids), MIN_PROMPT_BUCKET, half_steps=True), ids)
        for _name, run in tqdm(list(methods.items()), desc="warm-up", disable=not progress):
            for ids in seen.values():
                run(ids)
    records = []
    bar = tqdm(total=len(prompts) * len(methods), desc="bench", disable=not progress)
    for p, ids in zip(prompts, encoded):
        for name, run in methods.items():
            r = run(ids)
            ceiling = bound = None
            if name == "ar":
                ceiling = lookup_ceiling(ids, r.tokens)
                bound = lookup_bound(ids, r.tokens, verify_costs) if verify_costs else None
            records.append(
                Record(
                    name,
                    p["category"],
                    p["id"],
                    len(r.tokens),
                    ceiling_steps=ceiling,
                    ceiling_cost=bound,
                    **dataclasses.asdict(r),
                )
            )
            bar.set_postfix(method=name, tok_s=f"{len(r.tokens) / max(r.seconds, 1e-9):.1f}")
            bar.update()
    bar.close()
    return records


def _longest_copies(
    prompt: Sequence[int], output: Sequence[int], k: int | None = None
) -> np.ndarray:
    """L[t] (t >= 1): the longest prefix of output[t:t + k] that is a copy of some span of the
    context seen before output position t (prompt plus output[:t]); L[0] = 0."""
    ctx = np.asarray(list(prompt) + list(output), dtype=np.int64)
    p, n = len(prompt), len(output)
    L = np.zeros(n + 1, dtype=np.int64)
    for t in range(1, n):
        seen = p + t
        want = ctx[seen : seen + (k or n)]
        cand, a = np.arange(seen), 0  # sources j whose copy matches want[:a]
        while a < len(want):
            j = cand + a  # a copy may only read tokens already seen
            cand = cand[(j < seen) & (ctx[np.minimum(j, seen - 1)] == want[a])]
            if not cand.size:
                break
            a += 1
        L[t] = a
    return L


def lookup_ceiling(prompt: Sequence[int], output: Sequence[int], k: int | None = None) -> int:
    """Fewest decode steps in which any prompt-lookup drafter could emit `output` greedily.

    A step verifies a draft of at most k tokens copied from the context seen so far (prompt plus
    output so far) and emits the accepted tokens plus one; the first output token comes from
    prefill, as in `generate`. Taking the longest copy every step is optimal: if a copy from
    position j accepts a tokens at output position t, the copy from j + 1 accepts a - 1 at
    t + 1, so the farthest reachable position never decreases with t. No lookup drafter (any n,
    any tie-break, any tree of copies) can use fewer target forwards.
    """
    L, n = _longest_copies(prompt, output, k), len(output)
    t, steps = 1, 0
    while t < n:
        t += min(int(L[t]), n - t - 1) + 1
        steps += 1
    return steps


def check_costs(costs: dict) -> dict:
    """{T: cost of verifying T tokens} (any unit, e.g. ms) with T = 1 present, costs positive
    and non-decreasing in T (a longer block never costs less) -> a sorted copy relative to
    T = 1 (T = 1 costs 1.0, one AR step)."""
    out = {int(t): float(c) for t, c in sorted(costs.items())}
    if not out or min(out) != 1:
        raise ValueError(f"verify costs need T = 1 and only T >= 1, got sizes {sorted(out)}")
    vals = list(out.values())
    if min(vals) <= 0 or any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"verify costs must be positive and non-decreasing in T, got {out}")
    return {t: c / out[1] for t, c in out.items()}


BOUND_SIZES = (1, 2, 3, 4, 5, 9, 17, 33)


def measure_verify_costs(
    model: Model,
    prompts: list[dict],
    max_new_tokens: int,
    sizes: Sequence[int] = BOUND_SIZES,
    repeats: int = 5,
    progress: bool = True,
) -> dict:
    """{T: cost of one verify forward of T tokens / cost of T = 1} on this machine, with the
    cache holding the median prompt length of `prompts`. Each T takes the cheaper of a causal
    block and a random tree (a tree drafter could use either), then costs are made
    non-decreasing (a longer block can always be padded from a shorter one's program)."""
    from specjax import autotune

    lengths = sorted(len(model.encode(p["prompt"], chat=True)) for p in prompts)
    table = autotune.verify_cost_table(
        model,
        sizes,
        prompt_len=lengths[len(lengths) // 2],
        max_new=max_new_tokens,
        repeats=repeats,
        progress=progress,
    )
    sizes = sorted(table)
    ms = np.array([min(table[T]) for T in sizes])
    # A T block is never cheaper than a shorter one: take the cheapest of T and all longer.
    return check_costs(dict(zip(sizes, np.minimum.accumulate(ms[::-1])[::-1].tolist())))


def parse_costs(text: str) -> dict:
    """ "1:1,2:1.6,9:2.8" -> {1: 1.0, 2: 1.6, 9: 2.8} (checked and scaled by `check_costs`)."""
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        costs = {int(t): float(c) for t, c in pairs}
    except ValueError:
        raise ValueError(
            f"bad verify costs {text!r}: expected T:COST pairs like "
            "1:1,2:1.6,9:2.8, or auto, or none"
        ) from None
    return check_costs(costs)


def lookup_bound(
    prompt: Sequence[int], output: Sequence[int], costs: dict, k: int | None = None
) -> float:
    """Least decode cost, in single-token target forwards, at which any prompt-lookup drafter
    could emit `output` greedily when verifying T tokens costs costs[T].

    A size between two measured ones is charged the smaller size's cost, so with non-decreasing
    true costs this is a lower bound on cost and the speedup it implies an upper bound. The
    context seen before each output position is fixed by the output itself, whatever was drafted
    before, so an exact dynamic program over output positions finds the optimum: at position t
    draft r <= L[t] copied tokens (all accepted) for costs[r + 1], or move on with a plain step.
    Drafting past L[t] (tokens that get rejected) or a tree of copies never helps: it costs at
    least as much and accepts no more than the longest copy.
    """
    costs = check_costs(costs)
    sizes, table = np.asarray(list(costs)), np.asarray(list(costs.values()))
    L, n = _longest_copies(prompt, output, k), len(output)
    # step[r]: a step drafting r tokens verifies r + 1 (the smaller measured size's cost).
    step = table[np.searchsorted(sizes, np.arange(1, n + 1), side="right") - 1]
    best = np.zeros(n + 1)
    for t in range(n - 1, 0, -1):
        r = min(int(L[t]), n - t - 1)
        best[t] = np.min(step[: r + 1] + best[t + 1 : t + r + 2])
    return float(best[1]) if n > 1 else 0.0


def _decoded(r: Record) -> int:
    """Tokens emitted by decode steps (the first comes from prefill)."""
    return max(r.new_tokens - 1, 0)


def _scaled_speedup(rs: list[Record], decode_units: list) -> float:
    """Total-time speedup over the records `rs` if each prompt's decode took decode_units[i]
    AR steps (prefill unchanged)."""
    secs = sum(r.seconds for r in rs)
    best = sum(
        r.prefill_s + (r.seconds - r.prefill_s) * u / max(_decoded(r), 1)
        for r, u in zip(rs, decode_units)
    )
    return secs / best if best > 0 else float("nan")


def summarize(records: list[Record], baseline: str = "ar") -> dict:
    """-> {category: {method: stats}} plus an "overall" row.

    stats: tokens_per_s, speedup, tau, decode_tokens_per_s / decode_speedup (methods that
    split prefill from decode), same_as_ar (greedy outputs identical to the baseline's), and
    for the baseline the lookup ceiling: ceiling_tau and ceiling_speedup, the total-time speedup
    a lookup drafter would reach with ceiling_steps target forwards each costing one AR step,
    and bound_speedup, the same at the measured verify costs (records with ceiling_cost).
    """
    table: dict = collections.defaultdict(dict)
    groups = collections.defaultdict(list)
    base_tokens = {(r.category, r.qid): r.tokens for r in records if r.method == baseline}
    for r in records:
        groups[(r.category, r.method)].append(r)
        groups[("overall", r.method)].append(r)
    for (cat, method), rs in groups.items():
        toks = sum(r.new_tokens for r in rs)
        secs = sum(r.seconds for r in rs)
        # tau over all steps of the group (not a mean of per-prompt taus), like ceiling_tau.
        spec = [r for r in rs if not np.isnan(r.tau)]
        steps = sum(r.forwards - 1 for r in spec)
        tau = sum(map(_decoded, spec)) / steps if steps else float("nan")
        stats = {
            "tokens_per_s": toks / secs if secs else 0.0,
            "tau": tau,
            "prompts": len(rs),
            "new_tokens": toks,
            "same_as_ar": sum(base_tokens.get((r.category, r.qid)) == r.tokens for r in rs),
        }
        if not any(np.isnan(r.prefill_s) for r in rs):
            dec_s = sum(r.seconds - r.prefill_s for r in rs)
            stats["decode_tokens_per_s"] = sum(map(_decoded, rs)) / dec_s if dec_s > 0 else 0.0
        if all(r.ceiling_steps is not None for r in rs):
            steps = sum(r.ceiling_steps for r in rs)
            stats["ceiling_tau"] = sum(map(_decoded, rs)) / max(steps, 1)
            # Decode time scaled by (ceiling steps / AR steps); verify forwards cost at least
            # one AR step, so this is an upper bound on a lookup drafter's speedup.
            stats["ceiling_speedup"] = _scaled_speedup(rs, [r.ceiling_steps for r in rs])
        if rs and all(r.ceiling_cost is not None for r in rs):
            # The same with each verify forward charged its measured cost (`lookup_bound`).
            stats["bound_speedup"] = _scaled_speedup(rs, [r.ceiling_cost for r in rs])
        table[cat][method] = stats
    for row in table.values():
        base = row.get(baseline, {})
        for stats in row.values():
            for key, ref in (
                ("speedup", "tokens_per_s"),
                ("decode_speedup", "decode_tokens_per_s"),
            ):
                if ref in stats and base.get(ref):
                    stats[key] = stats[ref] / base[ref]
    cats = sorted(c for c in table if c != "overall") + ["overall"]
    return {c: table[c] for c in cats}


def _cell(s: dict) -> str:
    parts = [f"{s['speedup']:.2f}x"]
    if "decode_speedup" in s:
        parts.append(f"dec {s['decode_speedup']:.2f}x")
    if not np.isnan(s["tau"]):
        parts.append(f"tau {s['tau']:.2f}")
    return f"{s['tokens_per_s']:.1f} ({', '.join(parts)})"


def markdown(
    summary: dict,
    methods: Sequence[str],
    baseline: str = "ar",
    verify_costs: dict | None = None,
    sampling: dict | None = None,
) -> str:
    """Table: tokens/s (total speedup, decode-only speedup, tau) per method and category.
    sampling: the run's temperature / top_k / top_p / key when it sampled (outputs are then
    draws, not compared with the baseline's)."""
    others = [m for m in methods if m != baseline]
    lines = [
        "| category | " + " | ".join([f"{baseline} tok/s", "lookup ceiling"] + others) + " |",
        "|" + "---|" * (3 + len(others)),
    ]
    for cat, row in summary.items():
        base = row.get(baseline, {})
        cells = [f"{base['tokens_per_s']:.1f}" if base else ""]
        ceiling = ""
        if "ceiling_tau" in base:
            ceiling = f"tau {base['ceiling_tau']:.2f}, <= {base['ceiling_speedup']:.2f}x"
            if "bound_speedup" in base:
                ceiling += f" ({base['bound_speedup']:.2f}x)"
        cells.append(ceiling)
        cells += [_cell(row[m]) if m in row else "" for m in others]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    overall = summary.get("overall", {})
    same = [
        f"{m} {overall[m]['same_as_ar']}/{overall[m]['prompts']}" for m in others if m in overall
    ]
    if sampling and sampling.get("temperature", 0) > 0:
        setting = ", ".join(f"{k} {v}" for k, v in sampling.items() if v is not None)
        lines += [
            "",
            f"Sampled ({setting}; the same key for every prompt and method): outputs are "
            "draws from the target's distribution, not compared token for token.",
        ]
    elif same:
        lines += ["", f"Greedy outputs identical to {baseline}: " + ", ".join(same) + "."]
    if verify_costs and any("bound_speedup" in row.get(baseline, {}) for row in summary.values()):
        listed = ", ".join(f"{t}: {c:.2f}" for t, c in sorted(verify_costs.items()))
        lines += [
            "",
            "Lookup ceiling: fewest forwards of any prompt-lookup drafter (tau) and the "
            "speedup if each cost one AR step; in brackets, the bound at the verify costs "
            f"measured here (T: cost vs T=1; {listed}).",
        ]
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
    costs = meta.get("verify_costs")
    md = markdown(
        summary,
        methods,
        verify_costs={int(t): c for t, c in costs.items()} if costs else None,
        sampling=meta.get("sampling"),
    )
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(
            {"meta": meta, "summary": summary, "records": [dataclasses.asdict(r) for r in records]},
            f,
            indent=1,
            default=float,
        )
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md + "\n")
    plot(summary, methods, os.path.join(out_dir, "speedup.png"))
    return md
