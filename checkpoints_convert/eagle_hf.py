"""EAGLE drafters in the Hugging Face layout <-> specjax's feature drafter (EagleConfig, params).

The HF layout is the one SafeAILab/EAGLE publishes and vLLM / SGLang load: a directory with a
LlamaConfig-style `config.json` and the drafter's tensors (`model.safetensors`, sharded
safetensors with an index, or `pytorch_model.bin`). Two versions, told apart by their keys:

EAGLE-1/2 (SafeAILab `cnets1.py`)::

    fc.weight [D, 2D]   fc.bias [D]          fc over cat(token embedding, target feature)
    layers.0.self_attn.{q,k,v,o}_proj.weight  layers.0.mlp.{gate,up,down}_proj.weight
    layers.0.post_attention_layernorm.weight  (layer 0 has no input_layernorm)
    embed_tokens.weight [V, D]                optional (see the drafter embedding rule below)

  `fc.bias` is expected unless config.json says `"bias": false` (SafeAILab's loader defaults
  to a bias too).

EAGLE-3 (SafeAILab `cnets.py`, AngelSlim, SpecForge, vLLM `llama_eagle3`)::

    fc.weight [D, 3D]                         fc over cat(low, mid, high) target hidden states
    midlayer.input_layernorm.weight           norm of the token embedding
    midlayer.hidden_norm.weight               norm of the fused feature
    midlayer.self_attn.{q,k,v}_proj.weight [out, 2D]   input cat(embed norm, hidden norm)
    midlayer.self_attn.o_proj.weight  midlayer.post_attention_layernorm.weight
    midlayer.mlp.{gate,up,down}_proj.weight
    norm.weight [D]   lm_head.weight [Vd, D]
    d2t [Vd] int64 OFFSETS (target id = draft id + d2t[draft id]); may be absent when Vd = V
    t2d [V] bool (optional; checked against d2t)   embed_tokens.weight [V, D] (optional)
    fc_norm.{i}.weight [D]                    EAGLE-3.1 (`fc_norm`): one norm per captured layer
    input_norm.weight [3D]                    speculators `norm_before_fc`: a norm over the concat

  Some exports name the layer `layers.0.` instead of `midlayer.`; both are read.
  `draft_vocab_size` in config.json gives Vd (absent: the vocabulary size).

Deeper drafters (either version; `num_hidden_layers` N > 1 in config.json): layers 1..N-1 are
plain Llama decoder layers over the first one's output, under `layers.{i}.` with their own
`input_layernorm.weight` (the layout SGLang's multi-layer EAGLE-3 work uses for the added layers).

Producers (`PRODUCERS`; detected from config.json by `detect_producer`, or named by the caller)
differ in three things the tensors do not show: which target layers the ids in config.json mean,
what `norm_output` means, and whether a drafter embedding that differs from the target's is run:

- "safeailab" (SafeAILab EAGLE `cnets.py` / `cnets1.py`; the plain layout, no producer fields):
  EAGLE-3 captures the residual streams entering layers 2, L//2 and L-3 (hardcoded in its
  target model). Its loader loads the drafter's own `embed_tokens` over the base's.
- "specforge" (SGLang SpecForge; `eagle_config.eagle_aux_hidden_state_layer_ids`, `fc_norm`,
  `norm_output`): SGLang's capture stores the *output* of layer id (`layers_to_capture = id + 1`),
  so id i is HF `hidden_states[i + 1]`; without ids its default (1, L//2 - 1, L - 4) is that
  same (2, L//2, L-3). EAGLE-3.1's `fc_norm` norms each captured layer before fc; `norm_output`
  (default true) says whether the head reads norm(output) or the raw output, and the next draft
  step is fed the raw output either way (SpecForge's training loop). SpecForge trains with the
  target's embedding frozen and SGLang drafts with the target's: a differing `embed_tokens`
  means another target and is refused.
- "vllm" (a flat config with top-level `eagle_aux_hidden_state_layer_ids`, as vLLM reads it
  and `save_eagle_hf` writes it; also `norm_before_residual`, `norm_before_fc`): vLLM's Llama
  forward captures `hidden_states + residual` *before* running layer id, so id i is HF
  `hidden_states[i]`, used as given. `norm_output: true` means the next draft step is fed the
  output after the final norm. vLLM keeps a drafter embedding that differs from the target's.
- "speculators" (vllm-project/speculators: `speculators_model_type`, the layer's config nested
  under `transformer_layer_config`, `speculators_config`): ids and flags as for "vllm" (its
  trainer captures through vLLM; default (2, L//2, L-3)); keys under `layers.0.`,
  `norm_before_fc` adds `input_norm.weight` [n*D]. Only Llama layers are supported (its Qwen3
  layer adds q/k norms).

`EagleConfig.feature_layers` are HF `hidden_states` indices (index i = the residual stream
entering layer i; index L = the last layer's output before the final norm, which is what the
runtimes capture). `load_eagle_hf(..., capture_layers=...)` overrides them; the choice and its
reason are logged (logger `checkpoints_convert.eagle_hf`).

The drafter layer takes its own heads, head size, intermediate size, norm eps and RoPE
(`rope_theta`, `rope_scaling`) from config.json: SafeAILab's EAGLE-3 configs carry no
`rope_theta`, so their layer uses the LlamaConfig default 10000 whatever the target's RoPE.
The hidden size and vocabulary must be the target's.

`embed_tokens.weight`, when present, is compared with the target's embedding (exactly, after
rounding the target's to float32, bfloat16 or float16: a frozen copy saved in any of them
matches): equal -> the target's is shared; different -> used as the drafter's own (producers
whose runtime runs it) or refused (SpecForge). Without the target's embedding to compare (no
`target_embed`), a present embedding is used as the drafter's own.

Every tensor must be used and have the expected shape; errors (`CheckpointMismatch`) name the
HF key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

from checkpoints_convert.hf import IGNORED, CheckpointMismatch, read_hf_config, read_hf_dir
from specjax.models import eagle as eagle_lib
from specjax.models.config import ModelConfig

if TYPE_CHECKING:
    import jax
    from jax.typing import DTypeLike

    from specjax.paths import StrPath

log = logging.getLogger(__name__)

PRODUCERS = ("safeailab", "specforge", "vllm", "speculators")
# Producers whose runtime drafts with a drafter embedding that differs from the target's
# (SafeAILab's `load_state_dict(strict=False)` over the base embedding; vLLM's EAGLE loader
# keeps distinct `embed_tokens`). SpecForge/SGLang always use the target's.
_RUNS_OWN_EMBEDDING = ("safeailab", "vllm", "speculators")
# speculators' top-level fields (the nested layer config must not shadow them).
_SPECULATORS_TOP = (
    "architectures",
    "draft_vocab_size",
    "norm_before_residual",
    "norm_before_fc",
    "fc_norm",
    "norm_output",
    "target_hidden_size",
    "eagle_aux_hidden_state_layer_ids",
    "embed_requires_grad",
)
_LAYER_NUM = re.compile(r"^(?:layers|midlayer)\.(\d+)\.")
V3_PREFIXES = ("midlayer.", "layers.0.")
# HF layer suffix -> role (shared by both versions; EAGLE-3 adds the two input norms).
_ATTN_MLP = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
_V3_NORMS = ("input_layernorm.weight", "hidden_norm.weight")


# ----------------------------------------------------------------------------- config.json


def _flatten_config(raw: dict) -> dict:
    """config.json -> one flat dict. The `speculators` format nests the layer's config under
    `transformer_layer_config`, serialized with `to_diff_dict` (fields equal to the config
    class's defaults are left out): it is parsed by that class, as speculators and vLLM do, and
    its fields win over the top level's except for the speculator's own (`_SPECULATORS_TOP`)."""
    hf = dict(raw)
    nested = hf.pop("transformer_layer_config", None)
    if nested is None:
        return hf
    if not isinstance(nested, dict):
        raise CheckpointMismatch(
            f"transformer_layer_config must be a dict, got {type(nested).__name__}"
        )
    # speculators' own default layer class is Qwen3's (its config's default factory).
    model_type = nested.get("model_type", "qwen3")
    if model_type != "llama":
        raise CheckpointMismatch(
            f"speculators drafter with a {model_type!r} layer (transformer_layer_config."
            f"model_type); only 'llama' layers are supported (a Qwen3 layer adds q/k norms)"
        )
    import transformers

    layer = transformers.LlamaConfig(**nested).to_dict()
    hf.update({k: v for k, v in layer.items() if k not in _SPECULATORS_TOP and v is not None})
    return hf


def _layer_config(hf: dict, target: ModelConfig) -> ModelConfig:
    """The drafter's one decoder layer from its config.json, checked against the target."""
    for field in ("hidden_size", "num_attention_heads", "intermediate_size"):
        if hf.get(field) is None:
            raise CheckpointMismatch(f"EAGLE config.json has no {field!r}")
    n = hf.get("num_hidden_layers")
    n = 1 if n is None else n
    if not isinstance(n, int) or n < 1:
        raise CheckpointMismatch(
            f"EAGLE config.json has num_hidden_layers={n!r}; a drafter has >= 1 decoder layer"
        )
    D = int(hf["hidden_size"])
    if D != target.hidden_size:
        raise CheckpointMismatch(
            f"EAGLE drafter hidden_size {D} differs from the target's {target.hidden_size}: it "
            f"was trained for another model"
        )
    if hf.get("target_hidden_size") not in (None, target.hidden_size):
        raise CheckpointMismatch(
            f"EAGLE drafter reads target features of size {hf['target_hidden_size']} "
            f"(target_hidden_size) but the target's hidden size is {target.hidden_size}"
        )
    V = hf.get("vocab_size")
    if V is not None and int(V) != target.vocab_size:
        raise CheckpointMismatch(
            f"EAGLE drafter vocab_size {V} differs from the target's {target.vocab_size}: it "
            f"was trained for another model"
        )
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointMismatch(f"EAGLE drafter uses hidden_act={act!r}; only silu is supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointMismatch("EAGLE drafters with attention_bias / mlp_bias are not supported")
    # The layer is a Llama layer whatever the target family (Qwen2 targets still get Llama
    # drafter configs); model_type only selects how the fields are parsed.
    parsed = ModelConfig.from_hf(
        {
            **hf,
            "model_type": "llama",
            "num_hidden_layers": 1,
            "vocab_size": target.vocab_size,
            "attention_bias": False,
        }
    )
    return dataclasses.replace(
        parsed,
        num_layers=n,
        sliding_window=None,
        attention_bias=False,
        tie_word_embeddings=False,
        model_type="llama",
        # Not a property of the layer: keep the target's context limit and special tokens.
        max_position_embeddings=target.max_position_embeddings,
        eos_token_ids=target.eos_token_ids,
        bos_token_id=target.bos_token_id,
    )


def detect_producer(raw: dict) -> tuple[str, str]:
    """-> (producer, reason): who wrote this config.json (see the module docstring)."""
    archs = raw.get("architectures") or []
    ec = raw.get("eagle_config")
    if any(
        k in raw
        for k in ("speculators_model_type", "speculators_config", "transformer_layer_config")
    ):
        return "speculators", "config.json has speculators fields (speculators_model_type)"
    if isinstance(ec, dict) and ec.get("eagle_aux_hidden_state_layer_ids") is not None:
        return "specforge", "config.json has eagle_config.eagle_aux_hidden_state_layer_ids"
    if (
        raw.get("eagle_aux_hidden_state_layer_ids") is not None
        or "Eagle3LlamaForCausalLM" in archs
        or any(k in raw for k in ("norm_before_residual", "norm_before_fc"))
    ):
        return "vllm", (
            "config.json has vLLM's fields (top-level "
            "eagle_aux_hidden_state_layer_ids / norm_before_residual / "
            "norm_before_fc / architecture Eagle3LlamaForCausalLM)"
        )
    if "fc_norm" in raw or "norm_output" in raw:
        return "specforge", "config.json has SpecForge's EAGLE-3.1 fields (fc_norm / norm_output)"
    return "safeailab", "config.json has no producer-specific fields (SafeAILab's layout)"


def _int_list(ids: Any, what: str) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise CheckpointMismatch(f"{what} must be a list of ints, got {ids!r}")
    return [int(i) for i in ids]


def _checkpoint_ids(hf: dict, producer: str) -> tuple[list[int] | None, str | None]:
    """-> (ids or None, where they were read) as the producer writes them."""
    ec = hf.get("eagle_config")
    nested = ec.get("eagle_aux_hidden_state_layer_ids") if isinstance(ec, dict) else None
    top = hf.get("eagle_aux_hidden_state_layer_ids")
    if nested is not None and top is not None and list(nested) != list(top):
        raise CheckpointMismatch(
            f"config.json has both eagle_aux_hidden_state_layer_ids {top} and "
            f"eagle_config.eagle_aux_hidden_state_layer_ids {nested}, which disagree; pass "
            f"capture_layers= (HF hidden_states indices) to say which layers it was trained on"
        )
    if producer == "specforge" and nested is not None:
        return _int_list(
            nested, "eagle_config.eagle_aux_hidden_state_layer_ids"
        ), "eagle_config.eagle_aux_hidden_state_layer_ids"
    if top is not None:
        return _int_list(
            top, "eagle_aux_hidden_state_layer_ids"
        ), "eagle_aux_hidden_state_layer_ids"
    if nested is not None:
        return _int_list(
            nested, "eagle_config.eagle_aux_hidden_state_layer_ids"
        ), "eagle_config.eagle_aux_hidden_state_layer_ids"
    return None, None


def _feature_layers(
    hf: dict, producer: str, target: ModelConfig, override: Sequence[int] | None = None
) -> tuple[tuple[int, ...], str]:
    """EAGLE-3's captured target layers as HF hidden_states indices -> (layers, reason)."""
    L = target.num_layers
    ids, where = (None, None) if override is not None else _checkpoint_ids(hf, producer)
    if override is not None:
        layers = _int_list(list(override), "capture_layers")
        reason = "capture_layers given by the caller"
    elif ids is None:
        layers = list(eagle_lib.default_feature_layers(L))
        reason = (
            f"config.json names no layers: EAGLE-3's default (2, L//2, L-3) for L={L}, "
            f"which SafeAILab, SpecForge/SGLang and vLLM all use"
        )
    elif producer == "specforge":
        # SGLang stores the output of layer id, i.e. the stream entering layer id + 1.
        layers = [i + 1 for i in ids]
        reason = (
            f"SpecForge {where} {ids} + 1: SGLang captures the output of layer id "
            f"(HF hidden_states[id + 1])"
        )
    else:
        layers = list(ids)
        reason = (
            f"{producer} {where} {ids} as given: vLLM captures the stream entering layer "
            f"id (HF hidden_states[id])"
        )
    bad = [i for i in layers if not 0 <= i <= L]
    if bad:
        raise CheckpointMismatch(
            f"capture layers {layers} ({reason}) name hidden states {bad} outside 0..{L} of a "
            f"target with {L} layers"
        )
    return tuple(layers), reason


def _variant_flags(hf: dict, producer: str) -> dict:
    """EagleConfig's version-3 variant flags from config.json, read as `producer` means them."""
    fields = {
        k: hf[k]
        for k in ("fc_norm", "norm_output", "norm_before_residual", "norm_before_fc")
        if hf.get(k) is not None
    }
    for k, v in fields.items():
        if not isinstance(v, bool):
            raise CheckpointMismatch(f"config.json {k} must be true or false, got {v!r}")
    flags = {"fc_norm": fields.get("fc_norm", False)}
    if producer in ("vllm", "speculators"):
        flags.update(
            norm_before_residual=fields.get("norm_before_residual", False),
            fc_input_norm=fields.get("norm_before_fc", False),
            feed_normed=fields.get("norm_output", False),
        )
        if flags["fc_norm"] and flags["fc_input_norm"]:
            raise CheckpointMismatch(
                "config.json sets both fc_norm and norm_before_fc; they "
                "are exclusive (one norm per layer or one over the concat)"
            )
        return flags
    # SafeAILab's and SpecForge's modules have neither field: a set one means another producer.
    alien = [k for k in ("norm_before_residual", "norm_before_fc") if fields.get(k)]
    if alien:
        raise CheckpointMismatch(
            f"config.json sets {', '.join(alien)}, which {producer}'s EAGLE-3 module does not "
            f"have; pass producer='vllm' or 'speculators' if it was trained with it"
        )
    if producer == "specforge":  # SpecForge: norm_output = the head reads norm(output)
        flags["head_norm"] = fields.get("norm_output", True)
    elif "norm_output" in fields or flags["fc_norm"]:
        raise CheckpointMismatch(
            "config.json sets fc_norm / norm_output, which SafeAILab's EAGLE-3 module does not "
            "have; pass producer='specforge', 'vllm' or 'speculators'"
        )
    return flags


# ----------------------------------------------------------------------------- tensors


def _read_state(path: str) -> dict:
    """All tensors of the checkpoint directory (non-parameter buffers dropped)."""
    state = read_hf_dir(path)
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, name)
        if not os.path.exists(index):
            continue
        with open(index) as f:
            wanted = json.load(f).get("weight_map", {})
        lost = sorted(k for k in wanted if k not in state)
        if lost:
            raise CheckpointMismatch(
                f"{index} lists tensor(s) missing from the shards present: {', '.join(lost[:8])}"
            )
    return {k: np.asarray(v) for k, v in state.items() if not IGNORED.match(k)}


def _detect_version(state: dict, hf: dict) -> int:
    keys = set(state)
    archs = " ".join(hf.get("architectures") or []).lower()
    if (
        any(k.startswith("midlayer.") or k.endswith("hidden_norm.weight") for k in keys)
        or keys & {"d2t", "t2d", "lm_head.weight", "norm.weight"}
        or "eagle3" in archs
        or hf.get("speculators_model_type") == "eagle3"
    ):
        return 3
    if "fc.weight" in keys or any(k.startswith("layers.") for k in keys):
        return 1
    raise CheckpointMismatch(
        f"not an EAGLE drafter checkpoint: no 'fc.weight' or decoder layer keys; found "
        f"{', '.join(sorted(keys)[:8])}"
    )


def _check_layer_count(state: dict, n: int) -> None:
    """The checkpoint's numbered decoder layers are 1..n-1 (layer 0 may be `midlayer.`)."""
    found = sorted({int(m.group(1)) for k in state if (m := _LAYER_NUM.match(k))} - {0})
    if found != list(range(1, n)):
        first = next(
            (k for k in sorted(state) if (m := _LAYER_NUM.match(k)) and int(m.group(1)) >= n),
            None,
        )
        raise CheckpointMismatch(
            f"EAGLE checkpoint has decoder layers {[0] + found}"
            + (f" (e.g. {first!r})" if first else "")
            + f" but its config.json says num_hidden_layers={n} (layers 0..{n - 1})"
        )


def _added_shapes(lc: ModelConfig) -> dict:
    """Expected shapes of layers 1.. of a deeper drafter (`layers.{i}.`)."""
    shapes = {}
    for i in range(1, lc.num_layers):
        shapes.update(_layer_shapes(lc, f"layers.{i}.", lc.hidden_size))
        shapes[f"layers.{i}.input_layernorm.weight"] = (lc.hidden_size,)
    return shapes


def _added_params(state: dict, lc: ModelConfig, cast: Callable[[np.ndarray], jax.Array]) -> dict:
    """{"layers": [...]} of a deeper drafter's layers 1.. (nothing for one layer)."""
    layers = [
        {
            "attn_norm": cast(state[f"layers.{i}.input_layernorm.weight"]),
            **_layer_params(state, f"layers.{i}.", cast),
        }
        for i in range(1, lc.num_layers)
    ]
    return {"layers": layers} if layers else {}


def _check_tensors(
    state: dict, required: dict, optional: dict, version: int, hint: str = ""
) -> None:
    """Every key known, every required key present, every shape as expected (HF [out, in])."""
    extra = sorted(k for k in state if k not in required and k not in optional)
    if extra:
        raise CheckpointMismatch(
            f"{len(extra)} checkpoint tensor(s) not used by an EAGLE-{version} drafter: "
            f"{', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}"
        )
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointMismatch(
            f"EAGLE-{version} checkpoint is missing {len(missing)} tensor(s): "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}{hint}"
        )
    for key, want in {**required, **optional}.items():
        if key in state and tuple(state[key].shape) != tuple(want):
            raise CheckpointMismatch(
                f"checkpoint tensor {key!r} has shape {tuple(state[key].shape)}; expected "
                f"{tuple(want)} for this config"
            )


