"""Selection strategies: the :class:`SelectionFn` protocol and a registry.

A new strategy is one function and one registration::

    sift_jax.selection.register("smallest", score=lambda g, p, key: -jnp.abs(p), needs_grad=False)

after which ``sparse_increment(..., selection="smallest")``, :class:`sift_jax.compact.Sift`
and the trainers' ``--selection smallest`` all use it.
"""

from sift_jax._src.selection import (
    SelectionFn,
    Strategy,
    check_indices,
    count_for_rate,
    finite_abs,
    get,
    leaf_key,
    names,
    register,
    select_by_gradient,
    select_by_magnitude,
    select_random,
    select_row_balanced,
    topk_indices,
    unregister,
)

__all__ = [
    "SelectionFn",
    "Strategy",
    "check_indices",
    "count_for_rate",
    "finite_abs",
    "get",
    "leaf_key",
    "names",
    "register",
    "select_by_gradient",
    "select_by_magnitude",
    "select_random",
    "select_row_balanced",
    "topk_indices",
    "unregister",
]
