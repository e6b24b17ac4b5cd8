"""Choose the n-gram chain's verify rule on training data: replay rules over SmolLM2's own greedy
answers, then (``--e2e``) time the best against the others end to end.

A rule is the drafter's (k, short, short_from): after the longest match the history has for its
last tokens (n tokens, n <= max_ngram = 4, the drafter's `continuation_starts`) it verifies k
copied tokens when n = 4, `short` when short_from <= n < 4, and none (a plain step) otherwise.
Plain greedy decoding's output does not depend on the drafter, so for every answer position the
match and how many of its copied tokens the answer confirms are computed once (the history is
the prompt plus the answer so far), and each rule is then a walk over the answer: a step at
position p verifies `size` tokens, emits min(accepted, size) + 1 and costs what verifying size +
1 tokens costs relative to one (`--costs`; the default is this 2-core VM's measured table with
weights [out, in], benchmarks/RESULTS.md "Weights stored [out, in]": T = 1, 2, 4, 8, 9
measured, 3 and 5-7 interpolated linearly). The replayed speedup = answer tokens / cost
(decode only: no prefill, no drafter time; the drafter also caps a request at the copy's
tokens the history holds, which the replay does not).

Data: the self-distillation rows committed under `specjax/train/selfdistill/` (training prompts
answered greedily by SmolLM2; no eval file). `--e2e` then decodes the held-out prompts of the
stage-4 recipe (training-pool prompts never trained on; needs SPECJAX_DATA) with plain decoding
and each rule, checks every output against plain decoding's and prints `autotune.tune_tree`'s
interleaved timing. `--spec-bench N` measures (only measures: it chooses nothing) plain decoding,
the old rule and the default on Spec-Bench's first turns, N per category, in one `specjax bench`
run (`--out DIR`: its report).

    python benchmarks/ngram_rules.py [--rows 20000] [--costs 1:1,2:1.32,...] [--adaptive] [--e2e]
    python benchmarks/ngram_rules.py --spec-bench 2 --out DIR
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SELFDISTILL = os.path.join(HERE, "..", "specjax", "train", "selfdistill")
STAGES = ("eagle3_smollm2_general_b", "eagle3_smollm2_general_c")
COSTS = {1: 1.0, 2: 1.32, 3: 1.35, 4: 1.38, 5: 1.455, 6: 1.53, 7: 1.605, 8: 1.68, 9: 2.17}
MAX_NGRAM, MAX_K = 4, 8


def answers(limit: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prompt ids, answer ids) of up to `limit` self-distillation rows."""
    out = []
    for stage in STAGES:
        for f in sorted(glob.glob(os.path.join(SELFDISTILL, stage, "shard_self_*.npz"))):
            z = np.load(f)
            for tokens, mask in zip(z["tokens"], z["loss_mask"]):
                idx = np.nonzero(mask)[0]
                if len(idx) >= 8:
                    out.append((tokens[: idx[0]], tokens[idx[0] : idx[-1] + 1]))
                if len(out) >= limit:
                    return out
    return out


def replay_features(prompt: np.ndarray, answer: np.ndarray) -> np.ndarray:
    """Per answer position: (longest match n, copied tokens the answer confirms) [len, 2], the
    match being the most recent occurrence of the longest suffix (n <= MAX_NGRAM) with a token
    after it, copied MAX_K tokens long (past the history: its last token, as the drafter does)."""
    seq = np.concatenate([prompt, answer])
    feats = np.zeros((len(answer), 2), np.int32)
    for p in range(len(answer)):
        hist_len = len(prompt) + p
        h = seq[:hist_len]
        n_best, start = 0, -1
        for n in range(1, MAX_NGRAM + 1):
            if hist_len < n + 1:
                break
            match = np.ones(hist_len - n, bool)  # match[s - n]: h[s - n : s] == the last n
            for j in range(n):
                match &= h[j : hist_len - n + j] == h[hist_len - n + j]
            starts = np.nonzero(match)[0] + n
            if len(starts) == 0:
                break
            n_best, start = n, starts[-1]
        if n_best == 0:
            continue
        copy = seq[np.minimum(start + np.arange(MAX_K), hist_len - 1)]
        truth = answer[p : p + MAX_K]
        agree = np.cumprod(copy[: len(truth)] == truth)
        feats[p] = (n_best, int(agree.sum()))
    return feats


def replay(feats: list[np.ndarray], rule: tuple, costs: dict) -> float:
    """Replayed speedup of the rule (k, short, short_from)."""
    k, short, short_from = rule
    tokens = cost = 0.0
    for f in feats:
        p = 0
        while p < len(f):
            n, acc = f[p]
            size = k if n >= MAX_NGRAM else (short if n >= short_from else 0)
            cost += costs[size + 1]
            p += min(acc, size) + 1
        tokens += len(f)
    return tokens / cost


