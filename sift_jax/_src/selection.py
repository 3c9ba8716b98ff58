"""Index selection strategies and their registry.

A strategy chooses ``k`` flat positions of one array. It is a :class:`Strategy`: a ``select``
function ``(score, param, k, key) -> int32[k]`` and, for strategies that rank entries, a
``score`` function ``(grad_score, param, key) -> float32[...]`` (same shape as ``param``) whose
top-k is the selection. Strategies with a ``score`` also work with budgets shared across
tensors (:mod:`sift_jax.compact`'s ``budget="global"``), which compare scores of different
tensors. ``grad_score`` is the accumulated ``|gradient|`` (fp32) or ``None`` when the strategy
does not need gradients.

Every strategy returns sorted ``int32[k]`` indices (the library sorts a user function's
result and checks it, see :func:`check_indices`): sorted indices keep gathers and scatters
cache friendly and make the result independent of ``top_k`` tie order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp


class SelectionFn(Protocol):
    """``(score, param, k, key) -> int32[k]``: ``k`` distinct flat indices into ``param``.

    ``score`` is the accumulated fp32 ``|gradient|`` shaped like ``param`` (``None`` for
    strategies registered with ``needs_grad=False``); ``key`` is a PRNG key unique to the leaf.
    """

    def __call__(self, score: jax.Array | None, param: jax.Array, k: int, key: jax.Array) -> Any:
        """Returns the chosen indices."""


ScoreFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A registered selection strategy.

    Attributes:
        name: registry name (``--selection`` choice in the trainers).
        select: ``(score, param, k, key) -> int32[k]``.
        needs_grad: whether ``score`` (the accumulated ``|g|``) is used; gradient-free
            strategies let the compact path skip computing the dense weight gradient.
        score: ``(grad_score, param, key) -> float32`` ranking shaped like ``param`` (top-k of
            it = ``select``), or ``None`` for strategies that only choose.
        in_backward: the strategy is the top-k of ``|g|`` of one batch, so the compact path may
            take it inside the backward pass (:func:`sift_jax.compact.topk_probe`).
    """

    name: str
    select: SelectionFn
    needs_grad: bool = True
    score: ScoreFn | None = None
    in_backward: bool = False


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


def finite_abs(x: jax.Array) -> jax.Array:
    """``|x|`` in fp32 with NaN and inf mapped to -1, so they never win a top-k.

    Example:
        >>> import jax.numpy as jnp
        >>> finite_abs(jnp.array([-2.0, jnp.nan, jnp.inf])).tolist()
        [2.0, -1.0, -1.0]
    """
    a = jnp.abs(x).astype(jnp.float32)  # complex: the modulus
    return jnp.where(jnp.isfinite(a), a, -1.0)


def leaf_key(key: jax.Array, leaf_number: int, step: Any) -> jax.Array:
    """The PRNG key of the ``leaf_number``-th sparse leaf's selection at ``step``.

    Example:
        >>> import jax
        >>> leaf_key(jax.random.key(0), 1, 0).shape
        ()
    """
    return jax.random.fold_in(jax.random.fold_in(key, leaf_number), step)


def _grad_score(score, param, key):
    del param, key
    return score


def _magnitude_score(score, param, key):
    del score, key
    return finite_abs(param)


def _random_score(score, param, key):
    del score
    return jax.random.uniform(key, param.shape)


def _row_balanced_score(score, param, key):
    del param, key
    if score.ndim < 2:
        return score
    rows = score.reshape(-1, score.shape[-1])
    rms = jnp.sqrt(jnp.mean(jnp.square(rows), axis=-1, keepdims=True))
    tiny = jnp.finfo(rows.dtype).tiny
    return (rows / jnp.maximum(rms, tiny)).reshape(score.shape)


def _from_score(score_fn: ScoreFn) -> SelectionFn:
    def select(score, param, k, key):
        return topk_indices(score_fn(score, param, key), k)

    return select


