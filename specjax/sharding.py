"""Multi-device placement: the batch sharded over a mesh "data" axis (`jit` + `NamedSharding`).
`specjax.generate(..., mesh=...)` and `generate_pmap` (pure data parallelism) use it.

Weights are replicated for now; the "model" axis of the mesh is the seam for tensor-parallel
weights (a `PartitionSpec` per param leaf) and multi-host TPU pods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCHED_ARGS = ("inp", "max_new")  # per-row inputs: every leaf has the batch first


def make_mesh(devices: Sequence | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all) with the batch on axis "data"."""
    devs = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devs.reshape(-1), ("data",))


def place(mesh: Mesh, params: dict, dparams: Any, args: dict) -> tuple[dict, Any, dict]:
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
