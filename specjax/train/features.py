"""The target's features over a dataset, computed once and cached to disk as memory-mapped
`.npy` shards (`cache_features`), and read back a batch at a time (`FeatureStore`), so training
holds one shard's worth of memory and never runs the target again.

What a drafter kind needs from the cache is its recipe's `feature_layers(cfg)`: the final hidden
state is always stored; EAGLE-3 adds the target layers its fc fuses."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from specjax.models import compute_dtype, forward_hidden
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
    # Image rows of a vision-language target: the features at the placeholder positions
    # [B, S, D] and where they are [B, S] (None for text datasets)
    embeds: np.ndarray | None = None
    emask: np.ndarray | None = None


def _feature_fn(target: Model, layers: tuple) -> Callable[..., tuple[jax.Array, jax.Array | None]]:
    """Jitted (params, tokens [B, S], embeds [B, S, D] | None, emask [B, S] | None) ->
    (last [B, S, D], layers [n, B, S, D] or None)."""
    cfg = target.config

    @jax.jit
    def run(
        params: dict, tokens: jax.Array, embeds: jax.Array | None, emask: jax.Array | None
    ) -> tuple[jax.Array, jax.Array | None]:
        B, S = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        cache = init_cache(
            cfg, B, S, compute_dtype(params), per_layer=isinstance(params["layers"], (list, tuple))
        )
        hid, _ = forward_hidden(
            params,
            cfg,
            tokens,
            pos,
            cache,
            hidden_layers=layers,
            fresh=True,
            embeds=embeds,
            embed_mask=emask,
        )
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
        z = np.load(s)
        toks = z["tokens"]
        stem = out / s.stem
        images = "pixels" in z.files
        names = ("last", "layers") + (("embeds", "emask") if images else ())
        if all(Path(f"{stem}.{n}.npy").exists() for n in names):
            bar.update(len(toks))
            continue
        lasts, lays, embs, masks = [], [], [], []
        for b in range(0, len(toks), batch):
            chunk = toks[b : b + batch]
            pad = batch - len(chunk)  # one compiled shape
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            emb = emask = None
            if images:  # a vision-language target: its image features at the placeholders
                resp = z["loss_mask"][b : b + batch]
                resp = np.concatenate([resp, np.zeros((pad,) + resp.shape[1:], bool)])
                emb, emask = image_embeds(target, z, b, np.where(resp, -1, chunk))
                embs.append(np.asarray(emb[: batch - pad], dtype))
                masks.append(np.asarray(emask[: batch - pad]))
            last, lay = run(target.params, jnp.asarray(chunk), emb, emask)
            lasts.append(np.asarray(last[: batch - pad], dtype))
            lay = (
                np.zeros((batch, 0) + last.shape[1:], dtype)
                if lay is None
                else np.asarray(jnp.swapaxes(lay, 0, 1), dtype)
            )
            lays.append(lay[: batch - pad])
            bar.update(batch - pad)
        for name, arr in (("last", lasts), ("layers", lays), ("embeds", embs), ("emask", masks)):
            if not arr:
                continue
            tmp = f"{stem}.{name}.tmp.npy"
            np.save(tmp, np.concatenate(arr))
            Path(tmp).rename(f"{stem}.{name}.npy")
    bar.close()
    return out


def image_embeds(
    target: Model, shard: Any, start: int, chunk: np.ndarray
) -> tuple[jax.Array, jax.Array]:
    """Rows [start, start + len(chunk)) of an image dataset shard (`pixels` [N, C, H, W] and
    `image_row` [N], each image's row) -> (embeds [b, S, D], mask [b, S]) as the target's
    prefill sees them (padding rows have no images). `chunk` holds -1 over the responses: a
    placeholder id the target generated is a plain token, as at decode time."""
    from specjax.multimodal import Item, prefill_embeds

    rows = shard["image_row"]
    items = [
        [Item("image", shard["pixels"][i]) for i in np.flatnonzero(rows == start + r)]
        for r in range(len(chunk))
    ]
    return prefill_embeds(target, chunk, items)


class FeatureStore:
    """Rows of a dataset with their cached features, memory-mapped (bounded memory)."""

    def __init__(self, dataset_dir: StrPath, features_dir: StrPath, layers: tuple = ()) -> None:
        cached = json.loads((Path(features_dir) / "features.json").read_text())["layers"]
        self.pick = [cached.index(i) for i in layers]  # the requested layers, in order
        shards = sorted(Path(dataset_dir).glob("shard_*.npz"))
        if not shards:
            raise FileNotFoundError(f"no dataset shards (shard_*.npz) in {dataset_dir}")
        self.tokens, self.mask, self.last, self.layers = [], [], [], []
        self.embeds, self.emask = [], []
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
            images = Path(f"{stem}.embeds.npy").exists()
            self.embeds.append(np.load(f"{stem}.embeds.npy", mmap_mode="r") if images else None)
            self.emask.append(np.load(f"{stem}.emask.npy") if images else None)
        sizes = [len(t) for t in self.tokens]
        self.offsets = np.cumsum([0] + sizes)
        self.rows = int(self.offsets[-1])

    def batch(self, idx: np.ndarray) -> Batch:
        """The rows `idx` (a tuple: tokens, mask, last, layers)."""
        parts, images = [], []
        for i in idx:
            s = int(np.searchsorted(self.offsets, i, side="right") - 1)
            r = int(i - self.offsets[s])
            parts.append((self.tokens[s][r], self.mask[s][r], self.last[s][r], self.layers[s][r]))
            if self.embeds[s] is not None:
                images.append((self.embeds[s][r], self.emask[s][r]))
            else:  # a text shard of an image dataset: no features to put anywhere
                images.append((np.zeros_like(self.last[s][r]), np.zeros(len(parts[-1][0]), bool)))
        t, m, la, ly = (np.stack(x) for x in zip(*parts))
        emb = emask = None
        if any(e is not None for e in self.embeds):
            emb, emask = (np.stack(x) for x in zip(*images))
        return Batch(t, m, la, np.swapaxes(ly[:, self.pick], 0, 1), emb, emask)
