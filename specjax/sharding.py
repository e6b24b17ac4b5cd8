"""Multi-device placement over a mesh with a "data" axis (the batch) and optionally a "model"
axis (tensor parallelism), for `jit` with `NamedSharding`: XLA's SPMD partitioner runs the
one decode program on every device, inserting the collectives the shardings imply.

    mesh = specjax.make_mesh(data=2, model=4)            # 8 devices
    model = specjax.shard_model(model, mesh)              # params placed (inspect model.params)
    out = specjax.generate(model, prompts, mesh=mesh)     # the same call as on one device

Tensor parallelism (Megatron-style): each device of the "model" axis holds its query and KV
heads of every attention projection (the fused wqkv columns regrouped by device:
`ModelConfig.shards`), its columns of the MLP's gate/up and rows of its down projection, its
rows of the attention output projection, and its slice of the vocabulary of the embedding and
the head. The KV cache is sharded by KV heads (and by rows over "data"). Norms are
replicated; drafter params are placed by size (`drafter_spec`: leaves of 1 MiB and more split
over "model", smaller ones replicated), and drafters that share the target's layers share their
sharding.
`generate_pmap` is pure data parallelism.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from specjax.models import family_of

if TYPE_CHECKING:
    from specjax.model import Model
    from specjax.models.config import ModelConfig

BATCHED_ARGS = ("inp", "max_new")  # per-row inputs: every leaf has the batch first


def make_mesh(devices: Sequence | None = None, *, data: int | None = None, model: int = 1) -> Mesh:
    """A mesh over `devices` (default: all). `make_mesh()`: the batch over every device (one
    axis, "data"). `make_mesh(data=D, model=M)`: D x M devices, axes ("data", "model"), M-way
    tensor parallelism; D defaults to the devices left."""
    devs = np.asarray(devices if devices is not None else jax.devices()).reshape(-1)
    if isinstance(model, bool) or not isinstance(model, int) or model <= 0:
        raise ValueError(f"model axis size must be a positive int, got {model!r}")
    if data is None and model == 1:
        return Mesh(devs, ("data",))
    if data is None:
        data = len(devs) // model
    if isinstance(data, bool) or not isinstance(data, int) or data <= 0:
        raise ValueError(f"data axis size must be a positive int, got {data!r}")
    if data * model > len(devs):
        raise ValueError(
            f"a {data} x {model} (data x model) mesh needs {data * model} devices; "
            f"{len(devs)} are available"
        )
    return Mesh(devs[: data * model].reshape(data, model), ("data", "model"))


def model_axis(mesh: Mesh | None) -> int:
    """Size of the mesh's "model" axis (1 without one)."""
    return 1 if mesh is None else int(dict(mesh.shape).get("model", 1))


# ----------------------------------------------------------------------------- params


def regroup_orders(cfg: ModelConfig, shards: int) -> dict[str, np.ndarray]:
    """Column order of each fused projection (wqkv, bqkv, w_gate_up) that puts device s's
    columns in group s: its query heads, then its key and value heads; its gate, then its up
    columns."""
    H, KV, hd, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    q = np.arange(H * hd).reshape(shards, -1)
    k = H * hd + np.arange(KV * hd).reshape(shards, -1)
    v = (H + KV) * hd + np.arange(KV * hd).reshape(shards, -1)
    gate = np.arange(F).reshape(shards, -1)
    up = F + np.arange(F).reshape(shards, -1)
    qkv = np.concatenate([q, k, v], 1).ravel()
    return {"wqkv": qkv, "bqkv": qkv, "w_gate_up": np.concatenate([gate, up], 1).ravel()}


def regroup(params: dict, cfg: ModelConfig, shards: int) -> tuple[dict, ModelConfig]:
    """Params and config with the fused projections in `shards` column groups (the same model:
    the family's forward splits the groups). From the checkpoint layout (cfg.shards == 1) only."""
    if cfg.shards == shards:
        return params, cfg
    if cfg.shards != 1:
        raise ValueError(f"params are grouped for {cfg.shards} shards, not {shards}")
    new_cfg = dataclasses.replace(cfg, shards=shards)  # checks the divisibility
    order = regroup_orders(cfg, shards)

    def layer(lp: dict) -> dict:
        return {n: jnp.take(w, order[n], axis=-1) if n in order else w for n, w in lp.items()}

    layers = params["layers"]
    layers = [layer(lp) for lp in layers] if isinstance(layers, list) else layer(layers)
    return {**params, "layers": layers}, new_cfg


