"""Model configuration (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2; families: `specjax.models.family`).

A `ModelConfig` is a frozen, hashable dataclass: it is passed to jitted functions as a static
argument, so two models with equal configs share compiled code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from specjax.models.family import FAMILIES, family_of

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in HF `rope_parameters` / `rope_scaling`."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported RoPE type {self.rope_type!r}; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q, k, v projections
    sliding_window: int | None = None  # Mistral: keys older than this many positions are hidden
    model_type: str = "llama"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # Tensor parallelism: the fused projections (wqkv, bqkv, w_gate_up) hold their columns in
    # `shards` groups, group s = what device s of the mesh's "model" axis computes (its query
    # heads, then its key and value heads; its gate, then its up columns). 1: the checkpoint
    # layout (q | k | v, gate | up). Set by `specjax.shard_model`.
    shards: int = 1

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.shards, int) or self.shards <= 0:
            raise ValueError(f"ModelConfig.shards must be a positive int, got {self.shards!r}")
        for name in ("num_kv_heads", "intermediate_size"):
            if getattr(self, name) % self.shards:
                raise ValueError(
                    f"ModelConfig.{name} ({getattr(self, name)}) is not divisible by the "
                    f"{self.shards} tensor-parallel shards; use a model axis size dividing it"
                )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        family_of(self.model_type)  # ValueError naming the supported families

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one KV head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Build from a transformers `PretrainedConfig` (or a config.json dict)."""
        get = (
            hf_config.get
            if isinstance(hf_config, dict)
            else lambda k, d=None: getattr(hf_config, k, d)
        )
        model_type = get("model_type", "llama")
        if model_type not in FAMILIES:
            raise ValueError(
                f"unsupported architecture {model_type!r} (architectures={get('architectures')}); "
                f"supported model_type values: {', '.join(FAMILIES)}"
            )
        num_heads = get("num_attention_heads")
        hidden = get("hidden_size")
        head_dim = get("head_dim") or hidden // num_heads
        # transformers 5 keeps rope_theta inside `rope_parameters`; 4.x has `rope_theta` and
        # `rope_scaling` at the top level.
        rope = dict(get("rope_parameters") or {})
        legacy = get("rope_scaling") or {}
        if not rope and legacy:
            rope = dict(legacy)
        theta = rope.get("rope_theta", get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(rope.get("factor", 1.0) or 1.0),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", 8192)
            ),
        )
        eos = get("eos_token_id")
        eos_ids = (
            tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        )
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            model_type=model_type,
            eos_token_ids=eos_ids,
            bos_token_id=get("bos_token_id"),
            **FAMILIES[model_type].hf_fields(get),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)
