"""Held-out tau of EAGLE drafters on a training recipe's held-out prompts (never trained on).

The same measurement the trainer logs every `eval_every` steps (`train.evaluate_tau`: greedy,
batch 1, the recipe's `eval_prompts` prompts and `eval_new_tokens` tokens, the dynamic tree the
recipe's kind evaluates with), for any drafter directories, so a new run can be compared with
the bundled drafter on the same prompts:

    python benchmarks/heldout_tau.py --config eagle3_smollm2_general \
        smollm2-135m-eagle3 runs/eagle3_general/drafter

`--run DIR` prints a run's held-out tau against the tokens it had trained on (history.jsonl;
the trained tokens are summed over the exact batches of each step, as the trainer draws them).

`--questions FILE --limit N` measures on a benchmark's first turns instead (per category; tau
is a count, so it is the same on a busy machine, unlike tokens/s):

    python benchmarks/heldout_tau.py --questions ../shared/data/eval/eagle_mt_bench.jsonl \
        --limit 2 --new-tokens 128 smollm2-135m-eagle3 runs/eagle3_general/drafter

`--nodes`, `--depth` and `--top-k` set the dynamic tree (default: the trainer's 8 / 4 / 3).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import specjax
from specjax import drafters
from specjax.bench import load_questions
from specjax.train import data, load_configs, select_prompts
from specjax.train.trainer import evaluate_tau, tau_counts


def heldout_prompts(config: str) -> list[str]:
    """The recipe's held-out prompts, in the order the trainer evaluates them."""
    tc, dc = load_configs(config)
    return [p["prompt"] for p in select_prompts(dc)[1]][: tc.eval_prompts]


def tau_table(run: str) -> str:
    """A run's held-out tau against trained tokens (loss-masked positions seen), markdown."""
    cfg = json.loads((Path(run) / "run.json").read_text())
    tc = cfg["train"]
    _, mask = data.read_dataset(cfg["dataset"])
    per_row = mask.sum(axis=1)
    hist = [json.loads(x) for x in (Path(run) / "history.jsonl").read_text().splitlines() if x]
    losses = {r["step"]: r for r in hist if "loss" in r}
    rows = ["| step | rows seen | trained tokens | held-out tau | loss | top-1 acc (TTT 0/1/2) |"]
    # loss and accuracy: of the last logged training batch (a noisy single-batch reading)
    rows.append("|---|---|---|---|---|---|")
    batches = data.iterate_batches(len(per_row), tc["batch"], tc["seed"])
    seen, step = 0, 0
    for r in (r for r in hist if "tau" in r):
        while step < r["step"]:
            seen += int(per_row[next(batches)[1]].sum())
            step += 1
        # the last logged training batch at or before this step (log_every may not divide it)
        logged = [k for k in losses if k <= r["step"]]
        lo = losses[max(logged)] if logged else {}
        acc = "/".join(f"{a:.2f}" for a in lo.get("acc", []))
        loss = f"{lo['loss']:.3f}" if lo else ""
        rows.append(
            f"| {r['step']} | {r['step'] * tc['batch']:,} | {seen:,} | {r['tau']:.2f} | "
            f"{loss} | {acc} |"
        )
    return "\n".join(rows)


def category_tau(
    target: specjax.Model, drafter: drafters.Drafter, questions: list[dict], new_tokens: int
) -> dict[str, float]:
    """Greedy tau per category (and "overall") over benchmark questions, batch 1 each."""
    by_cat: dict[str, list[str]] = {}
    for q in questions:
        by_cat.setdefault(q["category"], []).append(q["prompt"])
    out = {}
    fwd = emitted = 0
    for cat, prompts in by_cat.items():
        e, f = tau_counts(target, drafter, prompts, new_tokens=new_tokens)
        out[cat] = e / max(f, 1)
        fwd, emitted = fwd + f, emitted + e
    out["overall"] = emitted / max(fwd, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="eagle3_smollm2_general", help="training recipe")
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--nodes", type=int, default=8, help="dynamic tree nodes (trainer: 8)")
    ap.add_argument("--depth", type=int, default=4, help="dynamic tree depth (trainer: 4)")
    ap.add_argument("--top-k", type=int, default=3, help="dynamic tree top-k (trainer: 3)")
    ap.add_argument("--run", help="a training run directory: print its tau table")
    ap.add_argument("--questions", help="benchmark .jsonl: tau per category on its first turns")
    ap.add_argument("--limit", type=int, default=1, help="questions per category")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: the recipe's")
    ap.add_argument("drafters", nargs="*", help="bundled drafter names or exported directories")
    a = ap.parse_args()
    if a.run:
        print(tau_table(a.run))
    if not a.drafters:
        return
    tc, _ = load_configs(a.config)
    new = a.new_tokens or tc.eval_new_tokens
    target = specjax.load_model(a.target)
    questions = load_questions(a.questions, a.limit) if a.questions else None
    prompts = heldout_prompts(a.config)
    for src in a.drafters:
        d = drafters.eagle(src, tree=drafters.DynamicTree(a.nodes, a.depth, a.top_k))
        if questions:
            taus = category_tau(target, d, questions, new)
            rec = {"drafter": src, "questions": len(questions), "new_tokens": new}
            rec |= {"nodes": a.nodes, "depth": a.depth, "top_k": a.top_k}
            print(json.dumps(rec | {k: round(v, 3) for k, v in taus.items()}), flush=True)
        else:
            tau = evaluate_tau(target, d, prompts, new_tokens=new)
            print(json.dumps({"drafter": src, "prompts": len(prompts), "tau": round(tau, 3)}))


if __name__ == "__main__":
    main()
