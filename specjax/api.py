"""`specjax.generate`: prompts in, tokens + text + statistics out.

Host side only: tokenization, validation, shape buckets (one compilation per bucket, never per
prompt), timing. Everything per step runs on device in `engine.decode`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from specjax import engine, sharding
from specjax.decode import (
    MIN_PROMPT_BUCKET,
    DecodeFn,
    bucket,
    cache_len,
    engine_config,
)
from specjax.engine.protocol import Drafter, DrafterSpec, Params
from specjax.model import Model
from specjax.sampling import make_sampling

Prompt = str | Sequence[int]
# One prompt or a batch: see PROMPTS_ACCEPTED (an int array is [T] or [B, T] token ids).
Prompts = Prompt | Sequence[Prompt] | np.ndarray | jax.Array
# `key` of generate: an int seed, or a JAX PRNG key (see `make_key`).
KeyLike = int | np.integer | jax.Array | np.ndarray


@dataclasses.dataclass
class GenerateOutput:
    tokens: list  # list[list[int]] generated ids per row (EOS included when hit)
    text: list  # list[str] decoded generated text per row (special tokens skipped)
    lengths: list  # list[int] generated tokens per row
    prompt_lengths: list  # list[int]
    stats: dict  # timings, forwards, tau, acceptance histogram (see `_stats`)

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"GenerateOutput(rows={len(self.tokens)}, lengths={self.lengths}, "
            f"tok/s={s['tokens_per_s']:.1f}, tau={s['tau']:.2f})"
        )


PROMPTS_ACCEPTED = (
    "a string, a list of strings, a list of token ids (ints), a list of such "
    "lists, or an int array of shape [T] or [B, T]"
)


def _normalize_prompts(prompts: Prompts) -> list:
    """One prompt or a batch -> a list of prompts (each a string or a sequence of ids)."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim not in (1, 2):
            raise ValueError(
                f"prompts as an array must have shape [T] or [B, T], got shape {arr.shape}"
            )
        return [arr] if arr.ndim == 1 else list(arr)
    if not isinstance(prompts, (list, tuple)):
        # bytes would read as token ids and a dict as its keys: refuse both, and non-sequences.
        hint = " (decode bytes to str first)" if isinstance(prompts, (bytes, bytearray)) else ""
        raise ValueError(
            f"prompts must be {PROMPTS_ACCEPTED}; got {type(prompts).__name__} "
            f"{_short(prompts)}{hint}"
        )
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: pass a string, a list of strings, or token id lists")
    if all(_is_int(p) for p in prompts):
        return [prompts]
    return prompts


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _short(x: object) -> str:
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


def _check_prompt(i: int, p: object) -> None:
    """One prompt of a batch: a str without lone surrogates, or a flat sequence of int ids."""
    if isinstance(p, str):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"prompt {i} contains a lone surrogate {p[e.start]!r} at character "
                f"{e.start}, which is not valid Unicode text: fix the string (e.g. "
                f"s.encode('utf-8', 'surrogatepass').decode('utf-8'))"
            ) from None
        return
    if isinstance(p, (np.ndarray, jax.Array)):
        if np.ndim(p) != 1 or (np.size(p) and not np.issubdtype(np.asarray(p).dtype, np.integer)):
            raise ValueError(
                f"prompt {i}: token ids must be integers in a 1-D array, got dtype "
                f"{np.asarray(p).dtype} and shape {np.shape(p)}"
            )
        return
    if not isinstance(p, (list, tuple)):
        raise ValueError(
            f"prompt {i} is {type(p).__name__} {_short(p)}; each prompt must be a "
            f"string or a list of token ids (ints)"
        )
    bad = [x for x in p if not _is_int(x)]
    if bad:
        raise ValueError(
            f"prompt {i}: token ids must be integers, got {type(bad[0]).__name__} {_short(bad[0])}"
        )


def encode_prompts(model: Model, prompts: Prompts, chat: bool) -> list[list[int]]:
    rows = []
    for i, p in enumerate(_normalize_prompts(prompts)):
        _check_prompt(i, p)
        ids = model.encode(p, chat=chat)
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        V = model.config.vocab_size
        bad = [t for t in ids if t < 0 or t >= V]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {V}): {bad[:5]}")
        rows.append(ids)
    return rows


