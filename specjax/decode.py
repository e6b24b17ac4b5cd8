"""`specjax.decode_fn`: the whole decode (prefill, then the on-device while_loop) as a pure
function over arrays, for JAX programs that call it inside their own `jax.jit`, `lax.scan`,
`shard_map` or `pmap` (for example an RL loop that samples completions and scores them on
device without returning to the host).

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

import jax
import jax.numpy as jnp

from specjax import api, engine
from specjax.drafters.base import Drafter, Params
from specjax.model import Model
from specjax.sampling import make_sampling


@dataclasses.dataclass(frozen=True, eq=False)
class DecodeFn:
    """A decode program for one model, drafter and sampling setting. Call it with arrays."""

    ec: engine.EngineConfig
    max_new_tokens: int
    sp: dict  # traced sampling values (temperature, top_p)
    params: dict  # the model's params, as loaded (pass them, or sharded/updated copies)
    dparams: Params  # the bound drafter's params (None without a drafter)
    pad_id: int = 0

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
        max_len = api.cache_len(P, self.ec)
        inp = engine.PrefillInput.from_tokens(
            jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32)
        )
        budget = jnp.full((B,), self.max_new_tokens, jnp.int32)
        state = engine.prefill(
            params, dparams, inp, budget, key, self.sp, ec=self.ec, max_len=max_len
        )
        state = engine.decode(params, dparams, state, self.sp, ec=self.ec)
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


def decode_fn(
    model: Model,
    *,
    drafter: Drafter | str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    impl: str = "xla",
    pad_id: int = 0,
) -> DecodeFn:
    """The decode program of `model` (and `drafter`: a Drafter or a registry name) as a pure
    function `fn(params, dparams, tokens, lengths, key) -> (tokens_out, lengths_out, stats)`;
    `fn.params` / `fn.dparams` are the params to pass unless you place or update them."""
    mode, sp = make_sampling(temperature, top_k, top_p)
    drafter = api.resolve_drafter(model, drafter)
    api.check_args(model, [], max_new_tokens, drafter)
    spec, dparams = api.bind_drafter(model, drafter)
    return DecodeFn(
        ec=api.engine_config(model, mode, max_new_tokens, spec, impl),
        max_new_tokens=int(max_new_tokens),
        sp=sp,
        params=model.params,
        dparams=dparams,
        pad_id=int(pad_id),
    )
