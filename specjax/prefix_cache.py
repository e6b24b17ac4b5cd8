"""The prefix KV cache for vision-language prompts: a follow-up question about an image already
seen does not prefill the image tokens again.

A row's prefix is its prompt up to and including its last image / video placeholder (capped so
that at least one token is left to run). Its key is a hash of the prefix tokens, the content
keys of the row's images (their features fill the placeholders) and what the prefill hands
the drafter (hidden layers, dtype): the same text before the same images gives the same K/V.
An entry holds the prefix's K/V of every layer and, when a drafter reads them, its hidden
states. A call whose rows hit runs `engine.target_prefill_after` over each row's remaining
tokens only; rows that miss are computed whole in the same call, and their prefixes stored.

The suffix attends to the prefix through the cache instead of inside one block, so logits can
differ from a whole prefill by float rounding (tests assert equal greedy outputs).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from specjax import engine
from specjax.decode import MIN_PROMPT_BUCKET, bucket
from specjax.models import Hiddens, KVCache, compute_dtype, init_cache, is_unrolled
from specjax.vision_cache import ByteLRU, content_hash

if TYPE_CHECKING:
    from specjax.multimodal import Item, VisionLanguageModel

DEFAULT_MAX_BYTES = 1 << 30


class PrefixCache(ByteLRU):
    """Prefix key -> {"k", "v": [L, KV, s, hd]; "layers": [n, s, D] | None; "last": [s, D] |
    None}, bounded in bytes, least recently used evicted first."""


def plan(
    model: VisionLanguageModel,
    rows: list[list[int]],
    items: list[list[Item]],
    pc: engine.PrefillConfig,
) -> list[tuple[str | None, int]]:
    """Per row: (prefix key or None, prefix length)."""
    cfg = model.vlm_config
    ids = {t for t in (cfg.image_token_id, cfg.video_token_id) if t is not None}
    sig = f"{model.fingerprint}|{pc.hidden_layers}|{pc.with_hiddens}|{model.dtype}|"
    out: list[tuple[str | None, int]] = []
    for r, toks in enumerate(rows):
        where = [i for i, t in enumerate(toks) if t in ids]
        s = min(where[-1] + 1, len(toks) - 1) if where else 0
        if s <= 0 or r >= len(items) or not items[r]:
            out.append((None, 0))
            continue
        h = hashlib.sha256(sig.encode())
        h.update(np.asarray(toks[:s], np.int64).tobytes())
        for it in items[r]:
            h.update(content_hash(it.pixels, it.kind, model.fingerprint).encode())
        out.append((h.hexdigest(), s))
    return out


def _stacked(kv: Any) -> jax.Array:
    return jnp.stack(kv) if isinstance(kv, (tuple, list)) else kv  # [L, B, KV, S, hd]


def prefill(
    model: VisionLanguageModel,
    params: dict,
    inp: engine.PrefillInput,
    pc: engine.PrefillConfig,
    keys: list[tuple[str | None, int]],
) -> tuple[jax.Array, KVCache, Hiddens | None]:
    """The target's prefill through the prefix cache -> what `engine.target_prefill` returns."""
    store: PrefixCache = model.prefix_cache
    B, P = inp.tokens.shape
    entries = [store.get(k) if k is not None else None for k, _ in keys]
    entries += [None] * (B - len(entries))
    keys = keys + [(None, 0)] * (B - len(keys))
    starts = np.array([s if e is not None else 0 for (_, s), e in zip(keys, entries)], np.int32)
    t0 = time.perf_counter()
    if not starts.any():
        logits, cache, hid = engine.target_prefill(params, inp, pc=pc)
    else:
        lengths = np.asarray(inp.lengths)
        width = bucket(int((lengths - starts).max()), MIN_PROMPT_BUCKET, half_steps=True)
        cache, hiddens = _restore(params, pc, entries, starts, P, width)
        logits, cache, hid = engine.target_prefill_after(
            params, inp, jnp.asarray(starts), cache, hiddens, pc=pc, width=width
        )
    jax.block_until_ready(logits)
    store.stats.encode_s += time.perf_counter() - t0
    _store_new(store, keys, entries, cache, hid)
    store.stats.reused_tokens += int(starts.sum())
    return logits, cache, hid


def _restore(
    params: dict,
    pc: engine.PrefillConfig,
    entries: list[dict | None],
    starts: np.ndarray,
    P: int,
    width: int,
) -> tuple[KVCache, Hiddens | None]:
    """A cache of width P + width (and full-prompt hiddens) holding each hit row's prefix.
    Built with one gather over the distinct entries (a row-by-row update would copy the whole
    cache once per row: 8192 rows sharing one image took minutes)."""
    B = len(entries)
    unrolled = is_unrolled(params)
    dtype = compute_dtype(params)
    cache = init_cache(pc.target, B, P + width, dtype, per_layer=unrolled)
    uniq: list[dict] = []
    slot = {}
    rows = np.zeros(B, np.int32)  # 0: the all-zero entry
    for b, e in enumerate(entries):
        if e is not None:
            if id(e) not in slot:
                uniq.append(e)
                slot[id(e)] = len(uniq)
            rows[b] = slot[id(e)]
    idx = jnp.asarray(rows)

    def table(get: Callable[[dict], jax.Array], length: int, axis: int) -> jax.Array:
        # [U + 1, ...] distinct entries padded to `length` on `axis`, a zero entry first
        arrs = [get(e) for e in uniq]
        pad = [
            jnp.pad(
                a, [(0, length - a.shape[axis]) if d == axis else (0, 0) for d in range(a.ndim)]
            )
            for a in arrs
        ]
        return jnp.concatenate([jnp.zeros_like(pad[0])[None]] + [a[None] for a in pad]).astype(
            dtype
        )

    k = jnp.moveaxis(jnp.take(table(lambda e: e["k"], P + width, 2), idx, axis=0), 0, 1)
    v = jnp.moveaxis(jnp.take(table(lambda e: e["v"], P + width, 2), idx, axis=0), 0, 1)
    hiddens = None
    if pc.with_hiddens:
        last = jnp.take(table(lambda e: e["last"], P, 0), idx, axis=0)  # [B, P, D]
        layers = None
        if pc.hidden_layers:
            layers = jnp.moveaxis(jnp.take(table(lambda e: e["layers"], P, 1), idx, axis=0), 0, 1)
        hiddens = Hiddens(last=last, layers=layers)
    if unrolled:
        k, v = tuple(k), tuple(v)
    return cache.replace(k=k, v=v), hiddens


def _store_new(
    store: PrefixCache,
    keys: list[tuple[str | None, int]],
    entries: list[dict | None],
    cache: KVCache,
    hid: Hiddens | None,
) -> None:
    """Put the prefixes of the rows that missed (each computed prefix once)."""
    k, v = _stacked(cache.k), _stacked(cache.v)
    done = set()
    for b, ((key, s), e) in enumerate(zip(keys, entries)):
        if key is None or e is not None or key in done or key in store:
            continue
        done.add(key)
        entry = {"k": k[:, b, :, :s], "v": v[:, b, :, :s], "layers": None, "last": None}
        if hid is not None:
            entry["last"] = hid.last[b, :s]
            if hid.layers is not None:
                entry["layers"] = hid.layers[:, b, :s]
        store.put(key, entry)
        store.stats.encoded += 1