def make_key(key: KeyLike | None) -> jax.Array:
    """`key` of generate: None (seed 0), an int seed, or a JAX PRNG key (jax.random.key or the
    legacy uint32[2] of jax.random.PRNGKey)."""
    if key is None:
        return jax.random.key(0)
    if _is_int(key):
        # jax.random.key takes a 64-bit seed; larger ints overflow deep inside JAX.
        if not -(2**63) <= int(key) < 2**63:
            raise ValueError(
                f"key: an int seed must fit in 64 bits (-2**63 <= seed < 2**63), got {key}"
            )
        return jax.random.key(int(key))
    if isinstance(key, (jax.Array, np.ndarray)):
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
            return key
        if key.dtype == np.uint32 and key.shape == (2,):
            return jax.random.wrap_key_data(jnp.asarray(key))
    raise ValueError(
        f"key must be an int seed or a JAX PRNG key (jax.random.key(seed)), got "
        f"{type(key).__name__} {_short(key)}"
    )


def _is_budget(x: object) -> bool:
    return _is_int(x) and int(x) > 0


def row_budgets(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    """`max_new_tokens` as one budget per row: one positive int for all `n` rows, or a
    sequence of `n` positive ints (each row stops at its own)."""
    if _is_budget(max_new_tokens):
        return [int(max_new_tokens)] * n
    if not isinstance(max_new_tokens, (list, tuple, np.ndarray)):
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    values = list(max_new_tokens)
    if len(values) != n:
        raise ValueError(
            f"max_new_tokens has {len(values)} budgets for {n} prompts: give one int for "
            "every prompt or one per prompt"
        )
    for i, v in enumerate(values):
        if not _is_budget(v):
            raise ValueError(f"max_new_tokens[{i}] must be a positive int, got {v!r}")
    return [int(v) for v in values]


def _one_budget(max_new_tokens: object, fn: str) -> None:
    """Per-row budgets are a `generate` option; these entry points take one int."""
    if isinstance(max_new_tokens, (list, tuple, np.ndarray)):
        raise ValueError(
            f"{fn} takes one max_new_tokens (a positive int) for every row, got "
            f"{_short(max_new_tokens)}; per-row budgets are a `generate` option"
        )


def check_args(
    model: Model,
    rows: list[list[int]],
    max_new_tokens: int | Sequence[int],
    drafter: Drafter | None,
) -> list[int]:
    """Checks the call's arguments -> each row's budget (`row_budgets`)."""
    budgets = row_budgets(max_new_tokens, len(rows))
    ctx = model.config.max_position_embeddings
    for i, (ids, new) in enumerate(zip(rows, budgets)):
        if len(ids) + new > ctx:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={new} that "
                f"exceeds the model's context of {ctx} positions"
            )
    if drafter is not None:
        if not isinstance(drafter, Drafter):
            raise TypeError(
                f"drafter must be a specjax Drafter (see specjax.drafters) or a drafter "
                f"name such as 'ngram' or 'auto', got {type(drafter).__name__}"
            )
        if drafter.tokenizer is not None and model.tokenizer is not None:
            if drafter.tokenizer.get_vocab() != model.tokenizer.get_vocab():
                raise ValueError(
                    f"drafter {drafter.name!r} uses a different tokenizer than the "
                    f"target {model.name!r}: speculative decoding needs one vocabulary"
                )
    return budgets


def bind_drafter(model: Model, drafter: Drafter | None) -> tuple[DrafterSpec | None, Params]:
    """-> (spec, params) of the drafter for this target, after compatibility checks."""
    if drafter is None:
        return None, None
    spec, dparams = drafter.bind(model)
    # The drafter computes in the target's dtype; its matrices may be stored in another dtype
    # (`Model.with_storage`): one the target stores (arrays it takes from the target) or, for a
    # float32 target, bfloat16 (a small-model drafter `load_model` stored so).
    dtypes = {x.dtype for x in jax.tree.leaves(dparams) if jnp.issubdtype(x.dtype, jnp.floating)}
    stored = {x.dtype for x in jax.tree.leaves(model.params)} | {model.dtype}
    if model.dtype == jnp.float32:
        stored.add(jnp.dtype(jnp.bfloat16))
    if dtypes and (model.dtype not in dtypes or not dtypes <= stored):
        raise ValueError(
            f"drafter {drafter.name!r} has dtype {sorted(map(str, dtypes))} but the "
            f"target is {model.dtype}: convert one with Model.astype(...)"
        )
    return spec, dparams


