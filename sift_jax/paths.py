"""Leaf paths (``encoder/layers/3/attention/query/kernel``) and the roles patterns give them."""

from sift_jax._src.masks import LeafSpec, is_trainable_dtype, leaf_roles, role_tree
from sift_jax._src.paths import (
    flatten_paths,
    key_to_str,
    leaves_with_paths,
    path_to_str,
    unflatten_paths,
)

__all__ = [
    "LeafSpec",
    "flatten_paths",
    "is_trainable_dtype",
    "key_to_str",
    "leaf_roles",
    "leaves_with_paths",
    "path_to_str",
    "role_tree",
    "unflatten_paths",
]
