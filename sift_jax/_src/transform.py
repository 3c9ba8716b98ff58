"""``sparse_increment``: the SIFT optax transform (compact and masking modes)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sift_jax._src import indexing, masks
from sift_jax._src import schedule as schedule_lib
from sift_jax._src import selection as selection_lib
from sift_jax._src.paths import path_to_str

MaskedNode = optax.MaskedNode

KSpec = float | int | Mapping[str, int] | Callable[[str, Any], int]


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
        inner_state: the inner optimizer's state: in compact mode over the compact tree
            (k-vectors for sparse leaves, full arrays for dense leaves, ``MaskedNode`` for
            frozen ones); in masking mode over full-shape sparse and dense leaves.
    """

    count: jax.Array
    indices: Any
    score: Any
    key: jax.Array
    inner_state: optax.OptState


def _is_marker(x: Any) -> bool:
    return isinstance(x, (MaskedNode, DenseLeaf))


def validate_k(k: Any) -> None:
    """Raises a clear error for a bad budget ``k`` (see :func:`sparse_increment`)."""
    if isinstance(k, (bool, np.bool_)):
        raise TypeError("`k` must be a rate in (0, 1], a count >= 1 or a callable, not a bool.")
    if callable(k) or isinstance(k, Mapping):
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
        f"`k` must be a float rate in (0, 1], an int count >= 1, a {{path: count}} mapping or a "
        f"callable (path, leaf) -> int; got {type(k).__name__}. Under optax.inject_hyperparams "
        "pass static_args=('k', 'selection_steps', 'reselect_every', 'seed')."
    )


def leaf_k(k: KSpec, path: str, shape: tuple[int, ...], dtype: Any = jnp.float32) -> int:
    """The number of entries a sparse leaf of ``shape`` (and ``dtype``) at ``path`` trains
    under budget ``k`` (a callable ``k`` is given ``(path, ShapeDtypeStruct(shape, dtype))``).

    Example:
        >>> leaf_k(0.01, "w", (100, 100)), leaf_k(5, "w", (2,)), leaf_k({"w": 3}, "w", (9,))
        (101, 2, 3)
    """
    n = math.prod(shape)
    if isinstance(k, Mapping):
        if path not in k:
            raise KeyError(f"`k` mapping has no count for the sparse leaf {path!r}.")
        value = k[path]
    elif callable(k):
        value = k(path, jax.ShapeDtypeStruct(shape, dtype))
    else:
        value = None
    if value is not None:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"`k` gave {value!r} for {path!r}; it must be an int.")
        if not 1 <= value <= n:
            raise ValueError(f"`k` gave {value} for {path!r}; it must be in [1, {n}].")
        return int(value)
    if isinstance(k, numbers.Integral):
        return min(int(k), n)
    return selection_lib.count_for_rate(float(k), n)


def state_dtype_for(leaf_dtype: Any, state_dtype: Any) -> Any:
    """The dtype of a leaf's optimizer-side copy: ``state_dtype`` (complex leaves get the
    complex dtype of that precision); ``None`` keeps the leaf's dtype."""
    if state_dtype is None:
        return jnp.dtype(leaf_dtype)
    if jnp.issubdtype(leaf_dtype, jnp.complexfloating):
        return jnp.result_type(state_dtype, jnp.complex64)
    return jnp.dtype(state_dtype)