def padded_batch(rows: int, multiple: int = 1) -> int:
    """The batch `generate` compiles for `rows` prompts: the next power of two, rounded up to a
    multiple of `multiple` (the mesh's data axis; each device decodes B // multiple rows)."""
    B = 1 << (max(rows, 1) - 1).bit_length()
    return -(-B // multiple) * multiple


def resolve_drafter(
    model: Model, drafter: Drafter | str | None, temperature: float = 0.0, batch: int = 1
) -> Drafter | None:
    """A registry name ("ngram", "eagle3_tree@8", "auto", ...) -> its Drafter for `model`;
    anything else unchanged (checked by `check_args`). "auto" is the drafter measured fastest
    at the decode's `temperature` and `batch` (rows per device; greedy and sampled choices,
    and batch buckets, are measured apart)."""
    if isinstance(drafter, str):
        from specjax.drafters import registry

        return registry.make(drafter, None, model, temperature=temperature, batch=batch)
    return drafter


def prepare(
    model: Model,
    prompts: Prompts,
    *,
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: KeyLike | None = None,
    chat: bool = True,
    drafter: Drafter | str | None = None,
    impl: str = "xla",
    batch_multiple: int = 1,
    images: Any = None,
    videos: Any = None,
    pixel_values: Any = None,
    pixel_values_videos: Any = None,
) -> tuple[engine.EngineConfig, dict[str, Any], list[list[int]]]:
    """Everything `generate` does before running: -> (ec, args for engine.prefill, rows)."""
    from specjax import multimodal

    mode, sp = make_sampling(temperature, top_k, top_p)  # cheap checks before tokenizing
    key = make_key(key)
    rows = encode_prompts(model, prompts, chat)
    rows, items = multimodal.prepare_rows(
        model, rows, images, videos, pixel_values, pixel_values_videos
    )
    B = padded_batch(len(rows), batch_multiple)
    drafter = resolve_drafter(model, drafter, temperature, batch=B // batch_multiple)
    budgets = check_args(model, rows, max_new_tokens, drafter)
    spec, dparams = bind_drafter(model, drafter)
    P = bucket(max(len(r) for r in rows), MIN_PROMPT_BUCKET, half_steps=True)
    ec = engine_config(model, mode, max(budgets), spec, impl)  # the largest budget's bucket
    max_len = cache_len(P, ec)
    tokens = np.zeros((B, P), np.int32)
    lengths = np.ones((B,), np.int32)
    budget = np.zeros((B,), np.int32)  # padding rows get no budget: done from the start
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)] = ids
        lengths[i] = len(ids)
        budget[i] = budgets[i]
    inp = engine.PrefillInput.from_tokens(jnp.asarray(tokens), jnp.asarray(lengths))
    args = dict(
        inp=inp, max_new=jnp.asarray(budget), key=key, sp=sp, dparams=dparams, max_len=max_len
    )
    if items is not None:  # image / video features at the placeholder positions
        embeds, mask = multimodal.prefill_embeds(model, tokens, items)
        args["inp"] = inp.replace(embeds=embeds, embed_mask=mask)
        args["items"] = items
        if getattr(drafter, "vision", None) is not None:  # a small VLM drafter: its own tower
            own = multimodal.drafter_embeds(drafter.vision, model, tokens, items)
            args["inp"] = args["inp"].replace(draft_embeds=own)
    return ec, args, rows


