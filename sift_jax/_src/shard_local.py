"""Shard-local sparse increments: top-k, gathers and scatters inside each device's own block.

With a weight split over a device mesh (e.g. FSDP), choosing the global top-k of ``|grad_W|``
and reading or writing ``W`` at arbitrary global flat indices needs cross-device traffic: the
index and value vectors (or the sharded operand) have to be gathered where the gather/scatter
runs. Shard-local selection instead gives each of the ``S`` blocks of a sharded tensor its own
static ``k_local = ceil(k / S)`` indices, chosen as the top-``k_local`` of ``|g|`` *within the
block*, and keeps them as **local** flat indices (into the block, row-major) in an
``int32[S * k_local]`` vector sharded over the same mesh axes as the tensor. Every operation
below runs through :func:`jax.shard_map` on local blocks and needs no communication.

The result is not the global top-k (see ``docs/sharding.md``): each block gets the same
budget whether or not its gradients are large.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sift_jax._src import selection as selection_lib
from sift_jax._src.transform import _gather, _unravel


@dataclass(frozen=True)
class ShardLayout:
    """How one targeted tensor is split into blocks, and where its ``S * k_local`` indices live.

    Attributes:
        mesh: the device mesh the tensor lives on.
        spec: the tensor's ``PartitionSpec``, one entry per dimension.
        shape: the tensor's (global) shape.
        k_local: indices per block (static).
    """

    mesh: Mesh
    spec: PartitionSpec
    shape: tuple[int, ...]
    k_local: int

    @property
    def dim_axes(self) -> tuple[tuple[str, ...], ...]:
        """The mesh axes that split each dimension (``()`` when it is not split)."""
        out = []
        for e in self.spec:
            out.append(() if e is None else (e,) if isinstance(e, str) else tuple(e))
        return tuple(out)

    @property
    def blocks(self) -> tuple[int, ...]:
        """Number of blocks along each dimension."""
        return tuple(math.prod(self.mesh.shape[a] for a in ax) for ax in self.dim_axes)

    @property
    def num_shards(self) -> int:
        """``S``: the number of distinct blocks (1 for a replicated tensor)."""
        return math.prod(self.blocks)

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(n // b for n, b in zip(self.shape, self.blocks, strict=True))

    @property
    def axes(self) -> tuple[str, ...]:
        """The mesh axes that split the tensor, in dimension order (major to minor)."""
        return tuple(a for ax in self.dim_axes for a in ax)

    @property
    def idx_spec(self) -> PartitionSpec:
        """Spec of the ``[S * k_local]`` index / value vectors: block ``s`` holds entries
        ``s * k_local ... (s + 1) * k_local - 1``, where ``s`` is the row-major number of the
        block's coordinates."""
        return PartitionSpec(self.axes) if self.axes else PartitionSpec()

    @property
    def size(self) -> int:
        """``S * k_local``: the total number of selected entries."""
        return self.num_shards * self.k_local

    def vector_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, self.idx_spec)


