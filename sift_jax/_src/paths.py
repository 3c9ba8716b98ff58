"""Leaf paths as strings: the names that regex targeting and saved deltas use.

A leaf's path is its pytree key path with every key written plainly and joined by ``/``:
``{"encoder": {"layers": {3: {"query": {"kernel": w}}}}}`` gives
``encoder/layers/3/query/kernel``. Lists and tuples contribute their index, attributes
their name, and Flax ``Variable`` wrappers (a trailing ``value`` attribute) are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

PathStr = str


def key_to_str(key: Any) -> str:
    """Writes one pytree key plainly: ``DictKey('a')`` -> ``'a'``, ``SequenceKey(3)`` -> ``'3'``.

    Example:
        >>> from jax.tree_util import DictKey, GetAttrKey, SequenceKey
        >>> [key_to_str(k) for k in (DictKey("query"), SequenceKey(3), GetAttrKey("kernel"))]
        ['query', '3', 'kernel']
    """
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, GetAttrKey):
        return str(key.name)
    if isinstance(key, FlattenedIndexKey):
        return str(key.key)
    return str(key).strip(".[]'\"")


def path_to_str(path: tuple[Any, ...]) -> PathStr:
    """Joins a jax key path into the ``a/b/0/c`` form used for targeting and saving.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> tree = {"encoder": {"layers": [{"query": {"kernel": jnp.zeros(2)}}]}}
        >>> [path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
        ['encoder/layers/0/query/kernel']
    """
    parts = [key_to_str(k) for k in path]
    if len(parts) > 1 and parts[-1] == "value" and isinstance(path[-1], GetAttrKey):
        parts = parts[:-1]  # nnx.Variable / VariableState wrapper
    return "/".join(parts)


def leaves_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None):
    """Returns ``[(path_str, leaf), ...]`` in ``jax.tree.leaves`` order.

    Example:
        >>> leaves_with_paths({"b": 1, "a": {"x": 2}})
        [('a/x', 2), ('b', 1)]
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_to_str(p), leaf) for p, leaf in flat]


def flatten_paths(tree: Any) -> dict[PathStr, Any]:
    """``{path: leaf}`` with ``/``-joined paths (``None`` leaves dropped).

    Example:
        >>> flatten_paths({"a": {"b": 1, "c": None}})
        {'a/b': 1}
    """
    return dict(leaves_with_paths(tree))


def unflatten_paths(flat: dict[PathStr, Any]) -> dict[str, Any]:
    """Nested dicts from ``{path: leaf}``: the inverse of :func:`flatten_paths` for dicts.

    Example:
        >>> unflatten_paths({"a/b": 1, "a/c": 2})
        {'a': {'b': 1, 'c': 2}}
    """
    out: dict[str, Any] = {}
    for path, x in flat.items():
        node = out
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = x
    return out
