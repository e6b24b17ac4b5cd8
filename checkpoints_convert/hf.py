"""HF Llama-family checkpoints -> specjax param pytrees.

The conversion is a literal name map plus an explicit transpose list (torch `Linear` stores
[out, in]; we store [in, out] so activations multiply on the left). Every checkpoint tensor must
be used and every shape must match, or the error names the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

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


@dataclasses.dataclass
class Plan:
    """Where each param comes from: (checkpoint name, transpose) per top-level param and per
    layer, decided from names and shapes alone (no tensor read)."""

    top: dict  # ours -> (name, transpose)
    layers: dict  # ours -> [(name, transpose)] * num_layers
    tied_head: str | None = None  # a stored lm_head that a tied config says equals the embedding


def plan_state_dict(shapes_in: Mapping[str, tuple], cfg: ModelConfig) -> Plan:
    """Check an HF checkpoint's tensor names and shapes against `cfg` -> `Plan`. Every tensor
    must be used and every shape must match, or the error names the offending key."""
    shapes = checkpoint_shapes(cfg)
    fam = family_of(cfg)
    LAYER_MAP, TOP_MAP = fam.layer_map, fam.top_map
    per_layer: dict[str, list] = {
        k.split("/")[1]: [None] * cfg.num_layers for k in shapes if k.startswith("layers/")
    }
    top: dict[str, tuple] = {}
    tied_head = None
    unused = []

    def t(shape: tuple, transpose: bool) -> tuple:
        return tuple(reversed(shape)) if transpose else tuple(shape)

    for name, shape in shapes_in.items():
        if IGNORED.match(name):
            continue
        shape = tuple(shape)
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
            if t(shape, transpose) != want:
                raise CheckpointMismatch(
                    f"checkpoint tensor {name!r} has shape {shape}; expected "
                    f"{t(want, transpose)} for this config"
                )
            per_layer[ours][layer] = (name, transpose)
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            # Tied checkpoints sometimes also store the head; it must be the embedding.
            if "model.embed_tokens.weight" in shapes_in:
                tied_head = name
            continue
        if name not in TOP_MAP:
            unused.append(name)
            continue
        ours, transpose = TOP_MAP[name]
        if t(shape, transpose) != shapes[ours]:
            raise CheckpointMismatch(
                f"checkpoint tensor {name!r} has shape {shape}; expected "
                f"{t(shapes[ours], transpose)} for this config"
            )
        top[ours] = (name, transpose)
    if unused:
        raise CheckpointMismatch(
            f"{len(unused)} checkpoint tensor(s) not used by a {cfg.model_type} model with this "
            f"config: {', '.join(sorted(unused)[:8])}{' ...' if len(unused) > 8 else ''}"
        )
    # Name missing tensors by their HF checkpoint keys.
    hf_top = {ours: name for name, (ours, _) in TOP_MAP.items()}
    hf_layer = {ours: suffix for suffix, (ours, _) in LAYER_MAP.items()}
    missing = [hf_top[k] for k in shapes if not k.startswith("layers/") and k not in top]
    for ours, items in per_layer.items():
        missing += [f"model.layers.{i}.{hf_layer[ours]}" for i, a in enumerate(items) if a is None]
    if missing:
        raise CheckpointMismatch(
            f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}"
        )
    return Plan(top=top, layers=per_layer, tied_head=tied_head)


def _check_tied(plan: Plan, read: Callable[[str], np.ndarray]) -> None:
    if plan.tied_head is not None and not np.array_equal(
        read("model.embed_tokens.weight"), read(plan.tied_head)
    ):
        raise CheckpointMismatch(
            "config says tie_word_embeddings=True but 'lm_head.weight' differs from "
            "'model.embed_tokens.weight'"
        )


def convert_state_dict(
    state: Mapping[str, np.ndarray], cfg: ModelConfig, dtype: DTypeLike = np.float32
) -> dict:
    """Map an HF state dict (name -> array) to our nested param dict (numpy, `dtype`; layers
    stacked)."""
    plan = plan_state_dict({k: np.shape(v) for k, v in state.items()}, cfg)
    _check_tied(plan, lambda name: np.asarray(state[name]))

    def get(name: str, transpose: bool) -> np.ndarray:
        arr = np.asarray(state[name])
        return arr.T if transpose else arr

    layers = fuse_layers(
        {k: np.stack([get(*it) for it in v]).astype(dtype) for k, v in plan.layers.items()}
    )
    params = {k: get(*v).astype(dtype) for k, v in plan.top.items()}
    params["layers"] = layers
    return params


_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class SafetensorsFile:
    """A safetensors file read one tensor at a time with plain reads, not a memory map: pages
    of a mapped file count as resident memory for as long as the map lives, so reading a whole
    model through maps would hold it in RSS next to the placed params."""

    def __init__(self, path: str) -> None:
        import struct

        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > os.path.getsize(path):
                    raise ValueError(f"header of {n} bytes in a {os.path.getsize(path)}-byte file")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointMismatch(
                f"cannot read {path!r} ({e}): the file is truncated or damaged"
            ) from e
        header.pop("__metadata__", None)
        self.start = 8 + n
        self.entries = header  # name -> {"dtype", "shape", "data_offsets"}
        need = self.start + max((e["data_offsets"][1] for e in header.values()), default=0)
        if need > os.path.getsize(path):
            raise CheckpointMismatch(
                f"cannot read {path!r} (its tensors end at byte {need}, the file has "
                f"{os.path.getsize(path)}): the file is truncated or damaged"
            )

    def shape(self, name: str) -> tuple:
        return tuple(self.entries[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

        e = self.entries[name]
        dtype = np.dtype(_ST_DTYPES[e["dtype"]])
        begin, end = e["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            buf = bytearray(end - begin)
            if f.readinto(buf) != end - begin:
                raise CheckpointMismatch(
                    f"cannot read {self.path!r} (tensor {name!r} is cut short): the file is "
                    "truncated or damaged"
                )
        return np.frombuffer(buf, dtype).reshape(e["shape"])


def stream_hf_dir(
    path: str,
    dtype: DTypeLike = np.float32,
    mesh: Any = None,
    *,
    cfg: ModelConfig | None = None,
    names: Callable[[str], str | None] | None = None,
) -> tuple[dict, ModelConfig] | None:
    """HF safetensors checkpoint directory -> (params as device arrays, per-layer (unrolled)
    layout, ModelConfig), one tensor at a time: each is read, transposed, fused with its
    layer's partners, cast to `dtype` and placed before the next is read, so the host holds at
    most one layer's tensors beyond what is already placed. With `mesh`, every param goes
    straight to its final sharding (`specjax.sharding`; the fused columns regrouped for tensor
    parallelism). None when the directory has no safetensors files.

    A language model inside a bigger checkpoint (a VLM) passes its `cfg` and `names`: checkpoint
    name -> the name this converter knows (`model.layers.0...`), or None for tensors that are
    not the language model's."""
    import jax
    import jax.numpy as jnp

    from specjax import sharding

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        return None
    cfg = cfg or ModelConfig.from_hf(read_hf_config(path))
    where: dict[str, tuple[SafetensorsFile, str]] = {}  # our name -> (file, its name there)
    for f in files:
        st = SafetensorsFile(os.path.join(path, f))
        for n in st.entries:
            ours = n if names is None else names(n)
            if ours is not None:
                where[ours] = (st, n)
    plan = plan_state_dict({n: st.shape(m) for n, (st, m) in where.items()}, cfg)
    shards = sharding.model_axis(mesh)
    cfg_out = dataclasses.replace(cfg, shards=shards) if shards > 1 else cfg
    order = sharding.regroup_orders(cfg, shards) if shards > 1 else {}

    def read(name: str, transpose: bool = False) -> np.ndarray:
        st, stored = where[name]
        a = st.read(stored)
        return np.ascontiguousarray(a.T) if transpose else a

    def place(key: str, arr: np.ndarray) -> jax.Array:
        arr = arr.astype(dtype, copy=False)
        if key in order:
            arr = np.take(arr, order[key], axis=-1)
        if mesh is None:
            out = jnp.asarray(arr)
        else:
            spec = sharding.param_spec(key, arr.shape, shards)
            out = sharding.put(arr, jax.sharding.NamedSharding(mesh, spec))
        # The copy to the device is asynchronous and keeps `arr` alive until it is done: wait,
        # so the host holds one tensor in flight however busy the CPU is (tests/
        # test_streaming.py's 300 MiB model with both cores busy: peak growth 431-445 MiB ->
        # 408-414 MiB; once, in a full test run, 532 MiB without the wait).
        return jax.block_until_ready(out)

    _check_tied(plan, read)
    params: dict[str, Any] = {}
    for ours, (name, transpose) in plan.top.items():
        params[ours] = place(ours, read(name, transpose))
    layers = []
    for i in range(cfg.num_layers):
        host = {ours: read(*items[i]) for ours, items in plan.layers.items()}
        layers.append({k: place(k, v) for k, v in fuse_layers(host).items()})
        del host
    params["layers"] = layers
    return params, cfg_out


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
    from checkpoints_convert.gguf_file import parsed_once

    with parsed_once():  # the tokenizer reuses the parse of the tensors' metadata
        state, cfg = _gguf_state(path)
        tok = None
        if tokenizer:  # ~8 s to build from GGUF metadata: skipped when the caller has one
            import transformers

            folder, name = os.path.split(os.path.abspath(path))
            tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return convert_state_dict(state, cfg, dtype), cfg, tok


def _gguf_state(path: str) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """GGUF file -> (HF-named float32 state dict, ModelConfig): `gguf_file.read_gguf` where it
    maps the architecture, else transformers."""
    from checkpoints_convert.gguf_file import read_gguf

    direct = read_gguf(path)
    if direct is not None:
        state, hf_cfg = direct
        return state, ModelConfig.from_hf(hf_cfg)
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"converting {path} (an architecture specjax reads through transformers) "
            "needs torch: pip install 'specjax[convert]'"
        ) from e
    import transformers

    folder, name = os.path.split(os.path.abspath(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    )
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return state, ModelConfig.from_hf(model.config)