def layout_for(x: jax.Array, k: int) -> ShardLayout:
    """The :class:`ShardLayout` of a placed array that gets ``k`` (global) increments.

    ``k_local = ceil(k / S)``, so the tensor trains ``S * k_local >= k`` entries. An array on a
    single device (not a ``NamedSharding``) counts as one block on a one-device mesh.
    """
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        mesh, spec = sharding.mesh, tuple(sharding.spec)
    elif sharding is not None and len(sharding.device_set) == 1:
        mesh, spec = Mesh(np.array(list(sharding.device_set)), ("data",)), ()
    else:
        raise ValueError(
            f"Shard-local selection needs arrays placed with a NamedSharding; got {sharding!r}."
        )
    spec = PartitionSpec(*(spec + (None,) * (x.ndim - len(spec))))
    layout = ShardLayout(mesh, spec, tuple(x.shape), 1)
    for n, b in zip(layout.shape, layout.blocks, strict=True):
        if n % b:
            raise ValueError(
                f"Shard-local selection: a dimension of size {n} is split unevenly into {b}."
            )
    s = layout.num_shards
    return ShardLayout(mesh, spec, tuple(x.shape), -(-k // s))


def _smap(layout: ShardLayout, f, in_specs, out_specs):
    return jax.shard_map(f, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs)


def placeholder_indices(layout: ShardLayout) -> jax.Array:
    """Valid local indices (``arange(k_local)`` in every block) before selection happens."""
    idx = np.tile(np.arange(layout.k_local, dtype=np.int32), layout.num_shards)
    return jax.device_put(idx, layout.vector_sharding())


def zeros_vector(layout: ShardLayout, dtype) -> jax.Array:
    """``dtype[S * k_local]`` zeros with the index vector's sharding."""
    return jax.device_put(np.zeros((layout.size,), dtype), layout.vector_sharding())


def gather_local(x: jax.Array, idx: jax.Array, layout: ShardLayout) -> jax.Array:
    """``block.ravel()[local_idx]`` in every block: ``x``'s values at the selected entries."""

    def f(xb, ib):
        return _gather(xb, ib)

    return _smap(layout, f, (layout.spec, layout.idx_spec), layout.idx_spec)(x, idx)


def write_local(
    w: jax.Array, idx: jax.Array, sel: jax.Array, delta: jax.Array, layout: ShardLayout
) -> jax.Array:
    """Shard-local :func:`sift_jax.write_increments`: ``w[idx] = round(sel + delta)`` per block."""
    vec = layout.idx_spec

    def f(wb, ib, sb, db):
        v = (sb.astype(db.dtype) + db).astype(wb.dtype)
        if wb.ndim == 0:
            return v.reshape(())
        return wb.at[_unravel(ib, wb.shape)].set(v, indices_are_sorted=True, unique_indices=True)

    return _smap(layout, f, (layout.spec, vec, vec, vec), layout.spec)(w, idx, sel, delta)


def topk_local(score: jax.Array, layout: ShardLayout) -> jax.Array:
    """Sorted local indices of the ``k_local`` largest entries of ``score`` in every block."""

    def f(sb):
        return selection_lib.topk_indices(sb, layout.k_local)

    return _smap(layout, f, (layout.spec,), layout.idx_spec)(score)


@functools.cache
def increment_view_fn(layout: ShardLayout):
    """Shard-local :func:`sift_jax.increment_view`: ``w`` forward; ``grad_w`` at the local
    indices (gathered inside each block) backward."""

    @jax.custom_vjp
    def view(w, delta, idx):
        del delta, idx
        return w

    def fwd(w, delta, idx):
        return w, (idx, jnp.zeros((0,), w.dtype), jnp.zeros((0,), delta.dtype))

    def bwd(res, g):
        idx, w_proto, d_proto = res
        return (
            jnp.zeros(g.shape, w_proto.dtype),  # never requested for frozen weights: DCE'd
            gather_local(g, idx, layout).astype(d_proto.dtype),
            np.zeros(idx.shape, jax.dtypes.float0),
        )

    view.defvjp(fwd, bwd)
    return view


@functools.cache
def topk_probe_fn(layout: ShardLayout):
    """Shard-local :func:`sift_jax.topk_probe`: the probe (``float32[3, S * k_local]``) gets,
    per block, the rows ``(idx // 65536, idx % 65536, grad_w[idx])`` for the block's top-k
    local indices (decode with :func:`sift_jax.probe_indices`)."""
    out_spec = PartitionSpec(None, layout.axes) if layout.axes else PartitionSpec()

    @jax.custom_vjp
    def probe(w, pr):
        del pr
        return w

    def fwd(w, pr):
        del pr
        return w, jnp.zeros((0,), w.dtype)

    def local(gb):
        idx = selection_lib.topk_indices(jnp.abs(gb.astype(jnp.float32)), layout.k_local)
        return jnp.stack(
            [
                (idx // 65536).astype(jnp.float32),
                (idx % 65536).astype(jnp.float32),
                _gather(gb, idx).astype(jnp.float32),
            ]
        )

    def bwd(w_proto, g):
        pg = _smap(layout, local, (layout.spec,), out_spec)(g)
        return jnp.zeros(g.shape, w_proto.dtype), pg

    probe.defvjp(fwd, bwd)
    return probe


def _coords(layout: ShardLayout):
    pos = np.arange(layout.size) // layout.k_local  # the block each entry belongs to
    block = np.unravel_index(pos, layout.blocks)
    return [b * n for b, n in zip(block, layout.local_shape, strict=True)]


def to_global(idx, layout: ShardLayout) -> np.ndarray:
    """Local indices (``[S * k_local]``, block by block) -> global flat indices (host numpy,
    in the same order; not sorted)."""
    idx = np.asarray(idx).astype(np.int64)
    if not layout.shape:
        return idx.astype(np.int32)
    local = np.unravel_index(idx, layout.local_shape)
    glob = [o + i for o, i in zip(_coords(layout), local, strict=True)]
    return np.ravel_multi_index(glob, layout.shape).astype(np.int32)


def from_global(gidx, layout: ShardLayout) -> np.ndarray:
    """Inverse of :func:`to_global` (host numpy); raises if an index is outside its block."""
    gidx = np.asarray(gidx).astype(np.int64)
    if not layout.shape:
        return gidx.astype(np.int32)
    coords = np.unravel_index(gidx, layout.shape)
    local = [c - o for c, o in zip(coords, _coords(layout), strict=True)]
    if any(((x < 0) | (x >= n)).any() for x, n in zip(local, layout.local_shape, strict=True)):
        raise ValueError(
            "Shard-local indices do not fall in their blocks: the checkpoint was written under "
            "a different mesh or sharding than this run's."
        )
    return np.ravel_multi_index(local, layout.local_shape).astype(np.int32)
