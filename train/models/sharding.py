"""Logical axis names of model parameters and the rules that map them onto a device mesh.

Every parameter of :mod:`train.models.encoder` and :mod:`train.models.decoder` is an
``nnx.Param`` with a ``logical_axes`` metadata tuple (one name per dimension, e.g.
``("embed", "heads")`` for a query kernel). :data:`DEFAULT_RULES` maps each logical name to a
mesh axis (or ``None`` = replicated); :func:`param_shardings` turns a model's parameter state
into a pytree of :class:`jax.sharding.NamedSharding`.

Logical names used: ``vocab``, ``embed``, ``heads`` (query heads x head_dim, flattened),
``kv_heads`` (key/value heads x head_dim), ``mlp``, ``positions``, ``types``, ``labels``,
``layers`` (the stacked axis of scanned layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

#: logical axis -> mesh axis. FSDP shards the embedding dim, tensor parallelism the
#: heads / mlp / vocab dims; ``data`` never shards parameters.
DEFAULT_RULES: LogicalRules = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("positions", None),
    ("types", None),
    ("labels", None),
    ("layers", None),
)


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: LogicalRules = DEFAULT_RULES,
) -> PartitionSpec:
    """The ``PartitionSpec`` for one array from its logical axes.

    A logical axis whose rule names a mesh axis that is not in ``mesh``, or whose dimension is
    not divisible by that mesh axis' size, is replicated; a mesh axis is used at most once.

    Args:
        axes: one logical name (or ``None``) per dimension.
        shape: the array's shape.
        mesh: the device mesh.
        rules: ``(logical, mesh_axis_or_None)`` pairs; the first match wins.

    Returns:
        A ``PartitionSpec`` with one entry per dimension.

    Example:
        >>> import numpy as np
        >>> mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tensor"))
        >>> logical_to_spec(("embed", "mlp"), (8, 6), mesh)
        P('fsdp', 'tensor')
        >>> logical_to_spec(("embed", "mlp"), (7, 6), mesh)  # 7 is not divisible by 2
        P(None, 'tensor')
    """
    table = {}
    for name, target in rules:
        table.setdefault(name, target)
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(axes, shape, strict=True):
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        ok = bool(targets) and all(t in mesh.shape and t not in used for t in targets)
        size = 1
        for t in targets if ok else ():
            size *= mesh.shape[t]
        if ok and dim % size == 0:
            used.update(targets)
            spec.append(targets[0] if len(targets) == 1 else targets)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def _axes_of(var: nnx.Variable) -> tuple[str | None, ...]:
    value = var.get_value() if hasattr(var, "get_value") else var.value
    axes = tuple(getattr(var, "logical_axes", None) or ())
    missing = value.ndim - len(axes)
    if missing > 0:  # stacked (scanned) layers carry a leading "layers" dim
        axes = ("layers",) * missing + axes
    return axes[: value.ndim]


def logical_axes(state: Any) -> Any:
    """The logical axes of every ``nnx.Variable`` in ``state`` (same tree structure).

    Example:
        >>> from train.models.encoder import EncoderConfig, EncoderModel
        >>> m = EncoderModel(EncoderConfig.tiny(), rngs=nnx.Rngs(0))
        >>> logical_axes(nnx.state(m, nnx.Param))["embeddings"]["word_embeddings"]["embedding"]
        ('vocab', 'embed')
    """
    return jax.tree.map(_axes_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """A pytree of ``NamedSharding`` for a model's parameter state.

    Args:
        state: ``nnx.state(model, nnx.Param)`` (an ``nnx.State`` of ``Param`` variables).
        mesh: the device mesh (axes such as ``data``, ``fsdp``, ``tensor``).
        rules: logical -> mesh axis rules (default :data:`DEFAULT_RULES`).

    Returns:
        The same structure with a ``NamedSharding`` per variable; ``nnx.to_pure_dict`` of it
        lines up with ``nnx.to_pure_dict(params)``.

    Example:
        >>> import numpy as np
        >>> from train.models.encoder import EncoderConfig, EncoderModel
        >>> m = EncoderModel(EncoderConfig.tiny(), rngs=nnx.Rngs(0))
        >>> mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tensor"))
        >>> sh = nnx.to_pure_dict(param_shardings(nnx.state(m, nnx.Param), mesh))
        >>> sh["encoder"]["layers"]["0"]["attention"]["query"]["kernel"].spec
        P('fsdp', 'tensor')
    """

    def one(var):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        return NamedSharding(mesh, logical_to_spec(_axes_of(var), value.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
