"""The optimiser every method uses: clip + AdamW with HF's decay mask, a warmup schedule, and a
guard that skips non-finite steps."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sift_jax.paths import path_to_str
from train.core.config import OptimConfig


def decay_mask(tree: Any) -> Any:
    """AdamW decay mask: no decay on biases, LayerNorm/RMSNorm scales and embeddings' norms.

    Example:
        >>> decay_mask({"dense": {"kernel": 1.0, "bias": 0.0}, "LayerNorm": {"scale": 1.0}})
        {'LayerNorm': {'scale': False}, 'dense': {'bias': False, 'kernel': True}}
    """

    def keep(path, _):
        p = path_to_str(path).lower()
        return not (p.endswith("bias") or "norm" in p or p.endswith("scale"))

    return jax.tree_util.tree_map_with_path(keep, tree)


def make_schedule(lr: float, total_steps: int, warmup_ratio: float, kind: str = "linear"):
    """Linear warmup then linear decay to 0 (HF's default), or warmup then constant.

    Example:
        >>> s = make_schedule(1.0, 100, 0.1)
        >>> float(s(0)), float(s(10)), float(s(100))
        (0.0, 1.0, 0.0)
    """
    warmup = int(math.ceil(warmup_ratio * total_steps))
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
            [warmup],
        )
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, lr, max(warmup, 1)),
            optax.linear_schedule(lr, 0.0, max(total_steps - warmup, 1)),
        ],
        [warmup],
    )


def adamw(
    cfg: OptimConfig,
    schedule,
    mask=decay_mask,
    dense: Callable[[str], bool] | None = None,
) -> optax.GradientTransformation:
    """Clip + AdamW with HF's decay mask (or ``mask``), as configured by ``cfg`` (its first
    moment in ``cfg.adam_mu_dtype``).

    ``dense(path) -> bool`` names the trainable leaves trained densely beside sparse
    increments or adapters; with ``cfg.dense_learning_rate`` their updates are AdamW's at that
    peak rate instead (the same schedule, scaled: AdamW's update is linear in the rate, weight
    decay included). A method without such leaves passes ``None`` and the flag is refused.

    Example:
        >>> tx = adamw(OptimConfig(), make_schedule(1e-3, 10, 0.1))
        >>> isinstance(tx, optax.GradientTransformation)
        True
        >>> import jax.numpy as jnp
        >>> cfg = OptimConfig(learning_rate=1e-3, dense_learning_rate=1e-2, max_grad_norm=0)
        >>> tx = adamw(cfg, 1e-3, dense=lambda path: path.startswith("head"))
        >>> p = {"head": jnp.ones(1), "w": jnp.ones(1)}
        >>> u, _ = tx.update({"head": jnp.ones(1), "w": jnp.ones(1)}, tx.init(p), p)
        >>> [round(float(u[k][0]), 4) for k in ("head", "w")]
        [-0.011, -0.0011]
        >>> tx = adamw(OptimConfig(adam_mu_dtype="bfloat16"), 1e-3)
        >>> [x.dtype.name for x in jax.tree.leaves(tx.init({"w": jnp.ones(2)}))[1:3]]
        ['bfloat16', 'float32']
    """
    parts = []
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.adam_beta1,
            b2=cfg.adam_beta2,
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
            mask=mask,
            mu_dtype=None if cfg.adam_mu_dtype == "auto" else jnp.dtype(cfg.adam_mu_dtype),
        )
    )
    if cfg.dense_learning_rate:
        if dense is None:
            raise ValueError(
                "--dense_learning_rate sets the rate of the tensors trained densely beside "
                "sparse increments or adapters; with this --finetuning_type every tensor is "
                "trained at --learning_rate. Drop --dense_learning_rate."
            )
        parts.append(scale_leaves(cfg.dense_learning_rate / cfg.learning_rate, dense))
    return optax.chain(*parts)


def scale_leaves(factor: float, which: Callable[[str], bool]) -> optax.GradientTransformation:
    """``optax.scale(factor)`` on the leaves whose ``/``-joined path ``which`` accepts
    (``optax.masked``); refuses, at ``init``, a tree in which it accepts no leaf (a flag that
    would change nothing).

    Example:
        >>> import jax.numpy as jnp
        >>> tx = scale_leaves(10.0, lambda p: p == "a")
        >>> p = {"a": jnp.ones(1), "b": jnp.ones(1)}
        >>> u, _ = tx.update({"a": jnp.ones(1), "b": jnp.ones(1)}, tx.init(p), p)
        >>> float(u["a"][0]), float(u["b"][0])
        (10.0, 1.0)
    """

    def mask(tree):
        out = jax.tree_util.tree_map_with_path(lambda path, _: which(path_to_str(path)), tree)
        if not any(jax.tree.leaves(out)):
            raise ValueError(
                "--dense_learning_rate: no tensor is trained densely (--sparse_exception / "
                "--lora_exception matched no parameter), so it would change nothing."
            )
        return out

    return optax.masked(optax.scale(factor), mask)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optax.apply_if_finite`` that never lets a non-finite step through: such a step
    changes nothing (zero updates, state kept); the loop reads the counts
    (:func:`nonfinite_counts`) and stops after too many in a row.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = skip_nonfinite(optax.sgd(1.0))
        >>> u, s = tx.update({"w": jnp.array([jnp.nan])}, tx.init({"w": jnp.ones(1)}))
        >>> u["w"].tolist(), nonfinite_counts(s)
        ([0.0], (1, 1))
    """
    return optax.apply_if_finite(inner, max_consecutive_errors=2**31 - 1)


def nonfinite_counts(opt_state: Any) -> tuple[int, int]:
    """``(consecutive, total)`` skipped non-finite steps of a :func:`skip_nonfinite` state."""
    return int(opt_state.notfinite_count), int(opt_state.total_notfinite)
