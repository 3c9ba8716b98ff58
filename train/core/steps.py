"""The jitted steps every method shares: gradient accumulation, the train step, evaluation.

Benchmarks call these same builders (``bench.train_step``, ``bench.memory``), so what they
time or compile is what the trainer runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.core import mesh as mesh_lib
from train.core.methods.base import Method, TrainState
from train.core.task import Task


def make_accum_grads(accum: int) -> Callable:
    """``grad_fn(loss_of, args, batch, rng) -> (loss, grads)`` averaged over ``accum``
    micro-batches.

    ``loss_of(args, micro_batch, rng)``; with ``accum > 1`` the batch leaves carry a leading
    ``[accum]`` dim and a ``lax.scan`` sums the gradients (one gradient tree live at a time).

    Example:
        >>> f = make_accum_grads(2)
        >>> loss, g = f(lambda a, b, r: jnp.sum(a * b), jnp.ones(2), jnp.array([[1.0, 0], [3, 0]]),
        ...             jax.random.key(0))
        >>> float(loss), g.tolist()
        (2.0, [2.0, 0.0])
    """

    def accum_grads(loss_of, args, batch, rng):
        grad_fn = jax.value_and_grad(loss_of)
        if accum == 1:
            return grad_fn(args, batch, rng)
        rngs = jax.random.split(rng, accum)

        def micro(carry, xs):
            mb, r = xs
            loss_i, g = grad_fn(args, mb, r)
            return (jax.tree.map(jnp.add, carry[0], g), carry[1] + loss_i), None

        zeros = jax.tree.map(jnp.zeros_like, args)
        (grads, loss), _ = jax.lax.scan(micro, (zeros, 0.0), (batch, rngs))
        return loss / accum, jax.tree.map(lambda g: g / accum, grads)

    return accum_grads


def make_train_step(method: Method, task: Task, accum: int) -> Callable:
    """The jitted optimizer step (trainable, opt_state and buffers donated):
    ``step(trainable, opt_state, buffers, frozen, batch, rng) -> (trainable, opt_state,
    buffers, metrics)``.

    Gradients over ``accum`` micro-batches, one optimizer update, the method's in-place buffer
    update. Metrics: ``loss``, ``grad_norm`` and the non-finite step counts of the optimizer's
    guard (:func:`train.core.optim.skip_nonfinite`).
    """
    accum_grads = make_accum_grads(accum)
    opt = method.optimizer

    def step(trainable, opt_state, buffers, frozen, batch, rng):
        def loss_of(t, b, r):
            return task.loss_of_params(method.loss_params(t, buffers, frozen), b, r)

        loss, grads = accum_grads(loss_of, trainable, batch, rng)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        buffers = method.after_update(trainable, buffers)
        return trainable, opt_state, buffers, step_metrics(loss, grads, opt_state)

    return jax.jit(step, donate_argnums=(0, 1, 2))


def step_metrics(loss, grads, opt_state) -> dict:
    """The per-step metrics: loss, gradient norm and the guard's non-finite counts."""
    out = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    if hasattr(opt_state, "notfinite_count"):
        out["nonfinite"] = opt_state.notfinite_count
    return out


def run_train_step(step_fn, state: TrainState, frozen, batch, rng) -> tuple[TrainState, dict]:
    """Calls a :func:`make_train_step` step on a :class:`TrainState`."""
    trainable, opt_state, buffers, metrics = step_fn(
        state.trainable, state.opt_state, state.buffers, frozen, batch, rng
    )
    return TrainState(trainable, opt_state, buffers, state.extra), metrics


def make_eval_fn(method: Method, task: Task) -> Callable:
    """The jitted forward used by :func:`evaluate` (build once, reuse every evaluation)."""

    def run(trainable, buffers, frozen, batch):
        params = method.eval_params(trainable, buffers, frozen)
        out = task.apply_fn(params, batch, jax.random.key(0), False)
        return task.eval_outputs(out, batch) if task.eval_outputs else out

    return jax.jit(run)


def evaluate(
    method: Method, task: Task, state: TrainState, frozen: Any, eval_bs: int, mesh, eval_fn=None
) -> dict:
    """Runs every eval set and returns HF-style ``eval_*`` metrics (gathered from every
    process, so each process computes the same numbers)."""
    from jax.experimental import multihost_utils

    eval_fn = eval_fn or make_eval_fn(method, task)
    metrics: dict[str, float] = {}
    for name, batches_fn in task.eval_sets.items():
        outs, kept = [], []
        for batch in batches_fn(eval_bs):
            dev = mesh_lib.put_batch(batch, mesh)
            out = eval_fn(state.trainable, state.buffers, frozen, dev)
            out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
            mask = batch["example_mask"].astype(bool)
            outs.append(out[mask])
            kept.append({k: v[mask] for k, v in batch.items()})
        metrics.update(task.metrics_fn(name, np.concatenate(outs), kept))
    return metrics