def _layer_shapes(lc: ModelConfig, prefix: str, d_in: int) -> dict:
    D, F = lc.hidden_size, lc.intermediate_size
    q, kv = lc.num_heads * lc.head_dim, lc.num_kv_heads * lc.head_dim
    shapes = ((q, d_in), (kv, d_in), (kv, d_in), (D, q), (D,), (F, D), (F, D), (D, F))
    return {prefix + s: shape for s, shape in zip(_ATTN_MLP, shapes)}


def _layer_params(state: dict, prefix: str, cast: Callable[[np.ndarray], jax.Array]) -> dict:
    t = lambda s: state[prefix + s].T  # noqa: E731  torch [out, in] -> ours [in, out]
    return {
        "wqkv": cast(
            np.concatenate(
                [
                    t("self_attn.q_proj.weight"),
                    t("self_attn.k_proj.weight"),
                    t("self_attn.v_proj.weight"),
                ],
                axis=-1,
            )
        ),
        "wo": cast(t("self_attn.o_proj.weight")),
        "mlp_norm": cast(state[prefix + "post_attention_layernorm.weight"]),
        "w_gate_up": cast(
            np.concatenate([t("mlp.gate_proj.weight"), t("mlp.up_proj.weight")], axis=-1)
        ),
        "w_down": cast(t("mlp.down_proj.weight")),
    }


