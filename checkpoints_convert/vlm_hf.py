"""HF LLaVA / Video-LLaVA checkpoints -> (language model params, vision params, VLMConfig).

Checkpoints come in two key layouts, both accepted:
    transformers >= 5   model.language_model.*, lm_head.*, model.vision_tower.*,
                        model.multi_modal_projector.* (Video-LLaVA: model.image_tower.*,
                        model.video_tower.*)
    older               language_model.model.*, language_model.lm_head.*,
                        vision_tower[.vision_model].*, multi_modal_projector.*
Names are first made canonical (`canonical_name`); the language model then goes through the
text converter (`checkpoints_convert.hf`, every tensor used, every shape checked) and the
towers and projector through the literal maps below. Encoder layers deeper than the deepest
feature layer, and `post_layernorm`, are never read by a LLaVA: they are skipped, not loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import numpy as np

from checkpoints_convert.hf import (
    CheckpointMismatch,
    SafetensorsFile,
    convert_state_dict,
    read_hf_config,
    read_hf_dir,
    stream_hf_dir,
)
from specjax.models import vision, vlm
from specjax.models.vlm import VLMConfig

_RENAMES = (
    (re.compile(r"^(?:model\.)?language_model\.model\."), "model."),
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^(?:language_model\.)?lm_head\."), "lm_head."),
    (re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?"), "image_tower."),
    (re.compile(r"^(?:model\.)?image_tower\.(?:vision_model\.)?"), "image_tower."),
    (re.compile(r"^(?:model\.)?video_tower\.(?:vision_model\.)?"), "video_tower."),
    (re.compile(r"^(?:model\.)?multi_modal_projector\."), "projector."),
)

# Tower-level HF name -> (our name, how: None as is, "T" transposed, "conv" the patch conv).
TOWER_TOP = {
    "embeddings.class_embedding": ("cls", None),
    "embeddings.patch_embedding.weight": ("patch", "conv"),
    "embeddings.position_embedding.weight": ("pos", None),
    "pre_layrnorm.weight": ("pre_w", None),
    "pre_layrnorm.bias": ("pre_b", None),
}
TOWER_DEAD = ("post_layernorm.weight", "post_layernorm.bias", "embeddings.position_ids")
TOWER_LAYER = {
    "layer_norm1.weight": ("ln1_w", None),
    "layer_norm1.bias": ("ln1_b", None),
    "self_attn.q_proj.weight": ("wq", "T"),
    "self_attn.k_proj.weight": ("wk", "T"),
    "self_attn.v_proj.weight": ("wv", "T"),
    "self_attn.q_proj.bias": ("bq", None),
    "self_attn.k_proj.bias": ("bk", None),
    "self_attn.v_proj.bias": ("bv", None),
    "self_attn.out_proj.weight": ("wo", "T"),
    "self_attn.out_proj.bias": ("bo", None),
    "layer_norm2.weight": ("ln2_w", None),
    "layer_norm2.bias": ("ln2_b", None),
    "mlp.fc1.weight": ("fc1", "T"),
    "mlp.fc1.bias": ("b1", None),
    "mlp.fc2.weight": ("fc2", "T"),
    "mlp.fc2.bias": ("b2", None),
}
PROJECTOR = {
    "linear_1.weight": ("w1", "T"),
    "linear_1.bias": ("b1", None),
    "linear_2.weight": ("w2", "T"),
    "linear_2.bias": ("b2", None),
}
_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def canonical_name(name: str) -> str:
    """A checkpoint key of either layout -> model.* / lm_head.* (the language model, as the
    text converter names it), image_tower.* / video_tower.* or projector.*."""
    for pattern, repl in _RENAMES:
        if pattern.match(name):
            return pattern.sub(repl, name, count=1)
    return name


def is_vlm_config(hf: dict) -> bool:
    return hf.get("model_type") in vlm.VLM_TYPES


def _tensor_sources(path: str) -> tuple[dict, bool]:
    """-> ({checkpoint name: (shape, read())}, streamed?) for a checkpoint directory."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if files:
        out = {}
        for f in files:
            st = SafetensorsFile(os.path.join(path, f))
            for n in st.entries:
                out[n] = (st.shape(n), lambda st=st, n=n: st.read(n))
        return out, True
    state = read_hf_dir(path)  # .bin: read whole (raises naming the files it found)
    return {n: (np.shape(a), lambda a=a: np.asarray(a)) for n, a in state.items()}, False


