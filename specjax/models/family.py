"""Model families: the seam through which the engine, drafters, trainer and converters reach a
model, so that a new family (a LLaVA-style VLM, Gemma) plugs in without touching them.

A `Family` names, for one HF `model_type`:
    config fields  what of an HF config is family-specific (on top of `ModelConfig.from_hf`)
    HF name map    checkpoint tensor names -> param names (+ which are transposed)
    functions      forward / forward_hidden / lm_head over the family's param pytree

    out_in_names   layer matrices it may store [out, in] (`Family.orient`, CPU's default)

Register with `register_family(...)` (Llama, Mistral and Qwen2 register in
`specjax.models.llama`); look up with `family_of(cfg)`. The module-level `forward`,
`forward_hidden` and `lm_head` dispatch on `cfg.model_type`, which is static under `jit`, so
the dispatch costs nothing at run time. Every family keeps its decoder layers under
params["layers"], unrolled (a list) or stacked (the scan layout): `is_unrolled`,
`stack_layers` and `unstack_layers` below serve them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # both import this module
    from specjax.models.cache import KVCache
    from specjax.models.config import ModelConfig


class Hiddens(NamedTuple):
    last: jax.Array  # [B, T, D] final hidden state after the final norm (what the LM head reads)
    # [n, B, T, D] for each requested i: the residual stream entering layer i (i=0: embeddings;
    # i=num_layers: last layer output), never normed. Equals HF `hidden_states[i]` for
    # i < num_layers; HF's `hidden_states[num_layers]` is post-norm, i.e. `last`. None if none.
    layers: jax.Array | None


# How layer matrices are stored: "in_out" ([in, out], checkpoints) or "out_in" (`Family.orient`).
ORIENTATIONS = ("in_out", "out_in")

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
    # Layer matrices the family may store [out, in] (faster products of a few rows on CPU):
    # checkpoint name -> the name it has when stored transposed. The key says the orientation,
    # so params carry it with no config field.
    out_in_names: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def orientation(self, params: dict) -> str:
        """ "out_in" when the layer matrices are stored [out, in] (`out_in_names`), else
        "in_out" (the checkpoint orientation)."""
        lp = params["layers"][0] if is_unrolled(params) else params["layers"]
        return "out_in" if any(n in lp for n in self.out_in_names.values()) else "in_out"

    def oriented_leaf(self, name: str, w: Any, to: str) -> tuple[str, Any]:
        """One layer leaf (name, array) stored as `to` says: a layer matrix in the other
        orientation is renamed and transposed (numpy: a view), anything else is returned as is."""
        names = self.out_in_names
        names = names if to == "out_in" else {v: k for k, v in names.items()}
        return (names[name], w.swapaxes(-1, -2)) if name in names else (name, w)

    def orient(self, params: dict, to: str) -> dict:
        """The same params with the layer matrices stored as `to` says ("in_out": [in, out], the
        checkpoint orientation; "out_in": [out, in]). Either layout."""
        if to not in ORIENTATIONS:
            raise ValueError(f"unknown weight orientation {to!r}; valid: {', '.join(ORIENTATIONS)}")
        if self.orientation(params) == to:
            return params

        def layer(lp: dict) -> dict:
            return dict(self.oriented_leaf(n, w, to) for n, w in lp.items())

        layers = params["layers"]
        layers = [layer(lp) for lp in layers] if is_unrolled(params) else layer(layers)
        return dict(params, layers=layers)

    def _matrix_slots(self, params: dict) -> list[tuple[str, dict, str]]:
        """(what to call it, the dict holding it, its key) for every matrix `matrices_stored`
        stores: the layer products (layer by layer), then the embedding and the head."""
        names = set(self.out_in_names) | set(self.out_in_names.values())
        layers = params["layers"]
        if is_unrolled(params):
            slots = [(f"layer {i} {n}", lp, n) for i, lp in enumerate(layers) for n in lp]
        else:
            slots = [(f"layer (stacked) {n}", layers, n) for n in layers]
        slots = [s for s in slots if s[2] in names]
        return slots + [(n, params, n) for n in ("embed", "lm_head") if n in params]

    def rounded_matrix(self, params: dict, dtype: Any) -> str | None:
        """None if `dtype` holds every matrix exactly, else what the first one it would round
        is and how many of its weights (one matrix converted at a time: no copy of the model)."""
        for where, holder, n in self._matrix_slots(params):
            w = holder[n]
            if w.dtype != dtype:
                bad = int(jnp.sum(jnp.asarray(w).astype(dtype).astype(w.dtype) != w))
                if bad:
                    name = jnp.dtype(dtype).name
                    return (
                        f"{where} is not exactly representable in {name}: {bad} of {w.size} "
                        "weights would round"
                    )
        return None

    def matrices_stored(
        self, params: dict, dtype: Any, consume: bool = False, check: bool = True
    ) -> dict:
        """The same params with every matrix (layer products, embedding, head) stored in
        `dtype`, the norms and biases as they are: what `Model.with_storage` keeps. ValueError
        naming the first matrix that `dtype` cannot hold exactly (nothing converted then).
        `consume`: convert in the dicts of `params` themselves, each old matrix dropped as its
        copy is made (the peak holds one matrix twice, not the model; `params` is then the
        result's). `check` False: the caller has found every matrix exact already."""
        rounded = self.rounded_matrix(params, dtype) if check else None
        if rounded is not None:
            raise ValueError(
                f"{rounded}; with_storage only stores weights losslessly "
                "(a bfloat16 checkpoint loaded in float32 is); Model.astype rounds them"
            )
        if not consume:  # new dicts over the same arrays
            layers = params["layers"]
            layers = [dict(lp) for lp in layers] if is_unrolled(params) else dict(layers)
            params = dict(params, layers=layers)
        for _, holder, n in self._matrix_slots(params):
            holder[n] = jnp.asarray(holder[n]).astype(dtype)
        return params


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


# ----------------------------------------------------------------------------- param layouts
# Every family keeps its decoder layers under params["layers"]: a list of per-layer dicts (the
# unrolled layout) or one dict of arrays stacked on a leading axis (the scan layout).


def is_unrolled(params: dict) -> bool:
    return isinstance(params["layers"], (list, tuple))


def compute_dtype(params: dict) -> Any:
    """The dtype a model's activations and KV cache run in: its final norm's. That is the
    params' dtype, except where `Model.with_storage` keeps the matrices in bfloat16 and the
    norms (with the computation) in float32."""
    return params["final_norm"].dtype


def unstack_layers(params: dict) -> dict:
    """Stacked layers {name: [L, ...]} -> a list of L per-layer dicts (the unrolled layout)."""
    if is_unrolled(params):
        return params
    L = jax.tree.leaves(params["layers"])[0].shape[0]
    layers = params["layers"]
    return dict(params, layers=[jax.tree.map(lambda x, i=i: x[i], layers) for i in range(L)])


def stack_layers(params: dict) -> dict:
    """Inverse of `unstack_layers` (the scan layout, also the checkpoint layout)."""
    if not is_unrolled(params):
        return params
    return dict(params, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *params["layers"]))
