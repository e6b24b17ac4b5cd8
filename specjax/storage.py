"""Which dtype a float32 model stores its matrices in, chosen by measurement on this device.

A bfloat16 checkpoint loaded in float32 holds weights that are all bfloat16 numbers. Stored in
bfloat16 (`Model.with_storage`) they compute float32's products exactly at half the bytes
(`llama.exact_bf16_product`). Whether that pays depends on the processor: on an Intel Xeon
with AMX a plain step of SmolLM2 rounded to bfloat16 took 0.77-0.79x the float32-stored one
(benchmarks/RESULTS.md section 8), on an AMD EPYC with AVX-512-BF16 but no AMX 1.3-1.5x
(section 9), and a CPU without bfloat16 instructions runs one-row bfloat16 products ~10x
slower. So `load_model` measures, once per device and model shape, a verify forward of 1 and
8 tokens with the matrices stored each way on the model's first layers, and keeps bfloat16
storage only if it is clearly faster at both sizes. The choice is cached in
$SPECJAX_CACHE/auto/ like `drafter="auto"`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from specjax.engine.verify import verify_forward
from specjax.models import family_of, init_cache, is_unrolled
from specjax.paths import cache_root, store_json

if TYPE_CHECKING:
    from specjax.model import Model

STORAGE_CHOICES = ("auto", "float32", "bfloat16")
PROBE_SIZES = (1, 8)  # a plain step, and a verify block of a typical tree
PROBE_BYTES = 384 << 20  # float32 layer bytes the probe runs through: well past the caches
CLEAR_MARGIN = 0.95  # bfloat16 storage must take at most this fraction of float32's time
STORAGE_VERSION = 1  # bump when the rule or the probe changes: cached choices are re-measured


def storage_dtype(storage: Any) -> str | None:
    """`load_model(storage=...)` -> "auto", "float32", "bfloat16" or None (the computing
    dtype, no probe); ValueError naming the valid values otherwise."""
    if storage is None or (isinstance(storage, str) and storage in STORAGE_CHOICES):
        return storage
    try:
        name = jnp.dtype(storage).name
    except (TypeError, ValueError, KeyError):
        name = None
    if name in STORAGE_CHOICES:
        return name
    raise ValueError(
        f"storage={storage!r}: valid values are 'auto' (measured on this device), 'float32', "
        "'bfloat16' (or the jnp dtypes) and None (the computing dtype, no probe)"
    )


def device_tag() -> str:
    """The device a storage choice holds for: platform, kind, processor model on a CPU (every
    CPU calls itself 'cpu'), jax version."""
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", "")
    if dev.platform == "cpu":
        kind = _cpu_model() or kind
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{dev.platform}-{kind}-{jax.__version__}")


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


def probe_layers(model: Model, budget: int = PROBE_BYTES) -> int:
    """How many of the model's first layers the probe runs: enough that their float32
    matrices exceed `budget` bytes (a memory-bound regime, as the whole model is), at most all."""
    cfg = model.config
    layer_bytes = 4 * sum(
        int(np.prod(x.shape[-2:])) for x in jax.tree.leaves(_layer(model.params, 0)) if x.ndim >= 2
    )
    return max(1, min(cfg.num_layers, -(-budget // max(layer_bytes, 1))))


def _layer(params: dict, i: int) -> dict:
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return layers[i]
    return jax.tree.map(lambda x: x[i], layers)


def _truncated(model: Model, n: int) -> Model:
    """The model's first `n` layers with its embedding, final norm and head."""
    layers = model.params["layers"]
    if isinstance(layers, (list, tuple)):
        layers = list(layers[:n])
    else:
        layers = jax.tree.map(lambda x: x[:n], layers)
    cfg = dataclasses.replace(model.config, num_layers=n)
    return dataclasses.replace(model, params=dict(model.params, layers=layers), config=cfg)


def cache_path(model: Model) -> str:
    """The cached choice's file: per model shape, layout and weight orientation (each a
    different program), processor model and jax version."""
    family = family_of(model.config)
    layout = "unrolled" if is_unrolled(model.params) else "scan"
    what = f"{model.config!r}-{layout}-{family.orientation(model.params)}"
    shape = hashlib.sha256(what.encode()).hexdigest()[:12]
    name = f"storage-{model.config.model_type}-{shape}-{device_tag()}.json"
    return os.path.join(cache_root(), "auto", name)