def plan_vision(shapes: dict[str, tuple], cfg: VLMConfig) -> dict[str, list]:
    """Canonical vision names -> {our param: [(name, how)] (one per layer for layers/*)}.
    Every tensor must be used or be dead weight; every shape must match."""
    want = vlm.param_shapes(cfg)
    L = cfg.vision.num_layers
    towers = ("image_tower", "video_tower") if cfg.has_video else ("image_tower",)
    plan: dict[str, list] = {}
    unused = []

    def shape_of(shape: tuple, how: str | None) -> tuple:
        if how == "T":
            return tuple(reversed(shape))
        if how == "conv":  # [D, C, p, p] -> [C*p*p, D]
            return (int(np.prod(shape[1:])), shape[0]) if len(shape) == 4 else tuple(shape)
        return tuple(shape)

    def add(key: str, name: str, how: str | None, shape: tuple, expect: tuple) -> None:
        if shape_of(shape, how) != tuple(expect):
            raise CheckpointMismatch(
                f"checkpoint tensor {name!r} has shape {tuple(shape)}; this config expects "
                f"{tuple(expect)} for {key} (after layout change {how or 'none'})"
            )
        plan.setdefault(key, []).append((name, how))

    for name, shape in shapes.items():
        tower, _, rest = name.partition(".")
        if tower == "projector":
            if rest not in PROJECTOR or f"projector/{PROJECTOR[rest][0]}" not in want:
                unused.append(name)
                continue
            ours, how = PROJECTOR[rest]
            add(f"projector/{ours}", name, how, shape, want[f"projector/{ours}"])
            continue
        if tower not in towers:
            unused.append(name)
            continue
        if rest in TOWER_DEAD:
            continue
        if rest in TOWER_TOP:
            ours, how = TOWER_TOP[rest]
            add(f"{tower}/{ours}", name, how, shape, want[f"{tower}/{ours}"])
            continue
        m = _LAYER_RE.match(rest)
        if (
            not m
            or m.group(2) not in TOWER_LAYER
            or int(m.group(1)) >= cfg.vision.checkpoint_layers
        ):
            unused.append(name)
            continue
        if int(m.group(1)) >= L:
            continue  # deeper than any feature layer: never computed
        ours, how = TOWER_LAYER[m.group(2)]
        part = "qkv" if ours[1:] in ("q", "k", "v") else None
        fused = ("wqkv" if ours[0] == "w" else "bqkv") if part else ours
        D = cfg.vision.hidden_size
        expect = want[f"{tower}/layers/{fused}"][1:]
        if part:
            expect = (*expect[:-1], D)
        key = f"{tower}/layers/{ours}"
        plan.setdefault(key, [None] * L)
        if shape_of(shape, how) != tuple(expect):
            raise CheckpointMismatch(
                f"checkpoint tensor {name!r} has shape {tuple(shape)}; expected "
                f"{tuple(expect)} (after layout change {how or 'none'})"
            )
        plan[key][int(m.group(1))] = (name, how)
    if unused:
        raise CheckpointMismatch(
            f"{len(unused)} vision tensor(s) not used by a {cfg.model_type} model with this "
            f"config: {', '.join(sorted(unused)[:8])}{' ...' if len(unused) > 8 else ''}"
        )
    need = {k for k in want if "/layers/" not in k}
    need |= {f"{t}/layers/{ours}" for t in towers for ours, _ in TOWER_LAYER.values() if L > 0}
    missing = sorted(k for k in need if k not in plan)
    missing += sorted(
        f"{k}[layer {i}]"
        for k, v in plan.items()
        if "/layers/" in k
        for i, x in enumerate(v)
        if x is None
    )
    if missing:
        raise CheckpointMismatch(
            f"checkpoint is missing {len(missing)} vision tensor(s): {', '.join(missing[:8])}"
        )
    return plan


def _read(read: Callable[[], np.ndarray], how: str | None, dtype: np.dtype) -> np.ndarray:
    a = np.asarray(read(), np.float32)
    if how == "T":
        a = a.T
    elif how == "conv":
        a = a.reshape(a.shape[0], -1).T
    return np.ascontiguousarray(a.astype(dtype))


def convert_vision(sources: dict, cfg: VLMConfig, dtype: np.dtype) -> dict:
    """Canonical name -> (shape, read) of the towers and projector -> nested numpy params."""
    plan = plan_vision({n: s for n, (s, _) in sources.items()}, cfg)
    out: dict = {}
    for key, items in plan.items():
        if "/layers/" in key:
            arr = np.stack([_read(sources[n][1], how, dtype) for n, how in items])
        else:
            ((n, how),) = items
            arr = _read(sources[n][1], how, dtype)
        tower, _, rest = key.partition("/")
        out.setdefault(tower, {})
        if rest.startswith("layers/"):
            out[tower].setdefault("layers", {})[rest[7:]] = arr
        else:
            out[tower][rest] = arr
    for tower in out:
        layers = out[tower].get("layers")
        if layers is None:  # a feature layer of 0: the embeddings alone
            shapes = vision.param_shapes(cfg.vision)
            out[tower]["layers"] = {
                k[7:]: np.zeros(s, dtype) for k, s in shapes.items() if k.startswith("layers/")
            }
            continue
        for fused, parts in (("wqkv", ("wq", "wk", "wv")), ("bqkv", ("bq", "bk", "bv"))):
            layers[fused] = np.concatenate([layers.pop(p) for p in parts], axis=-1)
    return out


def load_vlm_dir(path: str, dtype: np.dtype, mesh: object = None) -> tuple[dict, VLMConfig, dict]:
    """An HF LLaVA / Video-LLaVA directory -> (language model params (device arrays when
    streamed from safetensors, else numpy), VLMConfig, vision params (numpy))."""
    cfg = VLMConfig.from_hf(read_hf_config(path))
    sources, streamed = _tensor_sources(path)
    canon = {n: canonical_name(n) for n in sources}
    is_lm = {n for n, c in canon.items() if c.startswith(("model.", "lm_head."))}
    vis = {canon[n]: sources[n] for n in sources if n not in is_lm}
    vparams = convert_vision(vis, cfg, dtype)
    if streamed:
        params, _ = stream_hf_dir(
            path, dtype, mesh, cfg=cfg.text, names=lambda n: canon[n] if n in is_lm else None
        )
    else:
        state = {canon[n]: sources[n][1]() for n in is_lm}
        params = convert_state_dict(state, cfg.text, dtype)
    return params, cfg, vparams
