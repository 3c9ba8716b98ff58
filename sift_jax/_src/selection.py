"""Index selection strategies: pure functions choosing ``k`` flat positions of one array.

Every strategy returns sorted ``int32[k]`` flat (row-major) indices. Sorting keeps the later
gathers and scatters cache friendly and makes the result independent of ``top_k`` tie order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# (score, param, k, key) -> int32[k]; score is the accumulated |gradient| (flat, fp32).
SelectionFn = Callable[[jax.Array, jax.Array, int, jax.Array], jax.Array]


def count_for_rate(rate: float, n: int) -> int:
    """The paper's rule: ``k = min(int(rate * n) + 1, n)``.

    Example:
        >>> count_for_rate(0.008, 1024 * 1024), count_for_rate(1.0, 10)
        (8389, 10)
    """
    return min(int(rate * n) + 1, n)


def topk_indices(score: jax.Array, k: int) -> jax.Array:
    """Sorted flat indices of the ``k`` largest entries of ``score`` (any shape).

    Example:
        >>> import jax.numpy as jnp
        >>> topk_indices(jnp.array([[0.1, -5.0], [3.0, 2.0]]), 2).tolist()
        [2, 3]
    """
    flat = score.reshape(-1)
    if k == flat.shape[0]:
        return jnp.arange(k, dtype=jnp.int32)
    _, idx = jax.lax.top_k(flat, k)
    return jnp.sort(idx.astype(jnp.int32))


def select_by_gradient(score: jax.Array, param: Any, k: int, key: jax.Array) -> jax.Array:
    """Top-k of the accumulated ``|gradient|`` (the paper's selection).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> select_by_gradient(jnp.array([0.0, 4.0, 1.0, 3.0]), None, 2, jax.random.key(0)).tolist()
        [1, 3]
    """
    del param, key
    return topk_indices(score, k)


def select_by_magnitude(score: Any, param: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """Top-k of ``|param|`` (largest pretrained weights).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> select_by_magnitude(None, jnp.array([-9.0, 1.0, 2.0]), 1, jax.random.key(0)).tolist()
        [0]
    """
    del score, key
    return topk_indices(jnp.abs(param.astype(jnp.float32)), k)


def select_random(score: Any, param: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """``k`` distinct positions drawn uniformly at random (the paper's random baseline).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> idx = select_random(None, jnp.zeros((4, 4)), 5, jax.random.key(0))
        >>> idx.shape, len(set(idx.tolist()))
        ((5,), 5)
    """
    del score
    n = math.prod(param.shape)
    return topk_indices(jax.random.uniform(key, (n,)), k)


SELECTIONS: dict[str, SelectionFn] = {
    "grad": select_by_gradient,
    "magnitude": select_by_magnitude,
    "random": select_random,
}


def resolve_selection(selection: str | SelectionFn) -> tuple[SelectionFn, bool]:
    """Returns ``(fn, needs_gradient)`` for a selection name or callable.

    A user callable is assumed to want the accumulated gradient score.

    Example:
        >>> resolve_selection("random")[1]
        False
    """
    if isinstance(selection, str):
        if selection not in SELECTIONS:
            raise ValueError(
                f"Unknown selection {selection!r}; use one of {sorted(SELECTIONS)} or a callable "
                "(score, param, k, key) -> int32[k]."
            )
        return SELECTIONS[selection], selection == "grad"
    if callable(selection):
        return selection, True
    raise TypeError(f"`selection` must be a string or a callable, got {type(selection).__name__}.")
