"""Gradient quasi-sparsity: how much of a gradient the top-x% of its entries (by ``|g|``) hold.

The SIFT paper motivates sparse updates by observing that a small fraction of the entries of a
pretrained model's gradient carries most of its norm. :func:`gradient_sparsity` measures that,
per leaf and over the whole tree (one global top-x% across all leaves), as

* ``norm_ratio = ||g_top||_2 / ||g||_2`` (what the original code reported), and
* ``energy_share = ||g_top||_2^2 / ||g||_2^2`` (its square: the share of squared norm).

For a fraction ``x`` of ``n`` entries the top count is ``k = max(1, int(x * n))`` (floor, at
least one entry). Ties at the threshold are counted once each up to ``k``, so the result is the
exact top-``k`` sum whatever the ties.

How it is computed, without concatenating or sorting the tree: the ``k``-th largest ``|g|``
is found by bisection over float32 bit patterns (for non-negative floats their order is the
order of the integers), counting ``|g| >= t`` leaf by leaf, 31 passes; then
``sum_{|g| > t} g^2 + (k - #{|g| > t}) t^2``. Values are scaled by the maximum ``|g|``
first, so squares neither overflow nor underflow float32. A leaf (or tree) whose gradient is
all zeros, or holds ``inf``/``nan``, reports ``nan`` shares.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sift_jax._src.paths import path_to_str

_INF_BITS = 0x7F800000


def top_count(fraction: float, n: int) -> int:
    """Entries in the top ``fraction`` of ``n``: ``max(1, int(fraction * n))`` (capped at n).

    Example:
        >>> top_count(0.01, 250), top_count(0.25, 4), top_count(0.001, 10)
        (2, 1, 1)
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"A fraction must be in (0, 1]; got {fraction}.")
    return min(n, max(1, int(fraction * n)))


@jax.jit
def _abs_max(g: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(g.astype(jnp.float32)), initial=0.0)


@jax.jit
def _count_ge(g: jax.Array, scale: jax.Array, t: jax.Array) -> jax.Array:
    """``#{|g|/scale >= t_j}`` for each threshold ``t_j``."""
    a = jnp.abs(g.astype(jnp.float32)).reshape(-1) / scale
    return jax.vmap(lambda tj: jnp.sum(a >= tj, dtype=jnp.int32))(t)


@jax.jit
def _sums_above(g: jax.Array, scale: jax.Array, t: jax.Array):
    """Per threshold ``(#{a > t_j}, sum_{a > t_j} a^2)``, and ``sum a^2``; ``a = |g|/scale``."""
    a = jnp.abs(g.astype(jnp.float32)).reshape(-1) / scale
    sq = a * a

    def one(tj):
        above = a > tj
        return jnp.sum(above, dtype=jnp.int32), jnp.sum(jnp.where(above, sq, 0.0))

    counts, sums = jax.vmap(one)(t)
    return counts, sums, jnp.sum(sq)


@jax.jit
def _kth_largest_one(g: jax.Array, scale: jax.Array, ks: jax.Array) -> jax.Array:
    """:func:`_kth_largest` for a single leaf, as one compiled loop."""

    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        ok = _count_ge(g, scale, jax.lax.bitcast_convert_type(mid, jnp.float32)) >= ks
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo = jnp.zeros(ks.shape, jnp.int32)
    hi = jnp.full(ks.shape, _INF_BITS + 1, jnp.int32)
    lo, _ = jax.lax.fori_loop(0, 31, body, (lo, hi))  # the range is < 2^31
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def _kth_largest(leaves: Sequence[jax.Array], scale: jax.Array, ks: np.ndarray) -> np.ndarray:
    """The ``ks[j]``-th largest of ``|g|/scale`` over all ``leaves`` (float32), by bisection."""
    if len(leaves) == 1:
        return np.asarray(_kth_largest_one(leaves[0], scale, jnp.asarray(ks, jnp.int32)))
    lo = np.zeros(len(ks), np.int64)  # count(a >= 0.0) = n >= k always
    hi = np.full(len(ks), _INF_BITS + 1, np.int64)  # a NaN pattern: count(a >= nan) = 0 < k
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        t = jnp.asarray(mid.astype(np.int32).view(np.float32))
        count = sum(np.asarray(_count_ge(g, scale, t), np.int64) for g in leaves)
        ok = count >= ks
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid)
    return lo.astype(np.int32).view(np.float32)


