"""The paper's quasi-sparsity analysis of gradients (top-fraction norm shares)."""

from sift_jax._src.analysis import gradient_sparsity, gradient_sparsity_by_group, top_count

__all__ = ["gradient_sparsity", "gradient_sparsity_by_group", "top_count"]
