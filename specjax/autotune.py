"""Measure, don't guess: the cost of verifying T tokens, and the draft-tree size per device.

`verify_cost_table` times one target verify forward of T tokens against a KV cache that holds a
realistic prefix, once as the engine verifies a chain (causal block mask) and once as it verifies
a tree of the same size (ancestor-or-self mask of a random tree, positions `length + depth`).
Tree verification should cost no more than causal verification of the same length: sglang-jax
once saw its tree-mask verify run 61x slower than causal. The causal curve
cost(T) / cost(1) bounds what a block of T tokens can gain: speedup <= tau / cost(T).

`tune_tree` picks a draft tree by measured tokens/s on a few prompts, as EAGLE-2 does with
`total_token=-1`: the best tree size depends on the device's cost curve, not only on acceptance.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import numbers
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters import DraftGate, DynamicTree, VerifySizing, registry
from specjax.engine.verify import verify_forward
from specjax.models import is_unrolled
from specjax.models.cache import KVCache, init_cache
from specjax.paths import cache_root, store_json

if TYPE_CHECKING:
    from specjax.engine.protocol import Drafter
    from specjax.model import Model

DEFAULT_SIZES = (1, 2, 4, 8, 12, 16, 24, 32)
# Small trees first: on a 2-core CPU a verify block of 32 tokens costs ~3x one of 1 token.
# With the root, verify blocks of 5, 8, 12 and 16 tokens: 7 and 15 nodes fill the blocks of 8
# and 16 that CPU's row reduction reads each weight once and twice for (`llama.ROW_REDUCE_ROWS`).
DEFAULT_CANDIDATES = (
    DynamicTree(nodes=4, depth=3, top_k=2),
    DynamicTree(nodes=7, depth=4, top_k=3),
    DynamicTree(nodes=11, depth=5, top_k=3),
    DynamicTree(nodes=15, depth=6, top_k=4),
)


# ----------------------------------------------------------------------------- verify cost


def random_parents(rng: np.random.Generator, batch: int, n: int) -> np.ndarray:
    """[batch, n] random topologically ordered parents: node i hangs under the root (-1) or
    under any earlier node, uniformly."""
    return (np.floor(rng.random((batch, n)) * (np.arange(n) + 1)) - 1).astype(np.int32)


def prefilled_cache(model: Model, batch: int, prefix: int, max_len: int, seed: int = 0) -> KVCache:
    """A KV cache in the model's layout whose rows hold `prefix` committed tokens of random K/V
    (the cost of a forward does not depend on the values)."""
    cache = init_cache(
        model.config, batch, max_len, model.dtype, per_layer=is_unrolled(model.params)
    )
    leaves, treedef = jax.tree.flatten((cache.k, cache.v))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    k, v = jax.tree.unflatten(
        treedef, [jax.random.normal(kk, x.shape, x.dtype) for x, kk in zip(leaves, keys)]
    )
    return cache.replace(k=k, v=v, lengths=jnp.full((batch,), prefix, jnp.int32))


def _timed(
    fn: Callable[[KVCache], tuple[jax.Array, KVCache]], cache: KVCache
) -> tuple[float, KVCache]:
    t0 = time.perf_counter()
    logits, cache = fn(cache)
    logits.block_until_ready()
    return (time.perf_counter() - t0) * 1e3, cache


def verify_cost_table(
    model: Model,
    sizes: Sequence[int] = DEFAULT_SIZES,
    prompt_len: int = 256,
    batch: int = 1,
    impl: str = "xla",
    repeats: int = 10,
    max_new: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> dict[int, tuple[float, float]]:
    """Milliseconds of one jitted verify forward of T tokens -> {T: (causal_ms, tree_ms)}.

    The cache holds `prompt_len` committed tokens and is sized as `generate` sizes it for
    `max_new` new tokens. Every (T, mask) program is compiled and run twice before timing; the
    timed calls are interleaved over all programs, `repeats` rounds, and each entry is a median.
    """
    sizes = sorted({int(t) for t in sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"sizes must be positive block lengths, got {sizes}")
    from tqdm import tqdm

    cfg, rng = model.config, np.random.default_rng(seed)
    cache = prefilled_cache(model, batch, prompt_len, prompt_len + max_new + sizes[-1] + 2, seed)
    calls = {}
    for T in sizes:
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, T)), jnp.int32)
        parents = jnp.asarray(random_parents(rng, batch, T - 1))
        for kind, par in (("causal", None), ("tree", parents)):
            calls[T, kind] = functools.partial(
                verify_forward, model.params, tokens, par, cfg=cfg, impl=impl
            )
    for fn in tqdm(calls.values(), desc="compile verify", disable=not progress):
        for _ in range(2):
            _, cache = _timed(fn, cache)
    times = collections.defaultdict(list)
    for r in tqdm(range(repeats), desc="time verify", disable=not progress):
        order = list(calls.items())
        for key, fn in order if r % 2 == 0 else order[::-1]:  # alternate to cancel drift
            ms, cache = _timed(fn, cache)
            times[key].append(ms)
    return {
        T: (statistics.median(times[T, "causal"]), statistics.median(times[T, "tree"]))
        for T in sizes
    }


def read_bandwidth(nbytes: int = 512 << 20, repeats: int = 7) -> float:
    """Bytes per second one jitted sum reads from memory on the default device (median of
    `repeats` after a warm-up): the rate a memory-bound decode step can at best stream its
    weights at. 512 MiB is far larger than any CPU cache."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return nbytes / float(np.median(times))


