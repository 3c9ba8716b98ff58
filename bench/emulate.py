"""STUDY ONLY: the original PyTorch SIFT code's quirks, reproduced for the comparison in
``docs/results.md`` (part 4 of the study). Not used by the trainers.

Importing this module registers the method ``sift_emulated`` (the trainer's SIFT plus the
chosen quirks) and :class:`EmulateGlueConfig` adds its flag ``--sift_emulate``:

* ``lagged``: each update of the selected values is applied one step late (the original
  merged an increment into its weight during the next backward, after that step's forward
  had run, so every gradient was taken at parameters missing the latest sparse update, and
  the last update was never applied);
* ``no_selection_update``: the selection batch updates nothing, not even the dense leaves;
* ``no_sparse_decay``: no weight decay on the selected weights (the original decayed a freshly
  zeroed increment, i.e. nothing).

``python -m bench.sweep`` runs these through ``train.glue.run`` with an
:class:`EmulateGlueConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from train.core.config import OptimConfig, flag, section
from train.core.methods import register
from train.core.methods.base import TrainState
from train.core.methods.sift import Sift
from train.core.optim import adamw, decay_mask
from train.glue import GlueConfig

QUIRKS = ("lagged", "no_selection_update", "no_sparse_decay")


class LaggedState(NamedTuple):
    """State of :func:`lag_sparse`: the inner state and the sparse update not yet applied."""

    inner: Any
    pending: Any


def lag_sparse(inner: optax.GradientTransformation, is_sparse: Any) -> optax.GradientTransformation:
    """Applies the updates of the leaves where ``is_sparse`` (a bool tree like the params) one
    step late; the others at once.

    Example:
        >>> opt = lag_sparse(optax.sgd(1.0), {"s": True, "d": False})
        >>> p = {"s": jnp.zeros(2), "d": jnp.zeros(1)}
        >>> u, st = opt.update({"s": jnp.ones(2), "d": jnp.ones(1)}, opt.init(p))
        >>> u["s"].tolist(), u["d"].tolist()
        ([0.0, 0.0], [-1.0])
        >>> opt.update({"s": jnp.ones(2), "d": jnp.ones(1)}, st)[0]["s"].tolist()
        [-1.0, -1.0]
    """

    def init(params):
        return LaggedState(inner.init(params), jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        updates, inner_state = inner.update(grads, state.inner, params)
        out = jax.tree.map(lambda s, u, p: p if s else u, is_sparse, updates, state.pending)
        return out, LaggedState(inner_state, updates)

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass
class EmulateGlueConfig(GlueConfig):
    """``train.glue``'s flags plus the study's ``--sift_emulate`` (used with
    ``--finetuning_type sift_emulated``)."""

    sift_emulate: list[str] = flag(
        [],
        "STUDY ONLY (--finetuning_type sift_emulated): reproduce quirks of the original "
        "PyTorch code: lagged | no_selection_update | no_sparse_decay.",
    )

    def __post_init__(self):
        GlueConfig.__post_init__(self)
        bad = sorted(set(self.sift_emulate) - set(QUIRKS))
        if bad:
            raise ValueError(f"--sift_emulate: unknown quirk(s) {bad}; known: {list(QUIRKS)}.")


@register
class SiftEmulated(Sift):
    """The trainer's SIFT with the original code's quirks (``cfg.sift_emulate``)."""

    name = "sift_emulated"

    def __init__(self, params, cfg, schedule, rng):
        super().__init__(params, cfg, schedule, rng)
        self.quirks = set(getattr(cfg, "sift_emulate", ()))
        self.is_sparse = is_sparse = _sparse_flags(self.plan)
        mask = decay_mask
        if "no_sparse_decay" in self.quirks:

            def mask(tree):
                return jax.tree.map(lambda d, s: d and not s, decay_mask(tree), is_sparse)

        opt = adamw(section(cfg, OptimConfig), schedule, mask)
        if "lagged" in self.quirks:
            opt = lag_sparse(opt, is_sparse)
        self.optimizer = opt

    def phase_step(self, phase, loss_of_params, grad_fn, accum):
        run = super().phase_step(phase, loss_of_params, grad_fn, accum)
        if "no_selection_update" not in self.quirks or phase == "reselect":
            return run

        def no_update(state: TrainState, frozen, batch, rng, step):
            keep_dense = jax.tree.map(jnp.copy, state.trainable)
            keep_opt = jax.tree.map(jnp.copy, state.opt_state)
            new, aux = run(state, frozen, batch, rng, step)
            # the new selection (indices, values = the weights there) stands; nothing trained
            trainable = jax.tree.map(
                lambda s, n, o: n if s else o, self.is_sparse, new.trainable, keep_dense
            )
            return TrainState(trainable, keep_opt, new.buffers, new.extra), aux

        no_update.jitted = run.jitted
        return no_update


def _sparse_flags(plan) -> Any:
    """``True`` / ``False`` for sparse / dense leaves, ``None`` (no leaf) for frozen ones:
    shaped like the trainable tree."""
    flags = [
        True if leaf.role == "sparse" else False if leaf.role == "dense" else None
        for leaf in plan.leaves
    ]
    return plan._tree(flags)
