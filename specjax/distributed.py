"""Several processes (hosts) decoding as one: `jax.distributed` with a global device mesh.

Every process runs the same program on the same inputs (the same prompts, the same params in
host memory): `initialize(...)` connects it to the others, after which `jax.devices()` lists
every process's devices, `specjax.make_mesh(data=D, model=M)` builds one global mesh over them,
and `generate(model, prompts, mesh=mesh)` places each process's shards of the inputs and params
on its own devices (`sharding.place`), runs one SPMD program across all of them and gathers the
tokens on every process.

    # on each host (process_id 0 .. N-1; a Cloud TPU pod slice detects all of this itself)
    specjax.distributed.initialize("10.0.0.1:1234", num_processes=N, process_id=i)
    mesh = specjax.make_mesh(data=N, model=jax.local_device_count())
    out = specjax.generate(specjax.shard_model(model, mesh), prompts, mesh=mesh)

On CPU the processes exchange data through JAX's CPU collectives (gloo).
"""

from __future__ import annotations

import jax


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: list[int] | None = None,
    timeout_s: int = 300,
) -> None:
    """Join this process to the others (`jax.distributed.initialize`). Call it before anything
    else touches JAX devices. With no arguments the cluster is detected (Cloud TPU, SLURM)."""
    given = [coordinator_address is None, num_processes is None, process_id is None]
    if any(given) and not all(given):
        raise ValueError(
            "give coordinator_address, num_processes and process_id together (or none of them, "
            f"to detect the cluster); got {coordinator_address!r}, {num_processes!r}, "
            f"{process_id!r}"
        )
    if num_processes is not None:
        if not isinstance(num_processes, int) or num_processes <= 0:
            raise ValueError(f"num_processes must be a positive int, got {num_processes!r}")
        if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id!r}")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=timeout_s,
    )


def shutdown() -> None:
    """Leave the cluster (`jax.distributed.shutdown`)."""
    jax.distributed.shutdown()