def step_bytes(model: Model, prefix: int, batch: int = 1) -> dict[str, int]:
    """Bytes one plain decode step must read: every weight once (the vocabulary matrix as the
    head; an untied embedding table only for the `batch` rows it looks up) and the KV cache
    of `prefix` positions per row. -> {"weights", "kv", "total"}."""
    cfg = model.config
    weights = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(model.params):
        name = jax.tree_util.keystr(path)
        nbytes = leaf.size * leaf.dtype.itemsize
        if "'embed'" in name and not cfg.tie_word_embeddings:
            nbytes = batch * leaf.shape[-1] * leaf.dtype.itemsize
        weights += nbytes
    per_position = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim  # K and V
    kv = per_position * prefix * batch * np.dtype(model.dtype).itemsize
    return {"weights": weights, "kv": kv, "total": weights + kv}


def floor_line(model: Model, prefix: int, plain_ms: float, batch: int = 1) -> str:
    """One line: the memory floor of a plain step (bytes / measured bandwidth) next to the
    measured plain step."""
    b = step_bytes(model, prefix, batch)
    bw = read_bandwidth()
    floor_ms = b["total"] / bw * 1e3
    return (
        f"Plain-step floor: {b['total'] / 1e6:.0f} MB read (weights {b['weights'] / 1e6:.0f} MB "
        f"+ KV cache {b['kv'] / 1e6:.1f} MB at prefix {prefix}) / {bw / 1e9:.1f} GB/s measured "
        f"(jitted sum of 512 MiB) = {floor_ms:.1f} ms; measured plain step (T=1) "
        f"{plain_ms:.1f} ms = {plain_ms / floor_ms:.2f}x the floor."
    )