def _as_int(arr: np.ndarray, key: str) -> np.ndarray:
    """Integer values of `arr` (legacy .bin reads and bf16 safetensors arrive as floats)."""
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        return arr.astype(np.int64)
    r = np.rint(arr.astype(np.float64))
    if not np.array_equal(r, arr.astype(np.float64)):
        raise CheckpointMismatch(f"checkpoint tensor {key!r} must hold integers")
    return r.astype(np.int64)


def _same_table(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether embedding `a` is a copy of `b` saved in float32, bfloat16 or float16 (a frozen
    copy is the target's table cast to the checkpoint's dtype; upcasts are exact)."""
    import ml_dtypes

    if a.shape != b.shape:
        return False
    a = a.astype(np.float32)
    for dt in (np.float32, ml_dtypes.bfloat16, np.float16):
        if np.array_equal(a.astype(dt).astype(np.float32), b.astype(dt).astype(np.float32)):
            return True
    return False


def _own_embedding(
    state: dict, producer: str, target_embed: np.ndarray | jax.Array | None
) -> np.ndarray | None:
    """The drafter's `embed_tokens.weight` when it must be run as its own, else None (absent, or
    a copy of the target's, which is then shared). Refused when it differs from the target's
    and the producer's runtime would not run it (module docstring)."""
    mine = state.get("embed_tokens.weight")
    if mine is None:
        return None
    if target_embed is None:
        log.info(
            "EAGLE drafter carries embed_tokens.weight and no target embedding was given "
            "to compare it with: drafting with the drafter's own"
        )
        return mine
    theirs = np.asarray(target_embed, np.float32)
    if _same_table(mine, theirs):
        log.info("EAGLE drafter's embed_tokens.weight equals the target's: sharing the target's")
        return None
    diff = float(np.max(np.abs(mine.astype(np.float32) - theirs)))
    if producer not in _RUNS_OWN_EMBEDDING:
        raise CheckpointMismatch(
            f"EAGLE drafter's embed_tokens.weight differs from the target's (max |diff| "
            f"{diff:.3g}); a {producer} drafter is trained on its target's frozen embedding and "
            f"drafted with the target's, so it was made for another target. Producers whose "
            f"runtime drafts with their own embedding: {', '.join(_RUNS_OWN_EMBEDDING)} "
            f"(pass producer= to run it as one of them)"
        )
    warnings.warn(
        f"EAGLE drafter's embed_tokens.weight differs from the target's (max |diff| "
        f"{diff:.3g}): drafting with the drafter's own embedding, as {producer}'s "
        f"runtime does",
        stacklevel=3,
    )
    return mine


def _d2t_absolute(state: dict, Vd: int, V: int) -> np.ndarray:
    """d2t offsets -> absolute target ids [Vd] int32 (validated against t2d when present)."""
    if "d2t" in state:
        ids = np.arange(Vd, dtype=np.int64) + _as_int(state["d2t"], "d2t")
    else:  # only allowed when Vd == V (checked by the caller): the identity map
        ids = np.arange(Vd, dtype=np.int64)
    bad = np.flatnonzero((ids < 0) | (ids >= V))
    if bad.size:
        raise CheckpointMismatch(
            f"'d2t' maps draft id(s) {bad[:5].tolist()} to target id(s) {ids[bad[:5]].tolist()} "
            f"outside [0, {V}) (d2t holds offsets: target id = draft id + d2t[draft id])"
        )
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise CheckpointMismatch(
            f"'d2t' maps several draft ids to target id(s) {uniq[counts > 1][:5].tolist()}"
        )
    if "t2d" in state:
        t2d = _as_int(state["t2d"], "t2d")
        if not np.isin(t2d, (0, 1)).all():
            raise CheckpointMismatch("checkpoint tensor 't2d' must be boolean")
        if int(t2d.sum()) != Vd or not t2d[ids].all():
            raise CheckpointMismatch(
                f"'t2d' marks {int(t2d.sum())} target ids but 'd2t' maps the {Vd} draft ids to "
                f"a different set: the two maps disagree"
            )
    return ids.astype(np.int32)


# ----------------------------------------------------------------------------- public API


def load_eagle_hf(
    path: StrPath,
    target_cfg: ModelConfig,
    dtype: DTypeLike = jnp.float32,
    *,
    target_embed: np.ndarray | jax.Array | None = None,
    producer: str | None = None,
    capture_layers: Sequence[int] | None = None,
) -> tuple[eagle_lib.EagleConfig, dict]:
    """An HF-format EAGLE-1/2 or EAGLE-3 drafter directory -> (EagleConfig, params).

    `target_cfg`: the target's ModelConfig (hidden size, vocabulary and layer count are checked
    against it; EAGLE-3's capture layers are resolved for it). `target_embed` [V, D]: the
    target's embedding, compared with a drafter `embed_tokens.weight` (module docstring).
    `producer`: one of PRODUCERS, overriding `detect_producer`; `capture_layers`: the target's
    HF hidden_states indices fc reads, overriding config.json. Float params are `dtype` jax
    arrays; EAGLE-3's `d2t` becomes absolute target ids (int32). Bind the target's embedding
    (and, for EAGLE-1, head) with `bind_target` before running them.
    """
    E = eagle_lib
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"EAGLE drafter checkpoint {path!r} is not a directory")
    raw = read_hf_config(path)
    detected, why = detect_producer(raw)
    if producer is None:
        producer = detected
    elif producer not in PRODUCERS:
        raise ValueError(f"EAGLE producer must be one of {PRODUCERS}, got {producer!r}")
    else:
        why = f"given by the caller (config.json looks like {detected}: {why})"
    log.info("EAGLE drafter %s: producer %s, %s", path, producer, why)
    kind = raw.get("speculators_model_type")
    if kind not in (None, "eagle3"):
        raise CheckpointMismatch(
            f"speculators_model_type {kind!r} is not supported; specjax "
            f"reads speculators 'eagle3' drafters"
        )
    hf = _flatten_config(raw)
    state = _read_state(path)
    version = _detect_version(state, hf)
    layer = _layer_config(hf, target_cfg)
    _check_layer_count(state, layer.num_layers)
    D, V = layer.hidden_size, target_cfg.vocab_size
    cast = lambda x: jnp.asarray(np.asarray(x, np.float32), dtype)  # noqa: E731
    # Shape-checked here, compared with the target's below (never silently dropped).
    optional = {"embed_tokens.weight": (V, D)}

    if version == 1:
        if capture_layers is not None:
            raise ValueError(
                "capture_layers applies to EAGLE-3 drafters; this checkpoint is "
                "EAGLE-1/2 (it reads the target's last hidden state)"
            )
        bias = bool(hf.get("bias", True))
        required = {"fc.weight": (D, 2 * D)}
        if bias:
            required["fc.bias"] = (D,)
        required.update(_layer_shapes(layer, "layers.0.", D))
        required.update(_added_shapes(layer))
        hint = (
            '; config.json has no "bias" entry, so (like SafeAILab\'s loader) fc.bias is '
            'expected: set "bias": false if the drafter has none'
            if bias and "bias" not in hf and "fc.bias" not in state
            else ""
        )
        _check_tensors(state, required, optional, 1, hint)
        cfg = E.EagleConfig(version=1, layer=layer, fc_bias=bias)
        params = {
            "fc": cast(state["fc.weight"].T),
            "layer": _layer_params(state, "layers.0.", cast),
            **_added_params(state, layer, cast),
        }
        if bias:
            params["fc_b"] = cast(state["fc.bias"])
        own = _own_embedding(state, producer, target_embed)
        if own is not None:
            params["embed"] = cast(own)
        return cfg, params

    prefix = "midlayer." if any(k.startswith("midlayer.") for k in state) else "layers.0."
    feature_layers, reason = _feature_layers(hf, producer, target_cfg, capture_layers)
    n = len(feature_layers)
    if "fc.weight" in state and state["fc.weight"].shape[-1] != n * D:
        raise CheckpointMismatch(
            f"fc.weight reads {state['fc.weight'].shape[-1] / D:g} target layers of size {D} but "
            f"{n} capture layers were chosen ({list(feature_layers)}: {reason})"
        )
    log.info("EAGLE-3 capture layers (HF hidden_states) %s: %s", list(feature_layers), reason)
    flags = _variant_flags(hf, producer)
    Vd = int(hf.get("draft_vocab_size") or V)
    if Vd > V:
        raise CheckpointMismatch(
            f"EAGLE-3 draft_vocab_size {Vd} is larger than the target's vocabulary {V}"
        )
    required = {"fc.weight": (D, n * D)}
    if flags["fc_norm"]:
        required.update({f"fc_norm.{i}.weight": (D,) for i in range(n)})
    if flags.get("fc_input_norm"):
        required["input_norm.weight"] = (n * D,)
    required.update({prefix + s: (D,) for s in _V3_NORMS})
    required.update(_layer_shapes(layer, prefix, 2 * D))
    required.update(_added_shapes(layer))
    required.update({"norm.weight": (D,), "lm_head.weight": (Vd, D)})
    if Vd != V:
        required["d2t"] = (Vd,)
    else:
        optional["d2t"] = (Vd,)
    optional["t2d"] = (V,)
    hint = (
        "; config.json sets fc_norm (EAGLE-3.1: one norm per captured layer)"
        if flags["fc_norm"]
        else ""
    )
    _check_tensors(state, required, optional, 3, hint)
    d2t = _d2t_absolute(state, Vd, V)
    cfg = E.EagleConfig(
        version=3,
        layer=layer,
        feature_layers=feature_layers,
        draft_vocab=Vd,
        fc_bias=False,
        **flags,
    )
    lp = _layer_params(state, prefix, cast)
    lp["embed_norm"] = cast(state[prefix + "input_layernorm.weight"])
    lp["hidden_norm"] = cast(state[prefix + "hidden_norm.weight"])
    params = {
        "fc": cast(state["fc.weight"].T),
        "layer": lp,
        "norm": cast(state["norm.weight"]),
        "lm_head": cast(state["lm_head.weight"].T),
        "d2t": jnp.asarray(d2t, jnp.int32),
        **_added_params(state, layer, cast),
    }
    if flags["fc_norm"]:
        params["fc_norm"] = cast(np.stack([state[f"fc_norm.{i}.weight"] for i in range(n)]))
    if flags.get("fc_input_norm"):
        params["fc_input_norm"] = cast(state["input_norm.weight"])
    own = _own_embedding(state, producer, target_embed)
    if own is not None:
        params["embed"] = cast(own)
    return cfg, params