def generate(
    model: Model,
    prompts: Prompts,
    *,
    max_new_tokens: int | Sequence[int] = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: KeyLike | None = None,
    chat: bool = True,
    drafter: Drafter | str | None = None,
    impl: str = "xla",
    mesh: jax.sharding.Mesh | None = None,
    images: Any = None,
    videos: Any = None,
    pixel_values: Any = None,
    pixel_values_videos: Any = None,
) -> GenerateOutput:
    """Generate from one prompt or a batch (strings get the chat template when `chat`).

    `max_new_tokens`: one budget for every prompt, or one per prompt (a row stops at its own;
    the largest sets the compiled bucket). temperature 0 is greedy; otherwise sampling with
    optional top-k / top-p and an explicit `key` (int seed or `jax.random` key). With
    `drafter`, speculative decoding: the output equals (greedy) or is distributed exactly as
    (sampling) plain decoding of `model`.
    `drafter` is a `specjax.drafters` Drafter or a registry name as on the command line
    ("ngram", "eagle3_tree", ...); "auto" picks the drafter measured fastest for this model
    on this device at this `temperature` (greedy, or sampling at the temperature rounded to
    one decimal; each measured once, then cached; see `autotune.choose_drafter`).
    With `mesh` (a `jax.sharding.Mesh` with a "data" axis) the batch is sharded over it; with
    a "model" axis too (`specjax.make_mesh(data=D, model=M)`), the model is tensor parallel
    (`specjax.shard_model`; pass a model already sharded for the mesh to skip regrouping).
    A batch that repeats prompts (n samples of one question) runs the target's prefill once
    per distinct prompt (text prompts, one device); every row still samples on its own.

    Vision-language targets (`load_model` of a LLaVA / Video-LLaVA checkpoint): `images`
    holds, per prompt, a list of images (PIL images or uint8 [H, W, 3] arrays; one prompt may
    take its list directly) and `videos` (Video-LLaVA) a list of videos, each a list of
    frames. Each prompt holds one placeholder token per image (expanded here) or the
    expanded count. Already-processed inputs: `pixel_values` [N, C, H, W] /
    `pixel_values_videos` [N, F, C, H, W] with token-id prompts holding expanded
    placeholders, as HF processors write them. Features go through `model.feature_cache`
    (stats["vision_cache"]).
    """
    # A mesh without a "data" axis is rejected with a clear message by `sharding.place`.
    multiple = 1 if mesh is None else dict(mesh.shape).get("data", 1)
    if sharding.model_axis(mesh) > 1:  # tensor parallel: regroup and place (once per model)
        model = sharding.shard_model(model, mesh)
    ec, args, rows = prepare(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        key=key,
        chat=chat,
        drafter=drafter,
        impl=impl,
        batch_multiple=multiple,
        images=images,
        videos=videos,
        pixel_values=pixel_values,
        pixel_values_videos=pixel_values_videos,
    )
    params, dparams, items = model.params, args.pop("dparams"), args.pop("items", None)
    if mesh is not None:
        params, dparams, args = sharding.place(mesh, params, dparams, args)
        if sharding.model_axis(mesh) > 1:
            kv = NamedSharding(mesh, sharding.kv_spec(mesh))
            ec = dataclasses.replace(ec, kv_sharding=kv)
    # The target's prefill, then the rest as one program (`engine.start_and_decode`): the same
    # tokens as `decode_fn` (`DecodeFn.start` then `.run`), one compilation fewer per drafter.
    pc = ec.prefill_config
    before = sum(engine.TRACE_COUNTS.values())
    t0 = time.perf_counter()
    prefixes = _prefix_plan(model, rows, items, ec, mesh)
    shared = _distinct_prompts(args["inp"], items, mesh) if prefixes is None else None
    if shared is not None:  # repeated prompts (n samples of one question): one prefill each
        logits, cache, hid = engine.target_prefill_shared(params, shared[0], shared[1], pc=pc)
    elif prefixes is None:
        logits, cache, hid = engine.target_prefill(params, args["inp"], pc=pc)
    else:  # a VLM prompt: the target's prefill through the prefix KV cache
        from specjax import prefix_cache

        logits, cache, hid = prefix_cache.prefill(model, params, args["inp"], pc, prefixes)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    state = engine.start_and_decode(
        params, dparams, args["inp"], logits, cache, hid, args["max_new"], args["key"],
        args["sp"], ec=ec, max_len=args["max_len"],
    )  # fmt: skip
    del cache, hid
    jax.block_until_ready(state.out)
    t2 = time.perf_counter()
    compiled = sum(engine.TRACE_COUNTS.values()) > before
    out = finish(model, state, rows, t1 - t0, t2 - t1, compiled, ec.drafter)
    for name in ("feature_cache", "prefix_cache"):  # vision-language models
        cache = getattr(model, name, None)
        if cache is not None:
            out.stats["vision_cache" if name == "feature_cache" else name] = cache.summary()
    return out


