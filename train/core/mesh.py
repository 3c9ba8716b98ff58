"""Processes, the device mesh and data sharding (single- and multi-process).

A multi-process run starts every process with the same flags plus its identity, e.g. two
processes on one machine::

    export JAX_COORDINATOR_ADDRESS=127.0.0.1:47311 JAX_NUM_PROCESSES=2
    JAX_PROCESS_ID=0 python -m train.glue ... &
    JAX_PROCESS_ID=1 python -m train.glue ...

(or ``--coordinator_address``, ``--num_processes``, ``--process_id``); under SLURM and the other
launchers ``jax.distributed.initialize`` detects by itself, ``srun python -m train.glue ...``.
On the CPU backend the processes talk through gloo collectives.

Who does what: every process loads the data and computes the same global batch;
:func:`put_batch` puts onto each process's devices only the rows they hold on the mesh
(``data`` x ``fsdp`` split the batch, ``tensor`` replicates it). Weights and optimizer state
are sharded by the mesh across all devices of all processes (``--mesh`` must use them all).
Evaluation outputs are gathered to every process, so all compute the same metrics. Each
process writes its own shards of a checkpoint (orbax); process 0 writes the checksums, the
logs, the results, the SIFT delta and the merged export (from arrays every process helped
gather), and alone locks and clears the output directory (:func:`share_outcome` tells the
others when it is done, or why it was refused).
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

_CLUSTER_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def distributed_settings(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: dict | None = None,
) -> dict | None:
    """The ``jax.distributed.initialize`` arguments for this launch, or ``None`` for a single
    process. Flags win over ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``; a cluster launcher (SLURM, Open MPI, PMI) gives ``{}`` (auto-detect).

    Example:
        >>> distributed_settings(environ={})
        >>> distributed_settings(environ={"JAX_COORDINATOR_ADDRESS": "h:1",
        ...                               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})
        {'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 1}
    """
    env = os.environ if environ is None else environ
    addr = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else _int(env, "JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _int(env, "JAX_PROCESS_ID")
    if addr or (n is not None and n > 1) or pid is not None:
        missing = [
            name
            for name, v in (
                ("--coordinator_address / JAX_COORDINATOR_ADDRESS", addr),
                ("--num_processes / JAX_NUM_PROCESSES", n),
                ("--process_id / JAX_PROCESS_ID", pid),
            )
            if v is None
        ]
        if missing and not any(int(env.get(v, "1") or 1) > 1 for v in _CLUSTER_VARS):
            raise ValueError(
                "A multi-process launch needs all of coordinator address, number of processes "
                f"and process id; missing {', '.join(missing)}."
            )
        if missing:
            return {}
        if not 0 <= pid < n:
            raise ValueError(f"--process_id {pid} must be in [0, {n}) for {n} processes.")
        return {"coordinator_address": addr, "num_processes": n, "process_id": pid}
    if any(int(env.get(v, "1") or 1) > 1 for v in _CLUSTER_VARS):
        return {}
    return None


def _int(env, name):
    v = env.get(name)
    return None if v in (None, "") else int(v)


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> bool:
    """Joins the other processes of a multi-process run (no-op for one process); returns
    whether this is a multi-process run. Must run before anything touches the devices."""
    settings = distributed_settings(coordinator_address, num_processes, process_id)
    if settings is None:
        return False
    if jax.distributed.is_initialized():
        return True
    if (os.environ.get("JAX_PLATFORMS") or "cpu").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)
    return True


_OUTCOMES = itertools.count()


def share_outcome(error: str | None, *, timeout_s: float = 900.0) -> str | None:
    """Process 0's outcome of a step only it runs (e.g. locking and clearing the output
    directory), told to every process: process 0 passes ``None`` (it worked) or its error
    message and gets it back; every other process waits (at most ``timeout_s``) and returns
    process 0's. Processes must call it in the same order. One process: returns ``error``.

    It goes through the coordination service's key-value store, not a device collective, so it
    works before any computation and a process never waits longer than ``timeout_s``.

    Example:
        >>> share_outcome(None), share_outcome("refused")
        (None, 'refused')
    """
    if jax.process_count() == 1:
        return error
    from jax._src import distributed  # the coordination service's client (no public API)

    client = distributed.global_state.client
    key = f"train.core.mesh/outcome/{next(_OUTCOMES)}"
    if jax.process_index() == 0:
        client.key_value_set(key, "ok" if error is None else f"error:{error}")
        return error
    try:
        value = client.blocking_key_value_get(key, int(timeout_s * 1000))
    except Exception as e:  # the runtime's timeout / unavailable errors have no common type
        raise TimeoutError(
            f"Process 0 did not report within {timeout_s:g} s whether it could take the output "
            f"directory ({e}); is it running, and did it start with the same flags?"
        ) from e
    return None if value == "ok" else value.removeprefix("error:")


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
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ValueError(f"--mesh: {name}={value!r} is not an integer.") from None
        if list(sizes.values()).count(-1) > 1:
            raise ValueError("--mesh: at most one axis may be -1.")
        known = math.prod(v for v in sizes.values() if v != -1)
        for a in AXES:
            if sizes[a] == -1:
                sizes[a] = len(devices) // known
    total = math.prod(sizes.values())
    if total > len(devices) or total < 1:
        raise ValueError(f"--mesh {spec!r} needs {total} devices but {len(devices)} are available.")
    if total != len(devices) and jax.process_count() > 1:
        raise ValueError(
            f"--mesh {spec!r} uses {total} devices, but a multi-process run's mesh must use all "
            f"{len(devices)} devices of its {jax.process_count()} processes (each process "
            "computes on its own devices)."
        )
    arr = np.array(devices[:total]).reshape([sizes[a] for a in AXES])
    return Mesh(arr, AXES)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split on their leading dim over the data (and fsdp) axes."""
    return batch_sharding(mesh)