def _top_shares(leaves: Sequence[jax.Array], fractions: Sequence[float]) -> tuple[dict, float]:
    """``{fraction: {"k", "norm_ratio", "energy_share"}}`` over the union of ``leaves``."""
    n = sum(int(np.size(g)) for g in leaves)
    scale = max((float(_abs_max(g)) for g in leaves), default=0.0)
    ks = np.array([top_count(f, n) for f in fractions], np.int64)
    if scale == 0.0 or not math.isfinite(scale):  # all zero, or inf/nan present
        nan = float("nan")
        res = {
            f: {"k": int(k), "norm_ratio": nan, "energy_share": nan}
            for f, k in zip(fractions, ks, strict=True)
        }
        return res, 0.0 if scale == 0.0 else nan
    s = jnp.float32(scale)
    t = _kth_largest(leaves, s, ks)
    above = np.zeros(len(ks), np.int64)
    top = np.zeros(len(ks), np.float64)
    total = 0.0
    for g in leaves:
        c, sums, tot = _sums_above(g, s, jnp.asarray(t))
        above += np.asarray(c, np.int64)
        top += np.asarray(sums, np.float64)
        total += float(tot)
    top += (ks - above) * t.astype(np.float64) ** 2
    res = {}
    for f, k, e in zip(fractions, ks, top, strict=True):
        share = min(1.0, float(e) / total)
        res[f] = {"k": int(k), "norm_ratio": math.sqrt(share), "energy_share": share}
    return res, total * scale * scale


def gradient_sparsity(
    grads: Any, fractions: Sequence[float] = (0.001, 0.01, 0.05)
) -> dict[str, Any]:
    """Share of the gradient held by its top-x% entries by ``|g|``, per leaf and overall.

    ``overall`` takes one global top-x% across all entries of the tree (not per leaf).
    ``None`` leaves are skipped; any array dtype is cast to float32.

    Args:
        grads: A pytree of gradients (jax or numpy arrays).
        fractions: Fractions ``x`` in ``(0, 1]``; ``k = max(1, int(x * n))``.

    Returns:
        ``{"overall": {x: {"k", "norm_ratio", "energy_share"}}, "per_leaf": {path: {x: {...}}},
        "sizes": {path: n}, "sq_norms": {path: ||g||^2}}``, all plain Python numbers (the
        last two let :func:`gradient_sparsity_by_group` aggregate).

    Example:
        >>> import jax.numpy as jnp
        >>> r = gradient_sparsity({"w": jnp.array([3.0, 4.0, 0.0, 0.0])}, fractions=(0.25,))
        >>> r["overall"][0.25]
        {'k': 1, 'norm_ratio': 0.8, 'energy_share': 0.64}
    """
    fractions = tuple(float(f) for f in fractions)
    for f in fractions:
        top_count(f, 1)  # validates
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    named = [(path_to_str(p), jnp.asarray(g)) for p, g in flat]
    per_leaf, sizes, sq_norms = {}, {}, {}
    for path, g in named:
        per_leaf[path], sq_norms[path] = _top_shares([g], fractions)
        sizes[path] = int(np.size(g))
    overall, _ = _top_shares([g for _, g in named], fractions)
    return {"overall": overall, "per_leaf": per_leaf, "sizes": sizes, "sq_norms": sq_norms}


def gradient_sparsity_by_group(
    result: Mapping[str, Any], group: str | Callable[[str], str | None]
) -> dict[str, dict[float, dict[str, float]]]:
    """Aggregates per-leaf results of :func:`gradient_sparsity` into groups of leaves.

    A group's ``energy_share`` is the share of the group's squared gradient norm held by the
    per-leaf top-x% entries, i.e. what selecting top-x% *in each tensor* (as SIFT does)
    captures: ``sum_leaf share_leaf * ||g_leaf||^2 / sum_leaf ||g_leaf||^2``. ``k`` is summed.
    Leaves with a zero gradient count toward ``k`` but not the shares.

    Args:
        result: The output of :func:`gradient_sparsity`.
        group: A callable ``path -> group name`` (``None`` skips the leaf), or a regex: leaves
            it does not match are skipped; the group is its first capture group if it has
            one, else the matched text.

    Returns:
        ``{group: {x: {"k", "norm_ratio", "energy_share"}}}``.

    Example:
        >>> import jax.numpy as jnp
        >>> g = {"l0": {"query": jnp.array([3.0, 4.0]), "value": jnp.array([1.0, 1.0])},
        ...      "l1": {"query": jnp.array([0.0, 5.0])}}
        >>> r = gradient_sparsity(g, fractions=(0.5,))
        >>> by = gradient_sparsity_by_group(r, r"(query|value)")
        >>> round(by["query"][0.5]["energy_share"], 4), by["value"][0.5]["energy_share"]
        (0.82, 0.5)
    """
    if isinstance(group, str):
        pattern = re.compile(group)

        def group_fn(path: str) -> str | None:
            m = pattern.search(path)
            return None if m is None else (m.group(1) if pattern.groups else m.group(0))

    else:
        group_fn = group
    acc: dict[str, dict[float, list[float]]] = {}
    for path, per_fraction in result["per_leaf"].items():
        name = group_fn(path)
        if name is None:
            continue
        sq = result["sq_norms"][path]
        slot = acc.setdefault(name, {f: [0, 0.0, 0.0] for f in per_fraction})
        for f, v in per_fraction.items():
            slot[f][0] += v["k"]
            if sq > 0 and math.isfinite(sq):
                slot[f][1] += v["energy_share"] * sq
                slot[f][2] += sq
    out = {}
    for name, slot in acc.items():
        out[name] = {}
        for f, (k, top, tot) in slot.items():
            share = top / tot if tot > 0 else float("nan")
            out[name][f] = {"k": int(k), "norm_ratio": math.sqrt(share), "energy_share": share}
    return out