def select_by_gradient(score: jax.Array, param: Any, k: int, key: jax.Array) -> jax.Array:
    """Top-k of the accumulated ``|gradient|`` (the paper's selection).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> select_by_gradient(jnp.array([0.0, 4.0, 1.0, 3.0]), None, 2, jax.random.key(0)).tolist()
        [1, 3]
    """
    return topk_indices(_grad_score(score, param, key), k)


def select_row_balanced(score: jax.Array, param: Any, k: int, key: jax.Array) -> jax.Array:
    """Top-k of ``|g|`` divided by the RMS of ``|g|`` over its row (``"grad-row"``).

    A kernel's rows are its input features (flax's ``[in, out]`` layout; every axis but the
    last for higher ranks; 1-D leaves such as biases keep plain ``|g|``). ``|g_ij|`` scales
    with the size of input feature ``i``, so in a pretrained transformer the paper's top-k
    of ``|g|`` gathers in the few "outlier" input features: in the packaged MiniLM's value
    kernels 5 of 384 rows hold 49-77% of the rate-0.008 selection. Dividing by the row's
    RMS ranks each entry against its own row, so the same budget spreads over the rows
    while each row still keeps its largest entries. Measured, it is **worse** than plain
    ``"grad"`` for SIFT on GLUE CoLA (Matthews 7.2 vs 18.4, ``bench.glue_small``
    ``sift-head-lr-row``, one seed): the outlier features are where the increments pay. It is
    kept as a selection ablation, not a recommendation.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> g = jnp.array([[100.0, 90.0, 1.0], [1.0, 0.1, 0.2]])   # row 0 is an outlier feature
        >>> select_by_gradient(g.ravel(), None, 2, jax.random.key(0)).tolist()
        [0, 1]
        >>> select_row_balanced(g, None, 2, jax.random.key(0)).tolist()
        [0, 3]
    """
    return topk_indices(_row_balanced_score(score, param, key), k)


