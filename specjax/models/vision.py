"""CLIP vision tower (HF `CLIPVisionModel`) as pure functions, run only as deep as needed.

LLaVA-style models read the residual stream of one or a few encoder layers (HF
`vision_feature_layer`, an index into `hidden_states`: 0 is the embeddings after `pre_layrnorm`,
i the output of layer i - 1, negative from the end). Layers after the deepest one read, and
`post_layernorm`, are dead weight: the converter skips them and `hidden_states` runs only
`VisionConfig.num_layers` layers.

Params (layers stacked on a leading axis L and run with `lax.scan`: a tower runs once per image,
so its per-call slicing cost is irrelevant and the compile stays independent of depth):

    patch   [C*p*p, D]    the patch convolution as a matrix over flattened (c, y, x) patches
    cls     [D]           class embedding
    pos     [N + 1, D]    position embeddings (CLS first)
    pre_w, pre_b [D]      pre_layrnorm
    layers/ln1_w, ln1_b [L, D]   layers/wqkv [L, D, 3D]  layers/bqkv [L, 3D]
    layers/wo [L, D, D]  layers/bo [L, D]   layers/ln2_w, ln2_b [L, D]
    layers/fc1 [L, D, F] layers/b1 [L, F]   layers/fc2 [L, F, D]  layers/b2 [L, D]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


# HF `ACT2FN` names -> functions (the ones CLIP towers and LLaVA projectors use).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str, what: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported {what} {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The part of an HF `CLIPVisionConfig` the tower needs. `num_layers` is how many encoder
    layers are run (and converted): the deepest one a feature layer reads, not the checkpoint's
    `num_hidden_layers` (kept as `checkpoint_layers`)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    checkpoint_layers: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self) -> None:
        activation(self.hidden_act, "vision hidden_act")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not divisible by its "
                f"{self.num_heads} heads"
            )
        if not 0 <= self.num_layers <= self.checkpoint_layers:
            raise ValueError(
                f"vision num_layers {self.num_layers} must be in [0, {self.checkpoint_layers}]"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @classmethod
    def from_hf(cls, hf: dict, num_layers: int) -> VisionConfig:
        return cls(
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_heads=hf["num_attention_heads"],
            num_layers=num_layers,
            checkpoint_layers=hf["num_hidden_layers"],
            image_size=hf["image_size"],
            patch_size=hf["patch_size"],
            num_channels=hf.get("num_channels", 3),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
            hidden_act=hf.get("hidden_act", "quick_gelu"),
        )


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    return ((xf - mu) * jax.lax.rsqrt(var + eps)).astype(x.dtype) * w + b


def patchify(pixels: jax.Array, patch: int) -> jax.Array:
    """[N, C, H, W] -> [N, (H/p)(W/p), C*p*p], patches row-major over the grid and each
    flattened in (c, y, x) order: the order of a torch Conv2d weight [D, C, p, p]."""
    N, C, H, W = pixels.shape
    x = pixels.reshape(N, C, H // patch, patch, W // patch, patch)  # n c gy y gx x
    x = x.transpose(0, 2, 4, 1, 3, 5)  # n gy gx c y x
    return x.reshape(N, (H // patch) * (W // patch), C * patch * patch)


def embed_patches(params: dict, cfg: VisionConfig, pixels: jax.Array) -> jax.Array:
    """pixel_values [N, C, H, W] -> hidden_states[0] [N, 1 + patches, D] (after pre_layrnorm)."""
    N = pixels.shape[0]
    x = patchify(pixels.astype(params["patch"].dtype), cfg.patch_size) @ params["patch"]
    cls = jnp.broadcast_to(params["cls"], (N, 1, cfg.hidden_size))
    h = jnp.concatenate([cls, x], axis=1) + params["pos"][None]
    return layer_norm(h, params["pre_w"], params["pre_b"], cfg.layer_norm_eps)


def encoder_layer(lp: dict, cfg: VisionConfig, h: jax.Array) -> jax.Array:
    """One pre-norm CLIP encoder layer over [N, T, D] (full attention, no mask)."""
    N, T, D = h.shape
    H = cfg.num_heads
    hd = D // H
    x = layer_norm(h, lp["ln1_w"], lp["ln1_b"], cfg.layer_norm_eps)
    qkv = x @ lp["wqkv"] + lp["bqkv"]  # [N, T, 3D]
    q, k, v = (a.reshape(N, T, H, hd) for a in jnp.split(qkv, 3, axis=-1))
    s = jnp.einsum("nthd,nshd->nhts", q, k).astype(jnp.float32) * hd**-0.5
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("nhts,nshd->nthd", p, v).reshape(N, T, D)
    h = h + o @ lp["wo"] + lp["bo"]
    x = layer_norm(h, lp["ln2_w"], lp["ln2_b"], cfg.layer_norm_eps)
    x = activation(cfg.hidden_act, "vision hidden_act")(x @ lp["fc1"] + lp["b1"])
    return h + x @ lp["fc2"] + lp["b2"]


def hidden_states(
    params: dict, cfg: VisionConfig, pixels: jax.Array, layers: Sequence[int]
) -> list[jax.Array]:
    """HF `hidden_states[i]` [N, 1 + patches, D] for each i in `layers` (0 <= i <=
    cfg.num_layers), running the encoder only as deep as the largest i."""
    h = embed_patches(params, cfg, pixels)
    want = sorted(set(layers))
    out = {0: h} if 0 in want else {}
    if want and want[-1] > 0:

        def body(h: jax.Array, lp: dict) -> tuple[jax.Array, jax.Array]:
            h = encoder_layer(lp, cfg, h)
            return h, h

        depth = want[-1]
        stack = jax.tree.map(lambda a: a[:depth], params["layers"])
        _, hs = jax.lax.scan(body, h, stack)  # [depth, N, T, D]
        out.update({i: hs[i - 1] for i in want if i > 0})
    return [out[i] for i in layers]


def resolve_layers(feature_layer: int | Sequence[int], checkpoint_layers: int) -> tuple:
    """HF `vision_feature_layer` (an int or a list; negative counts from the end of the
    checkpoint's L + 1 hidden states) -> non-negative indices."""
    raw = (feature_layer,) if isinstance(feature_layer, int) else tuple(feature_layer)
    n = checkpoint_layers + 1
    out = []
    for i in raw:
        if not isinstance(i, int) or not -n <= i < n:
            raise ValueError(
                f"vision_feature_layer {feature_layer!r}: each index must be an int in "
                f"[{-n}, {n}) for a tower of {checkpoint_layers} layers"
            )
        out.append(i % n)
    return tuple(out)


def param_shapes(cfg: VisionConfig) -> dict[str, Any]:
    """Our param name -> shape (layers/* with the leading L)."""
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    C, p = cfg.num_channels, cfg.patch_size
    return {
        "patch": (C * p * p, D),
        "cls": (D,),
        "pos": (cfg.num_patches + 1, D),
        "pre_w": (D,),
        "pre_b": (D,),
        "layers/ln1_w": (L, D),
        "layers/ln1_b": (L, D),
        "layers/wqkv": (L, D, 3 * D),
        "layers/bqkv": (L, 3 * D),
        "layers/wo": (L, D, D),
        "layers/bo": (L, D),
        "layers/ln2_w": (L, D),
        "layers/ln2_b": (L, D),
        "layers/fc1": (L, D, F),
        "layers/b1": (L, F),
        "layers/fc2": (L, F, D),
        "layers/b2": (L, D),
    }
