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
_INT32_MAX = int(np.iinfo(np.int32).max)


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


_PROMISE = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS


def _dnums(ndim: int):
    # one entry per index row: ``ndim`` coordinates into an ``ndim``-D operand
    dims = tuple(range(ndim))
    g = jax.lax.GatherDimensionNumbers(
        offset_dims=(), collapsed_slice_dims=dims, start_index_map=dims
    )
    s = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(), inserted_window_dims=dims, scatter_dims_to_operand_dims=dims
    )
    return g, s


def _gather_at(x: jax.Array, coords: jax.Array) -> jax.Array:
    """``x`` at ``coords`` ``[k, x.ndim]`` (sorted, distinct, in range): a raw ``lax.gather``
    (``jnp`` indexing would first write a copy of the indices with negatives wrapped)."""
    return jax.lax.gather(
        x,
        coords,
        _dnums(x.ndim)[0],
        (1,) * x.ndim,
        indices_are_sorted=True,
        unique_indices=True,
        mode=_PROMISE,
    )


def _set_at(w: jax.Array, coords: jax.Array, values: jax.Array) -> jax.Array:
    """``w`` with ``values`` at ``coords`` ``[k, w.ndim]``: a raw ``lax.scatter``."""
    return jax.lax.scatter(
        w,
        coords,
        values.astype(w.dtype),
        _dnums(w.ndim)[1],
        indices_are_sorted=True,
        unique_indices=True,
        mode=_PROMISE,
    )


def _gather_flat(x: jax.Array, idx: jax.Array) -> jax.Array:
    # A 1-D gather through the flat view (the reshapes are bitcasts, so no index array is
    # built): ~30% faster on CPU than one at unravelled indices.
    return _gather_at(x.reshape(-1), idx.reshape(-1, 1))


def gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x.ravel()[idx]`` for sorted, distinct, in-range flat indices.

    Example:
        >>> import jax.numpy as jnp
        >>> gather(jnp.arange(6.0).reshape(2, 3), jnp.array([1, 5])).tolist()
        [1.0, 5.0]
    """
    return _auto(_gather_flat, x, x, idx, replicated=True)


def _unravel(idx: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, ...]:
    # flat -> per-dimension indices (truncating div/rem: the indices are non-negative)
    out = []
    for d in reversed(shape[1:]):
        d = jnp.asarray(d, idx.dtype)
        out.append(jax.lax.rem(idx, d))
        idx = jax.lax.div(idx, d)
    return (idx, *reversed(out))


def _scatter_at(w: jax.Array, idx: jax.Array, values: jax.Array, op: str) -> jax.Array:
    # ``set`` (the compact path's in-place write into the donated merged weights): a 1-D
    # scatter through the flat view. The reshapes are bitcasts, so a donated ``w`` is still
    # written in place, and no index array is built (unravelled indices were ``s32[k, ndim]``:
    # 8 B per trained value on 2-D leaves); faster on CPU too.
    # ``add`` (the transform's ``params + scatter_add(zeros, idx, u)``): per-dimension indices
    # into the unreshaped leaf, so XLA folds the add into ONE in-place scatter-add into the
    # donated params (a reshape between them hides the pattern: 2-4x slower steps).
    values = values.astype(w.dtype)
    if w.ndim == 0:
        return values.reshape(()) if op == "set" else w + values.reshape(())
    if op == "set":
        return _set_at(w.reshape(-1), idx.reshape(-1, 1), values.reshape(-1)).reshape(w.shape)
    kw = {"indices_are_sorted": True, "unique_indices": True, "mode": "promise_in_bounds"}
    return w.at[_unravel(idx, w.shape)].add(values, **kw)


def scatter(w: jax.Array, idx: jax.Array, values: jax.Array, op: str = "set") -> jax.Array:
    """``w`` with ``values`` set (``op="set"``) or added (``"add"``) at flat ``idx``.

    Performed in place when ``w`` is donated (``set``: a 1-D scatter through the flat view,
    whose reshapes are bitcasts; ``add``: at per-dimension indices, so that XLA folds
    ``params + scatter_add(zeros, ...)`` into one in-place scatter-add).

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


