"""``lora``: low-rank adapters ``W + (alpha / r) A B`` on the ``--lora_targets`` kernels, plus
the dense ``--lora_exception`` tensors."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from sift_jax.paths import flatten_paths, unflatten_paths
from train.core.config import LoraConfig, OptimConfig, section
from train.core.methods import register
from train.core.methods.base import Method, check_patterns
from train.core.optim import adamw


def _matches(patterns, path):
    return any(re.search(p, path) for p in patterns)


@register
class Lora(Method):
    """LoRA: ``trainable = {"adapters": {path: {lora_a, lora_b}}, "dense": ...}``, the frozen
    params are the whole pretrained tree (``B`` starts at zero, so step 0 is the base model).

    Example:
        >>> from train.core.config import TrainConfig
        >>> from train.core.optim import make_schedule
        >>> p = {"attention": {"query": {"kernel": jnp.ones((4, 6))}}, "classifier": jnp.ones(2)}
        >>> m = Lora(p, TrainConfig(finetuning_type="lora", lora_rank=2,
        ...          lora_targets=["query"]), make_schedule(1e-3, 10, 0.0), jax.random.key(0))
        >>> m.num_trainable  # (4 + 6) * 2 + 2
        22
    """

    name = "lora"

    def __init__(self, params, cfg, schedule, rng):
        lc = section(cfg, LoraConfig)
        check_patterns(params, lc.lora_targets, "--lora_targets")
        flat = flatten_paths(params)
        r, self.scale = lc.lora_rank, lc.lora_alpha / lc.lora_rank
        adapters, dense = {}, {}
        keys = iter(jax.random.split(rng, len(flat)))
        for path, w in flat.items():
            if _matches(lc.lora_exception, path):
                dense[path] = w if isinstance(w, jax.ShapeDtypeStruct) else jnp.copy(w)
            elif _matches(lc.lora_targets, path) and len(w.shape) >= 2 and path.endswith("kernel"):
                d_in, d_out = w.shape[0], math.prod(w.shape[1:])
                a = jax.random.normal(next(keys), (d_in, r), jnp.float32) / math.sqrt(d_in)
                adapters[path] = {
                    "lora_a": a.astype(w.dtype),
                    "lora_b": jnp.zeros((r, d_out), w.dtype),
                }
        if not adapters:
            raise ValueError("--lora_targets matched no kernel with >= 2 dims.")
        self.trainable = {"adapters": adapters, "dense": unflatten_paths(dense)}
        self.buffers, self.frozen = None, params
        self.optimizer = adamw(
            section(cfg, OptimConfig), schedule, dense=lambda path: path.startswith("dense/")
        )

    def loss_params(self, trainable, buffers, frozen):
        out = flatten_paths(frozen)
        out.update(flatten_paths(trainable["dense"]))
        for path, ab in trainable["adapters"].items():
            w = out[path]
            delta = (ab["lora_a"] @ ab["lora_b"]) * self.scale
            out[path] = w + delta.reshape(w.shape).astype(w.dtype)
        return unflatten_paths(out)
