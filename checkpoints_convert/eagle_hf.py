"""EAGLE drafters in the Hugging Face layout <-> specjax's feature drafter (EagleConfig, params).

The HF layout is the one SafeAILab/EAGLE publishes and vLLM / SGLang load: a directory with a
LlamaConfig-style `config.json` and the drafter's tensors (`model.safetensors`, sharded
safetensors with an index, or `pytorch_model.bin`). Two versions, told apart by their keys:

EAGLE-1/2 (SafeAILab `cnets1.py`)::

    fc.weight [D, 2D]   fc.bias [D]          fc over cat(token embedding, target feature)
    layers.0.self_attn.{q,k,v,o}_proj.weight  layers.0.mlp.{gate,up,down}_proj.weight
    layers.0.post_attention_layernorm.weight  (layer 0 has no input_layernorm)
    embed_tokens.weight [V, D]                optional frozen copy of the target's embedding

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

  Some exports name the layer `layers.0.` instead of `midlayer.`; both are read.
  `draft_vocab_size` in config.json gives Vd (absent: the vocabulary size).

Target layers fused by EAGLE-3 (`EagleConfig.feature_layers`, HF `hidden_states` indices, i.e.
index i = the residual stream entering layer i): taken from `eagle_aux_hidden_state_layer_ids`
(top level of config.json, or inside `eagle_config`), else EAGLE-3's default (2, L//2, L-3) for
the target's L layers. vLLM's `eagle_aux_hidden_state_layer_ids` use that same convention: its
Llama forward appends `hidden_states + residual` *before* running layer `idx`, so id i is HF
`hidden_states[i]` (the default ids (2, L//2, L-3) equal SafeAILab's). They are used as given,
with no +1 shift; `save_eagle_hf` writes them the same way. (Trainers that count "the output of
layer j", e.g. SpecForge's internal ids or DFlash's `target_layer_ids`, are 1 lower.)

The drafter layer takes its own heads, head size, intermediate size, norm eps and RoPE
(`rope_theta`, `rope_scaling`) from config.json: SafeAILab's EAGLE-3 configs carry no
`rope_theta`, so their layer uses the LlamaConfig default 10000 whatever the target's RoPE.
The hidden size and vocabulary must be the target's.

Every tensor must be used and have the expected shape; errors (`CheckpointMismatch`) name the
HF key.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional

import jax.numpy as jnp
import numpy as np

from checkpoints_convert.hf import IGNORED, CheckpointMismatch, read_hf_config, read_hf_dir
from specjax.models.config import ModelConfig

_LAYER_NUM = re.compile(r"^(?:layers|midlayer)\.(\d+)\.")
V3_PREFIXES = ("midlayer.", "layers.0.")
# HF layer suffix -> role (shared by both versions; EAGLE-3 adds the two input norms).
_ATTN_MLP = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "self_attn.o_proj.weight", "post_attention_layernorm.weight",
             "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
_V3_NORMS = ("input_layernorm.weight", "hidden_norm.weight")


def _eagle_lib():
    """The feature-drafter module, imported late (specjax imports this package)."""
    import importlib

    return importlib.import_module("specjax.drafters.feature")


# ----------------------------------------------------------------------------- config.json

def _flatten_config(raw: dict) -> dict:
    """config.json -> one flat dict. The `speculators` format nests the layer's LlamaConfig
    under `transformer_layer_config`; its fields win over the top level's."""
    hf = dict(raw)
    nested = hf.pop("transformer_layer_config", None)
    if isinstance(nested, dict):
        hf.update(nested)
    return hf