def select_by_magnitude(score: Any, param: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """Top-k of ``|param|`` (largest pretrained weights).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> select_by_magnitude(None, jnp.array([-9.0, 1.0, 2.0]), 1, jax.random.key(0)).tolist()
        [0]
    """
    return topk_indices(_magnitude_score(score, param, key), k)


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


_REGISTRY: dict[str, Strategy] = {}


def register(
    name: str,
    select: SelectionFn | None = None,
    *,
    score: ScoreFn | None = None,
    needs_grad: bool = True,
    in_backward: bool = False,
    overwrite: bool = False,
) -> Strategy:
    """Registers a selection strategy under ``name``; returns it.

    Give ``score`` (a ranking; the strategy is then its top-k and also works with global
    budgets) or ``select`` (indices directly), or both.

    Example:
        >>> import jax.numpy as jnp
        >>> s = register("smallest_weights", score=lambda g, p, key: -jnp.abs(p),
        ...              needs_grad=False)
        >>> s.name in names()
        True
        >>> _ = unregister("smallest_weights")
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"A strategy name must be a non-empty string, got {name!r}.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"Selection strategy {name!r} is already registered; pass overwrite=True.")
    if select is None and score is None:
        raise ValueError(f"Strategy {name!r}: give `select`, `score` or both.")
    if select is None:
        select = _from_score(score)
    if not callable(select) or (score is not None and not callable(score)):
        raise TypeError(f"Strategy {name!r}: `select` and `score` must be callables.")
    strategy = Strategy(name, select, bool(needs_grad), score, bool(in_backward))
    _REGISTRY[name] = strategy
    return strategy


def unregister(name: str) -> Strategy:
    """Removes a registered strategy (built-ins included) and returns it.

    Example:
        >>> _ = register("tmp", score=lambda g, p, key: g)
        >>> unregister("tmp").name
        'tmp'
    """
    return _REGISTRY.pop(name)


def names() -> list[str]:
    """Sorted names of the registered strategies.

    Example:
        >>> [n for n in names() if n in ("grad", "magnitude", "random")]
        ['grad', 'magnitude', 'random']
    """
    return sorted(_REGISTRY)


def get(selection: str | SelectionFn | Strategy) -> Strategy:
    """The :class:`Strategy` for a registered name, a :class:`Strategy`, or a bare callable
    (treated as a gradient-based ``select`` function, not usable with global budgets).

    Example:
        >>> get("random").needs_grad
        False
    """
    if isinstance(selection, Strategy):
        return selection
    if isinstance(selection, str):
        if selection not in _REGISTRY:
            raise ValueError(
                f"Unknown selection {selection!r}; registered: {names()}. Register a new one "
                "with sift_jax.selection.register(name, select=..., score=...) or pass a "
                "callable (score, param, k, key) -> int32[k]."
            )
        return _REGISTRY[selection]
    if callable(selection):
        name = getattr(selection, "__name__", "callable")
        return Strategy(name, selection, needs_grad=True, score=None)
    raise TypeError(f"`selection` must be a string or a callable, got {type(selection).__name__}.")


register("grad", select_by_gradient, score=_grad_score, needs_grad=True, in_backward=True)
register("grad-row", select_row_balanced, score=_row_balanced_score, needs_grad=True)
register("magnitude", select_by_magnitude, score=_magnitude_score, needs_grad=False)
register("random", select_random, score=_random_score, needs_grad=False)


def run(strategy: Strategy, score: Any, param: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """Runs ``strategy`` on one array and returns sorted, checked ``int32[k]`` indices.

    A gradient score has NaN/inf entries mapped below every finite one first, so a diverged
    gradient entry never wins. Indices of a user function are sorted and checked for range
    and duplicates (see :func:`check_indices`).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> run(get("grad"), jnp.array([1.0, jnp.nan, 3.0]), None, 1, jax.random.key(0)).tolist()
        [2]
    """
    if score is not None:
        score = jnp.where(jnp.isfinite(score), score, -1.0)
    ref = param if param is not None else score
    idx = jnp.asarray(strategy.select(score, ref, k, key), jnp.int32).reshape(-1)
    if idx.shape != (k,):
        raise ValueError(
            f"Selection {strategy.name!r} returned {idx.shape[0]} indices for a leaf that trains "
            f"{k}; a selection function must return exactly k indices."
        )
    if strategy.name in _BUILTIN:
        return idx
    return check_indices(jnp.sort(idx), math.prod(ref.shape), strategy.name)


_BUILTIN = frozenset(("grad", "grad-row", "magnitude", "random"))


def check_indices(idx: jax.Array, n: int, name: str = "selection") -> jax.Array:
    """Checks sorted indices for range and duplicates (inside ``jit`` too).

    Out-of-range or repeated indices would silently drop or double updates, so they raise
    (via ``jax.debug``-free checking: an invalid set is turned into an error at run time
    with :func:`jax.experimental.checkify`-style ``error_if``).

    Example:
        >>> import jax.numpy as jnp
        >>> check_indices(jnp.array([0, 2], jnp.int32), 3).tolist()
        [0, 2]
    """
    bad_range = (idx < 0) | (idx >= n)
    dup = jnp.concatenate([jnp.zeros((1,), bool), idx[1:] == idx[:-1]]) if idx.size else idx < 0
    return _error_if(
        idx,
        jnp.any(bad_range) | jnp.any(dup),
        f"Selection {name!r} returned out-of-range (valid: 0..{n - 1}) or repeated indices; "
        "a selection function must return k distinct flat indices into the leaf.",
    )


def _error_if(x: jax.Array, bad: jax.Array, msg: str) -> jax.Array:
    """``x``, raising ``ValueError(msg)`` when ``bad`` is true (eagerly, or at run time under
    ``jit`` through a host callback)."""
    if not isinstance(bad, jax.core.Tracer):
        if bool(bad):
            raise ValueError(msg)
        return x

    def check(b):
        if b:
            raise ValueError(msg)

    jax.debug.callback(check, bad, ordered=False)
    return x