def _distinct_prompts(
    inp: engine.PrefillInput, items: list | None, mesh: Any
) -> tuple[engine.PrefillInput, jax.Array] | None:
    """(the batch's distinct padded prompts [U, P], row -> prompt index [B]) when the batch
    repeats prompts enough to halve the prefill's batch bucket (U rounded up to a power of
    two), else None. Text prompts on one device only (images and meshes keep the plain
    prefill)."""
    if items is not None or mesh is not None:
        return None
    tokens, lengths = np.asarray(inp.tokens), np.asarray(inp.lengths)
    B = tokens.shape[0]
    keys = np.concatenate([lengths[:, None], tokens, np.asarray(inp.positions)], axis=1)
    distinct, first, rows = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    U = 1 << (len(distinct) - 1).bit_length()
    if U >= B:
        return None
    pick = np.concatenate([first, np.full(U - len(first), first[0])])  # pad to the bucket
    positions = np.asarray(inp.positions)
    shared = engine.PrefillInput(
        tokens=jnp.asarray(tokens[pick]),
        lengths=jnp.asarray(lengths[pick]),
        positions=jnp.asarray(positions[pick]),
    )
    return shared, jnp.asarray(rows.reshape(-1), jnp.int32)


def _prefix_plan(
    model: Model, rows: list[list[int]], items: list | None, ec: engine.EngineConfig, mesh: Any
) -> list | None:
    """Per-row prefix keys for the prefix KV cache, or None when it does not apply (no images,
    the cache is off (max_bytes 0), or a mesh: the cache is kept for one device)."""
    store = getattr(model, "prefix_cache", None)
    if items is None or store is None or store.max_bytes == 0 or mesh is not None:
        return None
    from specjax import prefix_cache

    plan = prefix_cache.plan(model, rows, items, ec.prefill_config)
    return plan if any(k is not None for k, _ in plan) else None


def finish(
    model: Model,
    state: engine.LoopState,
    rows: list[list[int]],
    prefill_s: float,
    decode_s: float,
    compiled: bool,
    spec: DrafterSpec | None = None,
) -> GenerateOutput:
    out = sharding.to_host(state.out)
    n_out = sharding.to_host(state.n_out)
    tokens = [out[i, : n_out[i]].tolist() for i in range(len(rows))]
    return GenerateOutput(
        tokens=tokens,
        text=[model.decode(t) for t in tokens],
        lengths=[len(t) for t in tokens],
        prompt_lengths=[len(r) for r in rows],
        stats=_stats(state, len(rows), prefill_s, decode_s, compiled, spec),
    )


def _stats(
    state: engine.LoopState,
    n: int,
    prefill_s: float,
    decode_s: float,
    compiled: bool,
    spec: DrafterSpec | None = None,
) -> dict:
    n_out = sharding.to_host(state.n_out)[:n]
    row_steps = sharding.to_host(state.row_steps)[:n]
    new = int(n_out.sum())
    # tau (Spec-Bench): tokens emitted per target verify forward, bonus token included. The
    # first token comes from the prefill forward, so it is not counted.
    decode_tokens = np.maximum(n_out - 1, 0)
    tau = float(decode_tokens.sum() / max(row_steps.sum(), 1))
    total = prefill_s + decode_s
    return {
        "new_tokens": new,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "total_s": total,
        "tokens_per_s": new / total if total > 0 else 0.0,
        "decode_tokens_per_s": float(decode_tokens.sum()) / decode_s if decode_s > 0 else 0.0,
        "steps": int(sharding.to_host(state.steps)),
        "target_forwards": (1 + row_steps).tolist(),
        "tau": tau,
        "acceptance_histogram": sharding.to_host(state.accept_hist).tolist(),
        # loop steps per verify size (0 = a plain step), for drafters that size their drafts
        "verify_size_histogram": sharding.to_host(state.size_hist).tolist(),
        "compiled": bool(compiled),
        **({} if spec is None else spec.stats(state.dstate, n)),
    }


def generate_stream(
    model: Model,
    prompt: Prompt,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: KeyLike | None = None,
    chat: bool = True,
    drafter: Drafter | str | None = None,
    impl: str = "xla",
) -> Iterator[str]:
    """Yield decoded text pieces of one prompt as they are produced.

    Uses the Python-loop twin of the decode step (one jitted call per step) so the host can see
    each step's tokens; same step function, same tokens as `generate`.
    """
    _one_budget(max_new_tokens, "generate_stream")
    ec, args, rows = prepare(
        model,
        [prompt] if isinstance(prompt, str) else prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        key=key,
        chat=chat,
        drafter=drafter,
        impl=impl,
    )
    if len(rows) != 1:
        raise ValueError(f"generate_stream takes one prompt, got {len(rows)}")
    dparams, sp = args.pop("dparams"), args["sp"]
    fn = DecodeFn(ec, int(max_new_tokens), sp, model.params, dparams)
    state = fn.start(model.params, dparams, args["inp"], args["max_new"], args["key"])
    emitted_text = ""
    while True:
        n = int(state.n_out[0])
        text = model.decode(np.asarray(state.out[0, :n]).tolist())
        if len(text) > len(emitted_text) and not text.endswith("\ufffd"):
            yield text[len(emitted_text) :]
            emitted_text = text
        if bool(state.done[0]):
            break
        state = fn.step(model.params, dparams, state)
    if len(text) > len(emitted_text):
        yield text[len(emitted_text) :]


