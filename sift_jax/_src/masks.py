"""Which leaves are sparse, dense or frozen: regexes, callables or bool trees over leaf paths."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sift_jax._src.paths import path_to_str

# A spec says which leaves a rule applies to.
LeafSpec = str | Sequence[str] | Callable[[str, Any], bool] | Any

SPARSE, DENSE, FROZEN = "sparse", "dense", "frozen"


def is_trainable_dtype(leaf: Any) -> bool:
    """True for floating-point (incl. bf16/fp16) and complex leaves; integer and bool leaves
    never train.

    Example:
        >>> import jax.numpy as jnp
        >>> is_trainable_dtype(jnp.zeros(2, jnp.bfloat16))
        True
        >>> is_trainable_dtype(jnp.zeros(2, jnp.int32))
        False
    """
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)
    )


def _compile_spec(spec: LeafSpec, name: str, params: Any) -> list[bool]:
    """Turns one spec into a bool per leaf (in ``jax.tree.leaves(params)`` order)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_to_str(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, (list, tuple)) and all(isinstance(s, str) for s in spec):
        try:
            patterns = [re.compile(s) for s in spec]
        except re.error as e:
            raise ValueError(f"`{name}` has an invalid regular expression: {e}") from e
        hits = [[bool(p.search(path)) for p in patterns] for path in paths]
        for j, p in enumerate(patterns):
            if paths and not any(h[j] for h in hits):
                warnings.warn(
                    f"`{name}` pattern {p.pattern!r} matches no leaf; leaf paths look like "
                    f"{paths[:4]}.",
                    UserWarning,
                    stacklevel=4,
                )
        return [any(h) for h in hits]
    if callable(spec):
        return [bool(spec(path, leaf)) for path, leaf in zip(paths, leaves, strict=True)]
    # A bool pytree: the same structure as params (or a prefix of it).
    try:
        spec_treedef = jax.tree_util.tree_structure(spec)
        per_prefix = spec_treedef.flatten_up_to(params)
        spec_leaves = jax.tree.leaves(spec)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`{name}` must be a regex string, a list of regex strings, a callable "
            f"(path, leaf) -> bool, or a bool pytree shaped like params; got a tree that does "
            f"not match params: {e}"
        ) from e
    out: list[bool] = []
    for flag, sub in zip(spec_leaves, per_prefix, strict=True):
        if not isinstance(flag, (bool, type(None))) and not (
            hasattr(flag, "dtype") and getattr(flag, "shape", None) == () and flag.dtype == bool
        ):
            raise TypeError(f"`{name}` bool pytree holds a non-bool leaf {flag!r}.")
        out.extend([bool(flag)] * len(jax.tree.leaves(sub)))
    return out


def leaf_roles(
    params: Any, sparse: LeafSpec | None = None, dense: LeafSpec | None = None
) -> list[str]:
    """Assigns each leaf of ``params`` the role ``"sparse"``, ``"dense"`` or ``"frozen"``.

    ``sparse=None`` selects every floating-point leaf. A leaf matched by ``dense`` is dense even
    if ``sparse`` also matches it (the paper's "exception" modules). Non-floating leaves are
    always frozen.

    Example:
        >>> import jax.numpy as jnp
        >>> p = {"attn": {"query": jnp.zeros(4)}, "cls": jnp.zeros(2), "ln": jnp.zeros(2)}
        >>> leaf_roles(p, sparse="query", dense="cls")
        ['sparse', 'dense', 'frozen']
    """
    leaves = jax.tree.leaves(params)
    is_float = [is_trainable_dtype(leaf) for leaf in leaves]
    sp = [True] * len(leaves) if sparse is None else _compile_spec(sparse, "sparse", params)
    de = [False] * len(leaves) if dense is None else _compile_spec(dense, "dense", params)
    roles = []
    for f, s, d in zip(is_float, sp, de, strict=True):
        roles.append(FROZEN if not f else DENSE if d else SPARSE if s else FROZEN)
    return roles


def role_tree(params: Any, sparse: LeafSpec | None = None, dense: LeafSpec | None = None) -> Any:
    """Like :func:`leaf_roles` but returns a pytree shaped like ``params`` holding the roles.

    Example:
        >>> import jax.numpy as jnp
        >>> role_tree({"w": jnp.zeros(3), "b": jnp.zeros(3)}, sparse="w")
        {'b': 'frozen', 'w': 'sparse'}
    """
    treedef = jax.tree.structure(params)
    return jax.tree.unflatten(treedef, leaf_roles(params, sparse, dense))