def cost_markdown(table: dict[int, tuple[float, float]]) -> str:
    """The cost table as Markdown: T, causal ms, tree ms, tree/causal, causal cost vs the
    smallest T."""
    t0 = min(table)
    base = table[t0][0]
    lines = [f"| T | causal ms | tree ms | tree/causal | cost vs T={t0} |", "|---|---|---|---|---|"]
    for T, (c, t) in sorted(table.items()):
        lines.append(f"| {T} | {c:.2f} | {t:.2f} | {t / c:.2f} | {c / base:.2f}x |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- verify sizing


# A verify size below the tree's gets a branch only if it costs at most this fraction of every
# larger size (timing noise between neighbouring sizes is a few percent).
SIZE_MARGIN = 0.97
# Bumped when how a sizing is measured changes, so that cached ones are measured again (2: the
# sizes are chosen from every size's measured cost, `frontier_sizes`).
SIZING_VERSION = 2


def default_verify_sizes(nodes: int) -> tuple[int, ...]:
    """Powers of two below `nodes`, then `nodes` (8 -> (1, 2, 4, 8)): each is one compiled
    verify branch."""
    return tuple(1 << i for i in range(max(nodes - 1, 1).bit_length()) if 1 << i < nodes) + (nodes,)


def frontier_sizes(nodes: int, verify_ms: Mapping[int, float]) -> tuple[int, ...]:
    """The verify sizes (in nodes) worth a compiled branch, from `verify_ms` {T: ms} of a
    verify forward of T = 2 .. nodes + 1 tokens on this device: each of
    `default_verify_sizes(nodes)` moved down to the largest size at or below it whose verify
    costs at most `SIZE_MARGIN` of every larger size's, then `nodes`. Costs need not grow with
    T: on the 2-core EPYC a verify of 5 tokens cost 1.84x a plain step and one of 8 1.67x
    (`specjax bench-verify`, 2026-12-07), so verifying 4 of 7 nodes never paid and 3 may."""
    worth = [
        s
        for s in range(1, nodes)
        if verify_ms[s + 1] <= SIZE_MARGIN * min(verify_ms[t + 1] for t in range(s + 1, nodes + 1))
    ]
    picked = {
        max((u for u in worth if u <= s), default=0) for s in default_verify_sizes(nodes)[:-1]
    }
    return tuple(sorted(picked - {0, nodes})) + (nodes,)


def step_costs(
    base: float, table: Mapping[int, Sequence[float]], sizes: Sequence[int]
) -> tuple[float, ...]:
    """A plain step's cost `base` (drafting + plain step), then one per verify size s:
    `base` + the tree-masked verify of s + 1 tokens less the causal one of 1 (`table` as
    `verify_cost_table` returns it)."""
    return (base,) + tuple(base + max(table[s + 1][1] - table[1][0], 0.0) for s in sizes)


def measure_sizing(
    model: Model,
    make: Callable[[DynamicTree], Drafter],
    tree: DynamicTree,
    sizes: Sequence[int] | None = None,
    *,
    prompt: str | Sequence[int] | None = None,
    repeats: int = 10,
    progress: bool = True,
) -> tuple[VerifySizing, dict]:
    """The step costs of the tree drafter `make(tree)` on this device -> (VerifySizing for
    `tree`, the measurements).

    A step at verify size s costs D + plain + verify(s + 1) - verify(1), and a plain step
    D + plain: D is the drafter's propose + commit (`anatomy.measure_step`, the drafting is
    paid whatever is verified), plain a whole plain decode step, verify(T) one tree-masked
    verify forward of T tokens (`verify_cost_table`, prefix 256). `sizes` None: every size is
    timed and `frontier_sizes` picks those worth a branch here."""
    from specjax import anatomy

    given = sizes is not None
    sizes = tuple(sorted(set(sizes))) if given else tuple(range(1, tree.nodes + 1))
    if sizes[-1] != tree.nodes:
        raise ValueError(f"the largest verify size must be the tree's {tree.nodes} nodes: {sizes}")
    whole = make(dataclasses.replace(tree, sizing=None))
    an = anatomy.measure_step(
        model, whole, prompt or anatomy.DEFAULT_PROMPT, repeats=repeats, loop_steps=4
    )
    D, plain = an.ms["propose"] + an.ms["commit"], an.ms["plain step"]
    table = verify_cost_table(
        model, (1,) + tuple(s + 1 for s in sizes), repeats=repeats, progress=progress
    )
    if not given:
        sizes = frontier_sizes(tree.nodes, {T: tree_ms for T, (_, tree_ms) in table.items()})
    costs = step_costs(D + plain, table, sizes)
    record = {
        "drafter": whole.name,
        "sizes": list(sizes),
        "costs_ms": list(costs),
        "draft_ms": D,
        "plain_ms": plain,
        "verify_ms": {str(T): list(v) for T, v in table.items()},
    }
    return VerifySizing(sizes, costs), record


# ----------------------------------------------------------------------------- tree size


def tune_tree(
    model: Model,
    drafter_factory: Callable[[Any], Drafter | None],
    prompts: Sequence[str | Sequence[int]],
    candidates: Sequence[Any] = DEFAULT_CANDIDATES,
    *,
    max_new_tokens: int = 64,
    repeats: int = 1,
    chat: bool = True,
    impl: str = "xla",
    progress: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
    batch: int = 1,
) -> tuple[Any, list[dict]]:
    """Pick the draft tree with the best measured tokens/s -> (best candidate, table).

    `drafter_factory(candidate)` builds the drafter of one candidate (usually a `DynamicTree`),
    e.g. `lambda t: drafters.layer_skip(8, tree=t)`; it may return None (plain decoding). Each
    candidate first runs `generate` once per prompt-length bucket (compilation), then on every
    prompt (`repeats` times), interleaved with the other candidates (prompt p starting
    with candidate p mod n). The table has one row per
    candidate, in order: candidate, drafter name, tokens_per_s (new tokens over wall time,
    prefill included, as `specjax bench`), tau (mean tokens per target forward), new_tokens,
    seconds. `temperature` > 0 samples: prompt i draws with the key `seed + i` for every
    candidate (the same prompts and keys for all; speculative outputs still differ between
    candidates, each following the target's distribution).
    `batch` > 1 decodes the prompts in consecutive groups of `batch` rows (their number must
    be a multiple of it); a "prompt" above is then one such group.
    """
    from tqdm import tqdm

    from specjax.api import generate
    from specjax.decode import MIN_PROMPT_BUCKET, bucket

    if not candidates:
        raise ValueError("tune_tree needs at least one candidate")
    drafters = [drafter_factory(c) for c in candidates]
    encoded = [model.encode(p, chat=chat) for p in prompts]
    if not encoded:
        raise ValueError("tune_tree needs at least one prompt")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"tune_tree batch must be a positive int, got {batch!r}")
    if len(encoded) % batch:
        raise ValueError(f"tune_tree: {len(encoded)} prompts do not fill batches of {batch}")
    rows = [encoded[i : i + batch] for i in range(0, len(encoded), batch)]  # one call each
    run = functools.partial(
        generate, model, max_new_tokens=max_new_tokens, impl=impl, temperature=temperature
    )
    warm = {bucket(max(map(len, g)), MIN_PROMPT_BUCKET, half_steps=True): g for g in rows}
    for d in tqdm(drafters, desc="compile trees", disable=not progress):
        for group in warm.values():
            run(group, drafter=d, key=seed)
    toks, secs = np.zeros((len(drafters), len(rows))), np.zeros((len(drafters), len(rows)))
    taus = [[] for _ in drafters]
    bar = tqdm(total=repeats * len(rows) * len(drafters), desc="tune tree", disable=not progress)
    for _ in range(repeats):
        for p, group in enumerate(rows):
            # Each prompt starts with another candidate: the first run after a prompt change is
            # slower on the 2-core VM (plain decoding run twice in a row, always first and
            # second: the second 7% faster, t 2.5 per prompt, 2026-12-06), which a fixed order
            # charges to the first candidate, plain decoding.
            for i in np.roll(np.arange(len(drafters)), -p):
                d = drafters[i]
                s = run(group, drafter=d, key=seed + p).stats
                toks[i, p] += s["new_tokens"]
                secs[i, p] += s["total_s"]
                taus[i].append(s["tau"])
                bar.update()
    bar.close()
    table = [
        {
            "candidate": c,
            "drafter": "none" if d is None else d.name,
            "tokens_per_s": float(toks[i].sum() / secs[i].sum()),
            "tau": float(np.mean(taus[i])),
            "new_tokens": int(toks[i].sum()),
            "seconds": float(secs[i].sum()),
            # each prompt's own speed: `auto` compares candidates prompt by prompt
            "prompt_tokens_per_s": (toks[i] / secs[i]).tolist(),
        }
        for i, (c, d) in enumerate(zip(candidates, drafters))
    ]
    best = max(range(len(table)), key=lambda i: table[i]["tokens_per_s"])
    return candidates[best], table


