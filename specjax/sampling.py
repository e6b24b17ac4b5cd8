"""Logit processing and sampling, applied identically to target and draft distributions.

Order follows HF `generate`: temperature, then top-k, then top-p. The static part (greedy or not,
top-k, whether top-p is on) is a hashable `SamplingMode`; temperature and top-p values are traced
scalars, so changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    greedy: bool = True
    top_k: int | None = None
    use_top_p: bool = False


def _number(name: str, value: Any, integral: bool = False) -> int | float:
    """A user's sampling setting as a Python number: ints and floats, numpy scalars included;
    bools (an easy slip for a flag) and strings are refused by name."""
    kind = numbers.Integral if integral else numbers.Real
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, kind):
        raise ValueError(
            f"{name} must be {'a positive int' if integral else 'a number'}, got "
            f"{type(value).__name__} {value!r}"
        )
    return int(value) if integral else float(value)


def make_sampling(
    temperature: float, top_k: int | None, top_p: float | None
) -> tuple[SamplingMode, dict[str, jax.Array]]:
    """Validate user settings -> (SamplingMode, traced params dict)."""
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, numbers.Real):
        raise ValueError(
            f"temperature must be >= 0 (a number; 0 means greedy), got "
            f"{type(temperature).__name__} {temperature!r}"
        )
    temperature = float(temperature)
    if not (0 <= temperature < float("inf")):  # rejects NaN and inf too
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None:
        top_k = _number("top_k", top_k, integral=True)  # np.int64 as well as int
        if top_k <= 0:
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None:
        top_p = _number("top_p", top_p)
        if not (0.0 < top_p <= 1.0):  # NaN fails this too
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    greedy = temperature == 0.0
    mode = SamplingMode(
        greedy=greedy,
        top_k=None if greedy else top_k,
        use_top_p=(not greedy) and top_p is not None and top_p < 1.0,
    )
    params = {
        "temperature": jnp.float32(temperature if not greedy else 1.0),
        "top_p": jnp.float32(top_p if top_p is not None else 1.0),
    }
    return mode, params


def process_logits(logits: jax.Array, mode: SamplingMode, sp: dict) -> jax.Array:
    """float32 logits [..., V] -> normalized log-probs [..., V] (-inf outside top-k / top-p)."""
    x = logits.astype(jnp.float32) / sp["temperature"]
    if mode.top_k is not None and mode.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, mode.top_k)[0][..., -1:]
        x = jnp.where(x < kth, NEG_INF, x)
    logp = jax.nn.log_softmax(x, axis=-1)
    if mode.use_top_p:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (HF semantics:
        # a token is kept while the mass strictly before it is < top_p; the top token always).
        p = jnp.exp(logp)
        sorted_p = jnp.sort(p, axis=-1)[..., ::-1]
        before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
        keep_sorted = before < sp["top_p"]
        keep_sorted = keep_sorted.at[..., 0].set(True)
        min_kept = jnp.min(jnp.where(keep_sorted, sorted_p, jnp.inf), axis=-1, keepdims=True)
        logp = jax.nn.log_softmax(jnp.where(p >= min_kept, logp, NEG_INF), axis=-1)
    return logp


def sample_token(key: jax.Array, logits: jax.Array, mode: SamplingMode, sp: dict) -> jax.Array:
    """[..., V] logits -> [...] int32 token (argmax when greedy)."""
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, process_logits(logits, mode, sp), axis=-1).astype(jnp.int32)


def pick_token(
    logits: jax.Array, key: jax.Array, mode: SamplingMode, sp: dict
) -> tuple[jax.Array, jax.Array | None]:
    """A drafter's choice -> (token [B], processed log-probs [B, V] or None when greedy): the
    argmax at temperature 0, else a sample from the processed distribution (which speculative
    sampling then needs as q)."""
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    logp = process_logits(logits, mode, sp)
    return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32), logp


def chosen_logp(logits: jax.Array, tok: jax.Array, logp: jax.Array | None) -> jax.Array:
    """[B] the drafter's log-probability of its own choice `tok` [B] (`pick_token`'s outputs):
    how sure it is (`VerifySizing` reads it)."""
    if logp is None:  # greedy: the argmax's share of the softmax
        return jnp.max(logits, axis=-1) - jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


def rank_logp(logits: jax.Array, mode: SamplingMode, sp: dict) -> jax.Array:
    """Log-probs that rank a drafter's tree candidates: the distribution sampling would use."""
    return jax.nn.log_softmax(logits, -1) if mode.greedy else process_logits(logits, mode, sp)
