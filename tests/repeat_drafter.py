"""A toy drafter in one file, as a reader would add one: "repeat the last token k times".

It keeps no state and reads no target features; it only shows that a new drafter needs this
file plus one registry line (see tests/test_registry.py), and nothing in the engine.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from specjax.engine.protocol import Draft, Drafter, DrafterSpec


@dataclasses.dataclass(frozen=True)
class RepeatSpec(DrafterSpec):
    """Drafts `last` k times: a deterministic chain (one-hot q)."""

    def init(self, params, prefill, max_len):
        return None

    def propose(self, params, state, last, key, mode, sp):
        return Draft(tokens=jnp.repeat(last[:, None], self.k, axis=1), logp=None), state

    def commit(self, params, state, draft, verified, active, target):
        return state


def repeat_last(k: int = 3) -> Drafter:
    return Drafter.fixed(f"repeat_last(k={k})", RepeatSpec(k=k))
