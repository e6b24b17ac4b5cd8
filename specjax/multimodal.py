"""Vision-language targets on the host side: `VisionLanguageModel`, image / video
preprocessing, placeholder expansion, and the features -> prefill embeddings step that
`specjax.generate(..., images=...)` runs before the (unchanged, text) decode program.

The decode program never sees an image: the target's prefill reads `PrefillInput.embeds` at
the placeholder positions (`embed_mask`), and everything after it (KV cache, drafters,
verification) is the text path. So every drafter works with a VLM target and stays exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from specjax.model import Model, register_dir_loader
from specjax.models import compute_dtype, forward, init_cache, is_unrolled
from specjax.models import vlm as vlm_fns
from specjax.models.vlm import VLMConfig
from specjax.prefix_cache import PrefixCache
from specjax.vision_cache import FeatureCache, content_hash

# CLIP's preprocessing constants (OpenAI CLIP; what LLaVA's processors use).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_INPUTS = "a PIL image or a uint8 array of shape [H, W, 3]"


@dataclasses.dataclass(frozen=True, eq=False)
class VisionLanguageModel(Model):
    """A LLaVA / Video-LLaVA target: `params` / `config` are its language model (what the
    engine and drafters use, exactly as for a text model); the towers and projector live in
    `vision_params`. `feature_cache` holds projected features of images already seen."""

    vision_params: Any = None
    vlm_config: VLMConfig | None = None
    processor: Any = None  # the checkpoint's HF image processor, when it ships one
    feature_cache: FeatureCache = dataclasses.field(default_factory=FeatureCache)
    # K/V (and hidden states) of prompt prefixes up to their last image: see prefix_cache.py
    prefix_cache: PrefixCache = dataclasses.field(default_factory=PrefixCache)
    fingerprint: str = ""

    def logits(
        self,
        input_ids: ArrayLike | Sequence[int] | Sequence[Sequence[int]],
        pixel_values: ArrayLike | None = None,
        pixel_values_videos: ArrayLike | None = None,
    ) -> jax.Array:
        """Full causal forward without a KV cache, as HF's `model(input_ids, pixel_values=...,
        pixel_values_videos=...).logits`: [T] or [B, T] ids with expanded placeholders ->
        float32 logits [.., T, V]."""
        ids = np.asarray(input_ids, np.int64)
        squeeze = ids.ndim == 1
        ids = ids[None] if squeeze else ids
        embeds, mask = None, None
        if pixel_values is not None or pixel_values_videos is not None:
            items = split_pixel_values(
                self, [list(r) for r in ids], pixel_values, pixel_values_videos
            )
            embeds, mask = prefill_embeds(self, ids.astype(np.int32), items)
        elif (ids == self.vlm_config.image_token_id).any():
            raise ValueError(
                "input_ids hold image placeholder tokens but no pixel_values were given"
            )
        out = _full_logits_embeds(
            self.params, self.config, jnp.asarray(ids, jnp.int32), embeds, mask
        )
        return out[0] if squeeze else out


def _full_logits_impl(
    params: dict, cfg: Any, tokens: jax.Array, embeds: jax.Array | None, mask: jax.Array | None
) -> jax.Array:
    B, T = tokens.shape
    cache = init_cache(cfg, B, T, compute_dtype(params), per_layer=is_unrolled(params))
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits, _, _ = forward(
        params, cfg, tokens, positions, cache, fresh=True, embeds=embeds, embed_mask=mask
    )
    return logits


_full_logits_embeds = jax.jit(_full_logits_impl, static_argnums=1)


# ----------------------------------------------------------------------------- loading


def fingerprint(vparams: dict, cfg: VLMConfig, params: dict) -> str:
    """A digest of the config and a strided sample of every vision weight and the token
    embedding: part of every feature-cache key, so two models never share entries."""
    h = hashlib.sha256(repr(cfg).encode())
    for leaf in jax.tree.leaves(vparams) + [params["embed"]]:
        a = np.asarray(leaf, np.float32).reshape(-1)
        h.update(np.ascontiguousarray(a[:: max(1, a.size // 4096)]).tobytes())
    return h.hexdigest()[:32]


def is_vlm_dir(path: str) -> bool:
    """An HF LLaVA / Video-LLaVA checkpoint directory (config.json says so)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("model_type") in vlm_fns.VLM_TYPES
    except (OSError, ValueError, AttributeError):
        return False


def load_vlm(path: str, dtype: Any, layout: str) -> VisionLanguageModel:
    """An HF LLaVA / Video-LLaVA checkpoint directory -> VisionLanguageModel."""
    from checkpoints_convert.vlm_hf import load_vlm_dir
    from specjax.model import _maybe_tokenizer, _to_model, default_dtype, float_dtype

    target = default_dtype() if dtype is None else float_dtype(dtype, "load_model(dtype=...)")
    params, cfg, vnp = load_vlm_dir(path, np.dtype(target))
    text = _to_model(
        params,
        cfg.text,
        _maybe_tokenizer(path),
        os.path.basename(os.path.normpath(path)),
        target,
        layout,
    )
    vparams = jax.tree.map(lambda a: jnp.asarray(a, target), vnp)
    return VisionLanguageModel(
        params=text.params,
        config=text.config,
        tokenizer=text.tokenizer,
        name=text.name,
        vision_params=vparams,
        vlm_config=cfg,
        processor=_maybe_image_processor(path),
        fingerprint=fingerprint(vparams, cfg, text.params),
    )


def _maybe_image_processor(path: str) -> Any:
    if not os.path.exists(os.path.join(path, "preprocessor_config.json")):
        return None
    import transformers

    return transformers.AutoImageProcessor.from_pretrained(path)


# ----------------------------------------------------------------------------- preprocessing


def _as_rgb_array(image: Any, what: str) -> np.ndarray:
    """A PIL image or a uint8 [H, W, 3] array -> uint8 [H, W, 3]; a named error otherwise."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"))
    if isinstance(image, (np.ndarray, jax.Array)):
        a = np.asarray(image)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(f"{what} has shape {a.shape}; expected {IMAGE_INPUTS}")
        if a.dtype != np.uint8:
            raise ValueError(
                f"{what} has dtype {a.dtype}; expected {IMAGE_INPUTS} (pass already "
                f"normalized inputs as pixel_values=)"
            )
        return a
    raise ValueError(f"{what} is {type(image).__name__}; expected {IMAGE_INPUTS}")


def clip_preprocess(rgb: np.ndarray, size: int) -> np.ndarray:
    """CLIP preprocessing (what `CLIPImageProcessor` does with LLaVA's settings): resize the
    shorter side to `size` (bicubic), center crop size x size, scale to [0, 1], normalize
    with CLIP's mean and std -> float32 [3, size, size]."""
    from PIL import Image

    img = Image.fromarray(rgb)
    w, h = img.size
    # HF's shortest-edge rule: the long side is floored, not rounded
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, np.float32) / 255.0
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_image(model: VisionLanguageModel, image: Any, what: str) -> np.ndarray:
    rgb = _as_rgb_array(image, what)
    if model.processor is not None:
        pv = model.processor(images=[rgb], return_tensors="np")["pixel_values"]
        return np.asarray(pv[0], np.float32)
    return clip_preprocess(rgb, model.vlm_config.vision.image_size)


def preprocess_video(model: VisionLanguageModel, frames: Any, what: str) -> np.ndarray:
    if isinstance(frames, (np.ndarray, jax.Array)) and np.ndim(frames) == 4:
        frames = list(np.asarray(frames))
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ValueError(
            f"{what} must be a non-empty list of frames (each {IMAGE_INPUTS}) or a uint8 "
            f"array [F, H, W, 3]"
        )
    return np.stack([preprocess_image(model, f, f"{what} frame {j}") for j, f in enumerate(frames)])


# ----------------------------------------------------------------------------- placeholders


@dataclasses.dataclass(frozen=True)
class Item:
    """One image ([C, H, W]) or video ([F, C, H, W]) of a prompt, preprocessed."""

    kind: str  # "image" or "video"
    pixels: np.ndarray
    raw: Any = None  # the image (or frames) as given, for a drafter that preprocesses its own


def _n_tokens(model: VisionLanguageModel, item: Item) -> int:
    cfg = model.vlm_config
    return cfg.image_tokens if item.kind == "image" else cfg.video_tokens(item.pixels.shape[0])


def expand_placeholders(
    model: VisionLanguageModel, i: int, ids: list[int], items: list[Item]
) -> list[int]:
    """Prompt `i`'s ids with each image / video placeholder expanded to its feature count. A
    prompt may hold one placeholder per item (expanded here) or exactly the expanded count
    (as HF processors write them); anything else is an error naming both counts."""
    cfg = model.vlm_config
    out = list(ids)
    for kind, tid in (("image", cfg.image_token_id), ("video", cfg.video_token_id)):
        mine = [it for it in items if it.kind == kind]
        have = sum(1 for t in out if t == tid) if tid is not None else 0
        need = sum(_n_tokens(model, it) for it in mine)
        if have == need:
            continue
        if have != len(mine):
            raise ValueError(
                f"prompt {i} has {have} {kind} placeholder token(s) (id {tid}) but "
                f"{len(mine)} {kind}(s): give one placeholder per {kind} (expanded to its "
                f"{kind} tokens) or exactly {need} (already expanded)"
            )
        counts = iter([_n_tokens(model, it) for it in mine])
        expanded = []
        for t in out:
            expanded += [t] * next(counts) if t == tid else [t]
        out = expanded
    return out


def normalize_items(model: Model, n_rows: int, images: Any, videos: Any) -> list[list[Item]] | None:
    """`images` / `videos` of generate -> per row, its items preprocessed (images of a row
    before its videos: a row's placeholders are matched per kind, in order)."""
    if images is None and videos is None:
        return None
    if not isinstance(model, VisionLanguageModel):
        raise ValueError(
            f"images/videos were given but model {model.name!r} is a text-only model; load "
            f"a LLaVA or Video-LLaVA checkpoint to pass images"
        )
    if videos is not None and not model.vlm_config.has_video:
        raise ValueError(
            f"videos were given but {model.name!r} ({model.vlm_config.model_type}) takes "
            f"images only"
        )
    rows: list[list[Item]] = [[] for _ in range(n_rows)]
    for kind, given in (("image", images), ("video", videos)):
        if given is None:
            continue
        per_row = _per_row(given, n_rows, kind)
        for r, lst in enumerate(per_row):
            for j, x in enumerate(lst):
                what = f"{kind} {j} of prompt {r}"
                px = (
                    preprocess_image(model, x, what)
                    if kind == "image"
                    else preprocess_video(model, x, what)
                )
                rows[r].append(Item(kind, px, raw=x))
    return rows


def _is_single(x: Any, kind: str) -> bool:
    if hasattr(x, "convert") and hasattr(x, "size"):
        return True
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.ndim(x) == (3 if kind == "image" else 4)
    return False


def _per_row(given: Any, n_rows: int, kind: str) -> list[list]:
    if _is_single(given, kind):
        given = [[given]]
    if not isinstance(given, (list, tuple)):
        raise ValueError(
            f"{kind}s must be a list (one entry per prompt), got {type(given).__name__}"
        )
    if (
        n_rows == 1
        and given
        and all(_is_single(x, kind) or kind == "video" and _looks_like_frames(x) for x in given)
    ):
        given = [list(given)]
    if len(given) != n_rows:
        raise ValueError(
            f"{kind}s has {len(given)} entries for {n_rows} prompt(s): give one list per prompt"
        )
    out = []
    for x in given:
        if x is None:
            out.append([])
        elif _is_single(x, kind):
            out.append([x])
        elif isinstance(x, (list, tuple)):
            out.append(list(x))
        else:
            raise ValueError(
                f"each entry of {kind}s must be a list of {kind}s, got {type(x).__name__}"
            )
    return out


def _looks_like_frames(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(_is_single(f, "image") for f in x)


def split_pixel_values(
    model: VisionLanguageModel, rows: list[list[int]], pixel_values: Any, pixel_values_videos: Any
) -> list[list[Item]]:
    """Already-processed `pixel_values` [N, C, H, W] (and `pixel_values_videos` [N, F, C, H,
    W]) with token-id prompts whose placeholders are expanded (HF processor output) -> per row
    its items, assigned in row order as HF's `masked_scatter` does."""
    cfg = model.vlm_config
    if not isinstance(model, VisionLanguageModel):
        raise ValueError(f"pixel_values were given but {model.name!r} is a text-only model")
    out: list[list[Item]] = [[] for _ in rows]
    for kind, given, tid in (
        ("image", pixel_values, cfg.image_token_id),
        ("video", pixel_values_videos, cfg.video_token_id),
    ):
        if given is None:
            continue
        if kind == "video" and not cfg.has_video:
            raise ValueError(f"pixel_values_videos were given but {model.name!r} takes images only")
        arr = np.asarray(given, np.float32)
        C, S = cfg.vision.num_channels, cfg.vision.image_size
        want = (C, S, S)
        ndim = 4 if kind == "image" else 5
        if arr.ndim != ndim or arr.shape[-3:] != want:
            name = "pixel_values" if kind == "image" else "pixel_values_videos"
            shape = "[N, C, H, W]" if kind == "image" else "[N, F, C, H, W]"
            raise ValueError(
                f"{name} has shape {arr.shape}; expected {shape} with (C, H, W) = {want}"
            )
        per = cfg.image_tokens if kind == "image" else cfg.video_tokens(arr.shape[1])
        counts = [sum(1 for t in r if t == tid) for r in rows]
        if any(c % per for c in counts) or sum(counts) != per * arr.shape[0]:
            raise ValueError(
                f"{kind} placeholder counts per prompt {counts} do not match {arr.shape[0]} "
                f"{kind}(s) of {per} tokens each: with pixel values the prompts must hold the "
                f"expanded placeholders (as the HF processor writes them)"
            )
        k = 0
        for r, c in enumerate(counts):
            for _ in range(c // per):
                out[r].append(Item(kind, arr[k]))
                k += 1
    return out


# ----------------------------------------------------------------------------- features


def item_features(
    model: VisionLanguageModel, items: list[Item]
) -> tuple[list[jax.Array], list[int]]:
    """-> (projected features [T, D] of each distinct item, the index of each item's among
    them), through the model's feature cache: each distinct item that misses runs its tower
    once (a call's misses batched per kind)."""
    cache = model.feature_cache
    keys = [content_hash(it.pixels, it.kind, model.fingerprint) for it in items]
    order = list(dict.fromkeys(keys))  # distinct keys, first appearance first
    found: dict[str, jax.Array] = {}
    todo: dict[str, Item] = {}
    first = dict(zip(reversed(keys), reversed(items)))
    for k in order:
        x = cache.get(k)
        if x is None:
            todo[k] = first[k]
        else:
            found[k] = x
    cache.stats.hits += len(keys) - len(order)  # repeats within the call: encoded once
    for kind in ("image", "video"):
        group = [(k, it) for k, it in todo.items() if it.kind == kind]
        # videos of different frame counts cannot share one batch
        for shape in sorted({it.pixels.shape for _, it in group}):
            same = [(k, it) for k, it in group if it.pixels.shape == shape]
            t0 = time.perf_counter()
            feats = encode(model, kind, np.stack([it.pixels for _, it in same]))
            jax.block_until_ready(feats)
            cache.stats.encode_s += time.perf_counter() - t0
            cache.stats.encoded += len(same)
            for j, (k, _) in enumerate(same):
                found[k] = feats[j]
                cache.put(k, feats[j])
    where = {k: i for i, k in enumerate(order)}
    return [found[k] for k in order], [where[k] for k in keys]


def encode(model: VisionLanguageModel, kind: str, pixels: np.ndarray) -> jax.Array:
    """Run a tower + projector over a stack of items -> [N, T, D]. The stack is padded to a
    power of two, so a tower compiles once per bucket, not per image count."""
    n = pixels.shape[0]
    b = 1 << (n - 1).bit_length()
    pad = np.zeros((b - n, *pixels.shape[1:]), np.float32)
    x = jnp.asarray(np.concatenate([pixels, pad]), model.dtype)
    fn = vlm_fns.image_features_jit if kind == "image" else vlm_fns.video_features_jit
    TOWER_RUNS[kind] += 1
    return fn(model.vision_params, model.vlm_config, x)[:n]


# Tower calls per kind (tests read it: a cached image runs no tower).
TOWER_RUNS: dict[str, int] = {"image": 0, "video": 0}


def prefill_embeds(
    model: VisionLanguageModel, tokens: np.ndarray, items: list[list[Item]]
) -> tuple[jax.Array, jax.Array]:
    """Padded prompts [B, P] (rows past len(items) are padding) -> (embeds [B, P, D], mask
    [B, P]): each row's item features, in order per kind, at its placeholder positions."""
    cfg = model.vlm_config
    B, P = tokens.shape
    flat = [it for row in items for it in row]
    feats, which = item_features(model, flat)
    # One table of each distinct item's feature vectors, plus a zero row for text positions.
    sizes = [f.shape[0] for f in feats]
    first = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    starts = [first[w] for w in which]  # table row of each item's first vector
    D = model.config.hidden_size
    table = jnp.concatenate(
        [f.astype(model.dtype) for f in feats] + [jnp.zeros((1, D), model.dtype)]
    )
    index = np.full((B, P), int(first[-1]), np.int32)
    k0 = 0
    for r, row in enumerate(items):
        for kind, tid in (("image", cfg.image_token_id), ("video", cfg.video_token_id)):
            mine = [k0 + j for j, it in enumerate(row) if it.kind == kind]
            pos = np.flatnonzero(tokens[r] == tid) if tid is not None else np.zeros(0, np.int64)
            rows_of = [starts[k] + np.arange(_n_tokens(model, flat[k])) for k in mine]
            src = np.concatenate(rows_of) if rows_of else np.zeros(0, np.int64)
            if len(src) != len(pos):
                raise ValueError(
                    f"prompt {r} has {len(pos)} {kind} placeholder tokens but its {kind}s "
                    f"have {len(src)} feature vectors"
                )
            index[r, pos] = src
        k0 += len(row)
    ids = [t for t in (cfg.image_token_id, cfg.video_token_id) if t is not None]
    return jnp.take(table, jnp.asarray(index), axis=0), jnp.asarray(np.isin(tokens, ids))


def prepare_rows(
    model: Model,
    rows: list[list[int]],
    images: Any = None,
    videos: Any = None,
    pixel_values: Any = None,
    pixel_values_videos: Any = None,
) -> tuple[list[list[int]], list[list[Item]] | None]:
    """generate's multimodal inputs -> (rows with placeholders expanded, per-row items or None
    for a text-only call), with the errors a user needs for mismatched inputs."""
    raw = images is not None or videos is not None
    processed = pixel_values is not None or pixel_values_videos is not None
    if raw and processed:
        raise ValueError("pass images=/videos= or pixel_values=/pixel_values_videos=, not both")
    if raw:
        items = normalize_items(model, len(rows), images, videos)
        rows = [expand_placeholders(model, i, r, it) for i, (r, it) in enumerate(zip(rows, items))]
        return rows, items
    if processed:
        if not isinstance(model, VisionLanguageModel):
            raise ValueError(f"pixel_values were given but {model.name!r} is a text-only model")
        return rows, split_pixel_values(model, rows, pixel_values, pixel_values_videos)
    if isinstance(model, VisionLanguageModel):
        cfg = model.vlm_config
        for i, r in enumerate(rows):
            for kind, tid in (("image", cfg.image_token_id), ("video", cfg.video_token_id)):
                if tid is not None and tid in r:
                    raise ValueError(
                        f"prompt {i} holds {kind} placeholder tokens (id {tid}) but no "
                        f"{kind}s were given: pass {kind}s= (or pixel_values)"
                    )
    return rows, None


def open_images(paths: Sequence[str]) -> list:
    """Image files -> PIL images (RGB), with an error naming a file that cannot be read."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"cannot read image {p!r}: {e}") from None
    return out


def with_placeholders(model: Model, prompt: str, n: int) -> str:
    """`prompt` with n image placeholders in front when it holds none (as LLaVA prompts put
    the image before the question); unchanged when it already holds some."""
    if not isinstance(model, VisionLanguageModel):
        raise ValueError(f"--image needs a LLaVA-style model; {model.name!r} is a text-only model")
    if model.tokenizer is None:
        raise ValueError(f"model {model.name!r} has no tokenizer: pass token ids and images")
    tag = model.tokenizer.convert_ids_to_tokens(model.vlm_config.image_token_id)
    return prompt if tag in prompt else tag * n + "\n" + prompt


def drafter_embeds(
    draft: VisionLanguageModel, target: Model, tokens: np.ndarray, items: list[list[Item]]
) -> jax.Array:
    """A small vision-language drafter's own features at the target's placeholders ->
    [B, P, Dd] (its tower, its feature cache, its preprocessing)."""
    if not isinstance(target, VisionLanguageModel):
        raise ValueError(f"drafter {draft.name!r} encodes images but the target is text-only")
    dc, tc = draft.vlm_config, target.vlm_config
    same = (dc.image_token_id, dc.video_token_id, dc.image_tokens) == (
        tc.image_token_id,
        tc.video_token_id,
        tc.image_tokens,
    )
    if not same:
        raise ValueError(
            f"drafter {draft.name!r} cannot share the target's image placeholders: placeholder "
            f"ids {dc.image_token_id}/{dc.video_token_id} and {dc.image_tokens} tokens per "
            f"image against the target's {tc.image_token_id}/{tc.video_token_id} and "
            f"{tc.image_tokens}"
        )

    def own(it: Item) -> Item:
        if it.raw is None:  # given as pixel_values: usable only at the drafter's image size
            if it.pixels.shape[-1] != dc.vision.image_size:
                raise ValueError(
                    f"pixel_values of size {it.pixels.shape[-1]} cannot feed drafter "
                    f"{draft.name!r} (image size {dc.vision.image_size}): pass images= instead"
                )
            return it
        what = f"{it.kind} for drafter {draft.name!r}"
        prep = preprocess_image if it.kind == "image" else preprocess_video
        return Item(it.kind, prep(draft, it.raw, what), raw=it.raw)

    embeds, _ = prefill_embeds(draft, tokens, [[own(it) for it in row] for row in items])
    return embeds


# `load_model(dir)` of a LLaVA / Video-LLaVA checkpoint returns a VisionLanguageModel.
register_dir_loader(is_vlm_dir, load_vlm)