def generate_pmap(
    model: Model,
    prompts: Prompts,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: KeyLike | None = None,
    chat: bool = True,
    drafter: Drafter | str | None = None,
    devices: Sequence | None = None,
) -> GenerateOutput:
    """`generate` with the batch split over devices by `jax.pmap`.

    Each device runs its own while_loop over its rows, so a device whose rows finish early stops
    early. Sampling uses one key per device (folded from `key`), so sampled tokens differ from a
    single-device run; greedy tokens are identical.
    """
    _one_budget(max_new_tokens, "generate_pmap")
    devices = list(devices if devices is not None else jax.devices())
    D = len(devices)
    ec, args, rows = prepare(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        key=key,
        chat=chat,
        drafter=drafter,
        batch_multiple=D,
    )
    _, dparams, sp, key = (
        args.pop("max_len"),
        args.pop("dparams"),
        args.pop("sp"),
        args.pop("key"),
    )
    split = jax.tree.map(lambda v: v.reshape((D, -1) + v.shape[1:]), args)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(D))

    def run(
        params: dict,
        dparams: Params,
        inp: engine.PrefillInput,
        max_new: jax.Array,
        key: jax.Array,
        sp: dict,
    ) -> engine.LoopState:
        fn = DecodeFn(ec, int(max_new_tokens), sp, params, dparams)  # the generate program
        return fn.run(params, dparams, fn.start(params, dparams, inp, max_new, key))

    fn = jax.pmap(run, in_axes=(None, None, 0, 0, 0, None), devices=devices)
    t0 = time.perf_counter()
    state = fn(model.params, dparams, split["inp"], split["max_new"], keys, sp)
    jax.block_until_ready(state.out)
    dt = time.perf_counter() - t0
    # Merge the device axis back into the batch axis. Drafter state leaves are batch first
    # (their per-row statistics included), so the same merge serves `spec.stats`.
    rows_first = lambda x: x.reshape((-1,) + x.shape[2:]) if x.ndim >= 2 else x  # noqa: E731
    state = state.replace(
        out=rows_first(state.out),
        n_out=state.n_out.reshape(-1),
        row_steps=state.row_steps.reshape(-1),
        dstate=jax.tree.map(rows_first, state.dstate),
        steps=jnp.max(state.steps),
        accept_hist=jnp.sum(state.accept_hist, axis=0),
        size_hist=jnp.sum(state.size_hist, axis=0),
    )
    return finish(model, state, rows, 0.0, dt, True, ec.drafter)


def decode_fn(
    model: Model,
    *,
    drafter: Drafter | str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    impl: str = "xla",
    pad_id: int = 0,
    batch: int = 1,
) -> DecodeFn:
    """The decode program of `model` (and `drafter`: a Drafter or a registry name) as a pure
    function `fn(params, dparams, tokens, lengths, key) -> (tokens_out, lengths_out, stats)`;
    `fn.params` / `fn.dparams` are the params to pass unless you place or update them.
    `batch`: the rows `fn` will decode per call, which only `drafter="auto"` reads (it chooses
    per batch bucket)."""
    _one_budget(max_new_tokens, "decode_fn")
    mode, sp = make_sampling(temperature, top_k, top_p)
    drafter = resolve_drafter(model, drafter, temperature, batch=batch)
    check_args(model, [], max_new_tokens, drafter)
    spec, dparams = bind_drafter(model, drafter)
    return DecodeFn(
        ec=engine_config(model, mode, max_new_tokens, spec, impl),
        max_new_tokens=int(max_new_tokens),
        sp=sp,
        params=model.params,
        dparams=dparams,
        pad_id=int(pad_id),
    )
