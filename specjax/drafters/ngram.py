"""Prompt lookup / n-gram drafting (Saxena 2023, "prompt lookup decoding"), fully on device.

The drafter keeps the row's whole token history (prompt + emitted tokens) in a static buffer.
To draft, it takes the last n tokens (n = max_ngram down to min_ngram), finds their most recent
earlier occurrence in the history, and proposes the K tokens that followed it. Deterministic,
so the draft distribution is one-hot (verification handles that exactly).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from specjax.drafters.base import Draft, DrafterSpec, TargetPrefill


@struct.dataclass
class NgramState:
    hist: jax.Array  # [B, H] int32 prompt + emitted tokens
    hist_len: jax.Array  # [B] int32


def latest_match(hist: jax.Array, hist_len: jax.Array, n: int):
    """Latest start i with hist[i:i+n] == last n tokens and i + n < hist_len (so at least one
    token follows). -> (found [B] bool, start of the continuation i + n [B] int32)."""
    B, H = hist.shape
    idx = jnp.arange(H)[None, :]  # [1, H]
    suffix_pos = hist_len[:, None] - n + jnp.arange(n)[None, :]  # [B, n]
    suffix = jnp.take_along_axis(hist, jnp.clip(suffix_pos, 0, H - 1), axis=1)  # [B, n]
    match = jnp.ones((B, H), bool)
    for j in range(n):  # n is small and static
        shifted = jnp.roll(hist, -j, axis=1)  # shifted[:, i] = hist[:, i + j]
        match &= shifted == suffix[:, j:j + 1]
    match &= (idx + n < hist_len[:, None]) & (hist_len[:, None] >= n + 1)
    found = match.any(axis=1)
    start = jnp.max(jnp.where(match, idx, -1), axis=1) + n
    return found, start.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class NgramSpec(DrafterSpec):
    max_ngram: int = 3
    min_ngram: int = 1

    kind = "ngram"

    def __post_init__(self):
        super().__post_init__()
        if not (1 <= self.min_ngram <= self.max_ngram):
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={self.min_ngram}, "
                             f"max_ngram={self.max_ngram}")

    def init(self, params, prefill: TargetPrefill, max_len: int) -> NgramState:
        B, P = prefill.tokens.shape
        hist = jnp.zeros((B, max_len), jnp.int32).at[:, :P].set(prefill.tokens)
        hist = hist.at[jnp.arange(B), prefill.lengths].set(prefill.first)
        return NgramState(hist=hist, hist_len=prefill.lengths + 1)

    def propose(self, params, state: NgramState, last, key, mode, sp):
        B, H = state.hist.shape
        start = jnp.full((B,), -1, jnp.int32)
        for n in range(self.min_ngram, self.max_ngram + 1):  # longer matches override shorter
            found, s = latest_match(state.hist, state.hist_len, n)
            start = jnp.where(found, s, start)
        # No match: propose a repeat of `last` (cheap guess; verification keeps it exact).
        pos = start[:, None] + jnp.arange(self.k)[None, :]  # [B, K]
        tokens = jnp.take_along_axis(state.hist, jnp.clip(pos, 0, H - 1), axis=1)
        # Past the known history the continuation is unknown: repeat its last known token.
        known = jnp.clip(pos, 0, state.hist_len[:, None] - 1)
        tokens = jnp.where(pos < state.hist_len[:, None], tokens,
                           jnp.take_along_axis(state.hist, known, axis=1))
        tokens = jnp.where((start >= 0)[:, None], tokens, last[:, None])
        return Draft(tokens=tokens.astype(jnp.int32), logp=None), state

    def commit(self, params, state: NgramState, draft, acc, active, target):
        B, H = state.hist.shape
        K = self.k
        j = jnp.arange(K + 1)[None, :]
        padded = jnp.concatenate([draft.tokens, jnp.zeros((B, 1), jnp.int32)], axis=1)
        emitted = jnp.where(j < acc.n[:, None], padded, acc.bonus[:, None])  # [B, K+1]
        count = jnp.where(active, acc.n + 1, 0)
        col = jnp.where(j < count[:, None], state.hist_len[:, None] + j, H)  # H = dropped
        hist = state.hist.at[jnp.arange(B)[:, None], col].set(emitted, mode="drop")
        return NgramState(hist=hist, hist_len=jnp.minimum(state.hist_len + count, H))