def param_spec(name: str, shape: tuple, shards: int) -> P:
    """The PartitionSpec of a target param leaf named `name` (its dict key) over the "model"
    axis; replicated when it has no model-parallel dimension or the dimension does not divide."""
    lead = (None,) * (len(shape) - 2)  # a stacked (scan) layout's layer axis
    if shards == 1:
        return P()
    if name in ("wqkv", "w_gate_up") or name == "bqkv":
        return P(*(None,) * (len(shape) - 1), "model")
    if name in ("wo", "w_down"):
        return P(*lead, "model", None)
    if name == "embed" and shape[0] % shards == 0:
        return P("model", None)
    if name == "lm_head" and shape[-1] % shards == 0:
        return P(None, "model")
    return P()


def _key_name(path: tuple) -> str:
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    return str(names[-1]) if names else ""


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """`x` (the same value in every process) as a global array with `sharding`: on one process
    `jax.device_put`; across processes each one builds only its own devices' shards."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=impl)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) array as one numpy array on this process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def place_params(params: dict, mesh: Mesh) -> dict:
    """Target params placed on `mesh`: model-parallel leaves split over "model" (`param_spec`),
    the rest replicated. The fused projections must already be grouped (`regroup`)."""
    shards = model_axis(mesh)

    def place_leaf(path: tuple, x: Any) -> Any:
        spec = param_spec(_key_name(path), tuple(np.shape(x)), shards)
        return put(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place_leaf, params)


def shard_model(model: Model, mesh: Mesh) -> Model:
    """`model` with its params regrouped for and placed on `mesh` (see the module docstring);
    `model.params` shows the placement. Pass the result to `generate(..., mesh=mesh)`; a model
    already sharded for this mesh is returned as is."""
    if "data" not in mesh.axis_names:
        raise ValueError(f"mesh needs a 'data' axis for the batch; it has {mesh.axis_names}")
    # Split in the checkpoint orientation, [in, out] (`param_spec`); the [out, in] one is
    # CPU's, for a single device.
    params = family_of(model.config).orient(model.params, "in_out")
    params, cfg = regroup(params, model.config, model_axis(mesh))
    return dataclasses.replace(model, params=place_params(params, mesh), config=cfg)


def kv_spec(mesh: Mesh) -> P:
    """PartitionSpec of a per-layer KV cache buffer [B, KV, S, hd]."""
    return P("data", "model") if model_axis(mesh) > 1 else P("data")


# ----------------------------------------------------------------------------- one call


# Drafter param leaves smaller than this are replicated on a tensor-parallel mesh; larger ones
# are split over "model" (XLA inserts whatever collectives that takes).
DRAFTER_REPLICATE_BELOW = 1 << 20


def drafter_spec(shape: tuple, nbytes: int, shards: int, replicate_below: int) -> P:
    """A drafter leaf's PartitionSpec: split on its last dimension that the model axis divides
    when it is large, else replicated."""
    if shards > 1 and nbytes >= replicate_below:
        for d in reversed(range(len(shape))):
            if shape[d] % shards == 0 and shape[d] >= shards:
                return P(*(None,) * d, "model")
    return P()


def place(
    mesh: Mesh,
    params: dict,
    dparams: Any,
    args: dict,
    replicate_below: int = DRAFTER_REPLICATE_BELOW,
) -> tuple[dict, Any, dict]:
    """Place one generate call: target params as `place_params` (already-placed ones stay),
    drafter params by size (`drafter_spec`) unless they already live on this mesh (a layer-skip
    drafter's shared target layers), the batch dimension of the per-row inputs over "data"."""
    if "data" not in mesh.axis_names:
        raise ValueError(f"mesh needs a 'data' axis for the batch; it has {mesh.axis_names}")
    rep = NamedSharding(mesh, P())
    row = NamedSharding(mesh, P("data"))
    shards = model_axis(mesh)

    def place_drafter_leaf(x: Any) -> Any:
        on_mesh = isinstance(getattr(x, "sharding", None), NamedSharding) and (
            x.sharding.mesh == mesh
        )
        if on_mesh:
            return x
        if not jnp.issubdtype(x.dtype, jnp.floating):
            # Integer leaves are tables read by gathers (an n-gram datastore's index): split,
            # every lookup would cross devices.
            return put(x, rep)
        spec = drafter_spec(
            np.shape(x), int(np.size(x)) * np.dtype(x.dtype).itemsize, shards, replicate_below
        )
        return put(x, NamedSharding(mesh, spec))

    params = place_params(params, mesh)
    dparams = None if dparams is None else jax.tree.map(place_drafter_leaf, dparams)
    args = dict(args)
    for name in BATCHED_ARGS:
        args[name] = jax.tree.map(lambda x: put(x, row), args[name])
    args["sp"] = jax.tree.map(lambda x: put(x, rep), args["sp"])
    args["key"] = put(args["key"], rep)
    return params, dparams, args