def check_arguments(selection_steps, seed, state_dtype) -> Any:
    """Validates the shared SIFT arguments; returns the normalised ``state_dtype``."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"`seed` must be an int, got {seed!r}.")
    if state_dtype is not None:
        state_dtype = jnp.dtype(state_dtype)
        if not jnp.issubdtype(state_dtype, jnp.floating):
            raise ValueError(f"`state_dtype` must be a floating dtype, got {state_dtype}.")
    del selection_steps  # checked by the Schedule
    return state_dtype


def fresh_sparse_state(fresh: Any, old: Any, treedef: Any, sparse: Sequence[bool]) -> Any:
    """``old`` (an optimizer state) with its sparse leaves' entries taken from ``fresh``.

    ``treedef`` is the structure of the tree the optimizer was initialised on and ``sparse``
    flags its leaves in flattening order. Every subtree of the state shaped like that tree
    (``optax.MaskedNode`` counting as a leaf: ``mu``, ``nu``, a momentum trace ...) is matched
    by *position*, so a dense leaf whose path ends like a sparse leaf's keeps its moments, and
    everything else (step counts, schedules' state) carries on. For a tree that is one bare
    array, the state's arrays of rank >= 1 are its copies (counts are scalars).

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> params = {"kernel": jnp.ones(2), "head": {"kernel": jnp.ones(2)}}
        >>> tx = optax.sgd(1.0, momentum=0.9)
        >>> old = jax.tree.map(lambda x: x + 5, tx.init(params))
        >>> td = jax.tree.structure(params)  # leaves: head/kernel, kernel
        >>> new = fresh_sparse_state(tx.init(params), old, td, [False, True])
        >>> new[0].trace["kernel"].tolist(), new[0].trace["head"]["kernel"].tolist()
        ([0.0, 0.0], [5.0, 5.0])
    """
    sparse = list(sparse)
    if len(sparse) != treedef.num_leaves:
        raise ValueError(f"`sparse` has {len(sparse)} flags for {treedef.num_leaves} leaves.")
    is_masked = lambda v: isinstance(v, MaskedNode)
    single = treedef == jax.tree.structure(0)

    def params_like(x) -> bool:
        if single:
            return getattr(x, "ndim", 0) >= 1
        return not is_masked(x) and jax.tree.structure(x, is_leaf=is_masked) == treedef

    def pick(o, f):
        if not params_like(o):
            return o
        ol, fl = treedef.flatten_up_to(o), treedef.flatten_up_to(f)
        picked = [fi if s else oi for oi, fi, s in zip(ol, fl, sparse, strict=True)]
        return treedef.unflatten(picked)

    return jax.tree.map(pick, old, fresh, is_leaf=params_like)


def sparse_increment(
    k: KSpec,
    inner: optax.GradientTransformation | None = None,
    *,
    sparse: masks.LeafSpec | None = None,
    dense: masks.LeafSpec | None = None,
    selection: str | selection_lib.SelectionFn | selection_lib.Strategy = "grad",
    selection_steps: int = 1,
    update_on_selection: bool = False,
    reselect_every: int = 0,
    seed: int = 0,
    state_dtype: Any = "float32",
    mode: str = "compact",
) -> optax.GradientTransformationExtraArgs:
    r"""Sparse Increment Fine-Tuning (SIFT) as an optax gradient transformation.

    For every *sparse* leaf :math:`W \in \mathbb{R}^n` a fixed set :math:`S` of :math:`k` flat
    positions is chosen once, and from then on only those entries train:

    .. math::

        S = \operatorname{top\text{-}k}\Big(\sum_{t=1}^{T_s} |g_t|\Big), \qquad
        W_{t+1} = W_t + \operatorname{scatter}_S\big(\mathrm{inner}(g_t[S], W_t[S])\big),

    where :math:`T_s` is ``selection_steps`` and ``inner`` is any optax optimizer. *Dense* leaves
    (the paper's "exception" modules, e.g. a classifier) are updated by ``inner`` in full from the
    first step; all other leaves are *frozen* (zero updates, no state). Only selected entries
    and dense leaves ever change, whatever ``inner`` does (weight decay included).

    Two modes:

    * ``"compact"`` (default, the memory-efficient choice): the state holds ``int32[k]``
      indices per sparse leaf and ``inner``'s state over ONE tree whose sparse leaves are
      ``k``-vectors (gathered gradients, zeros during selection) and whose dense leaves are full
      arrays; ``inner`` also receives params gathered the same way, so ``optax.adamw`` decays
      only the selected weights. Updates come back dense-shaped (scatter), so plain
      ``optax.apply_updates(params, updates)`` works. Sparse-leaf state is O(k).
    * ``"masking"``: ``inner`` runs on the full-shape gradient, zero outside the selected
      positions, with the full params (dense O(n) state, as with ``optax.chain`` of a mask and
      an optimizer), and its updates are masked again to the selected positions, so decay or
      momentum never move an unselected weight. For optimizers that need full-shape inputs.

    Selection happens at the update numbered ``selection_steps`` (1-based). Until then sparse
    leaves get exactly zero updates (dense leaves already train). With
    ``update_on_selection=True`` the last selection batch's gradient is also applied at the newly
    chosen positions. With ``reselect_every=N`` every N-th update after the first selection
    chooses new positions from that update's gradient (the trained values stay in the params)
    with fresh ``inner`` state for the sparse entries. ``inner``'s step count advances on every
    update, so Adam's bias correction counts the selection steps too. The same schedule drives
    the compact-gradient path (:mod:`sift_jax.compact`).

    Fast path: jit ``update`` and ``optax.apply_updates`` in ONE function and donate params; XLA
    then turns ``params + scatter(u)`` into an in-place scatter-add (see the README's benchmark).

    Differences from the original PyTorch code (each has a test): updates land in the same step
    (not merged one step late); dense leaves train from step 1 and the selection batch can
    optionally train sparse leaves; AdamW weight decay acts on the selected weights (not on a
    freshly zeroed increment); every targeted tensor trains (none is skipped); the inner state
    is fp32 by default even for bf16 params (``state_dtype``); accumulation via
    ``optax.MultiSteps`` counts real optimizer steps; indices are int32 device arrays in the
    state.

    Where optax tools see things differently: ``selection="magnitude"`` needs ``params`` on
    every ``update``; the state is not shaped like params (k-vectors, ``MaskedNode`` for frozen
    leaves), so ``optax.tree.map_params`` cannot map it: shard the ``int32[k]`` indices and the
    k-vector moments replicated (they are small) and dense leaves' moments like their params.

    Args:
        k: per-leaf budget. A float in (0, 1] is a rate, ``k_leaf = min(int(k * n) + 1, n)`` (the
            paper's rule); an int >= 1 is a count capped at ``n``; a ``{path: count}`` mapping or
            a callable ``(path, leaf) -> int`` decides per leaf (e.g. the counts of a global
            budget, :func:`sift_jax.compact.budget_counts`).
        inner: the optimizer (any optax transformation).
        sparse: which leaves get sparse increments: a regex (``re.search`` on the ``/``-joined
            leaf path, e.g. ``"attention/(query|key|value)"``), a list of regexes, a callable
            ``(path, leaf) -> bool`` or a bool pytree. ``None``: every floating-point leaf.
        dense: which leaves train densely (same forms); takes precedence over ``sparse``.
        selection: a registered strategy name (``"grad"``: top-k of accumulated ``|g|``;
            ``"random"``; ``"magnitude"``: top-k of ``|param|``; see :mod:`sift_jax.selection`)
            or a callable ``(score, param, k, key) -> int32[k]`` (k distinct flat indices, in
            any order) with ``score`` the accumulated ``|g|``.
        selection_steps: number of updates whose gradients are summed for selection. Values > 1
            with a gradient strategy keep an fp32 accumulator of size n per sparse leaf.
        update_on_selection: also apply the (last) selection batch's gradient (off by default,
            like the paper).
        reselect_every: re-select every this many updates after the first selection (0: never).
        seed: seed for random selection.
        state_dtype: dtype of the tree given to ``inner`` (so of its moments; complex leaves
            get the complex dtype of that precision); ``None`` keeps the params' dtype (pass
            ``params`` to ``update`` then: without them the gradients' dtype is all it has).
        mode: ``"compact"`` or ``"masking"`` (see above).

    Returns:
        An ``optax.GradientTransformationExtraArgs``; extra keyword arguments of ``update`` are
        forwarded to ``inner``. Updates come back in the gradients' dtype (optax's convention;
        equal to the params' dtype when gradients have it).

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
    validate_k(k)
    strategy = selection_lib.get(selection)
    sched = schedule_lib.Schedule(selection_steps, update_on_selection, reselect_every)
    state_dtype = check_arguments(selection_steps, seed, state_dtype)
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            "sparse_increment needs the optimizer to run on the selected entries, e.g. "
            "sparse_increment(k, optax.adamw(1e-4)); got "
            f"{type(inner).__name__}. (The chain form optax.chain(sparse_increment(k), opt) "
            "cannot keep a downstream weight decay off unselected weights, so it is not "
            "offered; use mode='masking' for an optimizer that needs full-shape inputs.)"
        )
    if mode not in ("compact", "masking"):
        raise ValueError(f"`mode` must be 'compact' or 'masking', got {mode!r}.")
    keep_score = strategy.needs_grad and sched.selection_steps > 1
    inner_tx = optax.with_extra_args_support(inner)
    masking = mode == "masking"

    def sdt(dtype):
        return state_dtype_for(dtype, state_dtype)

    def init_fn(params: optax.Params) -> SparseIncrementState:
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        roles = masks.leaf_roles(params, sparse, dense)
        indices, score, inner_tree = [], [], []
        for (path, leaf), role in zip(flat, roles, strict=True):
            if role == masks.SPARSE:
                kk = leaf_k(k, path_to_str(path), tuple(leaf.shape), leaf.dtype)
                indices.append(jnp.arange(kk, dtype=jnp.int32))
                score.append(_zeros_like(leaf, jnp.float32) if keep_score else MaskedNode())
                inner_tree.append(
                    _zeros_like(leaf, sdt(leaf.dtype))
                    if masking
                    else jnp.zeros((kk,), sdt(leaf.dtype))
                )
            elif role == masks.DENSE:
                indices.append(DenseLeaf())
                score.append(MaskedNode())
                inner_tree.append(_zeros_like(leaf, sdt(leaf.dtype)))
            else:
                indices.append(MaskedNode())
                score.append(MaskedNode())
                inner_tree.append(MaskedNode())
        if flat and masks.SPARSE not in roles and masks.DENSE not in roles:
            raise ValueError(
                "sparse_increment: no leaf is trainable: `sparse`/`dense` matched no "
                "floating-point leaf. Check the patterns against the leaf paths, e.g. "
                f"{[path_to_str(p) for p, _ in flat[:5]]}."
            )
        return SparseIncrementState(
            count=jnp.zeros([], jnp.int32),
            indices=jax.tree.unflatten(treedef, indices),
            score=jax.tree.unflatten(treedef, score),
            key=jax.random.PRNGKey(int(seed)),
            inner_state=inner_tx.init(jax.tree.unflatten(treedef, inner_tree)),
        )

    def update_fn(updates, state: SparseIncrementState, params=None, **extra_args):
        grads, treedef = jax.tree.flatten(updates)
        idx_in = treedef.flatten_up_to(state.indices)
        score_in = treedef.flatten_up_to(state.score)
        p_leaves = treedef.flatten_up_to(params) if params is not None else [None] * len(grads)
        # the state's dtype per leaf, as init chose it: from the params when given (bf16 params
        # with fp32 gradients keep a bf16 state under state_dtype=None)
        dts = [sdt((g if p is None else p).dtype) for g, p in zip(grads, p_leaves, strict=True)]
        sparse_ids = [i for i, x in enumerate(idx_in) if not _is_marker(x)]
        if not strategy.needs_grad and params is None and sparse_ids:
            if strategy.name != "random":  # a gradient-free score ranks the params themselves
                raise ValueError(
                    f"selection={strategy.name!r} needs params (it scores the weights, not the "
                    "gradients): call update(grads, state, params)."
                )
        for i in sparse_ids:
            n = math.prod(grads[i].shape)
            if idx_in[i].shape[0] > n:
                raise ValueError(
                    f"sparse_increment: a sparse leaf has {n} entries now but its state holds "
                    f"{idx_in[i].shape[0]} indices (from init); re-run init for the new shapes."
                )
        count = state.count
        scope = {
            i: indexing.WholeTensor(tuple(grads[i].shape), idx_in[i].shape[0]) for i in sparse_ids
        }

        # 1. Accumulate the selection score (only for multi-step gradient selection).
        score_out = list(score_in)
        if keep_score:
            in_phase = sched.in_selection_phase(count)
            for i in sparse_ids:
                acc = score_in[i] + selection_lib.finite_abs(grads[i])
                score_out[i] = jnp.where(in_phase, acc, score_in[i])

        # 2. Select under lax.cond, so top-k runs only on (re-)selection updates.
        def select(_):
            out = []
            for j, i in enumerate(sparse_ids):
                first = count == sched.select_step
                if keep_score:  # re-selections use this update's gradient alone
                    s = jnp.where(first, score_out[i], selection_lib.finite_abs(grads[i]))
                elif strategy.needs_grad:
                    s = selection_lib.finite_abs(grads[i])
                else:
                    s = None
                ref = p_leaves[i] if p_leaves[i] is not None else grads[i]
                key = selection_lib.leaf_key(state.key, j, count)
                out.append(scope[i].select(strategy, s, ref, key))
            return out

        old = [idx_in[i] for i in sparse_ids]
        selects = sched.selects_now(count)
        new = jax.lax.cond(selects, select, lambda _: old, None)
        idx_out = list(idx_in)
        for i, idx in zip(sparse_ids, new, strict=True):
            idx_out[i] = idx
        active = sched.trains_sparse(count)

        # A re-selection starts the sparse entries' inner state afresh.
        inner_state = state.inner_state
        if sched.reselect_every and sparse_ids:
            reselecting = selects & (count > sched.select_step)
            ids = set(sparse_ids)
            flags = [i in ids for i in range(len(grads))]
            fresh = inner_tx.init(_inner_tree_like(treedef, grads, idx_out, masking, dts))
            inner_state = jax.lax.cond(
                reselecting,
                lambda s: fresh_sparse_state(fresh, s, treedef, flags),
                lambda s: s,
                inner_state,
            )

        # 3. Inner optimizer -> updates on the selected entries and dense leaves only.
        g_c, p_c = [], []
        for i, g in enumerate(grads):
            idx, p = idx_out[i], p_leaves[i]
            if isinstance(idx, MaskedNode):
                g_c.append(MaskedNode())
                p_c.append(MaskedNode())
                continue
            dt = dts[i]
            if isinstance(idx, DenseLeaf):
                g_c.append(g.astype(dt))
                p_c.append(None if p is None else p.astype(dt))
            elif masking:
                vals = jnp.where(active, scope[i].gather(g, idx), 0)
                g_c.append(scope[i].write(jnp.zeros_like(g, dt), idx, vals.astype(dt)))
                p_c.append(None if p is None else p.astype(dt))
            else:
                g_c.append(jnp.where(active, scope[i].gather(g, idx), 0).astype(dt))
                p_c.append(None if p is None else scope[i].gather(p, idx).astype(dt))
        p_tree = None if params is None else jax.tree.unflatten(treedef, p_c)
        u_tree, inner_state = inner_tx.update(
            jax.tree.unflatten(treedef, g_c), inner_state, p_tree, **extra_args
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
                u = u_c[i] if not masking else scope[i].gather(u_c[i], idx)
                u = jnp.where(active, u, 0)
                out.append(scope[i].write(jnp.zeros_like(g), idx, u, "add"))

        new_state = SparseIncrementState(
            count=optax.safe_increment(count),
            indices=jax.tree.unflatten(treedef, idx_out),
            score=jax.tree.unflatten(treedef, score_out),
            key=state.key,
            inner_state=inner_state,
        )
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _zeros_like(leaf: Any, dtype: Any) -> jax.Array:
    """Zeros shaped (and, for placed arrays, sharded) like ``leaf``."""
    if isinstance(leaf, jax.Array):
        return jnp.zeros_like(leaf, dtype=dtype)
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
        return jnp.zeros(leaf.shape, dtype, device=sharding)
    return jnp.zeros(leaf.shape, dtype)


def _inner_tree_like(treedef, grads, idx_out, masking, dts):
    """The tree ``inner`` was initialised on (zeros), rebuilt for a fresh-state init."""
    out = []
    for i, g in enumerate(grads):
        idx = idx_out[i]
        if isinstance(idx, MaskedNode):
            out.append(MaskedNode())
        elif isinstance(idx, DenseLeaf) or masking:
            out.append(jnp.zeros_like(g, dts[i]))
        else:
            out.append(jnp.zeros(idx.shape, dts[i]))
    return jax.tree.unflatten(treedef, out)


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