def _hf_layer(lc: ModelConfig, lp: dict, prefix: str) -> dict:
    """A decoder layer's attention and MLP tensors in the HF layout (torch's [out, in])."""
    H, KV, hd = lc.num_heads, lc.num_kv_heads, lc.head_dim
    t = lambda x: np.ascontiguousarray(np.asarray(x).T)  # noqa: E731
    q, k, v = np.split(np.asarray(lp["wqkv"]), [H * hd, (H + KV) * hd], axis=-1)
    gate, up = np.split(np.asarray(lp["w_gate_up"]), 2, axis=-1)
    tensors = (t(q), t(k), t(v), t(lp["wo"]), np.asarray(lp["mlp_norm"]))
    tensors += (t(gate), t(up), t(lp["w_down"]))
    return {prefix + s: w for s, w in zip(_ATTN_MLP, tensors)}


def _hf_config(cfg: eagle_lib.EagleConfig, target_cfg: ModelConfig, dtype_name: str) -> dict:
    L = cfg.layer
    out = {
        "architectures": ["LlamaForCausalLMEagle3" if cfg.version == 3 else "LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": L.hidden_size,
        "intermediate_size": L.intermediate_size,
        "num_attention_heads": L.num_heads,
        "num_key_value_heads": L.num_kv_heads,
        "head_dim": L.head_dim,
        "num_hidden_layers": L.num_layers,
        "hidden_act": "silu",
        "rms_norm_eps": L.rms_norm_eps,
        "rope_theta": L.rope_theta,
        "max_position_embeddings": L.max_position_embeddings,
        "vocab_size": target_cfg.vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "torch_dtype": dtype_name,
    }
    rs = L.rope_scaling
    if rs.rope_type != "default":
        out["rope_scaling"] = dataclasses.asdict(rs)
    if target_cfg.bos_token_id is not None:
        out["bos_token_id"] = target_cfg.bos_token_id
    if target_cfg.eos_token_ids:
        eos = list(target_cfg.eos_token_ids)
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if cfg.version == 1:
        out["bias"] = bool(cfg.fc_bias)
    else:
        out["draft_vocab_size"] = int(cfg.draft_vocab)
        # HF hidden_states indices = vLLM's convention for this field (no shift); the variant
        # flags are written as vLLM reads them (the producer `load_eagle_hf` detects: "vllm").
        out["eagle_aux_hidden_state_layer_ids"] = [int(i) for i in cfg.feature_layers]
        for name, key in (
            ("fc_norm", "fc_norm"),
            ("fc_input_norm", "norm_before_fc"),
            ("norm_before_residual", "norm_before_residual"),
            ("feed_normed", "norm_output"),
        ):
            if getattr(cfg, name):
                out[key] = True
    return out


def save_eagle_hf(
    path: StrPath,
    cfg: eagle_lib.EagleConfig,
    params: dict,
    target_cfg: ModelConfig,
    embed: np.ndarray | jax.Array | None = None,
) -> None:
    """Write (EagleConfig, params) as an HF EAGLE checkpoint: config.json + model.safetensors,
    in the layout `load_eagle_hf` reads (EAGLE-3 under `midlayer.`, d2t as int64 offsets, t2d).

    The target's embedding is not written unless given as `embed` [V, D] (or present in bound
    params under "target"): vLLM and SGLang share it from the target when it is absent. A
    drafter's own embedding (params["embed"]) is always written.
    """
    from safetensors.numpy import save_file

    if not cfg.head_norm:
        raise ValueError(
            "EagleConfig.head_norm=False (SpecForge's norm_output: false) has no "
            "field in the vLLM-style config save_eagle_hf writes"
        )
    if cfg.version == 1 and bool(cfg.fc_bias) != ("fc_b" in params):
        raise ValueError(
            f"EagleConfig.fc_bias={cfg.fc_bias} but the params "
            f"{'lack' if cfg.fc_bias else 'have'} 'fc_b'"
        )
    arr = lambda x: np.asarray(x)  # noqa: E731  (bfloat16 stays bfloat16: safetensors has it)
    t = lambda x: np.ascontiguousarray(arr(x).T)  # noqa: E731  ours [in, out] -> torch [out, in]
    lp = params["layer"]
    prefix = "layers.0." if cfg.version == 1 else "midlayer."
    state = {"fc.weight": t(params["fc"]), **_hf_layer(cfg.layer, lp, prefix)}
    for i, extra in enumerate(params.get("layers", ()), start=1):
        state.update(_hf_layer(cfg.layer, extra, f"layers.{i}."))
        state[f"layers.{i}.input_layernorm.weight"] = arr(extra["attn_norm"])
    if cfg.version == 1:
        if "fc_b" in params:
            state["fc.bias"] = arr(params["fc_b"])
    else:
        state[prefix + "input_layernorm.weight"] = arr(lp["embed_norm"])
        state[prefix + "hidden_norm.weight"] = arr(lp["hidden_norm"])
        state["norm.weight"] = arr(params["norm"])
        state["lm_head.weight"] = t(params["lm_head"])
        ids = np.asarray(params["d2t"]).astype(np.int64)
        state["d2t"] = ids - np.arange(ids.shape[0], dtype=np.int64)  # offsets
        t2d = np.zeros((target_cfg.vocab_size,), np.bool_)
        t2d[ids] = True
        state["t2d"] = t2d
        if cfg.fc_norm:
            state.update({f"fc_norm.{i}.weight": w for i, w in enumerate(arr(params["fc_norm"]))})
        if cfg.fc_input_norm:
            state["input_norm.weight"] = arr(params["fc_input_norm"])
    if "embed" in params:  # the drafter's own embedding (see load_eagle_hf)
        if embed is not None:
            raise ValueError(
                "params carry the drafter's own embedding ('embed'); do not also pass embed="
            )
        embed = params["embed"]
    if embed is None and isinstance(params.get("target"), dict):
        embed = params["target"].get("embed")
    if embed is not None:
        state["embed_tokens.weight"] = arr(embed)
    floats = {
        str(w.dtype) for w in state.values() if w.dtype.kind == "f" or str(w.dtype) == "bfloat16"
    }
    dtype_name = floats.pop() if len(floats) == 1 else "float32"
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_hf_config(cfg, target_cfg, dtype_name), f, indent=2)
    save_file(
        {k: np.ascontiguousarray(w) for k, w in state.items()},
        os.path.join(path, "model.safetensors"),
        metadata={"format": "pt"},
    )