def _row_coords(row: jax.Array, idx: jax.Array) -> jax.Array:
    """``[k, 2]`` coordinates ``(row, idx_j)`` into a ``[rows, n]`` operand."""
    return jnp.stack([jnp.broadcast_to(row, idx.shape).astype(idx.dtype), idx], axis=1)


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

    @property
    def global_dtype(self) -> np.dtype:
        """dtype of the global flat indices (``int64`` only for a leaf beyond int32's range)."""
        return np.dtype(np.int64 if math.prod(self.shape) > _INT32_MAX else np.int32)

    def gather_global(self, x: jax.Array, gidx: Any) -> jax.Array:
        """``x.ravel()[gidx]`` for sorted global flat indices (host numpy)."""
        return gather(x, jnp.asarray(np.asarray(gidx, np.int32)))

    def scatter_global(self, w: jax.Array, gidx: Any, values: jax.Array) -> jax.Array:
        """``w`` with ``values`` set at sorted global flat indices (host numpy)."""
        return scatter(w, jnp.asarray(np.asarray(gidx, np.int32)), values)

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
        >>> big = PerSlice((40, 5120, 13824), 1, lead=1)  # past int32: int64 global indices
        >>> g = big.to_global(np.full((40, 1), 7))
        >>> g.dtype.name, int(g[-1]), big.from_global(g).tolist()[-1]
        ('int64', 2760376327, [7])
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

    def _rows(self, x, idx):
        n = math.prod(self.groups)
        return x.reshape(n, self.slice_size), idx.reshape(n, idx.shape[-1])

    def gather(self, x, idx):
        # one slice at a time (a vmapped gather is normalised by XLA into one gather at
        # [L * k, 2] coordinates, an 8 B per value index array); coordinates [k, 2] per slice
        def f(x, idx):
            x2, i2 = self._rows(x, idx)
            rows = jnp.arange(i2.shape[0], dtype=i2.dtype)
            out = jax.lax.map(lambda a: _gather_at(x2, _row_coords(a[0], a[1])), (rows, i2))
            return out.reshape(idx.shape)

        return _auto(f, x, x, idx, replicated=True)

    def write(self, w, idx, values, op="set"):
        if op != "set":
            return _auto(self._vmap(functools.partial(_scatter_at, op=op), 3), w, w, idx, values)

        # in place, one slice at a time (a loop over the donated buffer; see :meth:`gather`)
        def f(w, idx, values):
            w2, i2 = self._rows(w, idx)
            v2 = values.reshape(i2.shape).astype(w.dtype)
            body = lambda r, w2: _set_at(w2, _row_coords(r, i2[r]), v2[r])
            return jax.lax.fori_loop(0, i2.shape[0], body, w2).reshape(w.shape)

        return _auto(f, w, w, idx, values)

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
        # int64 when the stack has more than 2**31 - 1 entries (e.g. a 13B MLP stack)
        idx = np.asarray(idx).astype(np.int64).reshape(-1, self.k)
        offsets = (np.arange(idx.shape[0], dtype=np.int64) * self.slice_size)[:, None]
        return (idx + offsets).reshape(-1).astype(self.global_dtype)

    def _coords(self, gidx):
        g = np.asarray(gidx, np.int64).reshape(-1)
        return jnp.asarray(np.stack([g // self.slice_size, g % self.slice_size], 1), jnp.int32)

    def gather_global(self, x, gidx):
        # [n, 2] (slice, position) coordinates: int32 whatever the stack's size
        def f(x, coords):
            return _gather_at(x.reshape(-1, self.slice_size), coords)

        return _auto(f, x, x, self._coords(gidx), replicated=True)

    def scatter_global(self, w, gidx, values):
        def f(w, coords, values):
            w2 = w.reshape(-1, self.slice_size)
            return _set_at(w2, coords, values.reshape(-1)).reshape(w.shape)

        return _auto(f, w, w, self._coords(gidx), values)

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


# ----------------------------------------------------------------------------- scanned layers


def _lead_scope(shape: tuple[int, ...], k: int, lead: int) -> Scope:
    return WholeTensor(shape, k) if lead == 0 else PerSlice(shape, k, lead=lead)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerView:
    """A stacked sparse leaf as a scanned model receives it: the merged ``weight``
    ``[L, ...]``, the trained ``values`` ``[L, k]`` and the ``indices`` ``[L, k]`` (flat within
    each layer slice). A pytree whose children all lead with the layer dim, so ``lax.scan``
    (or ``nnx.scan``) over the stack hands the body one layer's ``(w_l, values_l, idx_l)``;
    :func:`apply_layer` there turns it into that layer's weight, whose backward gathers the
    layer's dense gradient into ``values_l`` at once (one layer's ``dW`` alive at a time).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w, i = jnp.arange(12.0).reshape(2, 6), jnp.array([[0, 5], [1, 2]])
        >>> def loss(v):
        ...     def body(h, lv):
        ...         return h + jnp.sum(apply_layer(lv) ** 2), None
        ...     return jax.lax.scan(body, 0.0, LayerView(w, v, i))[0]
        >>> jax.grad(loss)(jnp.zeros((2, 2))).tolist()
        [[0.0, 10.0], [14.0, 16.0]]
    """

    weight: jax.Array
    values: jax.Array
    indices: jax.Array

    def apply(self) -> jax.Array:
        """The weight read through :func:`view_fn` (per slice if still stacked)."""
        lead = self.indices.ndim - 1
        scope = _lead_scope(tuple(self.weight.shape), self.indices.shape[-1], lead)
        return view_fn(scope)(self.weight, self.values, self.indices)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerProbe:
    """A stacked sparse leaf at an in-backward selection step: the ``weight`` ``[L, ...]`` and
    the zero ``probe`` ``[L, 3, width]``; :func:`apply_layer` inside the scan body reads the
    layer's weight through :func:`probe_fn`, so the layer's top-``width`` of ``|dW|`` is taken
    in the backward of that layer.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jnp.array([[1.0, -3.0, 2.0], [0.5, 0.0, 4.0]])
        >>> def loss(pr):
        ...     body = lambda h, lp: (h + jnp.sum(apply_layer(lp) ** 2), None)
        ...     return jax.lax.scan(body, 0.0, LayerProbe(w, pr))[0]
        >>> decode_probe(jax.grad(loss)(jnp.zeros((2, 3, 1)))).tolist()
        [[1], [2]]
    """

    weight: jax.Array
    probe: jax.Array

    def apply(self) -> jax.Array:
        """The weight read through :func:`probe_fn` (per slice if still stacked)."""
        lead = self.probe.ndim - 2
        width = self.probe.shape[-1]
        return probe_fn(_lead_scope(tuple(self.weight.shape), width, lead))(self.weight, self.probe)


def is_layer_input(x: Any) -> bool:
    """Whether ``x`` is a :class:`LayerView` or :class:`LayerProbe` (an ``is_leaf`` for tree
    maps over params that may hold them).

    Example:
        >>> import jax.numpy as jnp
        >>> probe = LayerProbe(jnp.ones(2), jnp.zeros((3, 1)))
        >>> is_layer_input(jnp.zeros(2)), is_layer_input(probe)
        (False, True)
    """
    return isinstance(x, LayerView | LayerProbe)


def apply_layer(tree: Any) -> Any:
    """``tree`` (one layer's slice of a scanned model's params, inside the scan body) with every
    :class:`LayerView` / :class:`LayerProbe` replaced by the layer's weight read through the
    compact path's custom VJP; other leaves unchanged (a no-op on plain params). Works on any
    pytree (dicts, ``nnx.State``); applied to an unsliced stack it views the whole stack (per
    slice), which is correct but keeps the stacked dense gradient.

    Example:
        >>> import jax.numpy as jnp
        >>> p = {"w": LayerView(jnp.ones(4), jnp.zeros(2), jnp.array([0, 3])), "b": jnp.zeros(2)}
        >>> {k: v.shape for k, v in apply_layer(p).items()}
        {'b': (2,), 'w': (4,)}
    """
    return jax.tree.map(
        lambda x: x.apply() if is_layer_input(x) else x, tree, is_leaf=is_layer_input
    )
