"""The static settings of one compiled decode program and the state its while_loop carries."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import struct

from specjax.engine.accept import DEFAULT_RULES, AcceptRules
from specjax.engine.protocol import DrafterSpec
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.sampling import SamplingMode


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """Static settings of the target's prefill: what it shares across drafters and budgets."""

    target: ModelConfig
    hidden_layers: tuple = ()  # the target layers whose hidden states the drafter reads
    with_hiddens: bool = False  # hand the prompt's hidden states to the drafter
    impl: str = "xla"
    # Layout of the KV cache's [B, KV, S, hd] buffers on a mesh (`sharding.kv_spec`; None:
    # one device, or XLA's choice)
    kv_sharding: Any = None


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static settings of one compiled decode program (hashable: a static jit argument)."""

    target: ModelConfig
    mode: SamplingMode
    max_new: int  # output capacity per row (a bucket, >= every row's max_new_tokens)
    eos: tuple[int, ...]
    drafter: DrafterSpec | None = None
    impl: str = "xla"
    rules: AcceptRules = DEFAULT_RULES
    kv_sharding: Any = None  # as `PrefillConfig.kv_sharding`

    @property
    def k(self) -> int:
        """Draft tokens (chain) or nodes (tree) verified per step."""
        return 0 if self.drafter is None else self.drafter.k

    @property
    def max_accept(self) -> int:
        """Most draft tokens one step can accept (chain length or tree depth)."""
        return 0 if self.drafter is None else self.drafter.max_accept

    @property
    def verify_sizes(self) -> tuple:
        """The drafter's static verify sizes (empty without a drafter); with the plain step
        they are the branches `verify` chooses among: (0,) + verify_sizes."""
        return () if self.drafter is None else tuple(self.drafter.verify_sizes)

    @property
    def hidden_layers(self) -> tuple:
        return () if self.drafter is None else tuple(self.drafter.hidden_layers)

    @property
    def prefill_config(self) -> PrefillConfig:
        return PrefillConfig(
            target=self.target,
            hidden_layers=self.hidden_layers,
            with_hiddens=self.drafter is not None,
            impl=self.impl,
            kv_sharding=self.kv_sharding,
        )


@struct.dataclass
class LoopState:
    """Decode state carried by the while_loop (all arrays on device).

    Cache slots and positions are counted apart: `cache.lengths[b]` is the number of filled
    slots of row b, `pos[b]` the position id of `last`. For text they are equal; a
    vision-language prompt may give its image tokens positions of their own."""

    out: jax.Array  # [B, max_new + K + 1] int32 emitted tokens (tail is scratch)
    n_out: jax.Array  # [B] int32 tokens emitted so far
    max_new: jax.Array  # [B] int32 per-row budget
    done: jax.Array  # [B] bool
    last: jax.Array  # [B] int32 newest token, not yet in the target cache
    pos: jax.Array  # [B] int32 position id of `last`
    cache: KVCache
    dstate: Any  # drafter state (None for AR)
    key: jax.Array
    steps: jax.Array  # [] int32 loop iterations (= target verify forwards)
    row_steps: jax.Array  # [B] int32 verify forwards while the row was active
    accept_hist: jax.Array  # [A+1] int32 how often n = 0..A draft tokens were accepted
    # [S+1] int32 loop steps that verified (0,) + ec.verify_sizes draft tokens (0: a plain step)
    size_hist: jax.Array
