"""Functional sparse increments: select indices, hold ``Δ`` as k-vectors, form ``W + scatter(Δ)``.

These are the pieces of the *compact-gradient* training path: the trainable variables are the
``k``-vectors ``Δ`` (fp32 by default) and the frozen base weights are plain inputs, so
``jax.grad`` returns only ``k``-sized gradients for sparse tensors and the optimizer state is
O(k). Each dense weight gradient exists only inside the backward pass, transiently.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sift_jax._src import masks
from sift_jax._src import selection as selection_lib
from sift_jax._src.paths import path_to_str
from sift_jax._src.transform import _gather, _leaf_k, _unravel, _validate_k


def select_indices(
    scores: Any,
    k: Any,
    *,
    sparse: masks.LeafSpec | None = None,
    selection: str | selection_lib.SelectionFn = "grad",
    params: Any = None,
    seed: int = 0,
) -> Any:
    """Chooses ``k`` flat indices per sparse leaf from a tree of scores (e.g. ``|grad|``).

    Returns a tree shaped like ``scores`` with sorted ``int32[k]`` for sparse leaves and ``None``
    elsewhere (the same form as :func:`sift_jax.selected_indices`). Uses the same rules for
    ``k`` and ``sparse`` as :func:`sift_jax.sparse_increment`; random choices fold the leaf's
    position among sparse leaves into ``seed``, as the transform does.

    Example:
        >>> import jax.numpy as jnp
        >>> idx = select_indices({"w": jnp.array([0.1, 3.0, -2.0, 0.5])}, 2)
        >>> idx["w"].tolist()
        [1, 3]
    """
    _validate_k(k)
    fn, _ = selection_lib.resolve_selection(selection)
    flat, treedef = jax.tree_util.tree_flatten_with_path(scores)
    roles = masks.leaf_roles(scores, sparse, None)
    p_leaves = treedef.flatten_up_to(params) if params is not None else [None] * len(flat)
    key = jax.random.PRNGKey(seed)
    out, j = [], 0
    for (path, s), role, p in zip(flat, roles, p_leaves, strict=True):
        if role != masks.SPARSE:
            out.append(None)
            continue
        kk = _leaf_k(k, path_to_str(path), s)
        ref = p if p is not None else s
        idx = jnp.asarray(fn(s, ref, kk, jax.random.fold_in(key, j)), jnp.int32)
        out.append(idx if isinstance(selection, str) else jnp.sort(idx))  # callables may not sort
        j += 1
    return jax.tree.unflatten(treedef, out)


def _pairs(params: Any, indices: Any):
    leaves, treedef = jax.tree.flatten(params)
    idx = treedef.flatten_up_to(indices)
    return leaves, idx, treedef


def init_increments(params: Any, indices: Any, dtype: Any = jnp.float32) -> Any:
    """Zero increments ``Δ`` (``dtype[k]``) for leaves with indices; ``None`` elsewhere.

    Example:
        >>> import jax.numpy as jnp
        >>> init_increments({"w": jnp.ones((2, 2)), "b": jnp.ones(2)},
        ...                 {"w": jnp.array([0, 3]), "b": None})
        {'b': None, 'w': Array([0., 0.], dtype=float32)}
    """
    leaves, idx, treedef = _pairs(params, indices)
    out = [None if i is None else jnp.zeros(i.shape, dtype) for i in idx]
    return jax.tree.unflatten(treedef, out)


def gather_at(tree: Any, indices: Any) -> Any:
    """``x.ravel()[idx]`` per leaf with indices; ``None`` elsewhere.

    Example:
        >>> import jax.numpy as jnp
        >>> gather_at({"w": jnp.arange(4.0).reshape(2, 2)}, {"w": jnp.array([1, 2])})["w"].tolist()
        [1.0, 2.0]
    """
    leaves, idx, treedef = _pairs(tree, indices)
    out = [None if i is None else _gather(x, i) for x, i in zip(leaves, idx, strict=True)]
    return jax.tree.unflatten(treedef, out)


def apply_increments(params: Any, indices: Any, increments: Any) -> Any:
    """``W + scatter(Δ)`` for every leaf with indices; other leaves pass through unchanged.

    The add happens in the increment's dtype and is rounded once to the weight's dtype, so an
    fp32 ``Δ`` on a bf16 base keeps its precision across steps (the original code's bf16
    increments lost small updates). Differentiating through this with respect to ``Δ`` gives
    ``grad_W[idx]``: ``k`` values, no dense gradient output.

    Example:
        >>> import jax.numpy as jnp
        >>> apply_increments({"w": jnp.zeros(4)}, {"w": jnp.array([1, 3])},
        ...                  {"w": jnp.array([1.0, 2.0])})["w"].tolist()
        [0.0, 1.0, 0.0, 2.0]
    """
    return write_increments(params, indices, gather_at(params, indices), increments)


@jax.custom_vjp
def increment_view(w: jax.Array, delta: jax.Array, idx: jax.Array) -> jax.Array:
    """``w`` itself in the forward pass; the gradient w.r.t. ``delta`` is ``grad_w[idx]``.

    For training with the merged weight ``w = base + scatter(delta)`` kept up to date outside
    the differentiated function (e.g. in a donated buffer updated in place by
    :func:`write_increments` after each optimizer step): the forward reads ``w`` without
    copying it, and the backward turns the dense weight gradient into the k-vector
    ``grad_w[idx]`` as soon as it exists. No cotangent flows to ``w`` or ``idx``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w, d, i = jnp.arange(4.0), jnp.zeros(2), jnp.array([1, 3])
        >>> jax.grad(lambda d: jnp.sum(increment_view(w, d, i) ** 2))(d).tolist()
        [2.0, 6.0]
    """
    del delta, idx
    return w


def _view_fwd(w, delta, idx):
    return w, (idx, jnp.zeros((0,), w.dtype), jnp.zeros((0,), delta.dtype))


def _view_bwd(res, g):
    idx, w_proto, d_proto = res
    return (
        jnp.zeros(g.shape, w_proto.dtype),  # never requested for frozen weights: DCE'd
        _gather(g, idx).astype(d_proto.dtype),
        np.zeros(idx.shape, jax.dtypes.float0),
    )


increment_view.defvjp(_view_fwd, _view_bwd)


def write_increments(w: Any, indices: Any, selected_base: Any, increments: Any) -> Any:
    """``w.at[idx].set(round(selected_base + delta))`` per leaf with indices.

    Keeps a merged weight buffer in step with fp32 increments (one rounding from the exact
    fp32 sum, so small updates accumulate in ``delta`` rather than being lost in ``w``'s
    dtype). Under ``jit`` with ``w`` donated this is an in-place scatter of ``k`` values.

    Example:
        >>> import jax.numpy as jnp
        >>> w, i = {"w": jnp.zeros(4)}, {"w": jnp.array([0, 2])}
        >>> sel, d = {"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([0.5, -1.0])}
        >>> write_increments(w, i, sel, d)["w"].tolist()
        [1.5, 0.0, 0.0, 0.0]
    """
    leaves, idx, treedef = _pairs(w, indices)
    sel = treedef.flatten_up_to(selected_base)
    inc = treedef.flatten_up_to(increments)
    out = []
    for x, i, s, d in zip(leaves, idx, sel, inc, strict=True):
        if i is None:
            out.append(x)
            continue
        v = (s.astype(d.dtype) + d).astype(x.dtype)
        if x.ndim == 0:
            out.append(v.reshape(()))
        else:
            out.append(
                x.at[_unravel(i, x.shape)].set(v, indices_are_sorted=True, unique_indices=True)
            )
    return jax.tree.unflatten(treedef, out)


@jax.custom_vjp
def topk_probe(w: jax.Array, probe: jax.Array) -> jax.Array:
    """``w`` in the forward; in the backward, the top-k of ``|grad_w|`` comes out as ``probe``'s
    gradient, so selection never needs every dense weight gradient at once.

    ``probe`` is a float32 ``[3, k]`` array of zeros. Differentiating a loss with respect to it
    gives rows ``(idx // 65536, idx % 65536, grad_w[idx])`` for the sorted top-k flat indices
    ``idx`` of ``|grad_w|`` (:func:`probe_indices` decodes them). Each dense ``grad_w`` is reduced
    to ``3k`` numbers where the backward produces it (inside a scanned / rematerialised layer it
    never outlives that layer). Gradients of one backward pass only: summing probe gradients
    over micro-batches is meaningless.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jnp.arange(6.0)
        >>> g = jax.grad(lambda p: jnp.sum(topk_probe(w, p) ** 2))(jnp.zeros((3, 2)))
        >>> probe_indices(g).tolist(), g[2].tolist()
        ([4, 5], [8.0, 10.0])
    """
    del probe
    return w


def _probe_fwd(w, probe):
    return w, (jnp.zeros((0,), w.dtype), jnp.zeros(probe.shape[1:], jnp.float32))


def _probe_bwd(res, g):
    w_proto, k_proto = res
    k = k_proto.shape[0]
    idx = selection_lib.topk_indices(jnp.abs(g.astype(jnp.float32)), k)
    probe_grad = jnp.stack(
        [
            (idx // 65536).astype(jnp.float32),
            (idx % 65536).astype(jnp.float32),
            _gather(g, idx).astype(jnp.float32),
        ]
    )
    return jnp.zeros(g.shape, w_proto.dtype), probe_grad


topk_probe.defvjp(_probe_fwd, _probe_bwd)


def probe_indices(probe_grad: jax.Array) -> jax.Array:
    """Decodes the ``int32[k]`` indices from a :func:`topk_probe` gradient.

    Example:
        >>> import jax.numpy as jnp
        >>> probe_indices(jnp.array([[1.0, 0.0], [2.0, 7.0], [0.0, 0.0]])).tolist()
        [65538, 7]
    """
    return (probe_grad[0].astype(jnp.int32) * 65536 + probe_grad[1].astype(jnp.int32)).astype(
        jnp.int32
    )
