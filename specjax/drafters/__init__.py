"""Drafter constructors. Each returns a `Drafter` to pass as `generate(..., drafter=...)`.

    specjax.drafters.ngram(max_ngram=3, k=8)
    specjax.drafters.small_model(model_b, k=5)
    specjax.drafters.layer_skip(layers=8, k=4)

LM drafters draft a chain of k tokens, or a tree: `tree=DynamicTree(...)` (EAGLE-2, grown from
the draft's confidence) or `tree=StaticTree(choices)` (a fixed Medusa / EAGLE-1 shape, e.g.
`StaticTree("eagle_small")` from specjax/configs/trees/).
"""
from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Optional, Sequence, Union

from specjax.drafters.base import Draft, Drafter, DrafterSpec, TargetPrefill, TargetStep
from specjax.drafters.lm import LMDrafterSpec, LMStaticTreeSpec, LMTreeSpec, layer_skip_params
from specjax.drafters.ngram import NgramSpec
# Drafter modules whose constructor shares the drafter's name are named apart from it
# (`feature` for `eagle`, `medusa_heads` for `medusa`): a submodule import would rebind the name.
from specjax.drafters.medusa_heads import MedusaConfig, MedusaHeads, MedusaSpec, MedusaTreeSpec

NAMES = ("ngram", "model", "layer_skip")


def ngram(max_ngram: int = 4, min_ngram: int = 1, k: int = 8, branches: int = 1,
          adaptive: bool = True, short: int = 1) -> Drafter:
    """Prompt-lookup drafting over the prompt and the generated tokens. With `branches` > 1 it
    drafts a tree of that many candidate continuations of k tokens (shared prefixes merged).
    `adaptive` (chains): verify k tokens after a max_ngram match, `short` after a one shorter
    match, and take a plain step after shorter ones (see `NgramSpec.adaptive`); False verifies
    k tokens after any match."""
    spec = NgramSpec(k=k, max_ngram=max_ngram, min_ngram=min_ngram, branches=branches,
                     adaptive=adaptive, short=short)
    tree = f", branches={branches}" if branches > 1 else ""
    fixed = "" if adaptive or branches > 1 else ", fixed k"
    return Drafter(spec=spec, name=f"ngram(n={min_ngram}..{max_ngram}, k={k}{tree}{fixed})")


@dataclasses.dataclass(frozen=True)
class DynamicTree:
    """EAGLE-2 style dynamic draft tree: `nodes` kept out of the candidates expanded over
    `depth` levels with `top_k` children per frontier node and a frontier of `top_k` nodes."""

    nodes: int = 8
    depth: int = 4
    top_k: int = 3

    def __post_init__(self):
        for field in ("nodes", "depth", "top_k"):  # named here, not later as "draft length k"
            v = getattr(self, field)
            if not _is_rank(v) or v == 0:
                raise ValueError(f"DynamicTree {field} must be a positive int, got {v!r}")


def _is_rank(c) -> bool:
    return isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 0


@dataclasses.dataclass(frozen=True)
class StaticTree:
    """A fixed draft tree given as a Medusa / EAGLE-1 choice list: each choice is the path of
    sibling ranks from the root, e.g. [[0], [1], [0, 0]] = the two best tokens after `last`
    and the best token after the first of them. Every prefix of a choice must be listed too.
    `choices` may also name a preset in specjax/configs/trees/ (or a YAML path): see
    `specjax.tree.load_choices`."""

    choices: Union[str, tuple]
    name: Optional[str] = None

    def __post_init__(self):
        from specjax.tree import load_choices, parents_from_choices

        choices, name = self.choices, self.name
        if isinstance(choices, str):
            choices, name = load_choices(choices), name or choices
        if not isinstance(choices, (list, tuple)):
            raise ValueError(f"tree choices must be a list of lists of ints, got {choices!r}")
        norm = []
        for ch in choices:
            if not isinstance(ch, (list, tuple)) or not ch or not all(map(_is_rank, ch)):
                raise ValueError(f"invalid tree choice {ch!r}: each choice must be a non-empty "
                                 f"list of sibling ranks (ints >= 0)")
            norm.append(tuple(int(c) for c in ch))
        dup = sorted({c for c in norm if norm.count(c) > 1})
        if dup:
            raise ValueError(f"tree choices listed more than once: {[list(c) for c in dup]}")
        parents_from_choices(norm)  # raises on an empty list or a missing parent
        object.__setattr__(self, "choices", tuple(norm))
        object.__setattr__(self, "name", name)

    @property
    def parents_rank(self) -> tuple[tuple, tuple]:
        from specjax.tree import parents_from_choices

        parents, rank = parents_from_choices(self.choices)
        return tuple(parents.tolist()), tuple(rank.tolist())

    @property
    def nodes(self) -> int:
        return len(self.choices)

    @property
    def depth(self) -> int:
        return max(len(c) for c in self.choices)

    def __str__(self) -> str:
        return f"StaticTree({self.name or 'custom'}, nodes={self.nodes}, depth={self.depth})"