def tune_markdown(table: Sequence[dict], best: Any = None) -> str:
    """The `tune_tree` table as Markdown (the chosen candidate marked)."""
    lines = ["| drafter | tokens/s | tau | chosen |", "|---|---|---|---|"]
    for r in table:
        mark = "<-" if best is not None and r["candidate"] == best else ""
        lines.append(f"| {r['drafter']} | {r['tokens_per_s']:.1f} | {r['tau']:.2f} | {mark} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- drafter="auto"

# Prompts `auto` measures on: written for it, one per kind of request users make (never taken
# from the eval files). Two of them give the model text to copy from, as summaries, RAG and
# extraction do. Each fits in 64 tokens with SmolLM2's chat template, the bucket the tuning
# questions reach: a prompt in a bucket of its own costs every candidate one more compilation
# (~0.45 min each on the 2-core VM; tests/test_smollm2.py checks it).
AUTO_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Pens cost 3 dollars and notebooks 5 dollars. Tom buys 4 pens and 2 notebooks. What does "
    "he pay? Think step by step.",
    "Summarize in two sentences: The city council approved two new bus routes that connect "
    "the university to the train station, and asked for a timetable by next month.",
    "List the names and ages: Anna, 34, is a nurse. Her brother Ben is 29, and their "
    "neighbour Carla is 41.",
    "Explain why the sky is blue to a ten-year-old.",
)
# A drafter must beat plain decoding by this fraction of its tokens/s to be chosen (run-to-run
# noise of a calibration on the 2-core VM is ~2-4%).
AUTO_MARGIN = 0.05
# ... and be faster prompt by prompt by this many standard errors (`_clearly_faster`: a paired
# test of the per-prompt log speed ratios; 2 is a one-sided ~97% test for 21 prompts).
AUTO_T = 2.0
# `auto` measures in two rounds: every candidate on the first `AUTO_SCREEN_PROMPTS` prompts,
# then plain decoding and the candidates at least `AUTO_SCREEN` times its speed there on the
# rest. Six short answers (~300 tokens) alone were too few to choose by: the n-gram chain
# measured 0.97x plain decoding on them and 1.18x on Spec-Bench (2026-12-06); the second round
# adds the package's 16 tuning questions (2 per MT-bench category) without paying them for the
# candidates that are clearly slower.
AUTO_SCREEN_PROMPTS = 6
AUTO_SCREEN = 0.85
# Bumped when what a candidate means changes, so that an older cached choice is measured again
# (2: the EAGLE-3 candidate is eagle3_tree_sized, which sizes its verify per step; 3: the hybrid
# of prompt lookup and that tree joined the candidates; 4: EAGLE trees default to 7 nodes;
# 5: the n-gram chain's default rule verifies 7 tokens after 4-token matches, 3 after 2-3;
# 6: two rounds over the six prompts and the tuning questions, 96 new tokens each; 7: the
# hybrid's chain rows verify what the n-gram chain's own rule asks for; 8: the screening
# prompts shortened to SmolLM2's 64-token bucket, as the tuning questions are, so the first
# call compiles each candidate for 2 prompt-length buckets instead of 3; the tables keep each
# prompt's speed and a costlier candidate must be faster prompt by prompt beyond the noise;
# 9: the sized EAGLE tree skips its growth when its first level promises nothing; 10: its
# verify sizes are chosen from this device's measured costs, `frontier_sizes`).
AUTO_VERSION = 10


