"""The target's features over a dataset, computed once and cached to disk as memory-mapped
`.npy` shards (`cache_features`), and read back a batch at a time (`FeatureStore`), so training
holds one shard's worth of memory and never runs the target again.

What a drafter kind needs from the cache is its recipe's `feature_layers(cfg)`: the final hidden
state is always stored; EAGLE-3 adds the target layers its fc fuses."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from specjax.models import forward_hidden
from specjax.models.cache import init_cache

if TYPE_CHECKING:
    from specjax.model import Model
    from specjax.paths import StrPath


class Batch(NamedTuple):
    """Rows of the dataset with their cached features (numpy)."""

    tokens: np.ndarray  # [B, S] int
    mask: np.ndarray  # [B, S] bool: the token is a trained (response) token
    last: np.ndarray  # [B, S, D] the target's final hidden state
    layers: np.ndarray  # [n, B, S, D] the requested target layers (n may be 0)


def _feature_fn(
    target: Model, layers: tuple
) -> Callable[[dict, jax.Array], tuple[jax.Array, jax.Array | None]]:
    """Jitted (params, tokens [B, S]) -> (last [B, S, D], layers [n, B, S, D] or None)."""
    cfg = target.config

    @jax.jit
    def run(params: dict, tokens: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        B, S = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        cache = init_cache(
            cfg, B, S, params["embed"].dtype, per_layer=isinstance(params["layers"], (list, tuple))
        )
        hid, _ = forward_hidden(params, cfg, tokens, pos, cache, hidden_layers=layers, fresh=True)
        return hid.last, hid.layers

    return run


def cache_features(
    target: Model,
    dataset_dir: StrPath,
    out_dir: StrPath,
    layers: tuple,
    *,
    batch: int = 8,
    dtype: str = "float16",
    progress: bool = True,
) -> Path:
    """The target's final hidden state (and `layers`) over every dataset row, one `.npy` pair
    per dataset shard (`last` [n, S, D], `layers` [n, len(layers), S, D]). Existing shards are
    kept, so an interrupted run resumes; memory holds one shard at a time."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"layers": list(layers), "dtype": dtype, "model": target.name}
    mfile = out / "features.json"
    if mfile.exists():
        old = json.loads(mfile.read_text())
        # A cache holding more layers serves a drafter that reads fewer (`FeatureStore` picks).
        if (old["dtype"], old["model"]) != (dtype, target.name) or not set(layers) <= set(
            old["layers"]
        ):
            raise ValueError(
                f"feature cache {out} was written for {old}, not {meta}: use another directory"
            )
        layers = tuple(old["layers"])
    else:
        mfile.write_text(json.dumps(meta))
    run = _feature_fn(target, tuple(layers))
    shards = sorted(Path(dataset_dir).glob("shard_*.npz"))
    rows = sum(np.load(s)["tokens"].shape[0] for s in shards)
    bar = tqdm(total=rows, desc="target features", disable=not progress, unit="row")
    for s in shards:
        toks = np.load(s)["tokens"]
        stem = out / s.stem
        if Path(f"{stem}.last.npy").exists() and Path(f"{stem}.layers.npy").exists():
            bar.update(len(toks))
            continue
        lasts, lays = [], []
        for b in range(0, len(toks), batch):
            chunk = toks[b : b + batch]
            pad = batch - len(chunk)  # one compiled shape
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            last, lay = run(target.params, jnp.asarray(chunk))
            lasts.append(np.asarray(last[: batch - pad], dtype))
            lay = (
                np.zeros((batch, 0) + last.shape[1:], dtype)
                if lay is None
                else np.asarray(jnp.swapaxes(lay, 0, 1), dtype)
            )
            lays.append(lay[: batch - pad])
            bar.update(batch - pad)
        for name, arr in (("last", lasts), ("layers", lays)):
            tmp = f"{stem}.{name}.tmp.npy"
            np.save(tmp, np.concatenate(arr))
            Path(tmp).rename(f"{stem}.{name}.npy")
    bar.close()
    return out


class FeatureStore:
    """Rows of a dataset with their cached features, memory-mapped (bounded memory)."""

    def __init__(self, dataset_dir: StrPath, features_dir: StrPath, layers: tuple = ()) -> None:
        cached = json.loads((Path(features_dir) / "features.json").read_text())["layers"]
        self.pick = [cached.index(i) for i in layers]  # the requested layers, in order
        shards = sorted(Path(dataset_dir).glob("shard_*.npz"))
        if not shards:
            raise FileNotFoundError(f"no dataset shards (shard_*.npz) in {dataset_dir}")
        self.tokens, self.mask, self.last, self.layers = [], [], [], []
        for s in shards:
            z = np.load(s)
            stem = Path(features_dir) / s.stem
            if not Path(f"{stem}.last.npy").exists():
                raise FileNotFoundError(
                    f"features of {s.name} missing in {features_dir}: run cache_features first"
                )
            self.tokens.append(z["tokens"])
            self.mask.append(z["loss_mask"])
            self.last.append(np.load(f"{stem}.last.npy", mmap_mode="r"))
            self.layers.append(np.load(f"{stem}.layers.npy", mmap_mode="r"))
        sizes = [len(t) for t in self.tokens]
        self.offsets = np.cumsum([0] + sizes)
        self.rows = int(self.offsets[-1])

    def batch(self, idx: np.ndarray) -> Batch:
        """The rows `idx` (a tuple: tokens, mask, last, layers)."""
        parts = []
        for i in idx:
            s = int(np.searchsorted(self.offsets, i, side="right") - 1)
            r = int(i - self.offsets[s])
            parts.append((self.tokens[s][r], self.mask[s][r], self.last[s][r], self.layers[s][r]))
        t, m, la, ly = (np.stack(x) for x in zip(*parts))
        return Batch(t, m, la, np.swapaxes(ly[:, self.pick], 0, 1))
