"""GGUF files read directly with gguf-py and numpy, for the architectures whose metadata this
module maps completely (llama, qwen2); `read_gguf` returns None for any other file, and the
caller goes through transformers instead.

Why not always transformers: `from_pretrained(gguf_file=...)` parses the file's metadata twice
(config, then tensors), builds a randomly initialised torch model and copies the tensors into
it: 25 s for SmolLM2-135M on a 2-core machine, against ~6 s here (one parse, de-quantization,
one permutation per attention matrix).

What transformers does that this module repeats: de-quantize each tensor (gguf-py's
`dequantize`), undo llama.cpp's row permutation of the query and key projections of llama
models (its converter interleaves the two rotary halves of each head), map the tensor names
to HF names, and read the config from the `<arch>.*` metadata. Any metadata key that could
change the numerics and is not mapped below (rope scaling, sliding window, explicit key/value
lengths, ...) sends the file back to transformers rather than being ignored. Tests compare the
two paths tensor for tensor (tests/test_convert.py) and the real model's logits against HF.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# GGUF `general.architecture` -> HF model_type. llama.cpp writes Mistral as "llama" with
# "mistral" in `general.name`; transformers then builds a MistralConfig: left to it.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

# `<arch>.<key>` -> HF config field.
CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
# Keys read but not copied: the rotary dimension must be the whole head (checked below).
CHECKED_KEYS = {"rope.dimension_count"}

TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


@contextlib.contextmanager
def parsed_once() -> Iterator[None]:
    """Inside the block each GGUF file's metadata is parsed once, however many loaders read it
    (this module, transformers' model and tokenizer loaders), and gguf-py's tensor-name map is
    built once per (architecture, depth).

    Why: gguf-py parses every metadata field element by element (SmolLM2's 49k-entry vocabulary
    and merges: ~3-5 s a parse on the 2-core machine), transformers parses a file twice for a
    model (config, then tensors) and once more for its tokenizer, and rebuilds the name map for
    every tensor (397 times for SmolLM2: ~9 s). `from_pretrained(gguf_file=...)` of SmolLM2-135M
    took 17.5 s, 7.3 s inside this block, with the same tensors. Both are read-only: the cached
    reader is the same memory map transformers would open again. gguf-py's module attributes
    are swapped for the block and restored after it (transformers imports them at each call)."""
    import gguf

    readers: dict[str, Any] = {}
    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    def reader(path: str | os.PathLike, mode: str = "r") -> Any:
        if mode != "r":
            return reader_cls(path, mode)
        key = os.path.realpath(path)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> HF state-dict name (None when this module does not know it)."""
    if gguf_name in TOP_TENSORS:
        return TOP_TENSORS[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's query/key permutation: per head it stores the rows as (half, pair)
    where HF has (pair, half); swapping back is the same reshape with the axes exchanged."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(fields: dict, arch: str, tensor_names: set[str]) -> dict | None:
    """The HF config dict of a GGUF file's metadata, or None when a key is not mapped."""
    cfg: dict[str, Any] = {"model_type": ARCHITECTURES[arch]}
    for key, field in fields.items():
        if not key.startswith(arch + "."):
            continue
        sub = key[len(arch) + 1 :]
        if sub in CONFIG_KEYS:
            cfg[CONFIG_KEYS[sub]] = field.contents()
        elif sub not in CHECKED_KEYS:
            return None
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    if not heads or not hidden:
        return None
    rot = fields.get(f"{arch}.rope.dimension_count")
    if rot is not None and int(rot.contents()) != hidden // heads:
        return None  # partial rotary: not a layout this reader maps
    for tok_key, hf_key in (("eos_token_id", "eos_token_id"), ("bos_token_id", "bos_token_id")):
        f = fields.get(f"tokenizer.ggml.{tok_key}")
        if f is not None:
            cfg[hf_key] = int(f.contents())
    cfg["tie_word_embeddings"] = "output.weight" not in tensor_names
    cfg["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    return cfg


def read_gguf(path: str) -> tuple[dict[str, np.ndarray], PretrainedConfig] | None:
    """GGUF file -> (HF-named float32 state dict, HF config), or None when the file holds
    an architecture, metadata or tensor this module does not map (use transformers then)."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = reader.fields
    arch = str(fields["general.architecture"].contents())
    name = str(fields["general.name"].contents()) if "general.name" in fields else ""
    if arch not in ARCHITECTURES or "mistral" in name.lower():
        return None
    names = {t.name for t in reader.tensors}
    if any(hf_name(n) is None for n in names):
        return None
    cfg = read_config(fields, arch, names)
    if cfg is None:
        return None
    state = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape(tuple(int(n) for n in reversed(t.shape)))  # GGUF lists dims innermost first
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_rows(w, cfg["num_attention_heads"])
        elif arch == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_rows(w, cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
        state[hf_name(t.name)] = w
    cfg.setdefault("vocab_size", state["model.embed_tokens.weight"].shape[0])
    # Through transformers' config class, so absent keys take the defaults they take there.
    import transformers

    return state, transformers.AutoConfig.for_model(**cfg)
