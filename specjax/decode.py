"""The decode program: its static settings (`engine_config`, shape buckets, `cache_len`) and
`DecodeFn`, the whole decode (prefill, then the on-device while_loop) as a pure function over
arrays. `specjax.generate` runs it from the host (`DecodeFn.start`, then `.run`); JAX programs
call it inside their own `jax.jit`, `lax.scan`, `shard_map` or `pmap` (for example an RL loop
that samples completions and scores them on device without returning to the host), built by
`specjax.decode_fn` (specjax/api.py):

    fn = specjax.decode_fn(model, drafter=specjax.drafters.ngram(k=4), max_new_tokens=64)
    tokens_out, lengths_out, stats = jax.jit(fn)(fn.params, fn.dparams, tokens, lengths, key)

`tokens` [B, P] int32 holds right-padded prompts and `lengths` [B] their lengths (>= 1);
`key` is a `jax.random.key`. The output is `tokens_out` [B, max_new_tokens] (entries at and
after `lengths_out[b]` are `pad_id`), `lengths_out` [B] and `stats` (arrays: `steps`,
`row_steps`, `accept_hist`, `size_hist`). Shapes are static: one compilation per (B, P). With
the same padded batch, key and settings the tokens equal `specjax.generate`'s
(tests/test_decode_fn.py).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from specjax import engine
from specjax.engine import accept
from specjax.engine.protocol import DrafterSpec, Params
from specjax.sampling import SamplingMode

if TYPE_CHECKING:
    from specjax.model import Model

# Shape buckets: one compilation per bucket, never per prompt (see `bucket`).
MIN_PROMPT_BUCKET = 16
MIN_NEW_BUCKET = 16


def bucket(n: int, minimum: int, half_steps: bool = False) -> int:
    """Smallest power of two >= max(n, minimum); with `half_steps` also 1.5x powers of two
    (16, 24, 32, 48, ...). Prompt lengths use half steps, so padding wastes at most a third of a
    prefill while the number of compilations stays logarithmic in the length."""
    b = minimum
    while True:
        if b >= n:
            return b
        if half_steps and b * 3 // 2 >= n and (b * 3) % 2 == 0:
            return b * 3 // 2
        b *= 2


def engine_config(
    model: Model, mode: SamplingMode, max_new_tokens: int, spec: DrafterSpec | None, impl: str
) -> engine.EngineConfig:
    """The static settings of the decode program (output capacity: `max_new_tokens` bucketed)."""
    # The acceptance rules are read here, not at import: a swapped default is a new config.
    return engine.EngineConfig(
        target=model.config,
        mode=mode,
        max_new=bucket(int(max_new_tokens), MIN_NEW_BUCKET),
        eos=model.eos_token_ids,
        drafter=spec,
        impl=impl,
        rules=accept.DEFAULT_RULES,
    )


def cache_len(prompt_width: int, ec: engine.EngineConfig) -> int:
    """KV cache slots per row: the prompt, every emitted token, and one in-flight verify block
    (and the drafter's own in-flight tokens, for drafters that keep a cache)."""
    spec = ec.drafter
    slack = 0 if spec is None else max(spec.k, spec.cache_slack)
    return prompt_width + ec.max_new + slack + 2


@dataclasses.dataclass(frozen=True, eq=False)
class DecodeFn:
    """A decode program for one model, drafter and sampling setting. Call it with arrays."""

    ec: engine.EngineConfig
    max_new_tokens: int
    sp: dict  # traced sampling values (temperature, top_p)
    params: dict  # the model's params, as loaded (pass them, or sharded/updated copies)
    dparams: Params  # the bound drafter's params (None without a drafter)
    pad_id: int = 0

    def start(
        self,
        params: dict,
        dparams: Params,
        inp: engine.PrefillInput,
        budget: jax.Array,  # [B] int32 new tokens per row (0: a padding row, done at once)
        key: jax.Array,
    ) -> engine.LoopState:
        """The prefill: the target over the prompts, the first token, the drafter's state."""
        max_len = cache_len(inp.tokens.shape[1], self.ec)
        return engine.prefill(
            params, dparams, inp, budget, key, self.sp, ec=self.ec, max_len=max_len
        )

    def run(self, params: dict, dparams: Params, state: engine.LoopState) -> engine.LoopState:
        """The decode: the one on-device while_loop from a prefilled state to the end."""
        return engine.decode(params, dparams, state, self.sp, ec=self.ec)

    def step(self, params: dict, dparams: Params, state: engine.LoopState) -> engine.LoopState:
        """One step of the same loop body, as its own call (streaming: the host sees each
        step's tokens)."""
        return engine.decode_one(params, dparams, state, self.sp, ec=self.ec)

    def __call__(
        self,
        params: dict,
        dparams: Params,
        tokens: jax.Array,  # [B, P] int32, right-padded prompts
        lengths: jax.Array,  # [B] int32 prompt lengths, 1 <= lengths <= P
        key: jax.Array,  # a jax.random key
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
            raise ValueError(
                f"tokens must be [B, P] and lengths [B]; got tokens {tuple(tokens.shape)} and "
                f"lengths {tuple(lengths.shape)}"
            )
        B, P = tokens.shape
        ctx = self.ec.target.max_position_embeddings
        if P + self.max_new_tokens > ctx:
            raise ValueError(
                f"prompt width {P} + max_new_tokens {self.max_new_tokens} exceeds the model's "
                f"context of {ctx} positions"
            )
        inp = engine.PrefillInput.from_tokens(
            jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32)
        )
        budget = jnp.full((B,), self.max_new_tokens, jnp.int32)
        state = self.run(params, dparams, self.start(params, dparams, inp, budget, key))
        n = jnp.minimum(state.n_out, self.max_new_tokens)
        cols = jnp.arange(self.max_new_tokens)[None, :]
        out = jnp.where(cols < n[:, None], state.out[:, : self.max_new_tokens], self.pad_id)
        stats = {
            "steps": state.steps,
            "row_steps": state.row_steps,
            "accept_hist": state.accept_hist,
            "size_hist": state.size_hist,
        }
        return out, n, stats
