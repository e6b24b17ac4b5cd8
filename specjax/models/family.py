"""Model families: the seam through which the engine, drafters, trainer and converters reach a
model, so that a new family (a LLaVA-style VLM, Gemma) plugs in without touching them.

A `Family` names, for one HF `model_type`:
    config fields  what of an HF config is family-specific (on top of `ModelConfig.from_hf`)
    HF name map    checkpoint tensor names -> param names (+ which are transposed)
    functions      forward / forward_hidden / lm_head over the family's param pytree

Register with `register_family(...)` (Llama, Mistral and Qwen2 register in
`specjax.models.llama`); look up with `family_of(cfg)`. The module-level `forward`,
`forward_hidden` and `lm_head` dispatch on `cfg.model_type`, which is static under `jit`, so
the dispatch costs nothing at run time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax

if TYPE_CHECKING:  # both import this module
    from specjax.models.cache import KVCache
    from specjax.models.config import ModelConfig


class Hiddens(NamedTuple):
    last: jax.Array  # [B, T, D] final hidden state after the final norm (what the LM head reads)
    # [n, B, T, D] for each requested i: the residual stream entering layer i (i=0: embeddings;
    # i=num_layers: last layer output), never normed. Equals HF `hidden_states[i]` for
    # i < num_layers; HF's `hidden_states[num_layers]` is post-norm, i.e. `last`. None if none.
    layers: jax.Array | None


# Family name -> Family; filled by the family modules (imported by `specjax.models`).
FAMILIES: dict[str, Family] = {}


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # HF `model_type`
    # get(key, default) over an HF config -> ModelConfig fields that differ from the generic
    # reading (e.g. Qwen2: q/k/v biases, a sliding window only when enabled).
    hf_fields: Callable[[Callable], dict]
    layer_map: Mapping[str, tuple[str, bool]]  # HF per-layer suffix -> (param name, transpose)
    top_map: Mapping[str, tuple[str, bool]]  # HF top-level name -> (param name, transpose)
    forward: Callable[
        ..., Any
    ]  # (params, cfg, tokens, positions, cache, **kw) -> (logits, hiddens, cache)
    forward_hidden: Callable[..., Any]  # the same without the head -> (hiddens, cache)
    lm_head: Callable[..., Any]  # (params, cfg, h [..., D]) -> float32 logits [..., V]


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family_of(model_type_or_cfg: ModelConfig | str) -> Family:
    """The Family of a `ModelConfig` or an HF model_type; ValueError naming the supported ones."""
    name = getattr(model_type_or_cfg, "model_type", model_type_or_cfg)
    if name not in FAMILIES:
        raise ValueError(f"unsupported model_type {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def forward(
    params: dict, cfg: ModelConfig, *args: Any, **kwargs: Any
) -> tuple[jax.Array, Hiddens, KVCache]:
    """The model's forward over a block -> (logits, hiddens, cache) (see the family's docs)."""
    return family_of(cfg).forward(params, cfg, *args, **kwargs)


def forward_hidden(
    params: dict, cfg: ModelConfig, *args: Any, **kwargs: Any
) -> tuple[Hiddens, KVCache]:
    """The model's decoder without the head -> (hiddens, cache)."""
    return family_of(cfg).forward_hidden(params, cfg, *args, **kwargs)


def lm_head(params: dict, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """Hidden states [..., D] -> float32 logits [..., V]."""
    return family_of(cfg).lm_head(params, cfg, h)
