"""Batch scaling: `specjax bench --batch 1,4,16,64`.

Every batch size decodes the same rows (the first N prompts, N a multiple of the largest batch)
in consecutive groups of B, one `generate` call per group, after a warm-up call for every
prompt-length bucket, so timings exclude compilation. Per method and batch size: tokens/s over
all rows (the machine's throughput), tokens/s per row (what one user sees), tokens/s of the
decode phase alone (a batch's prefill pads every row to its longest prompt), tau, the speedup
over specjax AR at the same batch size, and how many rows equal AR's greedy output at the
smallest batch size (greedy decoding must not depend on the batch a row shares).

Why speculation gains less with batch: a verify forward over B rows of T tokens reads the
weights once, like a plain step, only while the step is memory-bound; as B grows the step turns
compute-bound and the T - 1 extra tokens per row cost real time, and a batch verifies the size
the hungriest row asks for.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specjax.engine.protocol import Drafter
    from specjax.model import Model


@dataclasses.dataclass
class BatchRecord:
    method: str
    batch: int
    rows: int  # prompts decoded, the same ones for every batch size
    new_tokens: int  # over all rows
    seconds: float  # wall time of the generate calls (prefill + decode)
    decode_s: float  # of which decoding (the prefill pads every row to the batch's longest)
    tau: float  # tokens per target forward over all rows (bonus included, prefill excluded)
    same_as_ar: int  # rows equal to AR's output at the smallest batch size
    compiled: bool  # a timed call compiled something (a shape the warm-up missed)
    tokens: list = dataclasses.field(default_factory=list, repr=False)  # per row

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after each row's first (which the prefill emits) per second of decoding."""
        return (self.new_tokens - self.rows) / self.decode_s if self.decode_s > 0 else 0.0


def parse_batches(text: str) -> tuple[int, ...]:
    """ "1,4,16" -> (1, 4, 16): positive ints, ascending, no repeats."""
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(b <= 0 for b in sizes):
        raise ValueError(f"--batch takes positive ints separated by commas, got {text!r}")
    return tuple(sorted(set(sizes)))


def groups(encoded: Sequence[list[int]], batch: int) -> list[list[list[int]]]:
    """Consecutive groups of `batch` prompts (len(encoded) must be a multiple of it)."""
    if len(encoded) % batch:
        raise ValueError(f"{len(encoded)} prompts do not split into batches of {batch}")
    return [list(encoded[i : i + batch]) for i in range(0, len(encoded), batch)]


def usable_rows(n_prompts: int, sizes: Sequence[int]) -> int:
    """The most prompts every batch size can decode in whole batches (a multiple of the
    largest); a clear error when there are fewer prompts than the largest batch."""
    top = max(sizes)
    if n_prompts < top:
        raise ValueError(
            f"batch {top} needs at least {top} prompts, the question file gave {n_prompts} "
            "(raise --limit, or use smaller batches)"
        )
    return n_prompts // top * top


def run_batch_bench(
    model: Model,
    prompts: Sequence[str],
    methods: dict[str, Drafter | None | Callable[[int], Drafter | None]],
    sizes: Sequence[int],
    max_new_tokens: int,
    *,
    progress: bool = True,
) -> list[BatchRecord]:
    """methods: name -> drafter (None: plain decoding; the "ar" method is the reference), or a
    function of the batch size returning one (`auto` chooses per batch)."""
    from tqdm import tqdm

    from specjax.api import generate
    from specjax.decode import MIN_PROMPT_BUCKET, bucket

    sizes = tuple(sorted(sizes))
    encoded = [model.encode(p, chat=True) for p in prompts]
    encoded = encoded[: usable_rows(len(encoded), sizes)]
    records: list[BatchRecord] = []
    reference: list | None = None
    calls = sum(len(encoded) // b for b in sizes) * len(methods)
    bar = tqdm(total=calls, desc="batch bench (timed calls)", disable=not progress)
    for b in sizes:
        batches = groups(encoded, b)
        for name, method in methods.items():
            drafter = method(b) if callable(method) else method

            def run(rows: list[list[int]], drafter: Drafter | None = drafter) -> dict:
                out = generate(model, rows, max_new_tokens=max_new_tokens, drafter=drafter)
                return {"tokens": out.tokens, **out.stats}

            # One warm-up call per prompt-length bucket (a batch's bucket is its longest row).
            warm = {}
            for g in batches:
                warm.setdefault(bucket(max(map(len, g)), MIN_PROMPT_BUCKET, half_steps=True), g)
            for g in warm.values():
                run(g)
            outs = []
            for g in batches:
                outs.append(run(g))
                bar.set_postfix(batch=b, method=name)
                bar.update()
            tokens = [t for o in outs for t in o["tokens"]]
            if reference is None and name == "ar":
                reference = tokens
            forwards = sum(sum(o["target_forwards"]) - len(o["tokens"]) for o in outs)
            decoded = sum(max(len(t) - 1, 0) for t in tokens)
            same = -1 if reference is None else sum(map(list.__eq__, tokens, reference))
            records.append(
                BatchRecord(
                    method=name,
                    batch=b,
                    rows=len(tokens),
                    new_tokens=sum(map(len, tokens)),
                    seconds=sum(o["total_s"] for o in outs),
                    decode_s=sum(o["decode_s"] for o in outs),
                    tau=decoded / max(forwards, 1),
                    same_as_ar=same,
                    compiled=any(o["compiled"] for o in outs),
                    tokens=tokens,
                )
            )
    bar.close()
    return records


def batch_markdown(records: Sequence[BatchRecord]) -> str:
    """One row per (batch, method): throughput, per-row speed, tau, speedup over AR at the same
    batch size, rows equal to AR at the smallest batch size."""
    ar = {r.batch: r.tokens_per_s for r in records if r.method == "ar"}
    lines = [
        "| batch | method | tok/s total | tok/s per row | decode tok/s total | tau | "
        "vs AR (same batch) | same as AR (smallest batch) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        speedup = f"{r.tokens_per_s / ar[r.batch]:.2f}x" if ar.get(r.batch) else ""
        same = "" if r.same_as_ar < 0 else f"{r.same_as_ar}/{r.rows}"
        lines.append(
            f"| {r.batch} | {r.method} | {r.tokens_per_s:.1f} | {r.tokens_per_s / r.batch:.1f} "
            f"| {r.decode_tokens_per_s:.1f} | {r.tau:.2f} | {speedup} | {same} |"
        )
    if any(r.compiled for r in records):
        lines += ["", "Warning: a timed call compiled something; its time includes compilation."]
    return "\n".join(lines)


def write_batch_report(records: Sequence[BatchRecord], out_dir: str, meta: dict) -> str:
    """results_batch.json (records with tokens) and results_batch.md -> the Markdown table."""
    os.makedirs(out_dir, exist_ok=True)
    md = batch_markdown(records)
    with open(os.path.join(out_dir, "results_batch.json"), "w") as f:
        rows = [
            {
                **dataclasses.asdict(r),
                "tokens_per_s": r.tokens_per_s,
                "decode_tokens_per_s": r.decode_tokens_per_s,
            }
            for r in records
        ]
        json.dump({"meta": meta, "records": rows}, f, indent=1)
    with open(os.path.join(out_dir, "results_batch.md"), "w") as f:
        f.write(md + "\n")
    return md
