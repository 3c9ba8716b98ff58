"""``full``: every parameter trains with AdamW."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from train.core.config import OptimConfig, section
from train.core.methods import register
from train.core.methods.base import Method
from train.core.optim import adamw


@register
class Full(Method):
    """Full fine-tuning: ``trainable`` is the whole parameter tree (a copy; the step donates it).

    Example:
        >>> from train.core.config import TrainConfig
        >>> from train.core.optim import make_schedule
        >>> m = Full({"w": jnp.ones(3)}, TrainConfig(finetuning_type="full"),
        ...          make_schedule(1e-3, 10, 0.0), None)
        >>> m.num_trainable
        3
    """

    name = "full"

    def __init__(self, params, cfg, schedule, rng):
        del rng
        self.trainable = jax.tree.map(_copy, params)
        self.buffers, self.frozen = None, None
        self.optimizer = adamw(section(cfg, OptimConfig), schedule)

    def loss_params(self, trainable, buffers, frozen):
        return trainable


def _copy(x):
    return x if isinstance(x, jax.ShapeDtypeStruct) else jnp.copy(x)
