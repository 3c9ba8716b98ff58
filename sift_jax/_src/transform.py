"""``sparse_increment``: the SIFT optax transform (compact and masking modes)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sift_jax._src import masks
from sift_jax._src import selection as selection_lib
from sift_jax._src.paths import path_to_str

MaskedNode = optax.MaskedNode

KSpec = float | int | Callable[[str, Any], int]


class DenseLeaf(NamedTuple):
    """Marks, inside :class:`SparseIncrementState`, a leaf that trains densely (no indices)."""


class SparseIncrementState(NamedTuple):
    """State of :func:`sparse_increment`.

    Attributes:
        count: int32 scalar, the number of updates seen so far.
        indices: a tree shaped like params: ``int32[k]`` sorted flat indices for sparse leaves
            (``arange(k)`` until selection happens), :class:`DenseLeaf` for dense leaves and
            ``optax.MaskedNode`` for frozen ones.
        score: a tree shaped like params holding the fp32 ``|g|`` accumulator of sparse leaves
            when gradient selection spans several steps (``selection_steps > 1``); otherwise
            ``MaskedNode`` everywhere (no O(n) memory).
        key: uint32[2] PRNG key for random selection.
        inner_state: the inner optimizer's state over the compact tree (k-vectors for sparse
            leaves, full arrays for dense leaves), or ``optax.EmptyState()`` in masking mode.
    """

    count: jax.Array
    indices: Any
    score: Any
    key: jax.Array
    inner_state: optax.OptState


def _is_marker(x: Any) -> bool:
    return isinstance(x, (MaskedNode, DenseLeaf))


def _validate_k(k: Any) -> None:
    if isinstance(k, (bool, np.bool_)):
        raise TypeError("`k` must be a rate in (0, 1], a count >= 1 or a callable, not a bool.")
    if callable(k):
        return
    if isinstance(k, numbers.Integral):
        if k < 1:
            raise ValueError(f"`k` as a count must be >= 1, got {k}. Use a float for a rate.")
        return
    if isinstance(k, numbers.Real):
        if math.isnan(k) or not 0.0 < k <= 1.0:
            raise ValueError(
                f"`k` as a rate must be a float in (0, 1], got {k}. "
                "Use an int >= 1 for a per-leaf count."
            )
        return
    raise TypeError(
        f"`k` must be a float rate in (0, 1], an int count >= 1, or a callable "
        f"(path, leaf) -> int; got {type(k).__name__}. Under optax.inject_hyperparams pass "
        "static_args=('k', 'selection_steps', 'seed')."
    )


def _leaf_k(k: KSpec, path: str, leaf: Any) -> int:
    n = math.prod(leaf.shape)
    if callable(k):
        value = k(path, leaf)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"`k` callable returned {value!r} for {path!r}; it must return an int.")
        if not 1 <= value <= n:
            raise ValueError(f"`k` callable returned {value} for {path!r}; it must be in [1, {n}].")
        return int(value)
    if isinstance(k, numbers.Integral):
        return min(int(k), n)
    return selection_lib.count_for_rate(float(k), n)


def _unravel(idx: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Flat indices -> one index array per dimension, so scatters need no reshape."""
    if len(shape) <= 1:
        return (idx,)
    # Truncating div/rem (indices are non-negative): ~10% faster scatters on CPU than
    # jnp.unravel_index, whose floor division and range clipping add per-element work.
    out = []
    for d in reversed(shape[1:]):
        d = jnp.asarray(d, idx.dtype)
        out.append(jax.lax.rem(idx, d))
        idx = jax.lax.div(idx, d)
    return (idx, *reversed(out))


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x.ravel()[idx]`` for sorted, distinct, in-range flat indices.

    A gather through the flat view: a reshape costs nothing here (unlike before a scatter that
    should run in place) and a 1-D index gather is ~30% faster on CPU than the unravelled one.
    """
    return x.reshape(-1).at[idx].get(
        mode="promise_in_bounds", indices_are_sorted=True, unique_indices=True
    )


def _scatter(values: jax.Array, idx: jax.Array, shape: tuple[int, ...], dtype: Any, op: str):
    """Dense array of ``shape`` that is zero except ``values`` at ``idx``.

    Written as ``zeros.at[unravelled idx].add`` with no reshape so that XLA turns
    ``params + scatter(u)`` into an in-place scatter-add when params are donated.
    """
    values = values.astype(dtype)
    if len(shape) == 0:
        return values.reshape(())
    zeros = jnp.zeros(shape, dtype)
    at = zeros.at[_unravel(idx, shape)]
    kw = {"indices_are_sorted": True, "unique_indices": True}
    return at.add(values, **kw) if op == "add" else at.set(values, **kw)


def sparse_increment(
    k: KSpec,
    inner: optax.GradientTransformation | None = None,
    *,
    sparse: masks.LeafSpec | None = None,
    dense: masks.LeafSpec | None = None,
    selection: str | selection_lib.SelectionFn = "grad",
    selection_steps: int = 1,
    seed: int = 0,
    update_on_selection: bool = False,
    state_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    r"""Sparse Increment Fine-Tuning (SIFT) as an optax gradient transformation.

    For every *sparse* leaf :math:`W \in \mathbb{R}^n` a fixed set :math:`S` of :math:`k` flat
    positions is chosen once, and from then on only those entries train:

    .. math::

        S = \operatorname{top\text{-}k}\Big(\sum_{t=1}^{T_s} |g_t|\Big), \qquad
        W_{t+1} = W_t + \operatorname{scatter}_S\big(\mathrm{inner}(g_t[S], W_t[S])\big),

    where :math:`T_s` is ``selection_steps`` and ``inner`` is any optax optimizer. *Dense* leaves
    (the paper's "exception" modules, e.g. a classifier) are updated by ``inner`` in full from the
    first step; all other leaves are *frozen* (zero updates, no state).

    Two modes:

    * **Compact** (``inner`` given, the memory-efficient choice): the state holds ``int32[k]``
      indices per sparse leaf and ``inner``'s state over ONE tree whose sparse leaves are
      ``k``-vectors (gathered gradients, zeros during selection) and whose dense leaves are full
      arrays; ``inner`` also receives params gathered the same way, so ``optax.adamw`` decays
      only the selected weights. Updates come back dense-shaped (scatter), so plain
      ``optax.apply_updates(params, updates)`` works. Sparse-leaf state is O(k).
    * **Masking** (``inner=None``, the form ``optax.chain(sparse_increment(k), optax.adam(lr))``):
      the gradient passes at selected positions and is zero elsewhere (dense leaves pass through,
      frozen leaves are zeroed). Downstream optimizers then keep *dense* O(n) state; prefer the
      compact mode when memory matters.

    Selection happens at the update numbered ``selection_steps`` (1-based). Until then sparse
    leaves get exactly zero updates (dense leaves already train). With
    ``update_on_selection=True`` the last selection batch's gradient is also applied at the newly
    chosen positions. ``inner``'s step count advances on every update, so Adam's bias correction
    counts the selection steps too.

    Fast path: jit ``update`` and ``optax.apply_updates`` in ONE function and donate params; XLA
    then turns ``params + scatter(u)`` into an in-place scatter-add (see the README's benchmark).

    Differences from the original PyTorch code (each has a test): updates land in the same step
    (not merged one step late); dense leaves train from step 1 and the selection batch can
    optionally train sparse leaves; AdamW weight decay acts on the selected weights (not on a
    freshly zeroed increment); every targeted tensor trains (none is skipped); the inner state
    is fp32 by default even for bf16 params (``state_dtype``); accumulation via
    ``optax.MultiSteps`` counts real optimizer steps; indices are int32 device arrays in the
    state.

    Args:
        k: per-leaf budget. A float in (0, 1] is a rate, ``k_leaf = min(int(k * n) + 1, n)`` (the
            paper's rule); an int >= 1 is a count capped at ``n``; a callable
            ``(path, leaf) -> int`` decides per leaf.
        inner: the optimizer run on the compact tree; ``None`` selects masking mode.
        sparse: which leaves get sparse increments: a regex (``re.search`` on the ``/``-joined
            leaf path, e.g. ``"attention/(query|key|value)"``), a list of regexes, a callable
            ``(path, leaf) -> bool`` or a bool pytree. ``None``: every floating-point leaf.
        dense: which leaves train densely (same forms); takes precedence over ``sparse``.
        selection: ``"grad"`` (top-k of accumulated ``|g|``), ``"random"``, ``"magnitude"``
            (top-k of ``|param|``; needs ``params`` in ``update``) or a callable
            ``(score, param, k, key) -> int32[k]`` (k distinct flat indices, in any order)
            with ``score`` the accumulated ``|g|``.
        selection_steps: number of updates whose gradients are summed for selection. Values > 1
            with ``"grad"`` (or a callable) keep an fp32 accumulator of size n per sparse leaf.
        seed: seed for random selection.
        update_on_selection: also apply the last selection batch's gradient (off by default,
            like the paper).
        state_dtype: dtype of the compact tree given to ``inner`` (so of its moments); ``None``
            keeps the params' dtype. Updates are always returned in the params' dtype.

    Returns:
        An ``optax.GradientTransformationExtraArgs``; extra keyword arguments of ``update`` are
        forwarded to ``inner``.

    Example:
        >>> import jax, jax.numpy as jnp, optax, sift_jax
        >>> params = {"w": jnp.ones((4, 4)), "head": jnp.ones(2), "ln": jnp.ones(4)}
        >>> opt = sift_jax.sparse_increment(2, optax.adam(0.1), sparse="w", dense="head")
        >>> state = opt.init(params)
        >>> grads = {"w": jnp.arange(16.0).reshape(4, 4), "head": jnp.ones(2), "ln": jnp.ones(4)}
        >>> updates, state = jax.jit(opt.update)(grads, state, params)  # selects, trains "head"
        >>> sift_jax.selected_indices(state)["w"].tolist()
        [14, 15]
        >>> updates, state = jax.jit(opt.update)(grads, state, params)
        >>> int((updates["w"] != 0).sum()), int((updates["ln"] != 0).sum())
        (2, 0)
    """
    _validate_k(k)
    sel_fn, needs_grad = selection_lib.resolve_selection(selection)
    if isinstance(selection_steps, (bool, np.bool_)) or not isinstance(
        selection_steps, numbers.Integral
    ):
        raise TypeError(f"`selection_steps` must be an int >= 1, got {selection_steps!r}.")
    if selection_steps < 1:
        raise ValueError(f"`selection_steps` must be >= 1, got {selection_steps}.")
    if not isinstance(seed, numbers.Integral):
        raise TypeError(f"`seed` must be an int, got {seed!r}.")
    if inner is not None and not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"`inner` must be an optax.GradientTransformation or None, got {type(inner).__name__}."
        )
    if state_dtype is not None:
        state_dtype = jnp.dtype(state_dtype)
        if not jnp.issubdtype(state_dtype, jnp.floating):
            raise ValueError(f"`state_dtype` must be a floating dtype, got {state_dtype}.")
    selection_steps = int(selection_steps)
    keep_score = needs_grad and selection_steps > 1
    inner_tx = optax.with_extra_args_support(inner) if inner is not None else None

    def _sdtype(dtype):
        return dtype if state_dtype is None else state_dtype

    def init_fn(params: optax.Params) -> SparseIncrementState:
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        roles = masks.leaf_roles(params, sparse, dense)
        indices, score, compact = [], [], []
        for (path, leaf), role in zip(flat, roles, strict=True):
            if role == masks.SPARSE:
                kk = _leaf_k(k, path_to_str(path), leaf)
                indices.append(jnp.arange(kk, dtype=jnp.int32))
                score.append(jnp.zeros(leaf.shape, jnp.float32) if keep_score else MaskedNode())
                compact.append(jnp.zeros((kk,), _sdtype(leaf.dtype)))
            elif role == masks.DENSE:
                indices.append(DenseLeaf())
                score.append(MaskedNode())
                compact.append(jnp.zeros(leaf.shape, _sdtype(leaf.dtype)))
            else:
                indices.append(MaskedNode())
                score.append(MaskedNode())
                compact.append(MaskedNode())
        if masks.SPARSE not in roles and masks.DENSE not in roles:
            raise ValueError(
                "sparse_increment: no leaf is trainable: `sparse`/`dense` matched no "
                "floating-point leaf. Check the patterns against the leaf paths, e.g. "
                f"{[path_to_str(p) for p, _ in flat[:5]]}."
            )
        inner_state = (
            inner_tx.init(jax.tree.unflatten(treedef, compact))
            if inner_tx is not None
            else optax.EmptyState()
        )
        return SparseIncrementState(
            count=jnp.zeros([], jnp.int32),
            indices=jax.tree.unflatten(treedef, indices),
            score=jax.tree.unflatten(treedef, score),
            key=jax.random.PRNGKey(int(seed)),
            inner_state=inner_state,
        )

    def update_fn(updates, state: SparseIncrementState, params=None, **extra_args):
        grads, treedef = jax.tree.flatten(updates)
        idx_in = treedef.flatten_up_to(state.indices)
        score_in = treedef.flatten_up_to(state.score)
        p_leaves = treedef.flatten_up_to(params) if params is not None else [None] * len(grads)
        sparse_ids = [i for i, x in enumerate(idx_in) if not _is_marker(x)]
        if selection == "magnitude" and params is None and sparse_ids:
            raise ValueError(
                "selection='magnitude' needs params: call update(grads, state, params)."
            )
        count = state.count

        # 1. Accumulate the selection score (only for multi-step gradient selection).
        in_selection = count < selection_steps
        score_out = list(score_in)
        if keep_score:
            for i in sparse_ids:
                acc = score_in[i] + jnp.abs(grads[i]).astype(jnp.float32)
                score_out[i] = jnp.where(in_selection, acc, score_in[i])

        # 2. Select, once, under lax.cond so top-k is not recomputed every step.
        def select(_):
            out = []
            for j, i in enumerate(sparse_ids):
                if keep_score:
                    s = score_out[i]
                elif needs_grad:
                    s = jnp.abs(grads[i]).astype(jnp.float32)
                else:
                    s = None
                ref = p_leaves[i] if p_leaves[i] is not None else grads[i]
                idx = sel_fn(s, ref, idx_in[i].shape[0], jax.random.fold_in(state.key, j))
                idx = jnp.asarray(idx, jnp.int32).reshape(idx_in[i].shape)
                # Gathers and scatters assume sorted indices; a user callable may not sort.
                out.append(idx if isinstance(selection, str) else jnp.sort(idx))
            return out

        old = [idx_in[i] for i in sparse_ids]
        new = jax.lax.cond(count == selection_steps - 1, select, lambda _: old, None)
        idx_out = list(idx_in)
        for i, idx in zip(sparse_ids, new, strict=True):
            idx_out[i] = idx
        first_trained = selection_steps - 1 if update_on_selection else selection_steps
        active = count >= first_trained

        # 3. Compact tree -> inner optimizer -> scatter back.
        if inner_tx is None:
            out = []
            for i, g in enumerate(grads):
                if isinstance(idx_out[i], DenseLeaf):
                    out.append(g)
                elif isinstance(idx_out[i], MaskedNode):
                    out.append(jnp.zeros_like(g))
                else:
                    vals = jnp.where(active, _gather(g, idx_out[i]), 0)
                    out.append(_scatter(vals, idx_out[i], g.shape, g.dtype, "set"))
            inner_state = state.inner_state
        else:
            g_c, p_c = [], []
            for i, g in enumerate(grads):
                idx, p = idx_out[i], p_leaves[i]
                if isinstance(idx, MaskedNode):
                    g_c.append(MaskedNode())
                    p_c.append(MaskedNode())
                    continue
                dt = _sdtype(g.dtype)
                if isinstance(idx, DenseLeaf):
                    g_c.append(g.astype(dt))
                    p_c.append(None if p is None else p.astype(dt))
                else:
                    g_c.append(jnp.where(active, _gather(g, idx), 0).astype(dt))
                    p_c.append(None if p is None else _gather(p, idx).astype(dt))
            p_tree = None if params is None else jax.tree.unflatten(treedef, p_c)
            u_tree, inner_state = inner_tx.update(
                jax.tree.unflatten(treedef, g_c), state.inner_state, p_tree, **extra_args
            )
            u_c = treedef.flatten_up_to(u_tree)
            out = []
            for i, g in enumerate(grads):
                idx = idx_out[i]
                if isinstance(idx, MaskedNode):
                    out.append(jnp.zeros_like(g))
                elif isinstance(idx, DenseLeaf):
                    out.append(u_c[i].astype(g.dtype))
                else:
                    u = jnp.where(active, u_c[i], 0)
                    out.append(_scatter(u, idx, g.shape, g.dtype, "add"))

        new_state = SparseIncrementState(
            count=optax.safe_increment(count),
            indices=jax.tree.unflatten(treedef, idx_out),
            score=jax.tree.unflatten(treedef, score_out),
            key=state.key,
            inner_state=inner_state,
        )
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_states(opt_state: Any) -> list[SparseIncrementState]:
    """All :class:`SparseIncrementState` found anywhere inside an optax state.

    Example:
        >>> import jax.numpy as jnp, optax, sift_jax
        >>> tx = optax.chain(optax.clip(1.0), sift_jax.sparse_increment(1, optax.sgd(0.1)))
        >>> len(find_states(tx.init({"w": jnp.ones(3)})))
        1
    """
    is_state = lambda x: isinstance(x, SparseIncrementState)
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]


def selected_indices(opt_state: Any) -> chex.ArrayTree:
    """The selected flat indices, found anywhere inside an optax state.

    Searches chains, ``inject_hyperparams``, ``MultiSteps`` and other wrappers for the (single)
    :class:`SparseIncrementState` and returns a tree shaped like params: sorted ``int32[k]``
    flat (row-major) indices for sparse leaves and ``None`` for dense and frozen ones. Before
    selection has happened the sparse entries are ``arange(k)`` placeholders; check
    :func:`selection_done`.

    Example:
        >>> import jax.numpy as jnp, optax, sift_jax
        >>> tx = optax.MultiSteps(sift_jax.sparse_increment(1, optax.sgd(1.0)), every_k_schedule=2)
        >>> sift_jax.selected_indices(tx.init({"w": jnp.ones(3)}))
        {'w': Array([0], dtype=int32)}
    """
    states = find_states(opt_state)
    if not states:
        raise ValueError(
            "No sparse_increment state found in this optimizer state; was the optimizer built "
            "with sift_jax.sparse_increment?"
        )
    if len(states) > 1:
        raise ValueError(
            f"Found {len(states)} sparse_increment states; pass the one you mean "
            "(see sift_jax.find_states)."
        )
    return jax.tree.map(
        lambda x: None if _is_marker(x) else x, states[0].indices, is_leaf=_is_marker
    )


def selection_done(opt_state: Any, selection_steps: int = 1) -> jax.Array:
    """Whether the sparse_increment state inside ``opt_state`` has made its selection.

    Example:
        >>> import jax.numpy as jnp, optax, sift_jax
        >>> tx = sift_jax.sparse_increment(1, optax.sgd(1.0))
        >>> bool(selection_done(tx.init({"w": jnp.ones(3)})))
        False
    """
    (state,) = find_states(opt_state)
    return state.count >= selection_steps
