"""LLaVA-style vision-language models (HF `LlavaForConditionalGeneration`,
`VideoLlavaForConditionalGeneration`): a CLIP tower, a two-layer projector, and a language
model of any registered family. Image features replace the token embeddings at the image
placeholder positions (HF `masked_scatter`, row-major over the batch), and from there the
language model runs exactly as for text: the engine, the KV cache and every drafter are the
text ones, fed `PrefillInput.embeds` / `embed_mask`.

Vision params (`VisionLanguageModel.vision_params`):

    image_tower   the CLIP tower (specjax.models.vision) images go through
    video_tower   Video-LLaVA only: a second tower for video frames
    projector     w1 [Dv * n_feature_layers, D]  b1 [D]  w2 [D, D]  b2 [D]  (biases optional)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from specjax.models import vision
from specjax.models.config import ModelConfig
from specjax.models.vision import VisionConfig

VLM_TYPES = ("llava", "video_llava")
SELECT_STRATEGIES = ("default", "full")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    model_type: str  # "llava" or "video_llava"
    text: ModelConfig
    vision: VisionConfig  # both towers of a Video-LLaVA share it
    feature_layers: tuple  # non-negative hidden-state indices, concatenated in this order
    select: str  # "default" drops the CLS token of image features, "full" keeps it
    projector_act: str
    projector_bias: bool
    image_token_id: int
    video_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in VLM_TYPES:
            raise ValueError(f"unsupported VLM type {self.model_type!r}; valid: {VLM_TYPES}")
        if self.select not in SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy {self.select!r}; valid: {SELECT_STRATEGIES}"
            )
        vision.activation(self.projector_act, "projector_hidden_act")
        for name in ("image_token_id", "video_token_id"):
            tid = getattr(self, name)
            if tid is not None and not 0 <= tid < self.text.vocab_size:
                raise ValueError(
                    f"{name} {tid} is outside the language model's vocabulary "
                    f"[0, {self.text.vocab_size})"
                )

    @property
    def image_tokens(self) -> int:
        """Placeholder tokens (= feature vectors) per image."""
        return self.vision.num_patches + (self.select == "full")

    def video_tokens(self, frames: int) -> int:
        """Placeholder tokens per video of `frames` frames (video frames keep their CLS)."""
        return frames * (self.vision.num_patches + 1)

    @property
    def has_video(self) -> bool:
        return self.model_type == "video_llava"

    @classmethod
    def from_hf(cls, hf: dict) -> VLMConfig:
        """From an HF LLaVA / Video-LLaVA config.json dict."""
        mt = hf.get("model_type")
        if mt not in VLM_TYPES:
            raise ValueError(f"not a vision-language config: model_type {mt!r}")
        text_hf = dict(hf["text_config"])
        text_hf.setdefault("model_type", "llama")
        vhf = dict(hf["vision_config"])
        if vhf.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(
                f"unsupported vision tower {vhf.get('model_type')!r}; supported: clip_vision_model"
            )
        layer = hf.get("vision_feature_layer", -2)
        layers = vision.resolve_layers(layer, vhf["num_hidden_layers"])
        image_id = hf.get("image_token_index", hf.get("image_token_id"))
        video_id = hf.get("video_token_index", hf.get("video_token_id"))
        return cls(
            model_type=mt,
            text=ModelConfig.from_hf(text_hf),
            vision=VisionConfig.from_hf(vhf, num_layers=max(layers)),
            feature_layers=layers,
            select=hf.get("vision_feature_select_strategy", "default"),
            projector_act=hf.get("projector_hidden_act", "gelu"),
            projector_bias=bool(hf.get("multimodal_projector_bias", True)),
            image_token_id=int(image_id),
            video_token_id=None if mt != "video_llava" else int(video_id),
        )


def project(pp: dict, cfg: VLMConfig, feats: jax.Array) -> jax.Array:
    """The multimodal projector: linear_1 -> act -> linear_2 over [..., Dv * n_layers]."""
    act = vision.activation(cfg.projector_act, "projector_hidden_act")
    h = feats @ pp["w1"] + (pp["b1"] if cfg.projector_bias else 0)
    return act(h) @ pp["w2"] + (pp["b2"] if cfg.projector_bias else 0)


def _tower_features(tower: dict, cfg: VLMConfig, pixels: jax.Array, drop_cls: bool) -> jax.Array:
    hs = vision.hidden_states(tower, cfg.vision, pixels, cfg.feature_layers)
    if drop_cls:
        hs = [h[:, 1:] for h in hs]
    return jnp.concatenate(hs, axis=-1)  # [N, T, Dv * n_layers]


def image_features(vparams: dict, cfg: VLMConfig, pixels: jax.Array) -> jax.Array:
    """pixel_values [N, C, H, W] -> projected features [N, image_tokens, D] (HF
    `get_image_features`)."""
    feats = _tower_features(vparams["image_tower"], cfg, pixels, cfg.select == "default")
    return project(vparams["projector"], cfg, feats)


def video_features(vparams: dict, cfg: VLMConfig, videos: jax.Array) -> jax.Array:
    """pixel_values_videos [N, F, C, H, W] -> [N, F * (patches + 1), D]: each frame through
    the video tower, CLS kept (HF `get_video_features`)."""
    N, F = videos.shape[:2]
    feats = _tower_features(
        vparams["video_tower"], cfg, videos.reshape(N * F, *videos.shape[2:]), False
    )
    return project(vparams["projector"], cfg, feats).reshape(N, -1, cfg.text.hidden_size)


image_features_jit = jax.jit(image_features, static_argnums=1)
video_features_jit = jax.jit(video_features, static_argnums=1)


def param_shapes(cfg: VLMConfig) -> dict[str, Any]:
    """Vision param name ("tower/name", "projector/name") -> shape."""
    towers = ("image_tower", "video_tower") if cfg.has_video else ("image_tower",)
    out = {f"{t}/{k}": s for t in towers for k, s in vision.param_shapes(cfg.vision).items()}
    Dv, D = cfg.vision.hidden_size * len(cfg.feature_layers), cfg.text.hidden_size
    out["projector/w1"] = (Dv, D)
    out["projector/w2"] = (D, D)
    if cfg.projector_bias:
        out["projector/b1"] = (D,)
        out["projector/b2"] = (D,)
    return out
