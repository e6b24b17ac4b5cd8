"""Multi-device decoding: batch sharded over a mesh "data" axis (`jit` + `NamedSharding`), and a
`pmap` entry point for pure data parallelism.

Weights are replicated for now; the "model" axis of the mesh is the seam for tensor-parallel
weights (a `PartitionSpec` per param leaf) and multi-host TPU pods.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from specjax import engine

BATCHED_ARGS = ("tokens", "lengths", "max_new")


def make_mesh(devices: Optional[Sequence] = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all) with the batch on axis "data"."""
    devs = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devs.reshape(-1), ("data",))


def place(mesh: Mesh, params, dparams, args: dict):
    """Replicate params, shard the batch dimension of the per-row inputs over "data"."""
    if "data" not in mesh.axis_names:
        raise ValueError(f"mesh needs a 'data' axis for the batch; it has {mesh.axis_names}")
    rep = NamedSharding(mesh, P())
    row = NamedSharding(mesh, P("data"))
    params = jax.device_put(params, rep)
    dparams = None if dparams is None else jax.device_put(dparams, rep)
    args = dict(args)
    for name in BATCHED_ARGS:
        args[name] = jax.device_put(args[name], row)
    args["sp"] = jax.device_put(args["sp"], rep)
    return params, dparams, args


def generate_pmap(model, prompts, *, max_new_tokens: int = 128, temperature: float = 0.0,
                  top_k=None, top_p=None, key=None, chat: bool = True, drafter=None,
                  devices: Optional[Sequence] = None):
    """`generate` with the batch split over devices by `jax.pmap`.

    Each device runs its own while_loop over its rows, so a device whose rows finish early stops
    early. Sampling uses one key per device (folded from `key`), so sampled tokens differ from a
    single-device run; greedy tokens are identical.
    """
    from specjax.generate import finish, prepare

    devices = list(devices if devices is not None else jax.devices())
    D = len(devices)
    ec, args, rows = prepare(model, prompts, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, key=key,
                             chat=chat, drafter=drafter, batch_multiple=D)
    max_len, dparams, sp, key = args.pop("max_len"), args.pop("dparams"), args.pop("sp"), args.pop("key")
    split = {k: v.reshape((D, -1) + v.shape[1:]) for k, v in args.items()}
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(D))

    def run(params, dparams, tokens, lengths, max_new, key, sp):
        st = engine.prefill(params, dparams, tokens, lengths, max_new, key, sp, ec=ec,
                            max_len=max_len)
        return engine.decode(params, dparams, st, sp, ec=ec)

    fn = jax.pmap(run, in_axes=(None, None, 0, 0, 0, 0, None), devices=devices)
    t0 = time.perf_counter()
    state = fn(model.params, dparams, split["tokens"], split["lengths"], split["max_new"], keys, sp)
    jax.block_until_ready(state.out)
    dt = time.perf_counter() - t0
    # Merge the device axis back into the batch axis.
    state = state.replace(
        out=state.out.reshape((-1,) + state.out.shape[2:]), n_out=state.n_out.reshape(-1),
        row_steps=state.row_steps.reshape(-1), steps=jnp.max(state.steps),
        accept_hist=jnp.sum(state.accept_hist, axis=0))
    return finish(model, state, rows, 0.0, dt, True)