def _lm_spec(cfg, k, tree: Union[DynamicTree, StaticTree, None], reuse_target_cache=False):
    if tree is None:
        return LMDrafterSpec(k=k, cfg=cfg, reuse_target_cache=reuse_target_cache)
    if isinstance(tree, StaticTree):
        parents, rank = tree.parents_rank
        return LMStaticTreeSpec(k=tree.nodes, cfg=cfg, parents=parents, rank=rank,
                                reuse_target_cache=reuse_target_cache)
    if isinstance(tree, DynamicTree):
        return LMTreeSpec(k=tree.nodes, cfg=cfg, depth=tree.depth, top_k=tree.top_k,
                          reuse_target_cache=reuse_target_cache)
    raise TypeError(f"tree must be a DynamicTree or a StaticTree, got {tree!r}")


def small_model(model, k: int = 5,
                tree: Union[DynamicTree, StaticTree, None] = None) -> Drafter:
    """An independent small LM with the target's tokenizer (its own KV cache). Drafts a chain of
    k tokens, or a tree (`DynamicTree` or `StaticTree`) when `tree` is given."""
    spec = _lm_spec(model.config, k, tree)
    shape = f"tree={tree}" if tree else f"k={k}"
    return Drafter(spec=spec, params=model.params, name=f"model({model.name}, {shape})",
                   tokenizer=model.tokenizer)


def layer_skip(layers: Union[int, Sequence[int]] = 8, k: int = 4,
               tree: Union[DynamicTree, StaticTree, None] = None) -> Drafter:
    """Self-speculation: the target's first `layers` layers (or the listed subset) with its head.

    The params are taken from the target when `generate` runs (`params` is a function of it).
    """
    def is_int(x):
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    if not (is_int(layers) or (isinstance(layers, (list, tuple)) and all(map(is_int, layers)))):
        raise ValueError(f"layer_skip layers must be a positive int (the first N layers) or a "
                         f"list of layer indices (ints), got {type(layers).__name__} {layers!r}")
    layers = int(layers) if is_int(layers) else tuple(int(i) for i in layers)
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