def replay_adaptive(
    feats: list[np.ndarray], rule: tuple, costs: dict, theta: float, decay: float, init: float
) -> float:
    """Replayed speedup of `rule` made adaptive per answer: a weak (short_from <= n < 4) match
    is verified only while a running mean of how often such matches' first copied token was
    right is at least `theta`, and a 4-token match verifies k only while the same mean for those
    is at least `theta` (else `short`). The mean is observable on every step, verified or not:
    the emitted token shows whether the copy's first token was right. Exact as any rule of the
    history is (the choice depends only on tokens already emitted)."""
    k, short, short_from = rule
    tokens = cost = 0.0
    for f in feats:
        p, weak, strong = 0, init, init
        while p < len(f):
            n, acc = f[p]
            if n >= MAX_NGRAM:
                size = k if strong >= theta else short
                strong = (1 - decay) * strong + decay * float(acc >= 1)
            elif n >= short_from:
                size = short if weak >= theta else 0
                weak = (1 - decay) * weak + decay * float(acc >= 1)
            else:
                size = 0
            cost += costs[size + 1]
            p += min(acc, size) + 1
        tokens += len(f)
    return tokens / cost


def parse_costs(text: str) -> dict:
    return {int(t): float(c) for t, c in (item.split(":") for item in text.split(","))}


def e2e(rules: list[tuple], new_tokens: int) -> str:
    import sys

    sys.path.insert(0, HERE)
    from compare import exact_then_timed
    from heldout_tau import heldout_prompts

    import specjax
    from specjax import drafters

    cands = {"plain": None}
    for k, short, short_from in rules:
        cands[f"ngram k {k}, short {short} from {short_from}"] = drafters.ngram(
            k=k, short=short, short_from=short_from
        )
    model = specjax.load_model("smollm2-135m")
    return exact_then_timed(model, cands, heldout_prompts("eagle3_smollm2_general_c"), new_tokens)


def spec_bench(limit: int, out: str, new_tokens: int) -> str:
    import specjax
    from specjax import bench, drafters
    from specjax.cli import _questions

    path = bench.default_questions()
    prompts = _questions(path, limit, None)
    model = specjax.load_model("smollm2-135m")
    old = drafters.ngram(k=8, short=1, short_from=3)
    methods = {
        "ar": bench._spec_runner(model, None, new_tokens),
        "ngram_old": bench._spec_runner(model, old, new_tokens),
        "ngram": bench._spec_runner(model, drafters.ngram(), new_tokens),
    }
    records = bench.run_bench(model, prompts, methods)
    meta = {"model": "smollm2-135m", "questions": path, "limit": limit}
    meta.update(max_new_tokens=new_tokens, machine=bench.machine())
    return meta["machine"] + "\n" + bench.write_report(records, list(methods), out, meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--costs", type=parse_costs, default=COSTS)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--adaptive", action="store_true", help="the best rule, adaptive per answer")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--spec-bench", type=int, metavar="N", help="questions per category")
    ap.add_argument("--out", default="bench_out/ngram_rule")
    a = ap.parse_args()
    if a.spec_bench:
        print(spec_bench(a.spec_bench, a.out, a.new_tokens))
        return
    rows = answers(a.rows)
    feats = [replay_features(p, ans) for p, ans in rows]
    tune, check = feats[0::2], feats[1::2]
    print(f"{len(rows)} answers, {sum(len(f) for f in feats)} tokens; rules chosen on one half")
    grid = [
        (k, short, short_from)
        for k, short, short_from in itertools.product((3, 5, 7, 8), (0, 1, 3, 5, 7), (1, 2, 3))
        if short <= k
    ]
    ranked = sorted(grid, key=lambda r: -replay(tune, r, a.costs))
    old = (8, 1, 3)  # the rule before 2026-12-06
    print("| k, short, short_from | replayed speedup (tune half) | (check half) |")
    print("|---|---|---|")
    for r in [*ranked[: a.top], old]:
        print(f"| {r} | {replay(tune, r, a.costs):.3f}x | {replay(check, r, a.costs):.3f}x |")
    if a.adaptive:
        best = ranked[0]
        print(f"\n{best} made adaptive (`replay_adaptive`), the best 6 settings on the tune half:")
        print("| theta, decay, init | tune half | check half |")
        print("|---|---|---|")
        grid = itertools.product((0.0, 0.2, 0.3, 0.4, 0.5), (0.2, 0.35, 0.5), (0.5, 1.0))
        scored = sorted(grid, key=lambda g: -replay_adaptive(tune, best, a.costs, *g))
        for g in scored[:6]:
            t, c = (replay_adaptive(x, best, a.costs, *g) for x in (tune, check))
            print(f"| {g} | {t:.3f}x | {c:.3f}x |")
    if a.e2e:
        print(e2e([old, (7, 1, 3), *ranked[:2]], a.new_tokens))


if __name__ == "__main__":
    main()
