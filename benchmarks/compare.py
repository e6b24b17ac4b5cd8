"""Shared by the benchmark scripts that compare drafters on a few prompts: every candidate's
greedy output checked against plain decoding's, then `autotune.tune_tree`'s interleaved timing
as a markdown table."""

from __future__ import annotations

from collections.abc import Sequence

import specjax
from specjax import autotune
from specjax.drafters import Drafter
from specjax.model import Model


def exact_then_timed(
    model: Model,
    cands: dict[str, Drafter | None],
    prompts: Sequence[str],
    max_new_tokens: int,
    repeats: int = 1,
) -> str:
    """-> the table (candidate, tokens/s, vs the first candidate, tau). The first candidate is
    the reference (plain decoding: None); any output that differs from its raises."""
    ref = {}
    for name, d in cands.items():  # exactness first (and every bucket's compilation)
        for i, p in enumerate(prompts):
            out = specjax.generate(model, p, max_new_tokens=max_new_tokens, drafter=d)
            ref.setdefault(i, out.tokens)
            assert out.tokens == ref[i], f"{name} differs from plain decoding on prompt {i}"
    _, table = autotune.tune_tree(
        model,
        cands.get,
        prompts,
        candidates=list(cands),
        max_new_tokens=max_new_tokens,
        repeats=repeats,
    )
    plain = table[0]["tokens_per_s"]
    lines = ["| candidate | tokens/s | vs plain | tau |", "|---|---|---|---|"]
    for r in table:
        v = r["tokens_per_s"]
        lines.append(f"| {r['candidate']} | {v:.1f} | {v / plain:.2f}x | {r['tau']:.2f} |")
    return "\n".join(lines)
