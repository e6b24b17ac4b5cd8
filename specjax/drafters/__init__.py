"""Drafter constructors. Each returns a `Drafter` to pass as `generate(..., drafter=...)`.

    specjax.drafters.ngram(max_ngram=3, k=8)
    specjax.drafters.small_model(model_b, k=5)
    specjax.drafters.layer_skip(layers=8, k=4)
"""
from __future__ import annotations

from typing import Sequence, Union

from specjax.drafters.base import Draft, Drafter, DrafterSpec, TargetPrefill, TargetStep
import dataclasses
from typing import Optional

from specjax.drafters.lm import LMDrafterSpec, LMTreeSpec, layer_skip_params
from specjax.drafters.ngram import NgramSpec

NAMES = ("ngram", "model", "layer_skip")


def ngram(max_ngram: int = 3, min_ngram: int = 1, k: int = 8, branches: int = 1) -> Drafter:
    """Prompt-lookup drafting over the prompt and the generated tokens. With `branches` > 1 it
    drafts a tree of that many candidate continuations of k tokens (shared prefixes merged)."""
    spec = NgramSpec(k=k, max_ngram=max_ngram, min_ngram=min_ngram, branches=branches)
    tree = f", branches={branches}" if branches > 1 else ""
    return Drafter(spec=spec, name=f"ngram(n={min_ngram}..{max_ngram}, k={k}{tree})")


@dataclasses.dataclass(frozen=True)
class DynamicTree:
    """EAGLE-2 style dynamic draft tree: `nodes` kept out of the candidates expanded over
    `depth` levels with `top_k` children per frontier node and a frontier of `top_k` nodes."""

    nodes: int = 8
    depth: int = 4
    top_k: int = 3


def _lm_spec(cfg, k, tree: Optional[DynamicTree], reuse_target_cache=False):
    if tree is None:
        return LMDrafterSpec(k=k, cfg=cfg, reuse_target_cache=reuse_target_cache)
    return LMTreeSpec(k=tree.nodes, cfg=cfg, depth=tree.depth, top_k=tree.top_k,
                      reuse_target_cache=reuse_target_cache)


def small_model(model, k: int = 5, tree: Optional[DynamicTree] = None) -> Drafter:
    """An independent small LM with the target's tokenizer (its own KV cache). Drafts a chain of
    k tokens, or a dynamic tree when `tree` is given."""
    spec = _lm_spec(model.config, k, tree)
    shape = f"tree={tree}" if tree else f"k={k}"
    return Drafter(spec=spec, params=model.params, name=f"model({model.name}, {shape})",
                   tokenizer=model.tokenizer)


def layer_skip(layers: Union[int, Sequence[int]] = 8, k: int = 4,
               tree: Optional[DynamicTree] = None) -> Drafter:
    """Self-speculation: the target's first `layers` layers (or the listed subset) with its head.

    The params are taken from the target when `generate` runs (`params` is a function of it).
    """
    prefix = isinstance(layers, int) or tuple(layers) == tuple(range(len(layers)))
    n = layers if isinstance(layers, int) else len(tuple(layers))
    if n <= 0:
        raise ValueError(f"layer_skip needs at least one layer, got layers={layers!r}")
    chosen = layers if isinstance(layers, int) else tuple(int(i) for i in layers)

    def bind(target):
        L = target.config.num_layers
        top = chosen if isinstance(chosen, int) else max(chosen) + 1
        if top > L or (not isinstance(chosen, int) and min(chosen) < 0):
            raise ValueError(f"layer_skip layers={layers!r} not valid for a target with {L} layers")
        spec = _lm_spec(dataclasses.replace(target.config, num_layers=n), k, tree,
                        reuse_target_cache=prefix)
        return spec, layer_skip_params(target.params, chosen)

    shape = f"tree={tree}" if tree else f"k={k}"
    return Drafter(spec=_lm_spec(None, k, tree), params=bind,
                   name=f"layer_skip(layers={layers}, {shape})")


def resolve(drafter: Drafter, target):
    """-> (spec, params) for this target (binds target-derived drafters such as layer skip)."""
    if callable(drafter.params):
        return drafter.params(target)
    return drafter.spec, drafter.params


__all__ = ["Draft", "Drafter", "DrafterSpec", "DynamicTree", "TargetPrefill", "TargetStep",
           "LMDrafterSpec", "LMTreeSpec", "NgramSpec", "ngram", "small_model", "layer_skip", "resolve", "NAMES"]
