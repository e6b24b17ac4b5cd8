"""Model families as pure functions over param pytrees, their configs and the KV cache.

    config.py   ModelConfig (frozen, hashable: a static jit argument)
    family.py   the family registry and the forward / forward_hidden / lm_head that dispatch on
                cfg.model_type (what the engine, drafters, trainer and converters call); the
                param layouts (unrolled / stacked layers) and orientations every family shares
    eagle.py    the EAGLE drafter network (one Llama decoder layer on the target's features)
    llama.py    the Llama family (Llama, Mistral, Qwen2), registered under those model_types
    cache.py    the static-shape KV cache

A new family: a module like llama.py that calls `register_family(...)`, imported below.
"""

from specjax.models import llama  # noqa: F401  (registers llama, mistral, qwen2)
from specjax.models.cache import KVCache, full_logits, init_cache
from specjax.models.config import ModelConfig, RopeScaling
from specjax.models.family import (
    FAMILIES,
    Family,
    Hiddens,
    compute_dtype,
    family_of,
    forward,
    forward_hidden,
    is_unrolled,
    lm_head,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "compute_dtype",
    "FAMILIES",
    "Family",
    "Hiddens",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "family_of",
    "forward",
    "forward_hidden",
    "full_logits",
    "init_cache",
    "is_unrolled",
    "lm_head",
    "stack_layers",
    "unstack_layers",
]
