"""SIFT for Flax NNX models: wrap a model, train its selected values with ``nnx.Optimizer``.

:class:`SiftModel` wraps a pretrained ``nnx.Module`` and a :class:`sift_jax.compact.Sift`
plan. The trained quantities are :class:`SiftValue` variables (an ``nnx.Param`` subclass, as
flax's ``LoRAParam``): the ``k``-vector of selected weight values per sparse parameter. The
wrapped model's own parameters hold the merged weights; the forward reads them through the
compact view (its backward emits ``grad_W[idx]`` only), so ``nnx.grad`` with
``wrt=model.wrt`` returns k-sized gradients. After each optimizer update call
:meth:`SiftModel.write` to put the new values into the weights (in place under
``nnx.jit`` with donation)::

    model = sift_jax.nnx.SiftModel(pretrained, 0.01, sparse="attention", dense="classifier")
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=model.wrt)

    @nnx.jit
    def train_step(model, optimizer, batch):
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, model.wrt))(model, batch)
        optimizer.update(model, grads)
        model.write()

    nnx.jit(lambda m, b: m.select(loss_fn, b))(model, first_batch)   # before training

This module imports flax; the rest of ``sift_jax`` does not.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from sift_jax._src import indexing, masks
from sift_jax._src.compact import Sift, SiftState


class SiftValue(nnx.Param):
    """The trained ``k``-vector of one sparse parameter's selected values (fp32)."""


class SiftIndex(nnx.Variable):
    """One sparse parameter's selected indices (not trained)."""


def _key(path: str) -> str:
    return path.replace("/", ".")