def auto_prompts() -> list[str]:
    """What `auto` measures on: `AUTO_PROMPTS` (the screening round), then the first turns of
    the package's tuning questions (`paths.tune_questions()`, never the eval files) that are not
    among them."""
    import json

    from specjax.paths import tune_questions

    with open(tune_questions()) as f:
        questions = [json.loads(line)["turns"][0] for line in f if line.strip()]
    return list(AUTO_PROMPTS) + [q for q in questions if q not in AUTO_PROMPTS]


def auto_candidates(model: Model, temperature: float = 0.0) -> list[str]:
    """Drafter names `auto` measures for `model`, from the cheapest to draft (the order
    `_choose` walks): plain decoding, prompt lookup, and, when the model has a bundled trained
    EAGLE-3 drafter, its tuned tree verified per step only as far as it is worth it at this
    device's costs, alone and as the model half of a hybrid with prompt lookup (the lookup's
    chain where the text repeats, else that sized tree). When sampling (`temperature` > 0)
    also its static tree whose children are drawn from the drafter's law (`eagle3_static`:
    tau 1.77 against the sized tree's 1.40 at temperature 1, benchmarks/RESULTS.md section
    14), which a greedy decode would draft as top-k candidates like the others."""
    from specjax.drafters.bundled import BUNDLED_DRAFTERS

    names = ["none", "ngram"]
    if f"{model.name}-eagle3" in BUNDLED_DRAFTERS:
        names += ["eagle3_tree_sized"]
        names += ["eagle3_static"] if temperature > 0 else []
        names += ["hybrid:ngram+eagle3_tree_sized"]
    return names


