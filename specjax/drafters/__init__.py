"""Drafters. Each constructor returns a `Drafter` to pass as `generate(..., drafter=...)`.

    specjax.drafters.ngram(max_ngram=4, k=7)
    specjax.drafters.small_model(model_b, k=5)
    specjax.drafters.layer_skip(layers=8, k=4)
    specjax.drafters.eagle("smollm2-135m-eagle3", tree=DynamicTree(nodes=7, depth=4, top_k=3))
    specjax.drafters.medusa("smollm2-135m-medusa", tree=StaticTree("eagle_small"))
    specjax.drafters.cascade([ngram(k=2), layer_skip(layers=8, k=4)])  # A -> B -> target
    specjax.drafters.hybrid(ngram(k=6), eagle("smollm2-135m-eagle3", tree=...))  # SAM switch
    specjax.drafters.hybrid(ngram(k=6), eagle(...), mode="merge")  # both in one tree
    specjax.drafters.ngram(k=4, datastore=[token_ids, ...])  # REST-style retrieval
    specjax.drafters.horizontal(eagle(..., k=2), ngram(k=4))  # later positions from the n-gram

LM drafters draft a chain of k tokens, or a tree: `tree=DynamicTree(...)` (EAGLE-2, grown from
the draft's confidence) or `tree=StaticTree(choices)` (a fixed Medusa / EAGLE-1 shape, e.g.
`StaticTree("eagle_small")` from specjax/configs/trees/).

Layout: the protocol and records a drafter implements live with the engine that drives them
(`specjax.engine.protocol`: drafters import the engine's contract, the engine never imports a
drafter); here `shapes.py` tree shapes (validation, growth),
`registry.py` CLI names -> constructors, `bundled.py` drafters shipped with specjax, then one
file per drafter (`ngram.py`, `lm.py`: small model and layer skip, `feature.py`: EAGLE-1/2/3,
`medusa_heads.py`, `cascade.py`: drafters drafting for each other, `horizontal.py`: a cheaper
drafter for later positions, `hybrid.py`: retrieval and a feature drafter, per step or merged
into one tree). A new drafter is one new
file (its spec: init / propose / commit, and a constructor returning a `Drafter`) plus one line
in `registry.py`.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from specjax.drafters import feature as eagle_lib
from specjax.drafters.bundled import BUNDLED_DRAFTERS, bundled_path
from specjax.drafters.cascade import CascadeSpec, cascade
from specjax.drafters.horizontal import HorizontalSpec, horizontal
from specjax.drafters.hybrid import HybridSpec, hybrid
from specjax.drafters.lm import LMDrafterSpec, LMStaticTreeSpec, LMTreeSpec, layer_skip_params

# `specjax.drafters.NAME` is the constructor: `eagle` and `medusa` live in modules named apart
# (`feature`, `medusa_heads`); `cascade`, `hybrid` and `horizontal` are imported from their
# modules of the same name and `ngram` is defined below the import of its module, so the
# attribute is the function (a module's contents: `from specjax.drafters.ngram import NgramSpec`).
from specjax.drafters.medusa_heads import MedusaConfig, MedusaHeads, MedusaSpec, MedusaTreeSpec
from specjax.drafters.ngram import NgramSpec, index_datastore
from specjax.drafters.shapes import DraftGate, DynamicTree, StaticTree, VerifySizing
from specjax.engine.protocol import (
    Draft,
    Drafter,
    DrafterSpec,
    Params,
    TargetPrefill,
    TargetStep,
    Tree,
    TreeDraft,
    Verified,
)
from specjax.models import eagle as eagle_net
from specjax.models.config import ModelConfig

if TYPE_CHECKING:
    from specjax.model import Model

# What `eagle` drafts from: an (EagleConfig, params) pair, a checkpoint directory or a bundled name.
EagleSource = tuple[eagle_net.EagleConfig, dict] | str | os.PathLike


def ngram(
    max_ngram: int = 4,
    min_ngram: int = 1,
    k: int = 7,
    branches: int = 1,
    adaptive: bool = True,
    short: int | None = None,
    datastore: Sequence[Sequence[int]] | None = None,
    short_from: int | None = None,
) -> Drafter:
    """Prompt-lookup drafting over the prompt and the generated tokens. With `branches` > 1 it
    drafts a tree of that many candidate continuations of k tokens (shared prefixes merged).
    `adaptive` (chains): verify k tokens after a max_ngram match, `short` (default min(3, k))
    after a match of `short_from` (default max(min_ngram, max_ngram - 2)) to max_ngram - 1
    tokens, and take a plain step after shorter ones (see `NgramSpec.adaptive`); False verifies
    k tokens after any match. `datastore` (chains): documents of token ids (e.g. a code base or
    earlier answers, tokenized with the target's tokenizer) indexed once and searched on device
    besides the history, REST-style (`ngram.index_datastore`); the longer match drafts."""
    spec = NgramSpec(
        k=k,
        max_ngram=max_ngram,
        min_ngram=min_ngram,
        branches=branches,
        adaptive=adaptive,
        short=short,
        short_from=short_from,
        datastore=datastore is not None,
    )
    tree = f", branches={branches}" if branches > 1 else ""
    fixed = "" if adaptive or branches > 1 else ", fixed k"
    params, store = None, ""
    if datastore is not None:
        params = index_datastore(datastore, max_ngram, k)
        store = f", datastore of {params.order.shape[0]} tokens"
    return Drafter.fixed(
        f"ngram(n={min_ngram}..{max_ngram}, k={k}{tree}{fixed}{store})", spec, params
    )


def _chain_sizing(
    k: int, tree: DynamicTree | StaticTree | None, sizing: VerifySizing | None
) -> VerifySizing | None:
    """Check `sizing` (a chain's; a tree carries its own in `DynamicTree(sizing=...)`)."""
    if sizing is None:
        return None
    if tree is not None:
        raise ValueError("a tree's verify sizing goes in DynamicTree(..., sizing=...)")
    if not isinstance(sizing, VerifySizing):
        raise TypeError(f"sizing must be a VerifySizing or None, got {sizing!r}")
    if sizing.sizes[-1] != k:
        raise ValueError(f"the largest verify size must be the chain's k={k}: {sizing.sizes}")
    return sizing


def _lm_spec(
    cfg: ModelConfig | None,
    k: int,
    tree: DynamicTree | StaticTree | None,
    reuse_target_cache: bool = False,
    sizing: VerifySizing | None = None,
) -> LMDrafterSpec:
    sizing = _chain_sizing(k, tree, sizing)
    if tree is None:
        return LMDrafterSpec(k=k, cfg=cfg, reuse_target_cache=reuse_target_cache, sizing=sizing)
    if isinstance(tree, StaticTree):
        parents, rank = tree.parents_rank
        return LMStaticTreeSpec(
            k=tree.nodes, cfg=cfg, parents=parents, rank=rank, reuse_target_cache=reuse_target_cache
        )
    if isinstance(tree, DynamicTree):
        return LMTreeSpec(
            k=tree.nodes,
            cfg=cfg,
            depth=tree.depth,
            top_k=tree.top_k,
            sizing=tree.sizing,
            reuse_target_cache=reuse_target_cache,
        )
    raise TypeError(f"tree must be a DynamicTree or a StaticTree, got {tree!r}")


def small_model(
    model: Model,
    k: int = 5,
    tree: DynamicTree | StaticTree | None = None,
    sizing: VerifySizing | None = None,
) -> Drafter:
    """An independent small LM with the target's tokenizer (its own KV cache). Drafts a chain of
    k tokens, or a tree (`DynamicTree` or `StaticTree`) when `tree` is given. `sizing`: verify
    per step only the prefix of the chain worth it (`VerifySizing`). With a vision-language
    target, `model` may be a text LM (placeholders are plain ids to it) or a small
    `VisionLanguageModel` that encodes the images with its own tower and feature cache (its
    placeholder id and count per image must equal the target's)."""
    spec = _lm_spec(model.config, k, tree, sizing=sizing)
    shape = f"tree={tree}" if tree else f"k={k}"
    # A small vision-language model drafts with its own tower's image features.
    vision = model if getattr(model, "vlm_config", None) is not None else None
    if vision is not None:
        spec = dataclasses.replace(spec, own_images=True)
    return Drafter.fixed(
        f"model({model.name}, {shape})",
        spec,
        model.params,
        tokenizer=model.tokenizer,
        vision=vision,
    )


def layer_skip(
    layers: int | Sequence[int] = 8,
    k: int = 4,
    tree: DynamicTree | StaticTree | None = None,
    sizing: VerifySizing | None = None,
) -> Drafter:
    """Self-speculation: the target's first `layers` layers (or the listed subset) with its head.

    The params are taken from the target when the drafter is bound to it. `sizing`: verify per
    step only the prefix of the chain worth it (`VerifySizing`).
    """

    def is_int(x: object) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    if not (is_int(layers) or (isinstance(layers, (list, tuple)) and all(map(is_int, layers)))):
        raise ValueError(
            f"layer_skip layers must be a positive int (the first N layers) or a "
            f"list of layer indices (ints), got {type(layers).__name__} {layers!r}"
        )
    layers = int(layers) if is_int(layers) else tuple(int(i) for i in layers)
    prefix = isinstance(layers, int) or tuple(layers) == tuple(range(len(layers)))
    n = layers if isinstance(layers, int) else len(tuple(layers))
    if n <= 0:
        raise ValueError(f"layer_skip needs at least one layer, got layers={layers!r}")
    chosen = layers if isinstance(layers, int) else tuple(int(i) for i in layers)

    def bind(target: Model) -> tuple[LMDrafterSpec, dict]:
        L = target.config.num_layers
        top = chosen if isinstance(chosen, int) else max(chosen) + 1
        if top > L or (not isinstance(chosen, int) and min(chosen) < 0):
            raise ValueError(f"layer_skip layers={layers!r} not valid for a target with {L} layers")
        spec = _lm_spec(
            dataclasses.replace(target.config, num_layers=n),
            k,
            tree,
            reuse_target_cache=prefix,
            sizing=sizing,
        )
        return spec, layer_skip_params(target.params, chosen)

    shape = f"tree={tree}" if tree else f"k={k}"
    _chain_sizing(k, tree, sizing)  # bad sizing fails here, not at bind
    return Drafter(
        name=f"layer_skip(layers={layers}, {shape})", k=_lm_spec(None, k, tree).k, binder=bind
    )


def eagle(
    source: EagleSource,
    k: int = 5,
    tree: DynamicTree | StaticTree | None = None,
    name: str = "",
    *,
    producer: str | None = None,
    capture_layers: Sequence[int] | None = None,
    sizing: VerifySizing | None = None,
) -> Drafter:
    """An EAGLE-1/2 or EAGLE-3 feature-level drafter (module `specjax.drafters.feature`).

    `source`: an (EagleConfig, params) pair (e.g. from `specjax.train`), a directory holding a
    drafter in the HF EAGLE format (config.json + safetensors/bin, as SafeAILab, vLLM and
    SGLang ship them, and as `specjax train-drafter` exports), or the name of a drafter bundled
    with specjax (see `BUNDLED_DRAFTERS`). Drafts a chain of k tokens, an EAGLE-2 dynamic tree
    when `tree=DynamicTree(...)` is given, or a fixed tree for `tree=StaticTree(...)`
    (`feature.EagleStaticTreeSpec`: the top candidates when greedy; at temperature > 0 each
    node's children are drawn without replacement from the drafter's law and verified
    against it).

    For a directory, `producer` (one of `checkpoints_convert.eagle_hf.PRODUCERS`) overrides the
    producer detected from its config.json, and `capture_layers` (the target's HF
    hidden_states indices) the EAGLE-3 layers it reads; see `load_eagle_hf`. `sizing`: verify
    per step only the prefix of the chain worth it (`VerifySizing`; a tree's goes in
    `DynamicTree(sizing=...)`).
    """
    if isinstance(source, tuple) and (producer is not None or capture_layers is not None):
        raise ValueError(
            "producer / capture_layers apply to checkpoint directories; an "
            "(EagleConfig, params) pair already fixes them"
        )
    if tree is not None and not isinstance(tree, (DynamicTree, StaticTree)):
        raise TypeError(f"tree must be a DynamicTree, a StaticTree or None, got {tree!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"draft length k must be a positive int, got {k!r}")
    sizing = _chain_sizing(k, tree, sizing)
    label = name or (source if isinstance(source, str) else "custom")

    def bind(target: Model) -> tuple[eagle_lib.EagleSpec, dict]:
        cfg, params = _eagle_weights(
            source, target, producer=producer, capture_layers=capture_layers
        )
        if tree is None:
            spec = eagle_lib.EagleSpec(k=k, eagle=cfg, target_cfg=target.config, sizing=sizing)
        elif isinstance(tree, StaticTree):
            parents, rank = tree.parents_rank
            spec = eagle_lib.EagleStaticTreeSpec(
                k=tree.nodes, parents=parents, rank=rank, eagle=cfg, target_cfg=target.config
            )
        else:
            spec = eagle_lib.EagleTreeSpec(
                k=tree.nodes,
                depth=tree.depth,
                top_k=tree.top_k,
                sizing=tree.sizing,
                eagle=cfg,
                target_cfg=target.config,
            )
        params = jax_cast(params, target.dtype)
        return spec, eagle_net.bind_target(params, target.params)

    shape = f"tree={tree}" if tree else f"k={k}"
    return Drafter(name=f"eagle({label}, {shape})", k=tree.nodes if tree else k, binder=bind)


def _eagle_weights(
    source: EagleSource,
    target: Model,
    producer: str | None = None,
    capture_layers: Sequence[int] | None = None,
) -> tuple[eagle_net.EagleConfig, dict]:
    """-> (EagleConfig, params) for `target` from any accepted `source`."""
    from pathlib import Path

    if isinstance(source, tuple) and len(source) == 2:
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"EAGLE source must be an (EagleConfig, params) pair, a directory or a "
            f"bundled name, got {type(source).__name__}"
        )
    path = Path(source)
    if str(source) in BUNDLED_DRAFTERS:
        path = bundled_path(str(source))
    elif not path.is_dir():
        raise ValueError(
            f"EAGLE drafter {source!r} is neither a directory nor a bundled drafter "
            f"({sorted(BUNDLED_DRAFTERS)})"
        )
    from checkpoints_convert.eagle_hf import load_eagle_hf

    return load_eagle_hf(
        path,
        target.config,
        target_embed=target.params["embed"],
        producer=producer,
        capture_layers=capture_layers,
    )


def jax_cast(params: Params, dtype: DTypeLike) -> Params:
    """Cast the floating leaves of a param tree (integer maps such as d2t stay)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )


def medusa(
    heads: MedusaHeads | tuple[MedusaConfig, dict] | str | os.PathLike,
    k: int | None = None,
    tree: StaticTree | None = None,
) -> Drafter:
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
        raise TypeError(
            f"Medusa heads must be a MedusaHeads or a (MedusaConfig, params) pair, "
            f"got {type(heads).__name__}"
        )
    cfg, params = heads
    check_params(cfg, params)
    if tree is not None and not isinstance(tree, StaticTree):
        raise TypeError(f"Medusa drafts static trees: tree must be a StaticTree, got {tree!r}")
    if tree is None:
        spec = MedusaSpec(k=cfg.num_heads if k is None else k, medusa=cfg)
    else:
        parents, rank = tree.parents_rank
        spec = MedusaTreeSpec(k=tree.nodes, medusa=cfg, parents=parents, rank=rank)

    def bind(target: Model) -> tuple[MedusaSpec | MedusaTreeSpec, dict]:
        own = jax_cast(params, target.dtype)
        return dataclasses.replace(spec, target_cfg=target.config), bind_target(own, target.params)

    shape = f"tree={tree}" if tree else f"k={spec.k}"
    return Drafter(name=f"medusa(heads={cfg.num_heads}, {shape})", k=spec.k, binder=bind)


__all__ = [
    "Draft",
    "Drafter",
    "DrafterSpec",
    "DynamicTree",
    "VerifySizing",
    "DraftGate",
    "StaticTree",
    "TargetPrefill",
    "TargetStep",
    "Tree",
    "TreeDraft",
    "Verified",
    "LMDrafterSpec",
    "LMTreeSpec",
    "LMStaticTreeSpec",
    "NgramSpec",
    "ngram",
    "small_model",
    "layer_skip",
    "eagle",
    "medusa",
    "cascade",
    "CascadeSpec",
    "hybrid",
    "HybridSpec",
    "horizontal",
    "HorizontalSpec",
    "MedusaConfig",
    "MedusaHeads",
    "MedusaSpec",
    "MedusaTreeSpec",
    "BUNDLED_DRAFTERS",
    "bundled_path",
]