def _layer_config(hf: dict, target: ModelConfig) -> ModelConfig:
    """The drafter's one decoder layer from its config.json, checked against the target."""
    for field in ("hidden_size", "num_attention_heads", "intermediate_size"):
        if hf.get(field) is None:
            raise CheckpointMismatch(f"EAGLE config.json has no {field!r}")
    n = int(hf.get("num_hidden_layers", 1) or 1)
    if n != 1:
        raise CheckpointMismatch(
            f"EAGLE config.json has num_hidden_layers={n}; specjax's EAGLE drafter has exactly "
            f"one decoder layer (multi-layer drafters are not supported)")
    D = int(hf["hidden_size"])
    if D != target.hidden_size:
        raise CheckpointMismatch(
            f"EAGLE drafter hidden_size {D} differs from the target's {target.hidden_size}: it "
            f"was trained for another model")
    if hf.get("target_hidden_size") not in (None, target.hidden_size):
        raise CheckpointMismatch(
            f"EAGLE drafter reads target features of size {hf['target_hidden_size']} "
            f"(target_hidden_size) but the target's hidden size is {target.hidden_size}")
    V = hf.get("vocab_size")
    if V is not None and int(V) != target.vocab_size:
        raise CheckpointMismatch(
            f"EAGLE drafter vocab_size {V} differs from the target's {target.vocab_size}: it "
            f"was trained for another model")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointMismatch(f"EAGLE drafter uses hidden_act={act!r}; only silu is supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointMismatch("EAGLE drafters with attention_bias / mlp_bias are not supported")
    if hf.get("norm_before_residual"):
        raise CheckpointMismatch(
            "EAGLE-3 config sets norm_before_residual=true (the layer's residual is the normed "
            "feature); specjax's drafter uses the un-normed feature as residual (SafeAILab's "
            "definition), so this checkpoint is not supported")
    # The layer is a Llama layer whatever the target family (Qwen2 targets still get Llama
    # drafter configs); model_type only selects how the fields are parsed.
    parsed = ModelConfig.from_hf({**hf, "model_type": "llama", "num_hidden_layers": 1,
                                  "vocab_size": target.vocab_size, "attention_bias": False})
    return dataclasses.replace(
        parsed, num_layers=1, sliding_window=None, attention_bias=False,
        tie_word_embeddings=False, model_type="llama",
        # Not a property of the layer: keep the target's context limit and special tokens.
        max_position_embeddings=target.max_position_embeddings,
        eos_token_ids=target.eos_token_ids, bos_token_id=target.bos_token_id)


def _feature_layers(hf: dict, target: ModelConfig) -> tuple:
    """EAGLE-3's target layers (HF hidden_states indices; see the module docstring)."""
    ids = hf.get("eagle_aux_hidden_state_layer_ids")
    eagle_config = hf.get("eagle_config")
    if not ids and isinstance(eagle_config, dict):
        ids = eagle_config.get("eagle_aux_hidden_state_layer_ids")
    if not ids:
        return tuple(_eagle_lib().default_feature_layers(target.num_layers))
    if not isinstance(ids, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CheckpointMismatch(f"eagle_aux_hidden_state_layer_ids must be a list of ints, got "
                                 f"{ids!r}")
    bad = [i for i in ids if not 0 <= i <= target.num_layers]
    if bad:
        raise CheckpointMismatch(
            f"eagle_aux_hidden_state_layer_ids {list(ids)} name hidden states {bad} outside "
            f"0..{target.num_layers} of a target with {target.num_layers} layers")
    return tuple(int(i) for i in ids)


# ----------------------------------------------------------------------------- tensors

def _read_state(path: str) -> dict:
    """All tensors of the checkpoint directory (non-parameter buffers dropped)."""
    state = read_hf_dir(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            wanted = json.load(f).get("weight_map", {})
        lost = sorted(k for k in wanted if k not in state)
        if lost:
            raise CheckpointMismatch(
                f"{index} lists tensor(s) missing from the shards present: {', '.join(lost[:8])}")
    return {k: np.asarray(v) for k, v in state.items() if not IGNORED.match(k)}


def _detect_version(state: dict, hf: dict) -> int:
    keys = set(state)
    archs = " ".join(hf.get("architectures") or []).lower()
    if (any(k.startswith("midlayer.") or k.endswith("hidden_norm.weight") for k in keys)
            or keys & {"d2t", "t2d", "lm_head.weight", "norm.weight"}
            or "eagle3" in archs or hf.get("speculators_model_type") == "eagle3"):
        return 3
    if "fc.weight" in keys or any(k.startswith("layers.") for k in keys):
        return 1
    raise CheckpointMismatch(
        f"not an EAGLE drafter checkpoint: no 'fc.weight' or decoder layer keys; found "
        f"{', '.join(sorted(keys)[:8])}")


def _check_single_layer(state: dict):
    extra = sorted({int(m.group(1)) for k in state if (m := _LAYER_NUM.match(k))} - {0})
    if extra:
        first = next(k for k in sorted(state) if (m := _LAYER_NUM.match(k))
                     and int(m.group(1)) == extra[0])
        raise CheckpointMismatch(
            f"EAGLE checkpoint has decoder layer(s) {[0] + extra} (e.g. {first!r}); specjax's "
            f"EAGLE drafter has exactly one decoder layer (multi-layer drafters are not "
            f"supported)")


def _check_tensors(state: dict, required: dict, optional: dict, version: int, hint: str = ""):
    """Every key known, every required key present, every shape as expected (HF [out, in])."""
    extra = sorted(k for k in state if k not in required and k not in optional)
    if extra:
        raise CheckpointMismatch(
            f"{len(extra)} checkpoint tensor(s) not used by an EAGLE-{version} drafter: "
            f"{', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointMismatch(
            f"EAGLE-{version} checkpoint is missing {len(missing)} tensor(s): "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}{hint}")
    for key, want in {**required, **optional}.items():
        if key in state and tuple(state[key].shape) != tuple(want):
            raise CheckpointMismatch(
                f"checkpoint tensor {key!r} has shape {tuple(state[key].shape)}; expected "
                f"{tuple(want)} for this config")


def _layer_shapes(lc: ModelConfig, prefix: str, d_in: int) -> dict:
    D, F = lc.hidden_size, lc.intermediate_size
    q, kv = lc.num_heads * lc.head_dim, lc.num_kv_heads * lc.head_dim
    shapes = ((q, d_in), (kv, d_in), (kv, d_in), (D, q), (D,), (F, D), (F, D), (D, F))
    return {prefix + s: shape for s, shape in zip(_ATTN_MLP, shapes)}


def _layer_params(state: dict, prefix: str, cast) -> dict:
    t = lambda s: state[prefix + s].T  # noqa: E731  torch [out, in] -> ours [in, out]
    return {
        "wqkv": cast(np.concatenate([t("self_attn.q_proj.weight"), t("self_attn.k_proj.weight"),
                                     t("self_attn.v_proj.weight")], axis=-1)),
        "wo": cast(t("self_attn.o_proj.weight")),
        "mlp_norm": cast(state[prefix + "post_attention_layernorm.weight"]),
        "w_gate_up": cast(np.concatenate([t("mlp.gate_proj.weight"), t("mlp.up_proj.weight")],
                                         axis=-1)),
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
            f"outside [0, {V}) (d2t holds offsets: target id = draft id + d2t[draft id])")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise CheckpointMismatch(
            f"'d2t' maps several draft ids to target id(s) {uniq[counts > 1][:5].tolist()}")
    if "t2d" in state:
        t2d = _as_int(state["t2d"], "t2d")
        if not np.isin(t2d, (0, 1)).all():
            raise CheckpointMismatch("checkpoint tensor 't2d' must be boolean")
        if int(t2d.sum()) != Vd or not t2d[ids].all():
            raise CheckpointMismatch(
                f"'t2d' marks {int(t2d.sum())} target ids but 'd2t' maps the {Vd} draft ids to "
                f"a different set: the two maps disagree")
    return ids.astype(np.int32)


# ----------------------------------------------------------------------------- public API

def load_eagle_hf(path, target_cfg: ModelConfig, dtype=jnp.float32):
    """An HF-format EAGLE-1/2 or EAGLE-3 drafter directory -> (EagleConfig, params).

    `target_cfg`: the target's ModelConfig (hidden size, vocabulary and layer count are checked
    against it; EAGLE-3's default feature layers come from it). Float params are `dtype`
    jax arrays; EAGLE-3's `d2t` becomes absolute target ids (int32). Bind the
    target's embedding (and, for EAGLE-1, head) with `bind_target` before running them.
    """
    E = _eagle_lib()
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"EAGLE drafter checkpoint {path!r} is not a directory")
    hf = _flatten_config(read_hf_config(path))
    state = _read_state(path)
    version = _detect_version(state, hf)
    layer = _layer_config(hf, target_cfg)
    _check_single_layer(state)
    D, V = layer.hidden_size, target_cfg.vocab_size
    cast = lambda x: jnp.asarray(np.asarray(x, np.float32), dtype)  # noqa: E731
    optional = {"embed_tokens.weight": (V, D)}  # the target's frozen embedding: not stored

    if version == 1:
        bias = bool(hf.get("bias", True))
        required = {"fc.weight": (D, 2 * D)}
        if bias:
            required["fc.bias"] = (D,)
        required.update(_layer_shapes(layer, "layers.0.", D))
        hint = ("; config.json has no \"bias\" entry, so (like SafeAILab's loader) fc.bias is "
                "expected: set \"bias\": false if the drafter has none"
                if bias and "bias" not in hf and "fc.bias" not in state else "")
        _check_tensors(state, required, optional, 1, hint)
        cfg = E.EagleConfig(version=1, layer=layer, fc_bias=bias)
        params = {"fc": cast(state["fc.weight"].T),
                  "layer": _layer_params(state, "layers.0.", cast)}
        if bias:
            params["fc_b"] = cast(state["fc.bias"])
        return cfg, params

    prefix = "midlayer." if any(k.startswith("midlayer.") for k in state) else "layers.0."
    feature_layers = _feature_layers(hf, target_cfg)
    Vd = int(hf.get("draft_vocab_size") or V)
    if Vd > V:
        raise CheckpointMismatch(f"EAGLE-3 draft_vocab_size {Vd} is larger than the target's "
                                 f"vocabulary {V}")
    n = len(feature_layers)
    required = {"fc.weight": (D, n * D)}
    required.update({prefix + s: (D,) for s in _V3_NORMS})
    required.update(_layer_shapes(layer, prefix, 2 * D))
    required.update({"norm.weight": (D,), "lm_head.weight": (Vd, D)})
    if Vd != V:
        required["d2t"] = (Vd,)
    else:
        optional["d2t"] = (Vd,)
    optional["t2d"] = (V,)
    _check_tensors(state, required, optional, 3)
    d2t = _d2t_absolute(state, Vd, V)
    cfg = E.EagleConfig(version=3, layer=layer, feature_layers=feature_layers, draft_vocab=Vd,
                        fc_bias=False)
    lp = _layer_params(state, prefix, cast)
    lp["embed_norm"] = cast(state[prefix + "input_layernorm.weight"])
    lp["hidden_norm"] = cast(state[prefix + "hidden_norm.weight"])
    params = {"fc": cast(state["fc.weight"].T), "layer": lp,
              "norm": cast(state["norm.weight"]), "lm_head": cast(state["lm_head.weight"].T),
              "d2t": jnp.asarray(d2t, jnp.int32)}
    return cfg, params


def _hf_config(cfg, target_cfg: ModelConfig, dtype_name: str) -> dict:
    L = cfg.layer
    out = {
        "architectures": ["LlamaForCausalLMEagle3" if cfg.version == 3 else "LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": L.hidden_size,
        "intermediate_size": L.intermediate_size,
        "num_attention_heads": L.num_heads,
        "num_key_value_heads": L.num_kv_heads,
        "head_dim": L.head_dim,
        "num_hidden_layers": 1,
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
        # HF hidden_states indices = vLLM's convention for this field (no shift).
        out["eagle_aux_hidden_state_layer_ids"] = [int(i) for i in cfg.feature_layers]
    return out


def save_eagle_hf(path, cfg, params: dict, target_cfg: ModelConfig,
                  embed: Optional[np.ndarray] = None) -> None:
    """Write (EagleConfig, params) as an HF EAGLE checkpoint: config.json + model.safetensors,
    in the layout `load_eagle_hf` reads (EAGLE-3 under `midlayer.`, d2t as int64 offsets, t2d).

    The target's embedding is not written unless given as `embed` [V, D] (or present in bound
    params under "target"): vLLM and SGLang share it from the target when it is absent.
    """
    from safetensors.numpy import save_file

    if cfg.version == 1 and bool(cfg.fc_bias) != ("fc_b" in params):
        raise ValueError(f"EagleConfig.fc_bias={cfg.fc_bias} but the params "
                         f"{'lack' if cfg.fc_bias else 'have'} 'fc_b'")
    L = cfg.layer
    H, KV, hd = L.num_heads, L.num_kv_heads, L.head_dim
    arr = lambda x: np.asarray(x)  # noqa: E731  (bfloat16 stays bfloat16: safetensors has it)
    t = lambda x: np.ascontiguousarray(arr(x).T)  # noqa: E731  ours [in, out] -> torch [out, in]
    lp = params["layer"]
    q, k, v = np.split(arr(lp["wqkv"]), [H * hd, (H + KV) * hd], axis=-1)
    gate, up = np.split(arr(lp["w_gate_up"]), 2, axis=-1)
    prefix = "layers.0." if cfg.version == 1 else "midlayer."
    state = {"fc.weight": t(params["fc"])}
    state.update({prefix + s: w for s, w in zip(
        _ATTN_MLP, (t(q), t(k), t(v), t(lp["wo"]), arr(lp["mlp_norm"]), t(gate), t(up),
                    t(lp["w_down"])))})
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
    if embed is None and isinstance(params.get("target"), dict):
        embed = params["target"].get("embed")
    if embed is not None:
        state["embed_tokens.weight"] = arr(embed)
    floats = {str(w.dtype) for w in state.values() if w.dtype.kind == "f" or
              str(w.dtype) == "bfloat16"}
    dtype_name = floats.pop() if len(floats) == 1 else "float32"
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_hf_config(cfg, target_cfg, dtype_name), f, indent=2)
    save_file({k: np.ascontiguousarray(w) for k, w in state.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
