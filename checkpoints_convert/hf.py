"""HF Llama-family checkpoints -> specjax param pytrees.

The conversion is a literal name map plus an explicit transpose list (torch `Linear` stores
[out, in]; we store [in, out] so activations multiply on the left). Every checkpoint tensor must
be used and every shape must match, or the error names the offending key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from specjax.models.config import ModelConfig
from specjax.models.family import family_of

if TYPE_CHECKING:
    from numpy.typing import DTypeLike
    from transformers import PreTrainedTokenizerBase

# Non-parameter buffers some checkpoints carry.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# Runtime layout: per-layer matrices read by the same input are fused, so a decode step runs
# 4 larger mat-vecs per layer instead of 7 (measured ~8% faster per step on a 2-core CPU).
FUSED = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"), "w_gate_up": ("w_gate", "w_up")}


def fuse_layers(layers: dict) -> dict:
    """Checkpoint layout (one array per HF tensor) -> runtime layout (FUSED concatenations)."""
    out = dict(layers)
    for fused, parts in FUSED.items():
        if all(p in out for p in parts):
            out[fused] = np.concatenate([out.pop(p) for p in parts], axis=-1)
    return out


def expected_shapes(cfg: ModelConfig) -> dict:
    """Shapes of the runtime param pytree, flattened as {"layers/wqkv": shape, ...}."""
    shapes = checkpoint_shapes(cfg)
    for fused, parts in FUSED.items():
        keys = ["layers/" + p for p in parts]
        if all(k in shapes for k in keys):
            first = shapes[keys[0]]
            width = sum(shapes.pop(k)[-1] for k in keys)
            shapes["layers/" + fused] = first[:-1] + (width,)
    return shapes


def checkpoint_shapes(cfg: ModelConfig) -> dict:
    """Shapes of the converted tensors before fusion, one per HF tensor (stacked over layers)."""
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {
        "embed": (V, D),
        "final_norm": (D,),
        "layers/attn_norm": (L, D),
        "layers/mlp_norm": (L, D),
        "layers/wq": (L, D, q),
        "layers/wk": (L, D, kv),
        "layers/wv": (L, D, kv),
        "layers/wo": (L, q, D),
        "layers/w_gate": (L, D, F),
        "layers/w_up": (L, D, F),
        "layers/w_down": (L, F, D),
    }
    if cfg.attention_bias:
        shapes.update({"layers/bq": (L, q), "layers/bk": (L, kv), "layers/bv": (L, kv)})
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


class CheckpointMismatch(ValueError):
    """A checkpoint does not match the model config (missing, unused or misshapen tensor)."""


def convert_state_dict(
    state: Mapping[str, np.ndarray], cfg: ModelConfig, dtype: DTypeLike = np.float32
) -> dict:
    """Map an HF state dict (name -> array) to our nested param dict (numpy, `dtype`)."""
    shapes = checkpoint_shapes(cfg)
    fam = family_of(cfg)
    LAYER_MAP, TOP_MAP = fam.layer_map, fam.top_map
    per_layer: dict[str, list] = {
        k.split("/")[1]: [None] * cfg.num_layers for k in shapes if k.startswith("layers/")
    }
    flat: dict[str, np.ndarray] = {}
    unused = []
    for name, value in state.items():
        if IGNORED.match(name):
            continue
        arr = np.asarray(value)
        m = _LAYER_RE.match(name)
        if m:
            layer, suffix = int(m.group(1)), m.group(2)
            if suffix not in LAYER_MAP or layer >= cfg.num_layers:
                unused.append(name)
                continue
            ours, transpose = LAYER_MAP[suffix]
            if ours not in per_layer:
                unused.append(name)
                continue
            want = shapes["layers/" + ours][1:]
            got = arr.T.shape if transpose else arr.shape
            if got != want:
                raise CheckpointMismatch(
                    f"checkpoint tensor {name!r} has shape {arr.shape}; expected "
                    f"{tuple(reversed(want)) if transpose else want} for this config"
                )
            per_layer[ours][layer] = arr.T if transpose else arr
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            # Tied checkpoints sometimes also store the head; it must be the embedding.
            emb = state.get("model.embed_tokens.weight")
            if emb is not None and not np.array_equal(np.asarray(emb), arr):
                raise CheckpointMismatch(
                    "config says tie_word_embeddings=True but 'lm_head.weight' differs from "
                    "'model.embed_tokens.weight'"
                )
            continue
        if name not in TOP_MAP:
            unused.append(name)
            continue
        ours, transpose = TOP_MAP[name]
        val = arr.T if transpose else arr
        if val.shape != shapes[ours]:
            raise CheckpointMismatch(
                f"checkpoint tensor {name!r} has shape {arr.shape}; expected "
                f"{tuple(reversed(shapes[ours])) if transpose else shapes[ours]} for this config"
            )
        flat[ours] = val
    if unused:
        raise CheckpointMismatch(
            f"{len(unused)} checkpoint tensor(s) not used by a {cfg.model_type} model with this "
            f"config: {', '.join(sorted(unused)[:8])}{' ...' if len(unused) > 8 else ''}"
        )
    # Name missing tensors by their HF checkpoint keys.
    hf_top = {ours: name for name, (ours, _) in TOP_MAP.items()}
    hf_layer = {ours: suffix for suffix, (ours, _) in LAYER_MAP.items()}
    missing = [hf_top[k] for k in shapes if not k.startswith("layers/") and k not in flat]
    for ours, items in per_layer.items():
        missing += [f"model.layers.{i}.{hf_layer[ours]}" for i, a in enumerate(items) if a is None]
    if missing:
        raise CheckpointMismatch(
            f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}"
        )
    layers = fuse_layers({k: np.stack(v).astype(dtype) for k, v in per_layer.items()})
    params = {k: v.astype(dtype) for k, v in flat.items()}
    params["layers"] = layers
    return params


def read_hf_dir(path: str) -> dict:
    """Read all tensors of an HF checkpoint directory (safetensors, sharded or not, or .bin)."""
    files = sorted(os.listdir(path))
    st = [f for f in files if f.endswith(".safetensors")]
    if st:
        state = {}
        for f in st:
            for k, v in _load_safetensors(os.path.join(path, f)).items():
                state[k] = v
        return state
    bins = [f for f in files if f.endswith(".bin") and f.startswith("pytorch_model")]
    if bins:
        import torch  # only needed for legacy .bin checkpoints

        state = {}
        for f in bins:
            sd = torch.load(os.path.join(path, f), map_location="cpu", weights_only=True)
            state.update({k: v.float().numpy() for k, v in sd.items()})
        return state
    raise FileNotFoundError(
        f"no *.safetensors or pytorch_model*.bin files in {path!r}; found: {files[:10]}"
    )


def _load_safetensors(file: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        try:
            return load_file(file)
        except (TypeError, ValueError):
            # bfloat16 has no numpy dtype: read through JAX and upcast.
            from safetensors.flax import load_file as load_jax

            return {k: np.asarray(v, dtype=np.float32) for k, v in load_jax(file).items()}
    except SafetensorError as e:  # its message never names the file
        raise CheckpointMismatch(
            f"cannot read {file!r} ({e}): the file is truncated or damaged; download it again"
        ) from e


def read_hf_config(path: str) -> dict:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path!r} has no config.json; is it an HF checkpoint directory?")
    with open(cfg_file) as f:
        return json.load(f)


def load_hf_dir(path: str, dtype: DTypeLike = np.float32) -> tuple[dict, ModelConfig]:
    """HF checkpoint directory -> (params as numpy, ModelConfig)."""
    cfg = ModelConfig.from_hf(read_hf_config(path))
    return convert_state_dict(read_hf_dir(path), cfg, dtype), cfg


def load_gguf(
    path: str, dtype: DTypeLike = np.float32, tokenizer: bool = True
) -> tuple[dict, ModelConfig, PreTrainedTokenizerBase | None]:
    """GGUF file -> (params as numpy, ModelConfig, tokenizer or None when not `tokenizer`).

    The tensors and config come from `gguf_file.read_gguf` (gguf-py + numpy, ~4x faster) for
    the architectures it maps, else from transformers, which de-quantizes the tensors and undoes
    llama.cpp's q/k row permutation the same way. Either way the state dict is in HF layout and
    goes through the same checked name map. The tokenizer always comes from transformers.
    """
    from checkpoints_convert.gguf_file import read_gguf

    folder, name = os.path.split(os.path.abspath(path))
    direct = read_gguf(path)
    if direct is not None:
        state, hf_cfg = direct
        cfg = ModelConfig.from_hf(hf_cfg)
    else:
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"converting {path} (an architecture specjax reads through transformers) "
                "needs torch: pip install 'specjax[convert]'"
            ) from e
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32
        )
        cfg = ModelConfig.from_hf(model.config)
        state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tok = None
    if tokenizer:  # ~8 s to build from GGUF metadata: skipped when the caller has one
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return convert_state_dict(state, cfg, dtype), cfg, tok
