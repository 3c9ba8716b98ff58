"""Device mesh and data sharding helpers (single- and multi-host)."""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when launched as one of several processes.

    Detected through the usual launcher variables (``JAX_COORDINATOR_ADDRESS``, SLURM, or
    ``JAX_NUM_PROCESSES``); a single process does nothing.
    """
    if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
        return
    if (
        os.environ.get("JAX_COORDINATOR_ADDRESS")
        or int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1
    ):
        jax.distributed.initialize()
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def parse_mesh(spec: str | None, devices=None) -> Mesh:
    """``'data=2,fsdp=4'`` -> a ``Mesh`` with axes (data, fsdp, tensor); default all on data.

    One axis may be ``-1`` (the rest of the devices).

    Example:
        >>> parse_mesh("data=1").shape["data"]
        1
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = {a: 1 for a in AXES}
    if not spec:
        sizes["data"] = len(devices)
    else:
        for part in spec.split(","):
            if "=" not in part:
                raise ValueError(
                    f"--mesh: expected 'axis=size' items like 'data=2,fsdp=4', got {part!r}."
                )
            name, value = (s.strip() for s in part.split("=", 1))
            if name not in AXES:
                raise ValueError(f"--mesh: unknown axis {name!r}; axes are {list(AXES)}.")
            sizes[name] = int(value)
        if list(sizes.values()).count(-1) > 1:
            raise ValueError("--mesh: at most one axis may be -1.")
        known = math.prod(v for v in sizes.values() if v != -1)
        for a in AXES:
            if sizes[a] == -1:
                sizes[a] = len(devices) // known
    total = math.prod(sizes.values())
    if total > len(devices) or total < 1:
        raise ValueError(f"--mesh {spec!r} needs {total} devices but {len(devices)} are available.")
    arr = np.array(devices[:total]).reshape([sizes[a] for a in AXES])
    return Mesh(arr, AXES)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split on their leading dim over the data (and fsdp) axes."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def batch_divisor(mesh: Mesh) -> int:
    """How many ways a batch is split (data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def host_slice(global_batch: dict[str, np.ndarray], axis: int = 0) -> dict[str, np.ndarray]:
    """This process's rows (along ``axis``) of a global batch that every process computes."""
    n_proc, i = jax.process_count(), jax.process_index()
    if n_proc == 1:
        return global_batch
    out = {}
    for key, x in global_batch.items():
        per = x.shape[axis] // n_proc
        out[key] = np.take(x, np.arange(i * per, (i + 1) * per), axis=axis)
    return out


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, leading: int = 0) -> dict[str, jax.Array]:
    """Places a host-local batch as a global array sharded on data over dim ``leading``."""
    spec = [None] * leading + [("data", "fsdp")]
    sharding = NamedSharding(mesh, P(*spec))
    local = host_slice(batch, axis=leading)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
