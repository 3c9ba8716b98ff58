"""Where a sparse leaf's ``k`` trained entries live, and the array operations at them.

A :class:`Scope` says how a leaf's selected entries are indexed and chosen:

* :class:`WholeTensor` (``scope="global"``): ``int32[k]`` sorted flat indices into the whole
  leaf, the top-k taken over all of it (the paper's selection);
* :class:`PerSlice` (stacked leaves of scanned layers): ``int32[L, k]``, flat indices into each
  leading-dim slice, the top-k taken per slice (per layer), never jointly across the stack;
* :class:`PerShard` (``scope="shard"``): ``int32[S * k_local]``, local flat indices into each of
  the ``S`` blocks of a sharded leaf, chosen and used inside each block (see
  :mod:`sift_jax._src.shard_local`).

Each scope gathers values at its indices, writes them back (in place when the buffer is
donated), chooses indices with any :mod:`sift_jax.selection` strategy, converts indices to
global flat form for checkpoints and deltas, and gives the two custom-VJP functions of the
compact path (:func:`view_fn`, :func:`probe_fn`), built by ONE factory per scope.

Arrays on meshes with ``Explicit`` axes (``jax.make_mesh``'s default in jax >= 0.7) reject
flat reshapes, ``top_k`` over sharded dims and scatters without an output sharding; every
operation here then runs under :func:`jax.sharding.auto_axes` and returns the operand's
sharding (scatters) or a replicated vector (gathers, top-k).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from sift_jax._src import selection as selection_lib

#: The probe gradient stores an index as two exactly representable fp32 numbers,
#: ``(idx // PROBE_BASE, idx % PROBE_BASE)``: exact for indices below 2**40.
PROBE_BASE = 65536


def encode_probe(idx: jax.Array, values: jax.Array) -> jax.Array:
    """``float32[3, k]`` rows ``(idx // PROBE_BASE, idx % PROBE_BASE, values)``.

    Example:
        >>> import jax.numpy as jnp
        >>> encode_probe(jnp.array([65538]), jnp.array([0.5])).tolist()
        [[1.0], [2.0], [0.5]]
    """
    return jnp.stack(
        [
            (idx // PROBE_BASE).astype(jnp.float32),
            (idx % PROBE_BASE).astype(jnp.float32),
            values.astype(jnp.float32),
        ]
    )


def decode_probe(probe_grad: jax.Array) -> jax.Array:
    """The ``int32`` indices of an :func:`encode_probe` array (last axis = entries).

    Example:
        >>> import jax.numpy as jnp
        >>> decode_probe(jnp.array([[1.0, 0.0], [2.0, 7.0], [0.0, 0.0]])).tolist()
        [65538, 7]
    """
    hi, lo = probe_grad[..., 0, :], probe_grad[..., 1, :]
    return (hi.astype(jnp.int32) * PROBE_BASE + lo.astype(jnp.int32)).astype(jnp.int32)


# ----------------------------------------------------------------------------- sharding


def explicit_sharding(x: Any) -> NamedSharding | None:
    """``x``'s sharding when it lives on a mesh with Explicit axes (inside or outside jit).

    Example:
        >>> import jax.numpy as jnp
        >>> explicit_sharding(jnp.zeros(3)) is None
        True
    """
    try:
        sharding = jax.typeof(x).sharding
    except Exception:  # noqa: BLE001  (numpy inputs, abstract values without sharding)
        return None
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not mesh.axis_names:
        return None
    if not any(t == AxisType.Explicit for t in mesh.axis_types):
        return None
    return sharding


def _auto(fn, out_like: Any, *args, replicated: bool = False):
    """``fn(*args)``; under Explicit sharding run in auto mode with the output sharded like
    ``out_like`` (or replicated)."""
    sh = next((s for s in map(explicit_sharding, (out_like, *args)) if s is not None), None)
    if sh is None:
        return fn(*args)
    like = None if replicated else explicit_sharding(out_like)
    spec = PartitionSpec() if like is None else like.spec
    return jax.sharding.auto_axes(fn, out_sharding=NamedSharding(sh.mesh, spec))(*args)


# ----------------------------------------------------------------------------- flat ops


def unravel(idx: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Flat indices -> one index array per dimension, so scatters need no reshape.

    Truncating div/rem (indices are non-negative): ~10% faster scatters on CPU than
    ``jnp.unravel_index``, whose floor division and range clipping add per-element work.

    Example:
        >>> import jax.numpy as jnp
        >>> [a.tolist() for a in unravel(jnp.array([5]), (2, 3))]
        [[1], [2]]
    """
    if len(shape) <= 1:
        return (idx,)
    out = []
    for d in reversed(shape[1:]):
        d = jnp.asarray(d, idx.dtype)
        out.append(jax.lax.rem(idx, d))
        idx = jax.lax.div(idx, d)
    return (idx, *reversed(out))


def _gather_flat(x: jax.Array, idx: jax.Array) -> jax.Array:
    # A gather through the flat view: a reshape costs nothing here (unlike before a scatter
    # that should run in place) and a 1-D gather is ~30% faster on CPU than an unravelled one.
    return (
        x.reshape(-1)
        .at[idx]
        .get(mode="promise_in_bounds", indices_are_sorted=True, unique_indices=True)
    )


def gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x.ravel()[idx]`` for sorted, distinct, in-range flat indices.

    Example:
        >>> import jax.numpy as jnp
        >>> gather(jnp.arange(6.0).reshape(2, 3), jnp.array([1, 5])).tolist()
        [1.0, 5.0]
    """
    return _auto(_gather_flat, x, x, idx, replicated=True)


def _scatter_at(w: jax.Array, idx: jax.Array, values: jax.Array, op: str) -> jax.Array:
    values = values.astype(w.dtype)
    if w.ndim == 0:
        return values.reshape(()) if op == "set" else w + values.reshape(())
    at = w.at[unravel(idx, w.shape)]
    kw = {"indices_are_sorted": True, "unique_indices": True}
    return at.set(values, **kw) if op == "set" else at.add(values, **kw)


def scatter(w: jax.Array, idx: jax.Array, values: jax.Array, op: str = "set") -> jax.Array:
    """``w`` with ``values`` set (``op="set"``) or added (``"add"``) at flat ``idx``.

    Written without reshapes so that XLA performs it in place when ``w`` is donated.

    Example:
        >>> import jax.numpy as jnp
        >>> scatter(jnp.zeros((2, 2)), jnp.array([1, 2]), jnp.array([5.0, 6.0])).tolist()
        [[0.0, 5.0], [6.0, 0.0]]
    """
    return _auto(functools.partial(_scatter_at, op=op), w, w, idx, values)


def topk(score: jax.Array, k: int) -> jax.Array:
    """Sorted flat indices of the ``k`` largest entries of ``score`` (replicated).

    Example:
        >>> import jax.numpy as jnp
        >>> topk(jnp.array([[1.0, 9.0], [3.0, 2.0]]), 2).tolist()
        [1, 2]
    """
    return _auto(lambda s: selection_lib.topk_indices(s, k), score, score, replicated=True)


# ----------------------------------------------------------------------------- scopes


@dataclasses.dataclass(frozen=True)
class Scope:
    """Base class: how one sparse leaf's selected entries are indexed.

    Attributes:
        shape: the leaf's shape.
        k: entries selected per selection group (the whole leaf, a slice or a shard block).
    """

    shape: tuple[int, ...]
    k: int

    @property
    def size(self) -> int:
        """Entries the leaf trains in all."""
        return self.k

    @property
    def index_shape(self) -> tuple[int, ...]:
        """Shape of the index (and value) arrays as kept."""
        return (self.k,)

    def placeholder(self) -> jax.Array:
        """Valid indices to hold before selection happens."""
        return jnp.arange(self.k, dtype=jnp.int32)

    def zeros(self, dtype: Any) -> jax.Array:
        """A zero value vector shaped (and placed) like the indices."""
        return jnp.zeros(self.index_shape, dtype)

    def gather(self, x: jax.Array, idx: jax.Array) -> jax.Array:
        """``x``'s values at ``idx``."""
        return gather(x, idx)

    def write(self, w: jax.Array, idx: jax.Array, values: jax.Array, op: str = "set") -> jax.Array:
        """``w`` with ``values`` set (or added) at ``idx``."""
        return scatter(w, idx, values, op)

    def select(
        self,
        strategy: selection_lib.Strategy,
        score: jax.Array | None,
        param: jax.Array,
        key: jax.Array,
        k: int | None = None,
    ) -> jax.Array:
        """Indices chosen by ``strategy`` (``k`` per group, default :attr:`k`)."""
        k = self.k if k is None else k
        # The key goes in as an argument: under Explicit sharding a closed-over key keeps
        # its Explicit mesh inside the auto region.
        fn = lambda s, p, kk: selection_lib.run(strategy, s, p, k, kk)
        return _auto(fn, param, score, param, key, replicated=True)

    def probe_grad(self, g: jax.Array, width: int) -> jax.Array:
        """The probe gradient for ``g``: the top-``width`` of ``|g|`` with its values."""

        def f(g):
            idx = selection_lib.topk_indices(selection_lib.finite_abs(g), width)
            return encode_probe(idx, _gather_flat(g, idx))

        return _auto(f, g, g, replicated=True)

    def probe_shape(self, width: int | None = None) -> tuple[int, ...]:
        """Shape of the zero probe whose gradient is :meth:`probe_grad`."""
        return (3, self.k if width is None else width)

    def to_global(self, idx: Any) -> np.ndarray:
        """Indices as kept -> sorted global flat ``int32`` indices (host numpy)."""
        return np.asarray(idx).astype(np.int32).reshape(-1)

    def from_global(self, gidx: Any) -> jax.Array:
        """Inverse of :meth:`to_global` (a device array, placed like :meth:`placeholder`)."""
        gidx = np.asarray(gidx).astype(np.int32).reshape(-1)
        if gidx.shape != (self.size,):
            raise ValueError(
                f"Expected {self.size} indices for a leaf of shape {self.shape}, got "
                f"{gidx.shape[0]}: the saved selection does not match this plan."
            )
        return jnp.asarray(gidx)


@dataclasses.dataclass(frozen=True)
class WholeTensor(Scope):
    """The top-k over the whole leaf; global flat indices (``int32[k]``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from sift_jax._src import selection
        >>> s = WholeTensor((2, 2), 1)
        >>> s.select(selection.get("grad"), jnp.array([[0.0, 3.0], [1.0, 2.0]]), None,
        ...          jax.random.key(0)).tolist()
        [1]
    """


@dataclasses.dataclass(frozen=True)
class PerSlice(Scope):
    """The top-k within each slice along the leading ``lead`` dims (layers of a scanned stack).

    Indices are ``int32[*shape[:lead], k]`` flat positions within each slice.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from sift_jax._src import selection
        >>> s = PerSlice((2, 3), 1, lead=1)
        >>> g = jnp.array([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0]])
        >>> s.select(selection.get("grad"), g, None, jax.random.key(0)).tolist()
        [[1], [0]]
        >>> s.to_global([[1], [0]]).tolist()
        [1, 3]
    """

    lead: int = 1

    @property
    def groups(self) -> tuple[int, ...]:
        return self.shape[: self.lead]

    @property
    def slice_size(self) -> int:
        return math.prod(self.shape[self.lead :])

    @property
    def size(self) -> int:
        return math.prod(self.groups) * self.k

    @property
    def index_shape(self) -> tuple[int, ...]:
        return (*self.groups, self.k)

    def _vmap(self, fn, n_args: int):
        for _ in range(self.lead):
            fn = jax.vmap(fn, in_axes=(0,) * n_args)
        return fn

    def placeholder(self) -> jax.Array:
        return jnp.broadcast_to(jnp.arange(self.k, dtype=jnp.int32), self.index_shape)

    def gather(self, x, idx):
        return _auto(self._vmap(_gather_flat, 2), x, x, idx, replicated=True)

    def write(self, w, idx, values, op="set"):
        return _auto(self._vmap(functools.partial(_scatter_at, op=op), 3), w, w, idx, values)

    def _keys(self, key):
        n = math.prod(self.groups)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
        return keys.reshape(*self.groups, *keys.shape[1:])

    def select(self, strategy, score, param, key, k=None):
        k = self.k if k is None else k

        def one(s, p, kk):
            return selection_lib.run(strategy, s, p, k, kk)

        keys = self._keys(key)
        if score is None:
            fn = self._vmap(lambda p, kk: one(None, p, kk), 2)
            return _auto(fn, param, param, keys, replicated=True)
        if param is None:
            fn = self._vmap(lambda s, kk: one(s, None, kk), 2)
            return _auto(fn, score, score, keys, replicated=True)
        return _auto(self._vmap(one, 3), param, score, param, keys, replicated=True)

    def probe_grad(self, g, width):
        def f(gs):
            idx = selection_lib.topk_indices(selection_lib.finite_abs(gs), width)
            return encode_probe(idx, _gather_flat(gs, idx))

        return _auto(self._vmap(f, 1), g, g, replicated=True)

    def probe_shape(self, width=None):
        return (*self.groups, 3, self.k if width is None else width)

    def to_global(self, idx):
        idx = np.asarray(idx).astype(np.int64).reshape(-1, self.k)
        offsets = (np.arange(idx.shape[0]) * self.slice_size)[:, None]
        return (idx + offsets).reshape(-1).astype(np.int32)

    def from_global(self, gidx):
        gidx = np.asarray(gidx).astype(np.int64).reshape(-1)
        if gidx.shape != (self.size,):
            raise ValueError(
                f"Expected {self.size} indices for a stacked leaf of shape {self.shape}, got "
                f"{gidx.shape[0]}: the saved selection does not match this plan."
            )
        local = gidx.reshape(-1, self.k)
        offsets = (np.arange(local.shape[0]) * self.slice_size)[:, None]
        local = local - offsets
        if (local < 0).any() or (local >= self.slice_size).any():
            raise ValueError("Saved per-slice indices fall outside their slices.")
        return jnp.asarray(local.reshape(self.index_shape).astype(np.int32))


# ----------------------------------------------------------------------------- custom VJPs


@functools.cache
def view_fn(scope: Scope):
    """``view(w, values, idx) -> w`` whose backward gives ``values`` the gradient
    ``grad_w`` at ``idx`` (gathered by ``scope``); no cotangent flows to ``w`` or ``idx``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> view = view_fn(WholeTensor((4,), 2))
        >>> w, i = jnp.arange(4.0), jnp.array([1, 3])
        >>> jax.grad(lambda v: jnp.sum(view(w, v, i) ** 2))(jnp.zeros(2)).tolist()
        [2.0, 6.0]
    """

    @jax.custom_vjp
    def view(w, values, idx):
        del values, idx
        return w

    def fwd(w, values, idx):
        return w, (idx, jnp.zeros((0,), w.dtype), jnp.zeros((0,), values.dtype))

    def bwd(res, g):
        idx, w_proto, v_proto = res
        return (
            jnp.zeros(g.shape, w_proto.dtype),  # never requested for frozen weights: DCE'd
            scope.gather(g, idx).astype(v_proto.dtype),
            np.zeros(idx.shape, jax.dtypes.float0),
        )

    view.defvjp(fwd, bwd)
    return view


@functools.cache
def probe_fn(scope: Scope):
    """``probe(w, pr) -> w`` whose backward gives ``pr`` (zeros of
    :meth:`Scope.probe_shape`) the top-k of ``|grad_w|`` as :func:`encode_probe` rows, so
    selection never holds every dense weight gradient at once.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> probe = probe_fn(WholeTensor((6,), 2))
        >>> w = jnp.arange(6.0)
        >>> g = jax.grad(lambda p: jnp.sum(probe(w, p) ** 2))(jnp.zeros((3, 2)))
        >>> decode_probe(g).tolist(), g[2].tolist()
        ([4, 5], [8.0, 10.0])
    """

    @jax.custom_vjp
    def probe(w, pr):
        del pr
        return w

    def fwd(w, pr):
        return w, (jnp.zeros((0,), w.dtype), jnp.zeros(pr.shape[-1:], jnp.float32))

    def bwd(res, g):
        w_proto, width_proto = res
        return jnp.zeros(g.shape, w_proto.dtype), scope.probe_grad(g, width_proto.shape[0])

    probe.defvjp(fwd, bwd)
    return probe