def batch_divisor(mesh: Mesh) -> int:
    """How many ways a batch is split (data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of ``tree`` replicated over ``mesh``.

    In a multi-process run the mesh has devices of other processes, which ``jax.device_put``
    cannot address: each process then builds its own replicas from its (identical) value.

    Example:
        >>> x = replicate({"w": np.ones(3)}, parse_mesh("data=1"))["w"]
        >>> x.sharding.is_fully_replicated, x.tolist()
        (True, [1.0, 1.0, 1.0])
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: _global_replica(x, sharding), tree)


def _global_replica(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` (the same value on every process) as a global array with ``sharding``."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _global_replica(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def onto_mesh(tree: Any, mesh: Mesh) -> Any:
    """Replicates over ``mesh`` every leaf that sits on a single device (a multi-device mesh
    only), so a step's arguments never mix one-device and mesh placements (and a
    multi-process run holds only global arrays, which orbax can save).

    Example:
        >>> onto_mesh({"k": np.zeros(2)}, parse_mesh("data=1"))["k"].shape
        (2,)
    """
    if mesh.size == 1:
        return tree

    def put(x):
        single = isinstance(x, jax.Array) and len(x.sharding.device_set) == 1
        return replicate(x, mesh) if single else x

    return jax.tree.map(put, tree)


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Batches split on dim ``leading`` over the data axes (``data`` x ``fsdp``), replicated
    over ``tensor``.

    Example:
        >>> batch_sharding(parse_mesh("data=1"), leading=1).spec
        P(None, ('data', 'fsdp'))
    """
    return NamedSharding(mesh, P(*[None] * leading, ("data", "fsdp")))


def process_rows(mesh: Mesh, size: int, leading: int = 0) -> np.ndarray:
    """The rows (along dim ``leading``, of ``size``) of a global batch that this process's
    devices hold, i.e. what it contributes in :func:`put_batch`. The processes' rows cover the
    batch; they are disjoint only when every process owns its own positions on the data axes
    (a ``tensor`` axis across processes replicates rows on several of them).

    Example:
        >>> process_rows(parse_mesh("data=1"), 4).tolist()
        [0, 1, 2, 3]
    """
    shape = (*([1] * leading), size)
    rows: set[int] = set()
    for index in batch_sharding(mesh, leading).addressable_devices_indices_map(shape).values():
        rows.update(range(size)[index[leading]])
    return np.array(sorted(rows), dtype=np.int64)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, leading: int = 0) -> dict[str, jax.Array]:
    """Places a global host batch (every process computes the same one) as global arrays
    sharded by :func:`batch_sharding`: each process puts, onto each of its own devices,
    exactly the rows that device holds (:func:`process_rows`), wherever the mesh puts it, so
    together they are exactly the global batch.

    Example:
        >>> b = put_batch({"x": np.arange(6).reshape(3, 2)}, parse_mesh("data=1"))
        >>> b["x"].shape, b["x"].sharding.spec
        ((3, 2), P(('data', 'fsdp'),))
    """
    sharding = batch_sharding(mesh, leading)

    def put(v: np.ndarray) -> jax.Array:
        # the dtype too: a process with no device on the mesh has no shard to infer it from
        dtype = jax.dtypes.canonicalize_dtype(v.dtype)
        return jax.make_array_from_callback(v.shape, sharding, lambda idx: v[idx], dtype=dtype)

    return {k: put(np.asarray(v)) for k, v in batch.items()}


def to_host(tree: Any) -> Any:
    """A tree of (possibly multi-process) arrays as host numpy, identical on every process."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x) if isinstance(x, jax.Array) else x

    return jax.tree.map(get, tree)
