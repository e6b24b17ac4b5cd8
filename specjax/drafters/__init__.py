"""Drafter constructors. Each returns a `Drafter` to pass as `generate(..., drafter=...)`.

    specjax.drafters.ngram(max_ngram=3, k=8)
    specjax.drafters.small_model(model_b, k=5)
    specjax.drafters.layer_skip(layers=8, k=4)
"""
from __future__ import annotations

from typing import Sequence, Union

from specjax.drafters.base import Draft, Drafter, DrafterSpec, TargetPrefill, TargetStep
from specjax.drafters.lm import LMDrafterSpec, layer_skip_params
from specjax.drafters.ngram import NgramSpec

NAMES = ("ngram", "model", "layer_skip")


def ngram(max_ngram: int = 3, min_ngram: int = 1, k: int = 8) -> Drafter:
    """Prompt-lookup drafting over the prompt and the generated tokens."""
    return Drafter(spec=NgramSpec(k=k, max_ngram=max_ngram, min_ngram=min_ngram),
                   name=f"ngram(n={min_ngram}..{max_ngram}, k={k})")


def small_model(model, k: int = 5) -> Drafter:
    """An independent small LM with the target's tokenizer (its own KV cache)."""
    return Drafter(spec=LMDrafterSpec(k=k, cfg=model.config), params=model.params,
                   name=f"model({model.name}, k={k})", tokenizer=model.tokenizer)


def layer_skip(layers: Union[int, Sequence[int]] = 8, k: int = 4) -> Drafter:
    """Self-speculation: the target's first `layers` layers (or the listed subset) with its head.

    The params are taken from the target when `generate` runs (`params` is a function of it).
    """
    prefix = isinstance(layers, int) or tuple(layers) == tuple(range(len(layers)))
    n = layers if isinstance(layers, int) else len(tuple(layers))
    if n <= 0:
        raise ValueError(f"layer_skip needs at least one layer, got layers={layers!r}")
    chosen = layers if isinstance(layers, int) else tuple(int(i) for i in layers)

    def bind(target):
        import dataclasses

        L = target.config.num_layers
        top = chosen if isinstance(chosen, int) else max(chosen) + 1
        if top > L or (not isinstance(chosen, int) and min(chosen) < 0):
            raise ValueError(f"layer_skip layers={layers!r} not valid for a target with {L} layers")
        spec = LMDrafterSpec(k=k, cfg=dataclasses.replace(target.config, num_layers=n),
                             reuse_target_cache=prefix)
        return spec, layer_skip_params(target.params, chosen)

    return Drafter(spec=LMDrafterSpec(k=k, cfg=None), params=bind,
                   name=f"layer_skip(layers={layers}, k={k})")


def resolve(drafter: Drafter, target):
    """-> (spec, params) for this target (binds target-derived drafters such as layer skip)."""
    if callable(drafter.params):
        return drafter.params(target)
    return drafter.spec, drafter.params


__all__ = ["Draft", "Drafter", "DrafterSpec", "TargetPrefill", "TargetStep", "LMDrafterSpec",
           "NgramSpec", "ngram", "small_model", "layer_skip", "resolve", "NAMES"]
