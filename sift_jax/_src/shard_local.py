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

import math
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sift_jax._src import indexing
from sift_jax._src import selection as selection_lib


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


@dataclass(frozen=True)
class PerShard(indexing.Scope):
    """``scope="shard"``: the top-``k_local`` within each block of a sharded leaf.

    Indices are an ``int32[S * k_local]`` vector of local flat indices (block ``s`` holds
    entries ``s * k_local ... (s + 1) * k_local - 1``), sharded over the same mesh axes as
    the leaf; gathers, writes, selection and the probe run per block in ``shard_map``.
    ``k`` is ``k_local``.
    """

    layout: ShardLayout | None = None

    @classmethod
    def for_array(cls, x: jax.Array, k: int) -> PerShard:
        """The scope of a placed array that gets ``k`` (global) entries: ``ceil(k / S)`` per
        block of its ``NamedSharding``.

        Example:
            >>> import jax.numpy as jnp
            >>> PerShard.for_array(jnp.zeros((4, 4)), 5).size  # one device: one block
            5
        """
        lay = layout_for(x, k)
        return cls(tuple(x.shape), lay.k_local, lay)

    @property
    def num_shards(self) -> int:
        """``S``, the number of blocks."""
        return self.layout.num_shards

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def index_shape(self) -> tuple[int, ...]:
        return (self.layout.size,)

    def placeholder(self):
        lay = self.layout
        idx = np.tile(np.arange(lay.k_local, dtype=np.int32), lay.num_shards)
        return jax.device_put(idx, lay.vector_sharding())

    def zeros(self, dtype):
        return jax.device_put(np.zeros((self.layout.size,), dtype), self.layout.vector_sharding())

    def gather(self, x, idx):
        lay = self.layout
        return _smap(lay, indexing._gather_flat, (lay.spec, lay.idx_spec), lay.idx_spec)(x, idx)

    def write(self, w, idx, values, op="set"):
        lay, vec = self.layout, self.layout.idx_spec

        def f(wb, ib, vb):
            return indexing._scatter_at(wb, ib, vb, op)

        return _smap(lay, f, (lay.spec, vec, vec), lay.spec)(w, idx, values)

    def select(self, strategy, score, param, key, k=None):
        lay = self.layout
        k = lay.k_local if k is None else k
        axes = lay.axes

        def block_key():
            if not axes:
                return key
            return jax.random.fold_in(key, jax.lax.axis_index(axes))

        if score is None:
            f = lambda pb: selection_lib.run(strategy, None, pb, k, block_key())
            return _smap(lay, f, (lay.spec,), lay.idx_spec)(param)
        if param is None:
            f = lambda sb: selection_lib.run(strategy, sb, None, k, block_key())
            return _smap(lay, f, (lay.spec,), lay.idx_spec)(score)
        f = lambda sb, pb: selection_lib.run(strategy, sb, pb, k, block_key())
        return _smap(lay, f, (lay.spec, lay.spec), lay.idx_spec)(score, param)

    def probe_grad(self, g, width):
        lay = self.layout
        out_spec = PartitionSpec(None, lay.axes) if lay.axes else PartitionSpec()
        per_block = width // lay.num_shards  # the probe holds every block's entries

        def local(gb):
            idx = selection_lib.topk_indices(selection_lib.finite_abs(gb), per_block)
            return indexing.encode_probe(idx, indexing._gather_flat(gb, idx))

        return _smap(lay, local, (lay.spec,), out_spec)(g)

    def probe_shape(self, width=None):
        return (3, self.layout.size if width is None else width * self.layout.num_shards)

    def to_global(self, idx):
        return np.sort(to_global(idx, self.layout))

    def from_global(self, gidx):
        lay = self.layout
        gidx = np.asarray(gidx).reshape(-1)
        if gidx.shape != (lay.size,):
            raise ValueError(
                f"Expected {lay.size} indices for a shard-local leaf of shape {lay.shape}, got "
                f"{gidx.shape[0]}: the saved selection does not match this plan."
            )
        # Saved sorted; each block's entries are contiguous once grouped by block.
        blocks = _block_of(gidx, lay)
        if (np.bincount(blocks, minlength=lay.num_shards) != lay.k_local).any():
            raise ValueError(
                "Shard-local indices do not fall in their blocks: the checkpoint was written "
                "under a different mesh or sharding than this run's."
            )
        order = np.argsort(blocks, kind="stable")
        local = from_global(gidx[order], lay)
        return jax.device_put(local, lay.vector_sharding())


def scope_for(x: jax.Array, k: int) -> PerShard:
    """The :class:`PerShard` scope of a placed array that gets ``k`` (global) increments."""
    return PerShard.for_array(x, k)


def _block_of(gidx: np.ndarray, layout: ShardLayout) -> np.ndarray:
    if not layout.shape:
        return np.zeros(gidx.shape, np.int64)
    coords = np.unravel_index(gidx.astype(np.int64), layout.shape)
    block = [c // n for c, n in zip(coords, layout.local_shape, strict=True)]
    return np.ravel_multi_index(block, layout.blocks)


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
