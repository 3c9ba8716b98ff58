"""Functional use of the NNX models: split once, train a nested dict of arrays, merge per call.

Recommended pattern for trainers::

    graphdef, params = split_params(model)          # params: {"encoder": {"layers": {"0": ...}}}
    def loss(params, batch, key):
        logits = functional_apply(graphdef, params, None, batch["input_ids"],
                                  batch["attention_mask"], deterministic=False,
                                  rngs=nnx.Rngs(dropout=key))
        ...
    jax.jit(jax.grad(loss))(params, batch, key)

Layer keys are strings (``"0"``, ``"1"``, ...), so ``/``-joined paths read
``encoder/layers/3/attention/query/kernel`` and a dict rebuilt from such paths merges back.
The models hold no state besides ``nnx.Param`` (dropout randomness is passed per call), so
``other_state`` is normally ``None``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """``(graphdef, params)`` with ``params`` a nested dict of arrays (string keys).

    Example:
        >>> from train.models.decoder import LlamaConfig, LlamaForCausalLM
        >>> g, p = split_params(LlamaForCausalLM(LlamaConfig.tiny(), rngs=nnx.Rngs(0)))
        >>> p["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"].shape
        (32, 32)
    """
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def functional_apply(
    graphdef: nnx.GraphDef,
    pure_params: dict[str, Any],
    other_state: Any = None,
    *args: Any,
    method: str | None = None,
    **kwargs: Any,
) -> Any:
    """Rebuilds the model from ``graphdef`` + params (+ other state) and calls it.

    Args:
        graphdef: from :func:`split_params` / ``nnx.split(model, nnx.Param)``.
        pure_params: nested dict of arrays (``nnx.to_pure_dict`` of the params), possibly
            traced (inside ``jit`` / ``grad``).
        other_state: any non-Param state split off separately, or ``None``.
        *args: positional arguments of the call.
        method: call this method instead of ``__call__`` (e.g. ``"hidden_states"``).
        **kwargs: keyword arguments (``deterministic=False, rngs=nnx.Rngs(dropout=key)``).

    Example:
        >>> import jax.numpy as jnp
        >>> from train.models.encoder import EncoderConfig, EncoderModel
        >>> m = EncoderModel(EncoderConfig.tiny(), rngs=nnx.Rngs(0))
        >>> g, p = split_params(m)
        >>> functional_apply(g, p, None, jnp.array([[2, 3]]), method="hidden_states").shape
        (1, 2, 32)
    """
    states = [pure_params] + ([other_state] if other_state is not None else [])
    model = nnx.merge(graphdef, *states)
    fn = model if method is None else getattr(model, method)
    return fn(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class ModelApply:
    """``(params, *args, **kwargs) -> model(*args, **kwargs)`` for a fixed ``graphdef``
    (``method``: call that method instead); hashable, so a static ``jit`` argument.

    Example:
        >>> import jax.numpy as jnp
        >>> from train.models.encoder import EncoderConfig, EncoderModel
        >>> g, p = split_params(EncoderModel(EncoderConfig.tiny(), rngs=nnx.Rngs(0)))
        >>> ModelApply(g)(p, jnp.array([[2, 3]])).pooler_output.shape
        (1, 32)
    """

    graphdef: Any
    method: str | None = None

    def __call__(self, params: Any, *args: Any, **kwargs: Any) -> Any:
        return functional_apply(self.graphdef, params, None, *args, method=self.method, **kwargs)
