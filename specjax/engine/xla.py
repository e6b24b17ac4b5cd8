"""XLA options for the programs specjax compiles, chosen per call instead of per process.

`XLA_FLAGS` is read once, when JAX starts its backend; after that a process cannot compile one
program with other XLA settings. `xla_options(...)` sets XLA debug options (the fields of
`XLA_FLAGS` without the leading dashes, for example `xla_backend_optimization_level=2`) for
the entry points compiled inside the block; outside it they compile as the process does.

Why this exists: on XLA CPU the right settings depend on the program. A 30-layer model in the
scan layout runs ~5x slower with `--xla_backend_optimization_level=0` (each step copies the
layer weights it slices out of the stack with unoptimized code) while a tiny model compiles
~35% faster with it. The tests use both in one process; a per-device tuner can use it too.

    with specjax.xla_options(xla_backend_optimization_level=2):
        out = specjax.generate(model, prompt)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax

Options = tuple[tuple[str, Any], ...]  # sorted (name, value) pairs: hashable, order-free

_CURRENT: contextvars.ContextVar[Options] = contextvars.ContextVar("specjax_xla", default=())


@contextlib.contextmanager
def xla_options(**options: bool | int | float | str) -> Iterator[None]:
    """Compile specjax's entry points inside the block with these XLA options (merged over
    those of an enclosing block). Only programs compiled here are affected: one already
    compiled with the same options is reused."""
    for name, value in options.items():
        if not name.startswith("xla_"):
            raise ValueError(
                f"XLA option {name!r} does not start with 'xla_'; valid names are XLA's debug "
                "options as in XLA_FLAGS without the dashes, e.g. xla_backend_optimization_level"
            )
        if not isinstance(value, bool | int | float | str):
            raise TypeError(f"XLA option {name}={value!r}: expected a bool, int, float or str")
    merged = dict(_CURRENT.get())
    merged.update(options)
    token = _CURRENT.set(tuple(sorted(merged.items())))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_options() -> Options:
    """The options `xla_options` blocks have set here (empty outside them)."""
    return _CURRENT.get()


class _OptionedJit:
    """`jax.jit(fn, **jit_kwargs)`, one per set of XLA options in force at the call."""

    def __init__(self, fn: Callable, jit_kwargs: dict[str, Any]) -> None:
        self._fn = fn
        self._kwargs = jit_kwargs
        self._jitted: dict[Options, Callable] = {}
        functools.update_wrapper(self, fn)

    def _current(self, nested: bool = False) -> Any:  # a jax.jit wrapper: .lower, .trace, ...
        # Called while another program is traced (a jitted entry point calling another), the
        # callee is part of the caller's program, compiled with the caller's options: JAX
        # rejects compiler options on a nested jit.
        opts = () if nested else _CURRENT.get()
        jitted = self._jitted.get(opts)
        if jitted is None:
            jitted = jax.jit(self._fn, compiler_options=dict(opts) or None, **self._kwargs)
            self._jitted[opts] = jitted
        return jitted

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        nested = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs)))
        return self._current(nested)(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self._current().lower(*args, **kwargs)

    def trace(self, *args: Any, **kwargs: Any) -> Any:
        return self._current().trace(*args, **kwargs)


def jit(**jit_kwargs: Any) -> Callable[[Callable], _OptionedJit]:
    """Decorator: like `functools.partial(jax.jit, **jit_kwargs)`, compiling with the options
    of the enclosing `xla_options` block."""
    return lambda fn: _OptionedJit(fn, jit_kwargs)
