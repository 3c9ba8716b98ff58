"""sift-jax: Sparse Increment Fine-Tuning (SIFT) for JAX.

Train only a tiny, gradient-selected set of a pretrained model's weights with any optax
optimizer, keeping optimizer state O(k).

- :func:`sparse_increment`: the optax transform (drop-in for any training loop);
- :class:`Sift` (:mod:`sift_jax.compact`): the compact-gradient path, where ``jax.grad``
  itself returns k-sized gradients; :mod:`sift_jax.nnx` for Flax NNX models;
- sparse deltas: :func:`extract_delta`, :func:`save_delta`, :func:`load_delta`,
  :func:`merge_delta`, :func:`unmerge_delta`;
- :mod:`sift_jax.selection` (strategies and their registry), :mod:`sift_jax.analysis`
  (gradient quasi-sparsity), :mod:`sift_jax.paths` (leaf paths and roles).
"""

from sift_jax import analysis, compact, delta, paths, selection
from sift_jax._src.compact import Sift, SiftState
from sift_jax._src.delta import (
    SparseDelta,
    delta_nbytes,
    delta_num_params,
    extract_delta,
    load_delta,
    load_delta_metadata,
    merge_delta,
    save_delta,
    unmerge_delta,
)
from sift_jax._src.transform import (
    SparseIncrementState,
    find_states,
    selected_indices,
    selection_done,
    sparse_increment,
)

__version__ = "0.2.0"

__all__ = [
    "Sift",
    "SiftState",
    "SparseDelta",
    "SparseIncrementState",
    "analysis",
    "compact",
    "delta",
    "delta_nbytes",
    "delta_num_params",
    "extract_delta",
    "find_states",
    "load_delta",
    "load_delta_metadata",
    "merge_delta",
    "paths",
    "save_delta",
    "selected_indices",
    "selection",
    "selection_done",
    "sparse_increment",
    "unmerge_delta",
]