def measure(
    f32: Model,
    b16: Model,
    sizes: Sequence[int] = PROBE_SIZES,
    prefix: int = 256,
    repeats: int = 7,
) -> dict[str, list[float]]:
    """Median ms of a verify forward of each of `sizes` tokens over a `prefix`-token cache, for
    the two storages of the same model -> {"float32": [...], "bfloat16": [...]}. Every program
    is compiled and run twice first; the timed calls alternate between storages and sizes."""
    rng = np.random.default_rng(0)
    cfg = f32.config
    per_layer = is_unrolled(f32.params)
    cache = init_cache(cfg, 1, prefix + max(sizes) + 2, f32.dtype, per_layer=per_layer)
    cache = cache.replace(lengths=jnp.full((1,), prefix, jnp.int32))  # cost, not values, counts
    calls = {}
    for name, model in (("float32", f32), ("bfloat16", b16)):
        for T in sizes:
            tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, T)), jnp.int32)
            calls[name, T] = functools.partial(verify_forward, model.params, tokens, None, cfg=cfg)
    times: dict[tuple[str, int], list[float]] = {k: [] for k in calls}
    for r in range(2 + repeats):
        order = list(calls.items())
        for key, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            logits, cache = fn(cache)
            logits.block_until_ready()
            if r >= 2:
                times[key].append((time.perf_counter() - t0) * 1e3)
    return {
        name: [statistics.median(times[name, T]) for T in sizes] for name in ("float32", "bfloat16")
    }


def choose(ms: dict[str, list[float]]) -> str:
    """bfloat16 when it takes at most `CLEAR_MARGIN` of float32's time at every probed size."""
    pairs = zip(ms["bfloat16"], ms["float32"], strict=True)
    return "bfloat16" if all(b <= CLEAR_MARGIN * f for b, f in pairs) else "float32"


def _cached_choice(path: str) -> str | None:
    try:
        with open(path) as f:
            rec = json.load(f)
        if rec.get("version") == STORAGE_VERSION and rec["choice"] in ("float32", "bfloat16"):
            return rec["choice"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or damaged: measured again
    return None


def stored(model: Model, dtype: Any, checked: bool = False) -> Model:
    """`model.with_storage(dtype)`, converting in `model`'s own param dicts (each float32
    matrix dropped as its copy is made, so the peak holds one matrix twice rather than the
    model): for a model nothing else holds (`load_model`'s). ValueError, nothing converted, if
    `dtype` would round a weight (`checked`: the caller has checked that already)."""
    family = family_of(model.config)
    params = family.matrices_stored(model.params, jnp.dtype(dtype), consume=True, check=not checked)
    return dataclasses.replace(model, params=params)


def auto_storage(model: Model, progress: bool = True) -> Model:
    """`model` (computing in float32) with its matrices in the storage this device runs
    fastest: bfloat16 only if every matrix is a bfloat16 number (lossless) and the measured
    probe says so. Models computing in another dtype, and weights bfloat16 cannot hold, are
    returned as they are (no measurement). Converts in `model`'s own dicts (`stored`)."""
    if model.dtype != jnp.float32:
        return model
    path = cache_path(model)
    choice = _cached_choice(path)
    if choice == "float32":
        return model
    if family_of(model.config).rounded_matrix(model.params, jnp.bfloat16) is not None:
        return model  # not a bfloat16 checkpoint: float32 storage is the only lossless one
    if choice is None:
        n = probe_layers(model)
        if progress:
            print(
                f"specjax: {model.name or model.config.model_type} holds bfloat16 weights; "
                f"timing its first {n} layers stored in float32 and in bfloat16 on this "
                f"device (once, cached in {path})",
                file=sys.stderr,
                flush=True,
            )
        probe = _truncated(model, n)
        try:
            ms = measure(probe, probe.with_storage(jnp.bfloat16))
        except Exception as e:  # noqa: BLE001 - the model loads in float32 whatever went wrong
            print(f"specjax: the storage probe failed ({e!r}); keeping float32", file=sys.stderr)
            return model  # nothing cached: measured again next time
        del probe
        choice = choose(ms)
        rec = {"version": STORAGE_VERSION, "choice": choice, "sizes": list(PROBE_SIZES), **ms}
        store_json(path, rec | {"layers": n, "device": device_tag()})
    return stored(model, jnp.bfloat16, checked=True) if choice == "bfloat16" else model