def candidates_fingerprint(model: Model) -> str:
    """A hash of the weights of the bundled drafters `auto` measures for `model`: a new
    release that retrains them makes a cached choice stale (it was measured on the old ones)."""
    import hashlib

    from specjax.drafters.bundled import BUNDLED_DRAFTERS, bundled_path

    h = hashlib.sha256()
    name = f"{model.name}-eagle3"
    if name in BUNDLED_DRAFTERS:
        for f in sorted(bundled_path(name).glob("*.safetensors")):
            st = f.stat()
            h.update(f.name.encode() + _file_digest(str(f), st.st_size, st.st_mtime_ns))
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> bytes:
    """sha256 of a file, read once per (path, size, mtime): `auto` asks on every call."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):  # 3.10 has no hashlib.file_digest
            h.update(chunk)
    return h.digest()


def cached_sizing(
    model: Model,
    name: str,
    make: Callable[[DynamicTree], Drafter],
    tree: DynamicTree,
    progress: bool = True,
    gate: bool = False,
) -> VerifySizing:
    """`measure_sizing` once per model, device, drafter and tree, then read from
    $SPECJAX_CACHE/auto/ (a damaged or foreign file is measured again). `gate`: with a
    `DraftGate` at the measured cost of a plain step (the drafting skipped while it does not
    pay)."""
    import json
    import os
    import re

    key = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{auto_key(model)}-{name}-{tree.nodes}_{tree.depth}")
    key += f"_{tree.top_k}_v{SIZING_VERSION}"
    path = os.path.join(cache_root(), "auto", f"sizing-{key}.json")
    try:
        with open(path) as f:
            rec = json.load(f)
        if rec["key"] == key:
            return _sizing(rec, gate)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # measured below
    _, rec = measure_sizing(model, make, tree, progress=progress)
    store_json(path, dict(rec, key=key))
    return _sizing(rec, gate)


def _sizing(rec: dict, gate: bool) -> VerifySizing:
    """A `measure_sizing` record -> its VerifySizing (`gate`: with a DraftGate)."""
    draft_gate = DraftGate(plain=float(rec["plain_ms"])) if gate else None
    return VerifySizing(tuple(rec["sizes"]), tuple(rec["costs_ms"]), draft_gate)


def auto_key(model: Model) -> str:
    """What `auto`'s choice depends on: the model (name, config, a weight fingerprint and the
    dtypes its weights are stored in), the device (on a CPU its processor model: every CPU
    calls itself 'cpu'), and the jax version."""
    import hashlib
    import re

    from specjax.storage import device_tag

    leaves = jax.tree.leaves(model.params)
    embed = np.asarray(leaves[0]).ravel()[:64]
    stored = ",".join(sorted({str(x.dtype) for x in leaves}))
    h = hashlib.sha256(repr(model.config).encode() + embed.tobytes() + stored.encode())
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model.name}-{h.hexdigest()[:12]}-{device_tag()}")


def choose_drafter(
    model: Model,
    *,
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 96,
    refresh: bool = False,
    progress: bool = True,
    temperature: float = 0.0,
    batch: int = 1,
) -> tuple[str, list[dict]]:
    """The drafter `drafter="auto"` uses for `model` on this device at `temperature` and
    `batch` rows -> (registry name, table).

    Measured once per model and device by `tune_tree` over `auto_candidates` (tokens/s,
    interleaved, compilation excluded) on `prompts` (default `auto_prompts()`), in two rounds:
    all candidates on the first `AUTO_SCREEN_PROMPTS` prompts, then plain decoding and the
    candidates at least `AUTO_SCREEN` times as fast as it there, on the rest; a candidate's row
    sums both rounds (`screened_out`: measured in the first only). A drafter is chosen only if
    it beats plain decoding ("none") by `AUTO_MARGIN`, and a costlier one only if it beats the
    cheaper one so chosen by as much (`_choose`). The table is cached as JSON under
    $SPECJAX_CACHE/auto/ (a damaged or foreign cache file is measured again) and the choice
    made from it by this release's rule.

    `temperature` > 0: measured with sampled decoding at `auto_temperature(temperature)`
    (fixed keys), and cached apart from the greedy choice: what pays when greedy (copies of
    the prompt accepted whole) need not pay when sampling, where every drafted token is
    accepted only with the target's probability for it.

    `batch` > 1: chosen for the batch `generate` compiles for that many rows
    (`auto_batch`: the next power of two), cached apart: the batch-1 choice, unless it is plain
    decoding, races plain decoding again at that batch (`_batch_race`), since a batch verifies
    the largest block any row asks for while a plain step still reads the weights once
    (2026-12-06, MT-bench: the n-gram chain 1.30x plain at batch 1, 0.73x at 4, 0.52x at 16).
    A refresh measures the batch's race again, not the batch-1 choice it starts from.
    """
    import os

    temp, B = auto_temperature(temperature), auto_batch(batch)
    names = auto_candidates(model, temperature=temp)
    if B > 1:  # plain decoding against the batch-1 choice (read from its cache once measured)
        kw = dict(prompts=prompts, max_new_tokens=max_new_tokens, progress=progress)
        single, _ = choose_drafter(model, temperature=temp, **kw)
        if single == "none":  # nothing beat plain decoding at batch 1: nothing to race
            return "none", []
        names = ["none", single]
    tag = _temperature_tag(temp) + ("" if B == 1 else f"-b{B}")
    path = os.path.join(cache_root(), "auto", auto_key(model) + tag + ".json")
    if not refresh:
        table = _cached_table(path, model, temp, B)
        # A table of other candidates than today's (a batch table that raced another batch-1
        # choice, a sampling table from before `eagle3_static` joined) is measured again.
        measured = None if table is None else [r["candidate"] for r in table]
        if measured is not None and (measured == names if B > 1 else set(measured) == set(names)):
            choice = _choose(table)  # this release's rule, on the cached table
            if choice in names:
                return choice, table
    prompts = list(auto_prompts() if prompts is None else prompts)
    if progress:
        _say_measuring(model, names, temp, B, path)
    if B == 1:
        table = _race(model, names, prompts, max_new_tokens, progress, temp)
    else:
        table = _batch_race(model, names, prompts, B, max_new_tokens, progress, temp)
    choice = _choose(table)
    rec = {
        "key": auto_key(model),
        "version": AUTO_VERSION,
        "drafters": candidates_fingerprint(model),  # the bundled drafters measured
        "temperature": temp,
        "batch": B,
        "choice": choice,
        "table": table,
    }
    store_json(path, rec)
    return choice, table


def _say_measuring(model: Model, names: list[str], temp: float, batch: int, path: str) -> None:
    """Tell the user, before the progress bars, why the first `auto` call waits and how to
    skip it: measuring compiles and times every candidate (5-9 minutes for SmolLM2 on a 2-core
    CPU, once per model, device, release, temperature and batch)."""
    import sys

    how = "greedy" if temp == 0 else f"temperature {temp}"
    rivals = ", ".join(n for n in names if n != "none")
    print(
        f"specjax: drafter='auto' is timing {rivals} against plain decoding for "
        f"{getattr(model, 'name', None) or model.config.model_type} on this device ({how}, "
        f"batch {batch}) to pick the fastest; once, then cached in {path}. This takes minutes "
        "on a small CPU; name a drafter (e.g. drafter='ngram') to skip it.",
        file=sys.stderr,
        flush=True,
    )


def _cached_table(path: str, model: Model, temp: float, batch: int) -> list[dict] | None:
    """The table `choose_drafter` cached at `path`, or None when it is missing, damaged, or was
    measured for other weights, bundled drafters, release rule, temperature or batch."""
    import json

    try:
        with open(path) as f:
            rec = json.load(f)
        fresh = rec["key"] == auto_key(model) and rec.get("version") == AUTO_VERSION
        fresh = fresh and rec.get("drafters") == candidates_fingerprint(model)
        fresh = fresh and rec.get("temperature", 0.0) == temp and rec.get("batch", 1) == batch
        if fresh and isinstance(rec["table"], list):
            _choose(rec["table"])  # a table the rule cannot read is measured again
            return rec["table"]
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        pass
    return None


# A batch race times each candidate on at least this many batches: the paired test of
# `_clearly_faster` needs 3 (fewer and the margin alone would decide).
AUTO_BATCH_CALLS = 3


def auto_batch(batch: int) -> int:
    """The batch `auto` measures for a decode of `batch` rows: the next power of two, the batch
    `generate` compiles for them."""
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    return 1 << (int(batch) - 1).bit_length()


def _batch_race(
    model: Model,
    names: list[str],
    prompts: list[str],
    batch: int,
    max_new_tokens: int,
    progress: bool,
    temperature: float = 0.0,
) -> list[dict]:
    """`names` timed at `batch` rows per call (`tune_tree(batch=)`), one round: the prompts
    repeated in order to fill whole batches, at least `AUTO_BATCH_CALLS` of them."""
    calls = max(AUTO_BATCH_CALLS, -(-len(prompts) // batch))
    rows = [prompts[i % len(prompts)] for i in range(calls * batch)]
    factory = lambda name: registry.make(name, None, model)  # noqa: E731
    _, table = tune_tree(
        model,
        factory,
        rows,
        candidates=names,
        max_new_tokens=max_new_tokens,
        progress=progress,
        temperature=temperature,
        batch=batch,
    )
    return [dict(r, prompts=len(rows), screened_out=False) for r in table]


def _choose(table: Sequence[dict]) -> str:
    """The candidate `auto` takes from a measured table (rows in `auto_candidates` order, from
    the simplest): plain decoding unless a candidate beats it, and a later (costlier) candidate
    only if it beats the one taken so far, where beating means both: `AUTO_MARGIN` faster over
    all prompts, and faster prompt by prompt beyond the measurement's noise (`_clearly_faster`).
    A gain under the noise is no reason for a drafter with more to lose where it drafts badly:
    on 2026-12-06 the hybrid led the n-gram chain by 0.9%, then by 9.4% in a slower hour, and
    measured 6-10% slower than it on Spec-Bench both times. Screened-out rows are never taken."""
    rows = [r for r in table if not r.get("screened_out")]
    taken = next(r for r in rows if r["candidate"] == "none")
    for r in rows:
        faster = r["tokens_per_s"] >= (1 + AUTO_MARGIN) * taken["tokens_per_s"]
        if faster and _clearly_faster(r, taken):
            taken = r
    return taken["candidate"]


def _clearly_faster(row: dict, than: dict) -> bool:
    """A paired test over the prompts both ran (`prompt_tokens_per_s`, in the same order): the
    mean log speed ratio of `row` over `than` is at least `AUTO_T` standard errors above 0.
    One prompt's speed on the 2-core VM varies between two runs of the same decoder (sd of the
    log ratio over auto's 21 prompts, plain decoding against itself, 2026-12-06: 0.28 in a slow
    hour, 0.07 in faster ones), so a lead in the total can be two or three prompts' luck. Rows
    without per-prompt speeds for at least 3 common prompts (tables made by hand) pass."""
    mine, base = row.get("prompt_tokens_per_s") or [], than.get("prompt_tokens_per_s") or []
    if min(len(mine), len(base)) < 3:
        return True
    return lead_t(mine, base) >= AUTO_T


def lead_t(mine: Sequence[float], base: Sequence[float]) -> float:
    """The paired t statistic of per-prompt speeds `mine` over `base` (the same prompts, in
    order; the longer list cut to the shorter): mean log speed ratio over its standard error
    (+-inf when every prompt has the same nonzero ratio, 0 when all are equal)."""
    n = min(len(mine), len(base))
    x = np.log(np.asarray(mine[:n], np.float64) / np.asarray(base[:n], np.float64))
    mean, sd = float(np.mean(x)), float(np.std(x, ddof=1))
    if sd == 0.0:
        return 0.0 if mean == 0.0 else float(np.copysign(np.inf, mean))
    return mean / (sd / np.sqrt(n))


def _race(
    model: Model,
    names: list[str],
    prompts: list[str],
    max_new_tokens: int,
    progress: bool,
    temperature: float = 0.0,
) -> list[dict]:
    """`choose_drafter`'s two rounds -> one row per candidate (in `names`' order): tokens/s and
    seconds over every prompt it ran, tau averaged over them, `screened_out` when it ran only
    the first round. A screened-out row's speed comes from fewer prompts: it is never chosen
    (it was slower than plain decoding by more than the screen allows)."""
    if "none" not in names:
        raise ValueError(f"auto's candidates must include plain decoding ('none'): {names}")
    if not prompts:
        raise ValueError("auto needs at least one prompt to measure on")
    factory = lambda name: registry.make(name, None, model)  # noqa: E731
    screen, rest = prompts[:AUTO_SCREEN_PROMPTS], prompts[AUTO_SCREEN_PROMPTS:]
    kw = dict(max_new_tokens=max_new_tokens, progress=progress, temperature=temperature)
    _, first = tune_tree(model, factory, screen, candidates=names, **kw)
    rows = {r["candidate"]: dict(r, prompts=len(screen)) for r in first}
    plain = rows["none"]["tokens_per_s"]
    keep = [n for n in names if n == "none" or rows[n]["tokens_per_s"] >= AUTO_SCREEN * plain]
    if rest and len(keep) > 1:
        # other keys than the screen's: prompt i of the second round draws with seed i + 6
        _, second = tune_tree(model, factory, rest, candidates=keep, seed=len(screen), **kw)
        for r in second:
            row = rows[r["candidate"]]
            n1, n2 = row["prompts"], len(rest)
            row["tau"] = (row["tau"] * n1 + r["tau"] * n2) / (n1 + n2)
            row["new_tokens"] += r["new_tokens"]
            row["seconds"] += r["seconds"]
            row["tokens_per_s"] = row["new_tokens"] / row["seconds"]
            row["prompts"] = n1 + n2
            both = row.get("prompt_tokens_per_s", []) + r.get("prompt_tokens_per_s", [])
            row["prompt_tokens_per_s"] = both  # the same prompts, in order, as plain decoding's
    for n in names:
        rows[n]["screened_out"] = bool(rest) and n not in keep
    return [rows[n] for n in names]


def auto_drafter(model: Model, **kw: Any) -> Drafter | None:
    """`drafter="auto"`: the drafter `choose_drafter` picks for `model` (None: plain); `kw`
    as `choose_drafter`'s (`temperature=` and `batch=` the decoding's)."""
    return registry.make(choose_drafter(model, **kw)[0], None, model)


def auto_temperature(temperature: float) -> float:
    """The temperature `auto` measures for a decode at `temperature`: 0 (greedy) for 0, else
    rounded to one decimal (at least 0.1), so that nearby temperatures share one measurement
    (each costs minutes) rather than measuring per value."""
    t = float(temperature)
    if not t >= 0.0 or t == float("inf"):  # NaN fails the first test
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    return 0.0 if t == 0.0 else max(round(t, 1), 0.1)


def _temperature_tag(temp: float) -> str:
    """The cache file suffix of `auto_temperature`'s value: none for greedy (the file greedy
    choices were always cached in), "-t1.0" for 1.0."""
    return "" if temp == 0.0 else f"-t{temp:.1f}"


# ----------------------------------------------------------------------------- registry entries
# The CLI names whose drafters measure on the device register here, not in
# `specjax.drafters.registry`: this module builds on the registry (and on `generate`), so the
# registry needs no import of it.


def _sized_eagle(kind: str, gate: bool = False) -> Callable[..., Drafter]:
    """`KIND_tree_sized[:PATH]`: the EAGLE tree verified per step only as far as it is worth it,
    at this device's step costs (measured on the target once, then cached: `cached_sizing`),
    grown past its first level only when that level promises a draft worth it
    (`VerifySizing.early_exit`).
    `KIND_tree_gated[:PATH]`: the same, and drafting only while it pays (`DraftGate`)."""

    suffix = "gated" if gate else "sized"

    def make(arg: str, k: int | None, model: Model | None, tree: DynamicTree | None) -> Drafter:
        from specjax.drafters import eagle

        if model is None:
            raise ValueError(f"drafter '{kind}_tree_{suffix}' needs the target model (it measures)")
        src = arg or registry.bundled_for(kind, model)
        shape = registry.eagle_tree(tree, k)
        build = lambda t: eagle(src, tree=t, name=src)  # noqa: E731
        label = f"{kind}_tree:{src}" if isinstance(src, str) else f"{kind}_tree"
        sizing = cached_sizing(model, label, build, shape, gate=gate)
        if not gate:  # a step whose first level promises nothing skips the tree's growth
            sizing = dataclasses.replace(sizing, early_exit=True)
        return build(dataclasses.replace(shape, sizing=sizing))

    return make


def _auto(
    arg: str,
    k: int | None,
    model: Model | None,
    tree: DynamicTree | None,
    temperature: float = 0.0,
    batch: int = 1,
) -> Drafter | None:
    """The drafter measured fastest for `model` on this device at `temperature` and `batch`
    rows (`choose_drafter`); None (plain decoding) when none beats it. `k` is not used: each
    candidate has its own."""
    if model is None:
        raise ValueError("drafter 'auto' needs the target model (it measures on it)")
    return auto_drafter(model, temperature=temperature, batch=batch)


registry.register(registry.DrafterEntry("eagle3_tree_sized", _sized_eagle("eagle3"), arg="PATH"))
registry.register(
    registry.DrafterEntry("eagle3_tree_gated", _sized_eagle("eagle3", gate=True), arg="PATH")
)
registry.register(registry.DrafterEntry("auto", _auto, per_decode=True))