def eagle(source, k: int = 5, tree: Union[DynamicTree, None] = None, name: str = "") -> Drafter:
    """An EAGLE-1/2 or EAGLE-3 feature-level drafter (module `specjax.drafters.feature`).

    `source`: an (EagleConfig, params) pair (e.g. from `specjax.train`), a directory holding a
    drafter in the HF EAGLE format (config.json + safetensors/bin, as SafeAILab, vLLM and
    SGLang ship them, and as `specjax train-drafter` exports), or the name of a drafter bundled
    with specjax (see `BUNDLED_DRAFTERS`). Drafts a chain of k tokens, or an EAGLE-2 dynamic
    tree when `tree=DynamicTree(...)` is given.
    """
    eagle_lib = _eagle_module()
    if tree is not None and not isinstance(tree, DynamicTree):
        raise TypeError(f"EAGLE drafts dynamic trees: tree must be a DynamicTree, got {tree!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"draft length k must be a positive int, got {k!r}")
    label = name or (source if isinstance(source, str) else "custom")

    def bind(target):
        cfg, params = _eagle_weights(source, target)
        if tree is None:
            spec = eagle_lib.EagleSpec(k=k, eagle=cfg, target_cfg=target.config)
        else:
            spec = eagle_lib.EagleTreeSpec(k=tree.nodes, depth=tree.depth, top_k=tree.top_k,
                                           eagle=cfg, target_cfg=target.config)
        params = jax_cast(params, target.dtype)
        return spec, eagle_lib.bind_target(params, target.params)

    shape = f"tree={tree}" if tree else f"k={k}"
    return Drafter(spec=None, params=bind, name=f"eagle({label}, {shape})")


# Drafters shipped inside the package: name -> (target model name, directory under specjax/).
BUNDLED_DRAFTERS = {
    "smollm2-135m-eagle3": ("smollm2-135m", "weights/smollm2-135m-eagle3"),
    "smollm2-135m-eagle": ("smollm2-135m", "weights/smollm2-135m-eagle"),
    "smollm2-135m-medusa": ("smollm2-135m", "weights/smollm2-135m-medusa"),
}


def bundled_path(name: str):
    """Directory of a drafter shipped with specjax (see BUNDLED_DRAFTERS)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / BUNDLED_DRAFTERS[name][1]
    if not path.exists():
        raise FileNotFoundError(f"bundled drafter {name!r} is missing from this install ({path})")
    return path


def _eagle_module():
    import importlib

    return importlib.import_module("specjax.drafters.feature")


def _eagle_weights(source, target):
    """-> (EagleConfig, params) for `target` from any accepted `source`."""
    import os
    from pathlib import Path

    if isinstance(source, tuple) and len(source) == 2:
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"EAGLE source must be an (EagleConfig, params) pair, a directory or a "
                        f"bundled name, got {type(source).__name__}")
    path = Path(source)
    if str(source) in BUNDLED_DRAFTERS:
        path = bundled_path(str(source))
    elif not path.is_dir():
        raise ValueError(f"EAGLE drafter {source!r} is neither a directory nor a bundled drafter "
                         f"({sorted(BUNDLED_DRAFTERS)})")
    from checkpoints_convert.eagle_hf import load_eagle_hf

    return load_eagle_hf(path, target.config)


def jax_cast(params, dtype):
    """Cast the floating leaves of a param tree (integer maps such as d2t stay)."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, params)


def medusa(heads, k: Optional[int] = None, tree: Optional[StaticTree] = None) -> Drafter:
    """Medusa-1 heads over the target's final hidden state (module `specjax.drafters.medusa_heads`).

    `heads`: a `MedusaHeads`, a (MedusaConfig, params) pair, a directory written by
    `medusa_heads.save_medusa` (what `specjax train-drafter --kind medusa` exports) or a
    bundled name (see BUNDLED_DRAFTERS). Drafts a chain of k tokens (head
    i drafts token i; default k = the number of heads), or Medusa's static tree when
    `tree=StaticTree(choices)` is given (depth at most the number of heads; k then unused).
    """
    from specjax.drafters.medusa_heads import bind_target, check_params, load_medusa

    if isinstance(heads, str) and heads in BUNDLED_DRAFTERS:
        heads = load_medusa(bundled_path(heads))
    elif isinstance(heads, (str, os.PathLike)):
        heads = load_medusa(heads)
    if isinstance(heads, MedusaHeads):
        heads = (heads.config, heads.params)
    if not (isinstance(heads, tuple) and len(heads) == 2 and isinstance(heads[0], MedusaConfig)):
        raise TypeError(f"Medusa heads must be a MedusaHeads or a (MedusaConfig, params) pair, "
                        f"got {type(heads).__name__}")
    cfg, params = heads
    check_params(cfg, params)
    if tree is not None and not isinstance(tree, StaticTree):
        raise TypeError(f"Medusa drafts static trees: tree must be a StaticTree, got {tree!r}")
    if tree is None:
        spec = MedusaSpec(k=cfg.num_heads if k is None else k, medusa=cfg)
    else:
        parents, rank = tree.parents_rank
        spec = MedusaTreeSpec(k=tree.nodes, medusa=cfg, parents=parents, rank=rank)

    def bind(target):
        own = jax_cast(params, target.dtype)
        return dataclasses.replace(spec, target_cfg=target.config), bind_target(
            own, target.params)

    shape = f"tree={tree}" if tree else f"k={spec.k}"
    return Drafter(spec=spec, params=bind, name=f"medusa(heads={cfg.num_heads}, {shape})")


def resolve(drafter: Drafter, target):
    """-> (spec, params) for this target (binds target-derived drafters such as layer skip)."""
    if callable(drafter.params):
        return drafter.params(target)
    return drafter.spec, drafter.params


__all__ = ["Draft", "Drafter", "DrafterSpec", "DynamicTree", "StaticTree", "TargetPrefill",
           "TargetStep", "LMDrafterSpec", "LMTreeSpec", "LMStaticTreeSpec", "NgramSpec", "ngram",
           "small_model", "layer_skip", "eagle", "medusa", "MedusaConfig", "MedusaHeads",
           "MedusaSpec", "MedusaTreeSpec", "resolve", "NAMES", "BUNDLED_DRAFTERS"]