class SiftModel(nnx.Module):
    """A pretrained NNX model whose selected weights train sparsely (see the module docs).

    Args:
        model: the pretrained module (its parameters become the merged weight buffers).
        k: the budget (as in :meth:`sift_jax.compact.Sift.create`).
        **plan: the other arguments of :meth:`sift_jax.compact.Sift.create` (``sparse``,
            ``dense``, ``selection``, ``scope``, ...).

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> base = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), jnp.tanh,
        ...                       nnx.Linear(8, 1, rngs=nnx.Rngs(1)))
        >>> model = SiftModel(base, 3, sparse="layers/0/kernel", dense="layers/2")
        >>> x, y = jnp.ones((5, 4)), jnp.zeros((5, 1))
        >>> loss = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
        >>> nnx.jit(lambda m, x, y: m.select(loss, x, y))(model, x, y)
        >>> opt = nnx.Optimizer(model, optax.adam(0.1), wrt=model.wrt)
        >>> @nnx.jit
        ... def step(model, opt, x, y):
        ...     grads = nnx.grad(loss, argnums=nnx.DiffState(0, model.wrt))(model, x, y)
        ...     opt.update(model, grads)
        ...     model.write()
        >>> step(model, opt, x, y)
        >>> model.values["layers.0.kernel"].shape, model.indices["layers.0.kernel"].shape
        ((3,), (3,))
    """

    def __init__(self, model: nnx.Module, k: Any, **plan: Any):
        budget = plan.get("budget", "per_tensor")
        if budget != "per_tensor":
            raise ValueError(
                f"SiftModel keeps each leaf's values and indices in fixed-size variables, so "
                f"budget={budget!r} (sizes decided at selection) cannot resize them: compute "
                f"the counts first, compact.budget_counts(grads, total, by='joint'|'mass'), "
                f"and pass them as k (a {{path: count}} mapping)."
            )
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        self.plan = Sift.create(params, k, **plan)
        trainable, state, _ = self.plan.split(params, copy=False)
        t, i = self.plan._flat(trainable), self.plan._flat(state.indices)
        values, indices = {}, {}
        for leaf, tj, ij in zip(self.plan.leaves, t, i, strict=True):
            if leaf.role == masks.SPARSE:
                values[_key(leaf.path)] = SiftValue(tj)
                indices[_key(leaf.path)] = SiftIndex(ij)
        self.model = model
        self.values = nnx.Dict(values)
        self.indices = nnx.Dict(indices)

    # -- the pieces of the plan, from the module's variables

    def _parts(self):
        graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        pure = nnx.to_pure_dict(params)
        leaves = self.plan._flat(pure)
        t, w, i, f = [], [], [], []
        for leaf, x in zip(self.plan.leaves, leaves, strict=True):
            sparse, dense = leaf.role == masks.SPARSE, leaf.role == masks.DENSE
            key = _key(leaf.path)
            t.append(self.values[key][...] if sparse else x if dense else None)
            w.append(x if sparse else None)
            i.append(self.indices[key][...] if sparse else None)
            f.append(None if sparse or dense else x)
        tree = self.plan._tree
        state = SiftState(tree(w), tree(i))
        return graphdef, params, rest, tree(t), state, tree(f)

    def _call_with(self, pure: Any, graphdef, params, rest, *args, **kwargs):
        nnx.replace_by_pure_dict(params, pure)
        return nnx.merge(graphdef, params, rest)(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the wrapped model with the sparse weights read through the compact view."""
        graphdef, params, rest, trainable, state, frozen = self._parts()
        pure = self.plan.params(trainable, state, frozen)
        return self._call_with(pure, graphdef, params, rest, *args, **kwargs)

    @property
    def wrt(self) -> nnx.filterlib.Filter:
        """The filter of what trains: the :class:`SiftValue` vectors and the dense parameters
        (give it to ``nnx.Optimizer(..., wrt=)`` and ``nnx.DiffState``)."""
        dense = {
            ("model", *leaf.path.split("/"))
            for leaf in self.plan.leaves
            if leaf.role == masks.DENSE
        }

        def is_dense(path, value):
            return tuple(str(p) for p in path) in dense and isinstance(value, nnx.Param)

        return nnx.Any(SiftValue, is_dense)

    def write(self) -> None:
        """Writes the trained values into the wrapped model's weights at their indices."""
        graphdef, params, rest, trainable, state, _ = self._parts()
        new = self.plan.write(trainable, state)
        for leaf, wj in zip(self.plan.leaves, self.plan._flat(new.weights), strict=True):
            if leaf.role == masks.SPARSE:
                _variable_at(self.model, leaf.path)[...] = wj

    def select(self, loss_fn, *args: Any, **kwargs: Any) -> None:
        """Chooses each sparse parameter's indices from ``loss_fn(model, *args, **kwargs)``'s
        gradient (the top-k inside the backward for ``selection="grad"``, otherwise the
        plan's strategy on one batch) and sets the values to the weights there.

        Call it under ``nnx.jit`` before training (dense parameters are not updated here; the
        first train step on the same batch then trains everything, like
        ``update_on_selection``)."""
        graphdef, params, rest, trainable, state, frozen = self._parts()
        plan = self.plan
        probing = plan.can_probe()

        def loss_of(args_tree, b, r):
            del r
            pure = plan._selection_params(args_tree, state, frozen, probing)
            return loss_fn(_Calls(self, pure, graphdef, params, rest), *b, **kwargs)

        sel_args = []
        for leaf, tj, wj in zip(
            plan.leaves, plan._flat(trainable), plan._flat(state.weights), strict=True
        ):
            if leaf.role == masks.SPARSE:
                sel_args.append(
                    jax.numpy.zeros(leaf.scope.probe_shape(), jax.numpy.float32) if probing else wj
                )
            else:
                sel_args.append(tj if leaf.role == masks.DENSE else None)
        _, g = jax.value_and_grad(loss_of)(plan._tree(sel_args), args, None)
        g = plan._flat(g)
        new_idx = []
        w = plan._flat(state.weights)
        j = -1
        for n, leaf in enumerate(plan.leaves):
            if leaf.role != masks.SPARSE:
                new_idx.append(None)
                continue
            j += 1
            if probing:
                new_idx.append(indexing.decode_probe(g[n]))
            else:
                s = None
                if plan.strategy.needs_grad:
                    from sift_jax._src import selection as selection_lib

                    s = selection_lib.finite_abs(g[n])
                key = jax.random.fold_in(jax.random.fold_in(plan.key, j), 0)
                new_idx.append(leaf.scope.select(plan.strategy, s, w[n], key))
        trainable, state = plan.with_indices(plan._tree(new_idx), trainable, state)
        for leaf, tj, ij in zip(
            plan.leaves, plan._flat(trainable), plan._flat(state.indices), strict=True
        ):
            if leaf.role == masks.SPARSE:
                self.values[_key(leaf.path)][...] = tj
                self.indices[_key(leaf.path)][...] = ij

    def delta(self, base: Any) -> dict:
        """The :func:`sift_jax.extract_delta` of the fine-tuned parameters against ``base``
        (``nnx.to_pure_dict`` of the pretrained ``nnx.state(model, nnx.Param)``)."""
        _, _, _, trainable, state, frozen = self._parts()
        return self.plan.delta(trainable, state, frozen, base)

    def merged(self) -> Any:
        """The fine-tuned parameters as a pure dict (what :meth:`delta` compares)."""
        _, _, _, trainable, state, frozen = self._parts()
        return self.plan.merged(trainable, state, frozen)


class _Calls:
    """A stand-in for the model during selection: calling it runs the wrapped model with the
    selection view of the parameters."""

    def __init__(self, owner, pure, graphdef, params, rest):
        self._args = (owner, pure, graphdef, params, rest)

    def __call__(self, *args, **kwargs):
        owner, pure, graphdef, params, rest = self._args
        return owner._call_with(pure, graphdef, params, rest, *args, **kwargs)


def _variable_at(module: nnx.Module, path: str) -> nnx.Variable:
    node: Any = module
    for part in path.split("/"):
        if isinstance(node, (nnx.List, list, tuple)) or (
            part.isdigit() and not hasattr(node, part) and hasattr(node, "__getitem__")
        ):
            node = node[int(part)] if part.isdigit() else node[part]
        elif hasattr(node, part):
            node = getattr(node, part)
        else:
            node = node[part]
    return node
