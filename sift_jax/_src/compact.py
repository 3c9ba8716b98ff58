"""The compact-gradient SIFT path, for any JAX training loop (see :class:`Sift`)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sift_jax._src import delta as delta_lib
from sift_jax._src import indexing, masks, shard_local
from sift_jax._src import schedule as schedule_lib
from sift_jax._src import selection as selection_lib
from sift_jax._src import transform as transform_lib
from sift_jax._src.paths import path_to_str

BUDGETS = ("per_tensor", "global", "mass")
SCOPES = ("global", "shard")

GradFn = Callable[..., tuple[jax.Array, Any]]


def value_and_grad(loss_of: Callable, args: Any, batch: Any, rng: Any):
    """The default ``grad_fn``: ``jax.value_and_grad(loss_of)(args, batch, rng)``.

    A trainer passes its own (e.g. averaging over micro-batches) with the same signature.

    Example:
        >>> import jax.numpy as jnp
        >>> value_and_grad(lambda a, b, r: jnp.sum(a * b), jnp.ones(2), jnp.arange(2.0), None)[1]
        Array([0., 1.], dtype=float32)
    """
    return jax.value_and_grad(loss_of)(args, batch, rng)


class Leaf(NamedTuple):
    """How :class:`Sift` treats one leaf of the parameter tree."""

    path: str  # "/"-joined leaf path (what patterns match and deltas store)
    key_path: tuple  # the jax key path (to find the leaf inside optimizer states)
    role: str  # "sparse" | "dense" | "frozen"
    shape: tuple[int, ...]
    dtype: Any
    scope: indexing.Scope | None  # sparse leaves only


class SiftState(NamedTuple):
    """The compact path's buffers besides what trains; donate it to the train step.

    Attributes:
        weights: a tree shaped like params holding, for sparse leaves, the merged weight
            ``W = W0 + scatter(values - W0[idx])`` (written in place after each update) and
            ``None`` elsewhere.
        indices: a tree shaped like params holding each sparse leaf's indices as its scope
            keeps them (``int32[k]`` global flat indices for ``scope="global"``) and ``None``
            elsewhere.
    """

    weights: Any
    indices: Any


def _none_like(treedef, leaves, keep) -> Any:
    return jax.tree.unflatten(
        treedef, [x if k else None for x, k in zip(leaves, keep, strict=True)]
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Sift:
    """The compact-gradient SIFT plan for one parameter tree: what trains and how.

    What trains is a tree shaped like params (``trainable``): each *sparse* leaf is the
    ``k``-vector of its selected weights (fp32, a master copy of ``W[idx]``), each *dense* leaf
    is itself, every other leaf is ``None``. The targeted weights live merged in a donated
    buffer (:class:`SiftState` ``weights``) read inside the loss through :meth:`params`, whose
    backward turns each dense weight gradient into ``grad_W[idx]`` at once, so ``jax.grad``
    returns k-sized leaves and any optax optimizer keeps O(k) state; after each update
    :meth:`write` puts the new values into the buffer in place. Weight decay of
    ``optax.adamw`` then acts on the selected weights themselves (as in
    :func:`sift_jax.sparse_increment`).

    Selection (first ``selection_steps`` steps, re-selection every ``reselect_every``) runs in
    :meth:`selection_step`: inside the backward (top-k of each weight gradient where it is
    produced, no dense gradient tree) when the strategy allows it, else from an accumulated
    ``|g|`` score. :attr:`schedule` says which step is which. Build with :meth:`create`.

    Example (a complete loop):
        >>> import jax, jax.numpy as jnp, optax
        >>> from sift_jax import compact
        >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8)), "b": jnp.zeros(8)}
        >>> x = jax.random.normal(jax.random.key(1), (16, 8))
        >>> loss_fn = lambda p, batch, rng: jnp.mean((batch @ p["w"] + p["b"] - 1.0) ** 2)
        >>> sift = compact.Sift.create(params, 4, sparse="w", dense="b")
        >>> trainable, state, frozen = sift.split(params)
        >>> opt = optax.adam(0.1)
        >>> opt_state = opt.init(trainable)
        >>> select = jax.jit(sift.selection_step(loss_fn, opt), static_argnames="last")
        >>> train = jax.jit(sift.train_step(loss_fn, opt), donate_argnums=(0, 1, 2))
        >>> trainable, opt_state, state, _, aux = select(
        ...     trainable, opt_state, state, frozen, {}, x, None, 0, last=True)
        >>> first = float(aux["loss"])
        >>> for _ in range(20):
        ...     trainable, opt_state, state, aux = train(trainable, opt_state, state, frozen,
        ...                                              x, None)
        >>> trainable["w"].shape, float(aux["loss"]) < first
        ((4,), True)
    """

    treedef: Any
    leaves: tuple[Leaf, ...]
    strategy: selection_lib.Strategy
    schedule: schedule_lib.Schedule
    budget: str = "per_tensor"
    total: int = 0
    seed: int = 0
    value_dtype: Any = np.dtype("float32")
    layer_views: bool = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        params: Any,
        k: transform_lib.KSpec,
        *,
        sparse: masks.LeafSpec | None = None,
        dense: masks.LeafSpec | None = None,
        selection: str | selection_lib.SelectionFn | selection_lib.Strategy = "grad",
        selection_steps: int = 1,
        update_on_selection: bool = False,
        reselect_every: int = 0,
        scope: str = "global",
        stacked: masks.LeafSpec | None = None,
        budget: str = "per_tensor",
        seed: int = 0,
        value_dtype: Any = "float32",
        layer_views: bool = False,
    ) -> Sift:
        """Plans SIFT for ``params`` (arrays, or ``ShapeDtypeStruct``s for ``scope="global"``).

        Args:
            params: the parameter tree (any pytree, e.g. a dict or ``nnx.State``).
            k: budget. Per tensor (``budget="per_tensor"``): as in
                :func:`sift_jax.sparse_increment` (rate, count, mapping or callable). With
                ``budget="global"``: a rate gives the same total as per tensor
                (``sum_i min(int(rate * n_i) + 1, n_i)``), an int is the total.
            sparse: leaves with sparse increments (regex, list, callable or bool tree;
                ``None``: every floating-point leaf).
            dense: leaves trained densely (precedence over ``sparse``).
            selection: a registered strategy (:mod:`sift_jax.selection`) or a callable.
            selection_steps: batches whose ``|g|`` is summed before selecting.
            update_on_selection: the (last) selection batch also trains the new entries.
            reselect_every: fold the trained values in and select anew every N steps (0: no).
            scope: ``"global"`` (top-k over each whole tensor) or ``"shard"`` (top
                ``ceil(k / S)`` within each of a sharded tensor's ``S`` blocks, all per device;
                needs placed ``params``).
            stacked: leaves whose leading dimension stacks layers (scanned models): their
                top-k is taken per layer slice (``k`` from the slice's size), never jointly
                across the stack; indices ``int32[L, k]``.
            budget: ``"per_tensor"`` (the paper); ``"global"``: one budget for all sparse
                leaves, the joint top-k of the strategy's score across them; ``"mass"``: the
                same total shared out in proportion to each leaf's score mass (the sum of its
                ``|g|``), then the top-k within each leaf. With both, each leaf's size is
                fixed at selection by :meth:`apply_budget`; ``"mass"`` needs every sparse
                leaf's whole ``|g|`` once, so its selection does not run inside the backward
                (:meth:`can_probe` is False).
            seed: seed for random selection.
            value_dtype: dtype of the trained values (``None``: the leaf's own).
            layer_views: hand the model each stacked sparse leaf as a
                :class:`~sift_jax.compact.LayerView` (weight, values, indices; a
                :class:`~sift_jax.compact.LayerProbe` at in-backward selection) instead of an
                array, for a scanned model that calls :func:`~sift_jax.compact.apply_layer` on
                its layer's slice inside the scan body: the view (and the probe) then act per
                layer, so at most one layer's dense weight gradient is alive at a time
                (applied outside the scan, the backward scan accumulates the stacked ``dW`` of
                every layer first). Needs ``stacked``.

        Returns:
            The plan.
        """
        transform_lib.validate_k(k)
        strategy = selection_lib.get(selection)
        sched = schedule_lib.Schedule(selection_steps, update_on_selection, reselect_every)
        transform_lib.check_arguments(selection_steps, seed, "float32")
        if scope not in SCOPES:
            raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}.")
        if budget not in BUDGETS:
            raise ValueError(f"`budget` must be one of {BUDGETS}, got {budget!r}.")
        if layer_views and stacked is None:
            raise ValueError(
                "layer_views=True hands stacked leaves to a scanned model: pass "
                "`stacked` (the leaves with a leading layer dim)."
            )
        if budget != "per_tensor":
            if strategy.score is None:
                raise ValueError(
                    f"budget={budget!r} compares scores across tensors; selection "
                    f"{strategy.name!r} has no score (register it with score=...)."
                )
            if scope != "global" or stacked is not None:
                raise ValueError(f"budget={budget!r} needs scope='global' and no stacked leaves.")
            if update_on_selection:
                raise ValueError(f"budget={budget!r} does not support update_on_selection.")
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        roles = masks.leaf_roles(params, sparse, dense)
        is_stacked = (
            [False] * len(flat)
            if stacked is None
            else masks.leaf_roles(params, sparse=stacked, dense=None)
        )
        is_stacked = [r is True or r == masks.SPARSE for r in is_stacked]
        paths = [path_to_str(p) for p, _ in flat]
        if flat and masks.SPARSE not in roles:
            raise ValueError(
                "compact SIFT: `sparse` matched no floating-point leaf (nothing would get sparse "
                f"increments). Leaf paths look like {paths[:6]}."
            )
        per_tensor_k = {
            p: transform_lib.leaf_k(k, p, tuple(x.shape), x.dtype)
            for p, (_, x), r in zip(paths, flat, roles, strict=True)
            if r == masks.SPARSE
        }
        total = sum(per_tensor_k.values())
        if budget != "per_tensor" and isinstance(k, numbers.Integral):
            total = int(k)
            sizes = {p: math.prod(x.shape) for p, (_, x) in zip(paths, flat, strict=True)}
            n_sparse = sum(sizes[p] for p in per_tensor_k)
            per_tensor_k = {
                p: max(1, min(sizes[p], round(total * sizes[p] / n_sparse))) for p in per_tensor_k
            }
        leaves = []
        for (kp, x), p, role, st in zip(flat, paths, roles, is_stacked, strict=True):
            shape = tuple(x.shape)
            sc = None
            if role == masks.SPARSE:
                if st:
                    if len(shape) < 2:
                        raise ValueError(f"stacked leaf {p!r} needs a leading layer dimension.")
                    kk = transform_lib.leaf_k(k, p, shape[1:], x.dtype)
                    sc = indexing.PerSlice(shape, kk, lead=1)
                    if scope == "shard":
                        raise ValueError("scope='shard' does not support stacked leaves.")
                elif scope == "shard":
                    if not isinstance(x, jax.Array):
                        raise ValueError("scope='shard' needs placed (sharded) params.")
                    sc = shard_local.scope_for(x, per_tensor_k[p])
                else:
                    sc = indexing.WholeTensor(shape, per_tensor_k[p])
            leaves.append(Leaf(p, tuple(kp), role, shape, np.dtype(x.dtype), sc))
        vd = None if value_dtype is None else np.dtype(value_dtype)
        return cls(
            treedef, tuple(leaves), strategy, sched, budget, total, int(seed), vd, layer_views
        )

    def resized(self, counts: Mapping[str, int]) -> Sift:
        """The same plan with each sparse leaf training ``counts[path]`` entries (global scope).

        Example:
            >>> import jax.numpy as jnp
            >>> s = Sift.create({"a": jnp.zeros(8), "b": jnp.zeros(8)}, 2)
            >>> [x.size for x in s.resized({"a": 3, "b": 1}).sparse_scopes.values()]
            [3, 1]
        """
        out = []
        for leaf in self.leaves:
            if leaf.role == masks.SPARSE and leaf.path in counts:
                if not isinstance(leaf.scope, indexing.WholeTensor):
                    raise ValueError("Only whole-tensor scopes can be resized.")
                n = math.prod(leaf.shape)
                c = int(counts[leaf.path])
                if not 1 <= c <= n:
                    raise ValueError(f"{leaf.path}: count {c} is outside [1, {n}].")
                leaf = leaf._replace(scope=indexing.WholeTensor(leaf.shape, c))
            out.append(leaf)
        return dataclasses.replace(self, leaves=tuple(out))

    # ------------------------------------------------------------------ static facts

    @property
    def sparse_scopes(self) -> dict[str, indexing.Scope]:
        """``{path: scope}`` of the sparse leaves."""
        return {x.path: x.scope for x in self.leaves if x.role == masks.SPARSE}

    @property
    def roles(self) -> dict[str, str]:
        """``{path: role}`` of every leaf."""
        return {x.path: x.role for x in self.leaves}

    @property
    def num_trainable(self) -> int:
        """Entries that train: selected ones plus every entry of dense leaves."""
        return sum(
            x.scope.size if x.role == masks.SPARSE else math.prod(x.shape)
            for x in self.leaves
            if x.role != masks.FROZEN
        )

    @property
    def key(self) -> jax.Array:
        return jax.random.PRNGKey(self.seed)

    def wrt(self, path: Any, value: Any = None) -> bool:
        """An ``(path, value) -> bool`` filter: true for what trains (dense leaves; the
        :mod:`sift_jax.nnx` values are matched by type). ``path`` is a key tuple or string."""
        del value
        p = path if isinstance(path, str) else path_to_str(tuple(path))
        return self.roles.get(p) == masks.DENSE

    def _flat(self, tree: Any) -> list:
        return self.treedef.flatten_up_to(tree)

    def _tree(self, leaves: list) -> Any:
        return jax.tree.unflatten(self.treedef, leaves)

    def _value_dtype(self, leaf: Leaf):
        return transform_lib.state_dtype_for(leaf.dtype, self.value_dtype)

    # ------------------------------------------------------------------ split / merge

    def split(self, params: Any, *, copy: bool = True) -> tuple[Any, SiftState, Any]:
        """``(trainable, state, frozen)`` from the pretrained ``params``.

        ``trainable``: sparse leaves -> values at placeholder indices (selection replaces them),
        dense leaves -> the arrays; ``state``: merged weights and indices (donate both);
        ``frozen``: every other leaf (read only), ``None`` at the others. With ``copy`` (the
        default) donated arrays are copies, so ``params`` stays valid.

        Example:
            >>> import jax.numpy as jnp
            >>> s = Sift.create({"w": jnp.ones((2, 3)), "ln": jnp.ones(3)}, 2, sparse="w")
            >>> t, st, fr = s.split({"w": jnp.ones((2, 3)), "ln": jnp.ones(3)})
            >>> t["w"].shape, t["ln"], st.indices["w"].tolist(), fr["ln"].shape
            ((2,), None, [0, 1], (3,))
        """
        leaves = self._flat(params)
        cp = (lambda x: jnp.copy(x)) if copy else (lambda x: x)
        trainable, weights, indices, frozen = [], [], [], []
        for leaf, x in zip(self.leaves, leaves, strict=True):
            t = w = i = f = None
            if leaf.role == masks.SPARSE:
                w = cp(x)
                i = _place_like(leaf.scope.placeholder(), x, leaf.scope)
                t = leaf.scope.gather(w, i).astype(self._value_dtype(leaf))
            elif leaf.role == masks.DENSE:
                t = cp(x)
            else:
                f = x
            trainable.append(t)
            weights.append(w)
            indices.append(i)
            frozen.append(f)
        return (
            self._tree(trainable),
            SiftState(self._tree(weights), self._tree(indices)),
            self._tree(frozen),
        )

    def params(
        self, trainable: Any, state: SiftState, frozen: Any, *, layer_views: bool | None = None
    ) -> Any:
        """The full parameter tree to call the model with, inside the differentiated loss.

        Sparse leaves are the merged weights read through :func:`indexing.view_fn` (their
        gradient reaches ``trainable`` as ``grad_W[idx]``), dense leaves come from
        ``trainable``, the rest from ``frozen``. With ``layer_views`` (default: the plan's)
        each stacked sparse leaf is instead a :class:`~sift_jax.compact.LayerView` of the raw
        stacked weight and its per-layer values and indices, for a scanned model that calls
        :func:`~sift_jax.compact.apply_layer` inside its scan body.

        Example (a scanned model):
            >>> import jax, jax.numpy as jnp
            >>> from sift_jax.compact import apply_layer
            >>> params = {"stack": jax.random.normal(jax.random.key(0), (3, 4, 4))}
            >>> sift = Sift.create(params, 2, stacked="stack", layer_views=True)
            >>> t, st, fr = sift.split(params)
            >>> def loss(p, x):
            ...     body = lambda h, w: (jnp.tanh(h @ apply_layer(w)), None)
            ...     return jnp.sum(jax.lax.scan(body, x, p["stack"])[0] ** 2)
            >>> type(sift.params(t, st, fr)["stack"]).__name__
            'LayerView'
            >>> jax.grad(lambda t: loss(sift.params(t, st, fr), jnp.ones((2, 4))))(t)["stack"].shape
            (3, 2)
        """
        per_layer = self.layer_views if layer_views is None else layer_views
        t, w, i, f = map(self._flat, (trainable, state.weights, state.indices, frozen))
        out = []
        for leaf, tj, wj, ij, fj in zip(self.leaves, t, w, i, f, strict=True):
            if leaf.role == masks.SPARSE:
                if per_layer and isinstance(leaf.scope, indexing.PerSlice):
                    out.append(indexing.LayerView(wj, tj, ij))
                else:
                    out.append(indexing.view_fn(leaf.scope)(wj, tj, ij))
            elif leaf.role == masks.DENSE:
                out.append(tj)
            else:
                out.append(fj)
        return self._tree(out)

    def merged(self, trainable: Any, state: SiftState, frozen: Any) -> Any:
        """The fine-tuned parameter tree as plain arrays (for evaluation outside ``grad``,
        export and deltas)."""
        t, w, f = map(self._flat, (trainable, state.weights, frozen))
        out = []
        for leaf, tj, wj, fj in zip(self.leaves, t, w, f, strict=True):
            out.append(wj if leaf.role == masks.SPARSE else tj if leaf.role == masks.DENSE else fj)
        return self._tree(out)

    def write(self, trainable: Any, state: SiftState) -> SiftState:
        """``state`` with each sparse leaf's values written into its merged weight at its
        indices (rounded once to the weight's dtype); in place when ``state`` is donated."""
        t, w, i = map(self._flat, (trainable, state.weights, state.indices))
        out = []
        for leaf, tj, wj, ij in zip(self.leaves, t, w, i, strict=True):
            out.append(leaf.scope.write(wj, ij, tj) if leaf.role == masks.SPARSE else None)
        return SiftState(self._tree(out), state.indices)

    def with_indices(self, indices: Any, trainable: Any, state: SiftState) -> tuple[Any, SiftState]:
        """``(trainable, state)`` for new ``indices`` (a params-shaped tree as kept by the
        scopes): each sparse leaf's values become the merged weight's values there."""
        t, w, i = map(self._flat, (trainable, state.weights, indices))
        new_t = []
        for leaf, tj, wj, ij in zip(self.leaves, t, w, i, strict=True):
            if leaf.role == masks.SPARSE:
                tj = leaf.scope.gather(wj, ij).astype(self._value_dtype(leaf))
            new_t.append(tj)
        return self._tree(new_t), SiftState(state.weights, indices)

    # ------------------------------------------------------------------ selection

    def can_probe(self, reselecting: bool = False) -> bool:
        """Whether selection can happen inside one backward pass (no O(n) score)."""
        single = reselecting or self.schedule.selection_steps == 1
        return self.strategy.in_backward and single and self.budget != "mass"

    def zero_score(self, state: SiftState) -> dict[str, jax.Array]:
        """The fp32 ``|g|`` accumulator (``{path: zeros like the weight}``) for selection
        from a score; ``{}`` when selection happens inside the backward."""
        w = self._flat(state.weights)
        return {
            leaf.path: jnp.zeros_like(wj, dtype=jnp.float32)
            for leaf, wj in zip(self.leaves, w, strict=True)
            if leaf.role == masks.SPARSE
        }

    def _width(self, leaf: Leaf) -> int:
        if self.budget == "per_tensor":
            return leaf.scope.k
        return min(self.total, math.prod(leaf.shape))

    def selection_step(
        self,
        loss_fn: Callable[[Any, Any, Any], jax.Array],
        optimizer: optax.GradientTransformation,
        grad_fn: GradFn = value_and_grad,
        *,
        probe: bool = True,
    ) -> Callable:
        """The selection step: ``step(trainable, opt_state, state, frozen, score, batch, rng,
        count, *, last) -> (trainable, opt_state, state, score, aux)``.

        Jit it with ``static_argnames="last"``. ``loss_fn(params, batch, rng) -> scalar``;
        ``grad_fn(loss_of, args, batch, rng) -> (loss, grads)`` (default
        :func:`value_and_grad`). ``count`` is the step number (it seeds random selection, as in
        :func:`sift_jax.sparse_increment`). ``score`` is ``{}`` (selection inside the backward,
        see :meth:`can_probe`) or :meth:`zero_score`'s accumulator, carried across the
        selection phase. ``last=False``: accumulate ``|g|``; ``last=True``: choose the indices
        (the trained values become the weights' values there). Dense leaves train at every
        step; the new sparse entries train only with ``update_on_selection``. With
        ``budget="global"`` ``aux["candidates"]`` goes to :meth:`apply_budget`. ``probe=False``
        forbids the in-backward path (a ``grad_fn`` that sums several backward passes).
        """

        def step(trainable, opt_state, state, frozen, score, batch, rng, count, *, last):
            t, w, idx = map(self._flat, (trainable, state.weights, state.indices))
            probing = last and probe and not score and self.can_probe(True)
            needs = self.strategy.needs_grad
            diff = needs or self.schedule.update_on_selection  # dense grad of the weights
            if not last and needs and not score:
                raise ValueError(
                    "selection_step(last=False) accumulates |g| into `score`: pass "
                    "sift.zero_score(state) at the first selection step, not {}."
                )
            args = []
            for leaf, tj, wj in zip(self.leaves, t, w, strict=True):
                if leaf.role == masks.SPARSE:
                    shape = leaf.scope.probe_shape(self._width(leaf))
                    args.append(jnp.zeros(shape, jnp.float32) if probing else wj if diff else None)
                else:
                    args.append(tj if leaf.role == masks.DENSE else None)

            def loss_of(a, b, r):
                return loss_fn(self._selection_params(a, state, frozen, probing), b, r)

            loss, g = grad_fn(loss_of, self._tree(args), batch, rng)
            g = self._flat(g)
            score = dict(score)
            new_idx, g_sel, candidates = list(idx), {}, {}
            j = -1
            for n, leaf in enumerate(self.leaves):
                if leaf.role != masks.SPARSE:
                    continue
                j += 1
                sc = leaf.scope
                if probing:
                    if self.budget == "per_tensor":
                        new_idx[n] = indexing.decode_probe(g[n])
                        g_sel[n] = g[n][..., 2, :]
                    else:
                        candidates[leaf.path] = (
                            indexing.decode_probe(g[n]),
                            jnp.abs(g[n][..., 2, :]),
                        )
                    continue
                s = None
                if needs:
                    s = selection_lib.finite_abs(g[n])
                    if leaf.path in score:
                        s = score[leaf.path] + s
                        score[leaf.path] = s
                if not last:
                    continue
                key = selection_lib.leaf_key(self.key, j, count)
                if self.budget == "per_tensor":
                    new_idx[n] = sc.select(self.strategy, s, w[n], key)
                    if diff:
                        g_sel[n] = sc.gather(g[n], new_idx[n])
                else:
                    ranking = self.strategy.score(s, w[n], key)
                    cidx = indexing.topk(ranking, self._width(leaf))
                    candidates[leaf.path] = (cidx, indexing.gather(ranking, cidx))
                    if self.budget == "mass":
                        mass = jnp.sum(ranking, dtype=jnp.float32)
                        candidates[leaf.path] += (mass,)
            if last and self.budget == "per_tensor":
                trainable, state = self.with_indices(self._tree(new_idx), trainable, state)
                score = {}
            train_now = last and self.schedule.update_on_selection
            t = self._flat(trainable)
            grads = []
            for n, (leaf, tj) in enumerate(zip(self.leaves, t, strict=True)):
                if leaf.role == masks.SPARSE:
                    grads.append(g_sel[n].astype(tj.dtype) if train_now else jnp.zeros_like(tj))
                else:
                    grads.append(g[n] if leaf.role == masks.DENSE else None)
            grads = self._tree(grads)
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
            if not train_now:
                updates = self._zero_sparse(updates)
            trainable = optax.apply_updates(trainable, updates)
            if train_now:
                state = self.write(trainable, state)
            aux = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
            if candidates:
                aux["candidates"] = candidates
            return trainable, opt_state, state, score, aux

        return step

    def _selection_params(self, args, state, frozen, probing):
        a, w, f = map(self._flat, (args, state.weights, frozen))
        out = []
        for leaf, aj, wj, fj in zip(self.leaves, a, w, f, strict=True):
            if leaf.role == masks.SPARSE:
                if probing and self.layer_views and isinstance(leaf.scope, indexing.PerSlice):
                    out.append(indexing.LayerProbe(wj, aj))
                elif probing:
                    out.append(indexing.probe_fn(leaf.scope)(wj, aj))
                else:
                    out.append(wj if aj is None else aj)
            else:
                out.append(aj if leaf.role == masks.DENSE else fj)
        return self._tree(out)

    def _zero_sparse(self, tree):
        leaves = self._flat(tree)
        out = [
            jnp.zeros_like(x) if leaf.role == masks.SPARSE else x
            for leaf, x in zip(self.leaves, leaves, strict=True)
        ]
        return self._tree(out)

    def apply_budget(
        self,
        candidates: Mapping[str, tuple[jax.Array, jax.Array]],
        trainable: Any,
        opt_state: Any,
        state: SiftState,
        optimizer: optax.GradientTransformation,
    ) -> tuple[Sift, Any, Any, SiftState]:
        """Finishes a ``budget="global"`` or ``"mass"`` selection on the host: the joint
        top-``total`` of the candidates' scores (``"global"``) or each leaf's share of the
        score mass (``"mass"``, :func:`mass_counts`) decides each leaf's count (at least 1)
        and indices; returns the resized plan, its trainable values, the optimizer state
        (fresh for the sparse leaves) and the state. Shapes change, so the train step
        retraces once."""
        paths = [leaf.path for leaf in self.leaves if leaf.role == masks.SPARSE]
        cand = {p: (np.asarray(candidates[p][0]), np.asarray(candidates[p][1])) for p in paths}
        if self.budget == "mass":
            sizes = {x.path: math.prod(x.shape) for x in self.leaves if x.role == masks.SPARSE}
            masses = {p: float(candidates[p][2]) for p in paths}
            counts = mass_counts(masses, self.total, sizes)
            chosen = {p: np.argsort(-v, kind="stable")[: counts[p]] for p, (_, v) in cand.items()}
        else:
            chosen = joint_topk({p: v for p, (_, v) in cand.items()}, self.total)
        counts = {p: len(c) for p, c in chosen.items()}
        plan = self.resized(counts)
        idx_leaves = self._flat(state.indices)
        new_idx = []
        for leaf, old in zip(self.leaves, idx_leaves, strict=True):
            if leaf.role != masks.SPARSE:
                new_idx.append(None)
                continue
            sel = np.sort(cand[leaf.path][0][chosen[leaf.path]]).astype(np.int32)
            new_idx.append(_place_like(jnp.asarray(sel), old, None))
        trainable, state = plan.with_indices(plan._tree(new_idx), trainable, state)
        opt_state = plan.refresh_opt_state(optimizer, opt_state, trainable)
        return plan, trainable, opt_state, state

    def refresh_opt_state(
        self, optimizer: optax.GradientTransformation, opt_state: Any, trainable: Any
    ) -> Any:
        """``opt_state`` with everything that belongs to a sparse leaf freshly initialised for
        ``trainable`` (new shapes allowed); dense leaves' moments and step counts carry on."""
        fresh = jax.jit(optimizer.init)(trainable)
        sparse = {leaf.key_path for leaf in self.leaves if leaf.role == masks.SPARSE}
        flat, treedef = jax.tree_util.tree_flatten_with_path(trainable)
        flags = [tuple(path) in sparse for path, _ in flat]
        return transform_lib.fresh_sparse_state(fresh, opt_state, treedef, flags)

    # ------------------------------------------------------------------ train step

    def train_step(
        self,
        loss_fn: Callable[[Any, Any, Any], jax.Array],
        optimizer: optax.GradientTransformation,
        grad_fn: GradFn = value_and_grad,
    ) -> Callable:
        """The train step: ``step(trainable, opt_state, state, frozen, batch, rng) ->
        (trainable, opt_state, state, aux)``; jit it with ``donate_argnums=(0, 1, 2)``.

        ``jax.grad`` inside sees only ``trainable`` (k-vectors + dense leaves), so gradients
        and optimizer state are O(k) for sparse leaves; the updated values are written into
        the donated weights in place.
        """

        def step(trainable, opt_state, state, frozen, batch, rng):
            def loss_of(t, b, r):
                return loss_fn(self.params(t, state, frozen), b, r)

            loss, grads = grad_fn(loss_of, trainable, batch, rng)
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            state = self.write(trainable, state)
            return trainable, opt_state, state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

        return step

    # ------------------------------------------------------------------ checkpoints, deltas

    def global_indices(self, state: SiftState) -> dict[str, np.ndarray]:
        """``{path: sorted int32 global flat indices}`` (host numpy) of the sparse leaves
        (``int64`` for a stacked leaf beyond int32's range)."""
        i = self._flat(state.indices)
        return {
            leaf.path: leaf.scope.to_global(_host(ij))
            for leaf, ij in zip(self.leaves, i, strict=True)
            if leaf.role == masks.SPARSE
        }

    def touched(
        self, state: SiftState, previous: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Every position selected so far: ``previous`` (from earlier selections) plus the
        current indices. Keep it across re-selections for :meth:`state_dict` and
        :meth:`delta`."""
        now = self.global_indices(state)
        if not previous:
            return now
        return {p: np.union1d(previous.get(p, []), i).astype(i.dtype) for p, i in now.items()}

    def state_dict(
        self, state: SiftState, touched: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, dict[str, np.ndarray]]:
        """What a checkpoint needs besides the trained values (all O(k), host numpy):
        ``indices`` (global flat, so independent of the mesh) and, after re-selections,
        the weights at every earlier-touched position (``touched`` + ``touched_values``)."""
        out: dict[str, dict[str, np.ndarray]] = {"indices": self.global_indices(state)}
        if touched:
            w = dict(zip([x.path for x in self.leaves], self._flat(state.weights), strict=True))
            sc = self.sparse_scopes
            out["touched"] = {p: np.asarray(i, sc[p].global_dtype) for p, i in touched.items()}
            out["touched_values"] = {
                p: _host(sc[p].gather_global(w[p], i)) for p, i in touched.items()
            }
        return out

    def counts_in(self, saved: Mapping[str, Any]) -> dict[str, int]:
        """Per-leaf counts of a :meth:`state_dict` (to :meth:`resized` a global budget)."""
        return {p: int(np.size(i)) for p, i in saved["indices"].items()}

    def load_state_dict(
        self, saved: Mapping[str, Any], trainable: Any, state: SiftState
    ) -> SiftState:
        """``state`` (fresh from :meth:`split` of the pretrained params) brought to a saved
        :meth:`state_dict`: earlier-touched weights restored, indices set, and the (restored)
        ``trainable`` values written at them."""
        w, i = self._flat(state.weights), self._flat(state.indices)
        new_w, new_i = [], []
        for leaf, wj, ij in zip(self.leaves, w, i, strict=True):
            if leaf.role != masks.SPARSE:
                new_w.append(None)
                new_i.append(None)
                continue
            if leaf.path not in saved["indices"]:
                raise ValueError(f"The saved SIFT state has no indices for {leaf.path!r}.")
            if "touched" in saved and leaf.path in saved["touched"]:
                at = np.asarray(saved["touched"][leaf.path])
                vals = jnp.asarray(saved["touched_values"][leaf.path])
                wj = leaf.scope.scatter_global(wj, at, vals)
            new_w.append(wj)
            new_i.append(
                _place_like(leaf.scope.from_global(saved["indices"][leaf.path]), ij, leaf.scope)
            )
        return self.write(trainable, SiftState(self._tree(new_w), self._tree(new_i)))

    def delta(
        self,
        trainable: Any,
        state: SiftState,
        frozen: Any,
        base: Any,
        touched: Mapping[str, np.ndarray] | None = None,
    ) -> delta_lib.Delta:
        """The :func:`sift_jax.extract_delta` of the fine-tuned params against ``base``: the
        selected (or, after re-selections, every touched) positions of sparse leaves and the
        dense leaves whole; merges back bit for bit."""
        return self.extract(
            self.merged(trainable, state, frozen), base, self.touched(state, touched)
        )

    def extract(self, merged: Any, base: Any, indices: Mapping[str, np.ndarray]) -> delta_lib.Delta:
        """:func:`sift_jax.extract_delta` of ``merged`` (the fine-tuned params, device or
        host arrays) against ``base`` at ``indices`` (``{path: global flat indices}`` of the
        sparse leaves, e.g. :meth:`touched`), dense leaves stored whole."""
        tree = self._tree(
            [
                np.asarray(indices[leaf.path]) if leaf.role == masks.SPARSE else None
                for leaf in self.leaves
            ]
        )
        dense = lambda path, x: self.roles.get(path) == masks.DENSE
        return delta_lib.extract_delta(merged, base, tree, dense=dense)


def joint_topk(scores: Mapping[str, np.ndarray], total: int) -> dict[str, np.ndarray]:
    """Positions (into each array) of the ``total`` largest entries across all arrays, with
    every array keeping at least its largest entry (which then replaces the weakest winner of an
    array that has several, so exactly ``total`` are chosen).

    Example:
        >>> import numpy as np
        >>> out = joint_topk({"a": np.array([5.0, 1.0]), "b": np.array([4.0, 3.0, 0.5])}, 3)
        >>> {k: v.tolist() for k, v in out.items()}
        {'a': [0], 'b': [0, 1]}
        >>> out = joint_topk({"a": np.array([5.0, 4.0]), "b": np.array([0.1])}, 2)
        >>> {k: v.tolist() for k, v in out.items()}
        {'a': [0], 'b': [0]}
    """
    names = list(scores)
    vals = [np.asarray(scores[n], np.float64).reshape(-1) for n in names]
    owner = np.concatenate([np.full(v.shape, i) for i, v in enumerate(vals)])
    pos = np.concatenate([np.arange(v.size) for v in vals])
    flat = np.concatenate(vals)
    total = min(total, flat.size)
    order = list(np.argsort(-flat, kind="stable")[:total])
    chosen = np.bincount(owner[order], minlength=len(vals))
    for i, v in enumerate(vals):
        if chosen[i] or not v.size:
            continue
        # the weakest winner of an array with several gives its place to this array's best
        for j in range(len(order) - 1, -1, -1):
            if chosen[owner[order[j]]] > 1:
                chosen[owner[order[j]]] -= 1
                del order[j]
                break
        order.append(int(np.flatnonzero(owner == i)[np.argmax(v)]))
        chosen[i] = 1
    order = np.asarray(order, np.int64)
    return {n: np.sort(pos[order][owner[order] == i]) for i, n in enumerate(names)}


def mass_counts(
    masses: Mapping[str, float], total: int, sizes: Mapping[str, int]
) -> dict[str, int]:
    """``{name: count}``: every array keeps 1 and the rest of ``total`` is shared out in
    proportion to ``masses`` (largest remainders), at most each array's size (a share beyond
    it goes to the others); with more arrays than ``total`` each still gets 1.

    Example:
        >>> mass_counts({"a": 3.0, "b": 1.0}, 8, {"a": 100, "b": 100})
        {'a': 6, 'b': 2}
        >>> mass_counts({"a": 3.0, "b": 1.0, "c": 0.0}, 9, {"a": 4, "b": 100, "c": 9})
        {'a': 4, 'b': 4, 'c': 1}
    """
    names = list(masses)
    m = np.array([float(masses[n]) for n in names], np.float64)
    cap = np.array([int(sizes[n]) for n in names], np.int64)
    if not np.isfinite(m).all():
        bad = [n for n, x in zip(names, m, strict=True) if not np.isfinite(x)]
        raise ValueError(f"mass budget: non-finite score mass in {bad} (check the gradients).")
    m = np.maximum(m, 0.0)
    total = min(int(total), int(cap.sum()))
    room = cap - 1  # every array keeps 1; the rest is shared by mass within each one's room
    left = max(0, total - len(names))
    full = room <= 0
    while True:  # water-filling: a share beyond an array's room goes to the others
        w = np.where(full, 0.0, m)
        w = w / w.sum() if w.sum() > 0 else ~full / max(1, (~full).sum())
        quota = np.where(full, room, w * (left - room[full].sum()))
        over = ~full & (quota >= room)
        if not over.any():
            break
        full |= over
    extra = np.minimum(np.floor(quota).astype(np.int64), room)
    rem = np.where(full, -np.inf, quota - extra)
    for i in np.argsort(-rem, kind="stable")[: left - int(extra.sum())]:  # largest remainders
        extra[i] += 1
    count = 1 + extra
    return {n: int(c) for n, c in zip(names, count, strict=True)}


def budget_counts(
    scores: Any, total: int, *, sparse: masks.LeafSpec | None = None, by: str = "joint"
) -> dict:
    """``{path: count}`` of a shared budget of ``total`` entries over the sparse leaves of
    ``scores`` (e.g. ``|grad|`` of a first batch): ``by="joint"`` (``budget="global"``): how
    many of the ``total`` largest scores fall in each leaf; ``by="mass"``
    (``budget="mass"``): shares proportional to each leaf's score sum (:func:`mass_counts`);
    at least 1 each. Pass it as ``k`` to :func:`sift_jax.sparse_increment` to give the
    transform that budget.

    Example:
        >>> import jax.numpy as jnp
        >>> s = {"a": jnp.array([5.0, 1.0]), "b": jnp.array([4.0, 3.0, 0.5])}
        >>> budget_counts(s, 3), budget_counts(s, 4, by="mass")
        ({'a': 1, 'b': 2}, {'a': 2, 'b': 2})
    """
    if by not in ("joint", "mass"):
        raise ValueError(f"`by` must be 'joint' or 'mass', got {by!r}.")
    flat, _ = jax.tree_util.tree_flatten_with_path(scores)
    roles = masks.leaf_roles(scores, sparse, None)
    named = {
        path_to_str(p): np.abs(np.asarray(x, np.float64))
        for (p, x), r in zip(flat, roles, strict=True)
        if r == masks.SPARSE
    }
    if by == "mass":
        # summed in float32 like the plan's own selection (``Sift`` with ``budget="mass"``),
        # not float64, so both paths round the masses alike (the reduction order may still
        # differ under jit, by float32 rounding at most)
        raw = {path_to_str(p): x for p, x in flat}
        masses = {p: float(jnp.sum(jnp.abs(jnp.asarray(raw[p])), dtype=jnp.float32)) for p in named}
        return mass_counts(masses, total, {p: v.size for p, v in named.items()})
    return {p: int(v.size) for p, v in joint_topk(named, total).items()}


def _host(x: Any) -> np.ndarray:
    """A (possibly multi-process) array as host numpy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _place_like(idx: jax.Array, like: Any, scope: indexing.Scope | None) -> jax.Array:
    """``idx`` on the devices of ``like`` (replicated), unless the scope placed it itself."""
    if isinstance(scope, shard_local.PerShard) or isinstance(like, jax.core.Tracer):
        return idx
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(idx, jax.Array):
        mesh = sharding.mesh
        return jax.device_put(idx, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return idx
