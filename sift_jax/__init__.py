"""sift-jax: Sparse Increment Fine-Tuning (SIFT) for JAX.

Train only a tiny, gradient-selected set of a pretrained model's weights with any optax
optimizer, keeping optimizer state O(k). See :func:`sparse_increment`.
"""

from sift_jax._src.analysis import gradient_sparsity, gradient_sparsity_by_group, top_count
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
    wide_dtype,
)
from sift_jax._src.increments import (
    apply_increments,
    gather_at,
    increment_view,
    init_increments,
    probe_indices,
    select_indices,
    topk_probe,
    write_increments,
)
from sift_jax._src.masks import leaf_roles, role_tree
from sift_jax._src.paths import leaves_with_paths, path_to_str
from sift_jax._src.selection import (
    count_for_rate,
    select_by_gradient,
    select_by_magnitude,
    select_random,
    topk_indices,
)
from sift_jax._src.transform import (
    DenseLeaf,
    SparseIncrementState,
    find_states,
    selected_indices,
    selection_done,
    sparse_increment,
)

__version__ = "0.1.0"

__all__ = [
    "DenseLeaf",
    "SparseDelta",
    "SparseIncrementState",
    "apply_increments",
    "delta_nbytes",
    "delta_num_params",
    "extract_delta",
    "gather_at",
    "gradient_sparsity",
    "gradient_sparsity_by_group",
    "increment_view",
    "init_increments",
    "load_delta",
    "load_delta_metadata",
    "merge_delta",
    "save_delta",
    "select_indices",
    "probe_indices",
    "top_count",
    "topk_probe",
    "unmerge_delta",
    "wide_dtype",
    "write_increments",
    "count_for_rate",
    "find_states",
    "leaf_roles",
    "leaves_with_paths",
    "path_to_str",
    "role_tree",
    "select_by_gradient",
    "select_by_magnitude",
    "select_random",
    "selected_indices",
    "selection_done",
    "sparse_increment",
    "topk_indices",
]
