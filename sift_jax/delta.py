"""Sparse deltas: what fine-tuning changed, stored small, applied and removed bit-exactly.

The functions are also at the package root (``sift_jax.extract_delta`` ...); this module adds
the format's details: :func:`wide_dtype` (the dtype increments are stored in) and the file
format version.
"""

from sift_jax._src.delta import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Delta,
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

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Delta",
    "SparseDelta",
    "delta_nbytes",
    "delta_num_params",
    "extract_delta",
    "load_delta",
    "load_delta_metadata",
    "merge_delta",
    "save_delta",
    "unmerge_delta",
    "wide_dtype",
]
