"""SIFT deltas: what fine-tuning changed, stored small, applied and removed bit-exactly.

A delta is a plain ``dict`` from leaf path (``encoder/layers/3/query/kernel``, see
:mod:`sift_jax._src.paths`) to a :class:`SparseDelta`:

* **sparse leaves** hold sorted flat (row-major) ``int32[k]`` ``indices`` and the increments
  ``values = f - b`` at those positions, in a *wider* dtype than the leaf (``float64`` for
  ``float32`` params, ``float32`` for ``bfloat16`` / ``float16`` / fp8, ``float64`` for
  ``float64``);
* **dense leaves** (the paper's "exception" modules, e.g. a freshly trained classifier) hold
  ``indices=None`` and the full fine-tuned value in the leaf's own dtype.

Exactness. Floating point does not promise ``b + (f - b) == f``. Merging is therefore defined
as ``round_to_leaf_dtype(wide(b) + d)`` on the host in numpy, and :func:`extract_delta` runs
exactly that computation (and the reverse, ``round(wide(f) - d)`` for unmerging) on every
selected entry before returning. The few entries where either direction is not bitwise exact
(huge exponent gaps such as ``b = 1, f = 1e-30``, signed zeros, ``inf``/``nan``) are recorded
as *fix-ups*: their flat index plus the exact fine-tuned and base values, which merge and
unmerge write verbatim. So ``merge_delta(base, extract_delta(f, base, idx))`` equals ``f``
bit for bit, and ``unmerge_delta`` of that equals ``base`` bit for bit, for every float dtype
and every value; ``values`` still holds the (rounded) increment at fix-up positions, so it can
be inspected or scaled as an increment. With ordinary fine-tuning updates fix-ups are absent
or a handful per model.

Merging and unmerging gather the ``k`` selected entries to the host, compute there, and
scatter back; they are eager (not jittable) and return leaves of the input's kind (numpy in,
numpy out; ``jax.Array`` in, ``jax.Array`` out on the leaf's sharding).

Fingerprints. :func:`extract_delta` records, per leaf, the sha256 of the base values and of the
fine-tuned values at the delta's positions (the ``k`` selected entries of a sparse leaf, the
whole value of a dense one). :func:`merge_delta` checks that its target holds the base values
there (and says "already merged" when it holds the fine-tuned ones); :func:`unmerge_delta`
checks the mirror. Sparse leaves raise; dense leaves only warn, since their target value does
not change the result (merging replaces them). Only the ``k`` entries that merging gathers
anyway are hashed for sparse leaves. Deltas without fingerprints (built by hand, or files of
format version 1) are not checked.

Files are safetensors (:func:`save_delta`): tensors ``<path>.indices``, ``<path>.values`` and,
where present, ``<path>.fixup_indices`` / ``.fixup_finetuned`` / ``.fixup_base``. Dtypes that
safetensors' numpy backend lacks (``bfloat16``, fp8) are stored as same-width unsigned integer
bit patterns; the true dtypes, shapes, fingerprints and the user's metadata live in the JSON
header metadata, together with a sha256 of every stored tensor's bytes and one of the rest of
the metadata, which :func:`load_delta` verifies. The bytes of a file depend only on the delta
and the metadata (sorted JSON keys, a fixed tensor order, no timestamps), so equal deltas give
equal files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import struct
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from sift_jax._src import masks
from sift_jax._src.paths import path_to_str

FORMAT_NAME = "sift_jax.delta"
FORMAT_VERSION = 2  # 2: tensor checksums, header checksum, base fingerprints


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class SparseDelta:
    """What fine-tuning changed in one leaf.

    Attributes:
        indices: Sorted flat (row-major) ``int32[k]`` positions of the changed entries, or
            ``None`` for a dense leaf.
        values: Sparse leaf: the increments ``f - b`` at ``indices``, ``float[k]`` in
            :func:`wide_dtype` of ``dtype``. Dense leaf: the full fine-tuned value, ``shape``
            and ``dtype`` as the leaf.
        shape: Shape of the base leaf.
        dtype: Dtype of the base leaf (a numpy dtype, e.g. ``bfloat16``).
        fixup_indices: Sorted flat ``int32[m]`` subset of ``indices`` where additive merge or
            unmerge is not bitwise exact, or ``None`` when there are none.
        fixup_finetuned: ``dtype[m]`` exact fine-tuned values at ``fixup_indices``.
        fixup_base: ``dtype[m]`` exact base values at ``fixup_indices``.
        base_sha256: sha256 (hex) of the base leaf's bit patterns at ``indices`` (in order), or
            of the whole base leaf when dense; ``None`` when unknown (then merging cannot check
            its target).
        finetuned_sha256: the same for the fine-tuned leaf (the merged values).

    Example:
        >>> import numpy as np
        >>> d = SparseDelta(np.array([1], np.int32), np.array([0.5]), (3,), np.dtype("float32"))
        >>> d.is_dense, d.num_params
        (False, 1)
    """

    indices: np.ndarray | None
    values: np.ndarray
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    dtype: np.dtype = dataclasses.field(metadata={"static": True})
    fixup_indices: np.ndarray | None = None
    fixup_finetuned: np.ndarray | None = None
    fixup_base: np.ndarray | None = None
    base_sha256: str | None = dataclasses.field(default=None, metadata={"static": True})
    finetuned_sha256: str | None = dataclasses.field(default=None, metadata={"static": True})

    @property
    def is_dense(self) -> bool:
        """True when the leaf is stored whole (``indices is None``)."""
        return self.indices is None

    @property
    def num_params(self) -> int:
        """Number of leaf entries this delta sets: ``k``, or the leaf's size when dense."""
        return int(np.prod(self.shape)) if self.is_dense else int(np.size(self.indices))

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays held (indices, values, fix-ups)."""
        arrays = (self.indices, self.values, self.fixup_indices, self.fixup_finetuned)
        return sum(int(a.nbytes) for a in (*arrays, self.fixup_base) if a is not None)


Delta = dict[str, SparseDelta]


def wide_dtype(dtype: Any) -> np.dtype:
    """The dtype in which increments for a ``dtype`` leaf are stored and added.

    Example:
        >>> import jax.numpy as jnp
        >>> wide_dtype(jnp.float32), wide_dtype(jnp.bfloat16), wide_dtype(jnp.float16)
        (dtype('float64'), dtype('float32'), dtype('float32'))
    """
    dtype = np.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"Sparse increments need a floating-point leaf; got dtype {dtype}.")
    if dtype.itemsize >= 4:
        return np.dtype(np.float64)
    return np.dtype(np.float32)


# ----------------------------------------------------------------------------- array helpers


def _is_jax(x: Any) -> bool:
    return isinstance(x, jax.Array)


def _auto(x: Any) -> Any:
    """``x`` on the same devices and layout, but with Auto mesh axes (Explicit ones reject the
    flat gathers and scatters used here); non-jax and unsharded inputs pass through."""
    s = getattr(x, "sharding", None)
    if not isinstance(s, jax.sharding.NamedSharding):
        return x
    auto = jax.sharding.AxisType.Auto
    if all(t == auto for t in s.mesh.axis_types):
        return x
    mesh = jax.sharding.Mesh(
        s.mesh.devices, s.mesh.axis_names, axis_types=(auto,) * len(s.mesh.axis_names)
    )
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, s.spec))


def _uint_for(dtype: np.dtype) -> np.dtype:
    return np.dtype(f"uint{8 * np.dtype(dtype).itemsize}")


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(_uint_for(x.dtype))


@jax.jit
def _count_bit_diff_jax(a: jax.Array, b: jax.Array) -> jax.Array:
    u = jnp.dtype(f"uint{8 * a.dtype.itemsize}")
    diff = jax.lax.bitcast_convert_type(a, u) != jax.lax.bitcast_convert_type(b, u)
    return jnp.sum(diff, dtype=jnp.int32)


def _count_bit_diff(a: Any, b: Any) -> int:
    """How many entries of two same-shape, same-dtype arrays differ bitwise."""
    if _is_jax(a) or _is_jax(b):
        return int(_count_bit_diff_jax(_auto(jnp.asarray(a)), _auto(jnp.asarray(b))))
    a, b = np.asarray(a), np.asarray(b)
    return int(np.count_nonzero(_bits(a) != _bits(b)))


@jax.jit
def _gather_bits_jax(x: jax.Array, idx: jax.Array) -> jax.Array:
    # On bit patterns, so that NaN payloads reach the host (and the fingerprints) unchanged.
    u = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    return jax.lax.bitcast_convert_type(x, u).reshape(-1)[idx]


def _gather(leaf: Any, idx: np.ndarray) -> np.ndarray:
    """``leaf.ravel()[idx]`` as a host numpy array (only ``k`` values leave the device)."""
    if _is_jax(leaf):
        bits = _gather_bits_jax(_auto(leaf), jnp.asarray(idx, jnp.int32))
        return np.asarray(bits).view(np.dtype(leaf.dtype))
    return np.asarray(leaf).reshape(-1)[idx]


def _digest(x: Any) -> str:
    """sha256 (hex) of an array's bit patterns in C order: the fingerprint of leaf values."""
    x = np.asarray(x)
    return hashlib.sha256(_bits(x.reshape(-1))).hexdigest()


@jax.jit
def _set_flat_jax(x: jax.Array, idx: jax.Array, v: jax.Array) -> jax.Array:
    # On bit patterns: XLA may canonicalise NaN payloads when it computes in a float dtype.
    u = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    xb, vb = jax.lax.bitcast_convert_type(x, u), jax.lax.bitcast_convert_type(v, u)
    out = xb.reshape(-1).at[idx].set(vb, unique_indices=True).reshape(x.shape)
    return jax.lax.bitcast_convert_type(out, x.dtype)


def _scatter(leaf: Any, idx: np.ndarray, vals: np.ndarray) -> Any:
    """A copy of ``leaf`` with flat positions ``idx`` set to ``vals``, of the input's kind."""
    if _is_jax(leaf):
        vals = jnp.asarray(np.asarray(vals, leaf.dtype))
        out = _set_flat_jax(_auto(leaf), jnp.asarray(idx, jnp.int32), vals)
        return out if out.sharding == leaf.sharding else jax.device_put(out, leaf.sharding)
    out = np.array(leaf, copy=True)
    np.put(out, idx, vals)  # C-order flat indices whatever the memory layout
    return out


def _like(leaf: Any, value: np.ndarray) -> Any:
    """``value`` as the same kind of array as ``leaf`` (device and sharding kept for jax)."""
    if _is_jax(leaf):
        return jax.device_put(np.asarray(value, leaf.dtype), leaf.sharding)
    return np.array(value, dtype=leaf.dtype, copy=True)


def _add_round(b: np.ndarray, d: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The one definition of merging: ``round_dtype(wide(b) + d)``, on the host."""
    with np.errstate(all="ignore"):
        return (b.astype(d.dtype) + d).astype(dtype)


def _sub_round(m: np.ndarray, d: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The one definition of unmerging: ``round_dtype(wide(m) - d)``, on the host."""
    with np.errstate(all="ignore"):
        return (m.astype(d.dtype) - d).astype(dtype)


def _check_indices(path: str, idx: Any, n: int) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.ndim != 1 or not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(
            f"{path}: indices must be a 1-D integer array; got {idx.dtype}{list(idx.shape)}."
        )
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(
            f"{path}: index out of range: indices span [{idx.min()}, {idx.max()}] but the leaf "
            f"has {n} entries."
        )
    return idx.astype(np.int64)


def _leaf_info(path: str, leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise ValueError(f"{path}: expected an array leaf; got {type(leaf).__name__}.")
    return tuple(int(s) for s in leaf.shape), np.dtype(leaf.dtype)


def _flatten(tree: Any, what: str) -> tuple[list[tuple[str, Any]], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    named = [(path_to_str(p), leaf) for p, leaf in flat]
    seen: set[str] = set()
    for name, _ in named:
        if name in seen:
            raise ValueError(f"{what}: two leaves share the path {name!r}.")
        seen.add(name)
    return named, treedef


# ----------------------------------------------------------------------------- extract


def _resolve_indices(indices: Any, base: Any, treedef: Any) -> list[Any]:
    if indices is None:
        return [None] * treedef.num_leaves
    # An optax state holding a sparse_increment state: take its selected indices.
    from sift_jax._src import transform  # lazy: delta does not need the optimizer otherwise

    if transform.find_states(indices):
        indices = transform.selected_indices(indices)
    try:
        # ``None`` may stand for a whole subtree (e.g. ``"classifier": None``).
        full = jax.tree.broadcast(indices, base, is_leaf=lambda x: x is None)
        return treedef.flatten_up_to(full)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "`indices` must be shaped like the params (int32[k] for sparse leaves, None "
            f"elsewhere), as returned by sift_jax.selected_indices: {e}"
        ) from e


def _extract_sparse(path: str, f: Any, b: Any, idx: Any) -> SparseDelta:
    shape, dtype = _leaf_info(path, b)
    wide = wide_dtype(dtype)
    n = int(np.prod(shape))
    idx = np.unique(_check_indices(path, idx, n))  # sorted; duplicates would break scatter
    f_sel, b_sel = _gather(f, idx), _gather(b, idx)
    with np.errstate(all="ignore"):
        d = f_sel.astype(wide) - b_sel.astype(wide)
    merge_ok = _bits(_add_round(b_sel, d, dtype)) == _bits(f_sel)
    unmerge_ok = _bits(_sub_round(f_sel, d, dtype)) == _bits(b_sel)
    bad = ~(merge_ok & unmerge_ok)
    changed_sel = int(np.count_nonzero(_bits(f_sel) != _bits(b_sel)))
    outside = _count_bit_diff(f, b) - changed_sel
    if outside:
        raise ValueError(
            f"{path}: {outside} entries changed outside the {idx.size} selected indices; the "
            "delta would lose them. Was this leaf trained densely (pass it in `dense`) or were "
            "the indices taken from another optimizer state?"
        )
    fix = {}
    if bad.any():
        fix = dict(
            fixup_indices=idx[bad].astype(np.int32),
            fixup_finetuned=f_sel[bad].copy(),
            fixup_base=b_sel[bad].copy(),
        )
    return SparseDelta(
        idx.astype(np.int32),
        d,
        shape,
        dtype,
        **fix,
        base_sha256=_digest(b_sel),
        finetuned_sha256=_digest(f_sel),
    )


def extract_delta(
    finetuned: Any,
    base: Any,
    indices: Any = None,
    *,
    dense: masks.LeafSpec | None = None,
) -> Delta:
    """The delta that turns ``base`` into ``finetuned``: sparse increments plus dense leaves.

    Every change is accounted for: a sparse leaf that changed outside its indices, or a
    non-sparse leaf that changed but is not stored dense, raises. The result merges back to
    ``finetuned`` bit for bit (see the module docstring).

    Args:
        finetuned: Fine-tuned params (jax or numpy leaves).
        base: The params fine-tuning started from; same structure, shapes and dtypes.
        indices: A tree shaped like params with ``int32[k]`` flat indices for sparse leaves and
            ``None`` elsewhere (:func:`sift_jax.selected_indices`; ``None`` may also stand for a
            whole subtree), or an optax state holding a
            ``sparse_increment`` state (its indices are used), or ``None`` (no sparse leaves).
        dense: Which non-sparse leaves to store whole. ``None`` (default): every non-sparse leaf
            that differs bitwise from ``base``. Otherwise a regex, list of regexes, callable
            ``(path, leaf) -> bool`` or bool tree (as in :func:`sift_jax.leaf_roles`); the
            matched floating-point leaves are stored even if unchanged.

    Returns:
        ``{leaf path: SparseDelta}`` in ``jax.tree.leaves`` order; unchanged non-sparse leaves
        are absent.

    Raises:
        ValueError: naming the leaf, for mismatched structure, shapes or dtypes, indices out of
            range, or changes the delta would not carry.

    Example:
        >>> import jax.numpy as jnp
        >>> base = {"w": jnp.zeros((2, 2)), "cls": jnp.zeros(2), "ln": jnp.ones(2)}
        >>> tuned = {"w": base["w"].at[1, 0].set(0.5), "cls": jnp.ones(2), "ln": jnp.ones(2)}
        >>> delta = extract_delta(tuned, base, {"w": jnp.array([2], jnp.int32), "cls": None,
        ...                                     "ln": None})
        >>> sorted(delta), delta["w"].values.tolist(), delta["cls"].is_dense
        (['cls', 'w'], [0.5], True)
    """
    b_named, treedef = _flatten(base, "base")
    try:
        f_leaves = treedef.flatten_up_to(finetuned)
    except (ValueError, TypeError) as e:
        raise ValueError(f"`finetuned` is not shaped like `base`: {e}") from e
    idx_leaves = _resolve_indices(indices, base, treedef)
    if dense is None:
        dense_flags = [None] * len(b_named)  # decided per leaf: "changed"
    else:
        roles = masks.leaf_roles(base, sparse=lambda p, x: False, dense=dense)
        dense_flags = [r == masks.DENSE for r in roles]

    out: Delta = {}
    for (path, b), f, idx, want_dense in zip(
        b_named, f_leaves, idx_leaves, dense_flags, strict=True
    ):
        b_shape, b_dtype = _leaf_info(path, b)
        f_shape, f_dtype = _leaf_info(path, f)
        if f_shape != b_shape:
            raise ValueError(f"{path}: shape mismatch: finetuned {f_shape} vs base {b_shape}.")
        if f_dtype != b_dtype:
            raise ValueError(f"{path}: dtype mismatch: finetuned {f_dtype} vs base {b_dtype}.")
        if idx is not None:
            if want_dense:
                raise ValueError(f"{path}: has sparse indices but is also selected by `dense`.")
            out[path] = _extract_sparse(path, f, b, idx)
            continue
        changed = _count_bit_diff(f, b)
        if want_dense or (want_dense is None and changed):
            value = np.array(f, copy=True)
            out[path] = SparseDelta(
                None,
                value,
                b_shape,
                b_dtype,
                base_sha256=_digest(b),
                finetuned_sha256=_digest(value),
            )
        elif changed:
            raise ValueError(
                f"{path}: {changed} entries changed but the leaf is neither sparse nor selected "
                "by `dense`; the delta would lose them."
            )
    return out


# ----------------------------------------------------------------------------- merge / unmerge


def _validate(path: str, leaf: Any, d: SparseDelta) -> np.ndarray | None:
    shape, dtype = _leaf_info(path, leaf)
    if shape != tuple(d.shape):
        raise ValueError(f"{path}: shape mismatch: delta {tuple(d.shape)} vs params {shape}.")
    if dtype != np.dtype(d.dtype):
        raise ValueError(f"{path}: dtype mismatch: delta {np.dtype(d.dtype)} vs params {dtype}.")
    if d.is_dense:
        if tuple(np.shape(d.values)) != shape:
            raise ValueError(f"{path}: dense values have shape {np.shape(d.values)}, not {shape}.")
        return None
    idx = _check_indices(path, d.indices, int(np.prod(shape)))
    if np.shape(d.values) != idx.shape:
        raise ValueError(
            f"{path}: {np.size(d.values)} values for {idx.size} indices; the delta is corrupt."
        )
    if np.asarray(d.values).dtype != wide_dtype(dtype):
        raise ValueError(
            f"{path}: increments are {np.asarray(d.values).dtype}, expected "
            f"{wide_dtype(dtype)} for a {dtype} leaf."
        )
    if d.fixup_indices is not None:
        _check_indices(path + " (fixups)", d.fixup_indices, int(np.prod(shape)))
    return idx


def _state(d: SparseDelta, current: np.ndarray) -> str:
    """Which side of ``d`` the target's values at the delta's positions match: ``"base"``,
    ``"finetuned"``, ``"both"`` (the two are equal there), ``"other"``, or ``"unknown"`` (``d``
    carries no fingerprints)."""
    if d.base_sha256 is None or d.finetuned_sha256 is None:
        return "unknown"
    digest = _digest(current)
    if digest == d.base_sha256 == d.finetuned_sha256:
        return "both"
    if digest == d.base_sha256:
        return "base"
    if digest == d.finetuned_sha256:
        return "finetuned"
    return "other"


def _fingerprint_error(states: dict[str, str], merging: bool) -> ValueError | None:
    """The error for a target whose sparse leaves do not all hold the expected side's values
    (``states`` from :func:`_state`), or ``None`` when they do."""
    want, twice = ("base", "finetuned") if merging else ("finetuned", "base")
    bad = [(p, st) for p, st in states.items() if st not in (want, "both", "unknown")]
    if not bad:
        return None
    keyword = "check_base" if merging else "check_merged"
    total = len(states)
    shown = ", ".join(f"{p!r}" for p, _ in bad[:5]) + (
        f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    )
    if all(st == twice for _, st in bad):
        partly = any(st == want for st in states.values())
        if merging:
            head = "partly merged" if partly else "already merged"
            return ValueError(
                f"This delta is {head}: {len(bad)} of the {total} sparse leaves it sets "
                f"({shown}) already hold its fine-tuned values, so merging would apply it twice "
                f"there. Merge into the base params instead, or pass {keyword}=False to merge "
                "anyway."
            )
        head = "only partly merged into" if partly else "not merged into"
        return ValueError(
            f"This delta is {head} these params: {len(bad)} of the {total} sparse leaves it "
            f"sets ({shown}) hold its base values, so unmerging would remove it twice there. "
            f"Pass the merged params, or {keyword}=False to unmerge anyway."
        )
    what = {"base": "the base values", "finetuned": "the fine-tuned values", "other": "neither"}
    detail = "; ".join(f"{p}: {what[st]}" for p, st in bad[:5])
    target = (
        "the base params this delta was extracted against"
        if merging
        else "the fine-tuned (merged) params this delta was extracted from"
    )
    return ValueError(
        f"These params are not {target}: at the delta's positions, {len(bad)} of its {total} "
        f"sparse leaves do not hold the {want} values the delta recorded ({detail}"
        + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        + "). Were they loaded from another checkpoint, or was another delta merged first? "
        f"Pass {keyword}=False to apply it anyway (e.g. a deliberately scaled delta or another "
        "base of the same shape)."
    )


def _warn_dense(paths: list[str], merging: bool) -> None:
    """Dense leaves of the target that hold neither side's values: they are replaced whole
    (merging) or kept (unmerging), so the result does not depend on them; a warning."""
    fn, keyword = ("merge_delta", "check_base") if merging else ("unmerge_delta", "check_merged")
    effect = "replaced whole, so they come out fine-tuned" if merging else "kept as they are"
    warnings.warn(
        f"{fn}: the target's dense leaves {paths[:5]}"
        + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        + " hold neither the delta's base values nor its fine-tuned ones (a classifier head "
        f"initialised with another seed, or another model?). They are {effect}, but check that "
        f"these are the params the delta was made from; {keyword}=False silences this.",
        stacklevel=3,
    )


def _apply(
    params: Any, delta: Mapping[str, SparseDelta], leaf_fn, *, check: bool, merging: bool
) -> Any:
    named, treedef = _flatten(params, "params")
    paths = {p for p, _ in named}
    missing = [p for p in delta if p not in paths]
    if missing:
        raise ValueError(
            f"Delta leaves missing from the params: {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            + f". Params have e.g. {sorted(paths)[:3]}."
        )
    # First pass: validate, gather the k entries of sparse leaves (merging needs them anyway)
    # and compare fingerprints, so a wrong target raises before anything is computed.
    # Sparse leaves decide: their values at the delta's positions determine the result. Dense
    # leaves do not (merging replaces them, unmerging keeps them), so they only warn.
    prepared: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
    states: dict[str, str] = {}
    odd_dense: list[str] = []
    for path, leaf in named:
        d = delta.get(path)
        if d is None:
            continue
        idx = _validate(path, leaf, d)
        current = None if idx is None else _gather(leaf, idx)
        if check and idx is not None:
            states[path] = _state(d, current)
        elif check and _state(d, np.asarray(leaf)) == "other":
            odd_dense.append(path)
        prepared[path] = (idx, current)
    error = _fingerprint_error(states, merging)
    if error is not None:
        raise error
    if odd_dense:
        _warn_dense(odd_dense, merging)
    out = []
    for path, leaf in named:
        d = delta.get(path)
        out.append(leaf if d is None else leaf_fn(path, leaf, d, *prepared[path]))
    return jax.tree.unflatten(treedef, out)


def merge_delta(base: Any, delta: Mapping[str, SparseDelta], *, check_base: bool = True) -> Any:
    """``base`` with ``delta`` applied: the fine-tuned params, bit for bit.

    Sparse leaves become ``round(wide(b) + d)`` at their indices (then the fix-ups are written);
    dense leaves are replaced by their stored value. Leaves not in the delta are returned
    as they are (the same objects); every leaf keeps its dtype and kind (numpy or jax).

    Before anything is computed, the values of ``base`` at each sparse leaf's ``k`` indices are
    compared with the base fingerprint the delta recorded (see the module docstring), so
    merging into another checkpoint of the same shape, or merging the same delta twice, raises.
    A dense leaf of ``base`` that holds neither the recorded base value nor the fine-tuned one
    (e.g. a classifier head initialised with another seed) only warns: it is replaced whole,
    so the result is exact whatever it held.

    Args:
        base: Params the delta was extracted against (nested dicts/lists of jax or numpy
            arrays; any pytree whose paths match the delta's).
        delta: From :func:`extract_delta` or :func:`load_delta`.
        check_base: Compare ``base`` with the delta's base fingerprints (default). ``False``
            merges into whatever params are given, e.g. a deliberately different base or a
            scaled delta. Deltas without fingerprints are never checked.

    Returns:
        A new tree like ``base``.

    Raises:
        ValueError: naming the leaf, for a delta leaf missing from ``base``, shape or dtype
            mismatch, or indices out of range; and, with ``check_base``, when the sparse leaves
            of ``base`` already hold the fine-tuned values ("this delta is already merged") or
            are not the base the delta was made from.

    Example:
        >>> import numpy as np
        >>> base = {"w": np.array([1.0, 2.0, 3.0], np.float32)}
        >>> tuned = {"w": np.array([1.0, 2.5, 3.0], np.float32)}
        >>> delta = extract_delta(tuned, base, {"w": np.array([1])})
        >>> merged = merge_delta(base, delta)
        >>> merged["w"].tolist()
        [1.0, 2.5, 3.0]
        >>> merge_delta(merged, delta)
        Traceback (most recent call last):
        ...
        ValueError: This delta is already merged: 1 of the 1 sparse leaves it sets ('w') ...
        >>> merge_delta(merged, delta, check_base=False)["w"].tolist()  # applied twice
        [1.0, 3.0, 3.0]
    """

    def leaf_fn(path, leaf, d, idx, current):
        if idx is None:
            return _like(leaf, d.values)
        dtype = np.dtype(d.dtype)
        new = _add_round(current, np.asarray(d.values), dtype)
        if d.fixup_indices is not None:
            pos = np.searchsorted(idx, np.asarray(d.fixup_indices, np.int64))
            new[pos] = np.asarray(d.fixup_finetuned, dtype)
        return _scatter(leaf, idx, new)

    return _apply(base, delta, leaf_fn, check=check_base, merging=True)


def unmerge_delta(
    merged: Any,
    delta: Mapping[str, SparseDelta],
    *,
    dense: Literal["error", "keep"] = "error",
    check_merged: bool = True,
) -> Any:
    """Removes ``delta`` from merged params: the base params, bit for bit, for sparse leaves.

    Sparse leaves become ``round(wide(m) - d)`` at their indices (then the base values of the
    fix-ups are written), which :func:`extract_delta` verified to give the base exactly. A
    dense leaf's base value is not in the delta, so it cannot be restored: by default that is
    an error; ``dense="keep"`` leaves those leaves as they are in ``merged``.

    The mirror of :func:`merge_delta`'s check: ``merged`` must hold the delta's fine-tuned
    values at each sparse leaf's indices, so unmerging from params that are not merged, or
    unmerging twice, raises (dense leaves kept with ``dense="keep"`` only warn).

    Args:
        merged: Params with the delta merged in (e.g. from :func:`merge_delta`).
        delta: The delta to remove.
        dense: ``"error"`` or ``"keep"``, what to do with dense leaves (see above).
        check_merged: Compare ``merged`` with the delta's fine-tuned fingerprints (default);
            ``False`` subtracts the increments from whatever params are given.

    Returns:
        A new tree like ``merged``.

    Raises:
        ValueError: as :func:`merge_delta`; with ``check_merged``, when ``merged`` holds the
            base values ("not merged into these params") or other values.

    Example:
        >>> import numpy as np
        >>> base = {"w": np.array([1.0, 2.0, 3.0], np.float32)}
        >>> delta = extract_delta({"w": np.array([1.0, 2.5, 3.0], np.float32)}, base,
        ...                       {"w": np.array([1])})
        >>> unmerge_delta(merge_delta(base, delta), delta)["w"].tolist()
        [1.0, 2.0, 3.0]
    """
    if dense not in ("error", "keep"):
        raise ValueError(f"`dense` must be 'error' or 'keep'; got {dense!r}.")
    dense_paths = [p for p, d in delta.items() if d.is_dense]
    if dense_paths and dense == "error":
        raise ValueError(
            f"The delta stores dense leaves {dense_paths[:5]} whose base values it does not "
            "hold, so they cannot be unmerged; pass dense='keep' to leave them as merged."
        )

    def leaf_fn(path, leaf, d, idx, current):
        if idx is None:
            return leaf
        dtype = np.dtype(d.dtype)
        old = _sub_round(current, np.asarray(d.values), dtype)
        if d.fixup_indices is not None:
            pos = np.searchsorted(idx, np.asarray(d.fixup_indices, np.int64))
            old[pos] = np.asarray(d.fixup_base, dtype)
        return _scatter(leaf, idx, old)

    return _apply(merged, delta, leaf_fn, check=check_merged, merging=False)


# ----------------------------------------------------------------------------- size


def delta_num_params(delta: Mapping[str, SparseDelta]) -> int:
    """Number of parameter entries the delta sets: ``sum(k)`` plus the size of dense leaves.

    Example:
        >>> import numpy as np
        >>> base = {"w": np.zeros(4, np.float32), "cls": np.zeros(3, np.float32)}
        >>> tuned = {"w": np.array([0, 1, 0, 0], np.float32), "cls": np.ones(3, np.float32)}
        >>> delta_num_params(extract_delta(tuned, base, {"w": np.array([1]), "cls": None}))
        4
    """
    return sum(d.num_params for d in delta.values())


def delta_nbytes(delta: Mapping[str, SparseDelta]) -> int:
    """Bytes of all arrays in the delta (about the size of its safetensors file).

    Example:
        >>> import numpy as np
        >>> base = {"w": np.zeros(4, np.float32)}
        >>> tuned = {"w": np.array([0, 1, 0, 0], np.float32)}
        >>> delta_nbytes(extract_delta(tuned, base, {"w": np.array([1])}))  # int32 + float64
        12
    """
    return sum(d.nbytes for d in delta.values())


# ----------------------------------------------------------------------------- save / load

_CODES = {np.dtype(t): code for code, t in safetensors.numpy._TYPES.items()}


def _to_storable(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return x if x.dtype in _CODES else x.view(_uint_for(x.dtype))


def _from_stored(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return x if x.dtype == dtype else x.view(dtype)


def _sha256(x: np.ndarray) -> str:
    """sha256 (hex) of a stored tensor's raw bytes (C order, as in the file)."""
    return hashlib.sha256(np.ascontiguousarray(x).reshape(-1).view(np.uint8)).hexdigest()


def _canonical(obj: Any) -> str:
    """JSON whose text depends only on the content: sorted keys, no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _header_sha256(meta: Mapping[str, str]) -> str:
    return hashlib.sha256(
        _canonical({k: v for k, v in meta.items() if k != "header_sha256"}).encode()
    ).hexdigest()


def _serialize(tensors: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> list[Any]:
    """A safetensors file as byte chunks, the same bytes for the same content.

    (``safetensors.numpy.save`` writes the metadata in hash-map order, which changes from run
    to run.) Tensors are laid out by decreasing item size, then name, so each is aligned.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k))
    header: dict[str, Any] = {"__metadata__": dict(meta)}
    offset = 0
    for k in order:
        x = tensors[k]
        header[k] = {
            "dtype": _CODES[x.dtype],
            "shape": list(x.shape),
            "data_offsets": [offset, offset + x.nbytes],
        }
        offset += x.nbytes
    text = _canonical(header).encode()
    text += b" " * (-len(text) % 8)
    data = [np.ascontiguousarray(tensors[k]).reshape(-1).view(np.uint8) for k in order]
    return [struct.pack("<Q", len(text)), text, *data]


def _write_atomic(path: str, chunks: list[Any], overwrite: bool) -> None:
    """Writes ``chunks`` to ``path`` via a temporary file in the same directory, then
    ``os.replace`` (``overwrite``) or a hard link that fails if ``path`` exists meanwhile.

    The temporary file is created with mode ``0o666`` less the umask (``tempfile.mkstemp``
    would give ``0o600``, which the final file would keep), and removed on any error.
    """
    directory = os.path.dirname(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f"{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 32 random bits
        raise FileExistsError(f"Could not create a temporary file next to {path}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and refuses an existing `path`
            except FileExistsError:
                raise _exists_error(path) from None
            except OSError:  # no hard links on this file system
                if os.path.lexists(path):
                    raise _exists_error(path) from None
                os.replace(tmp, path)
            else:
                os.remove(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _exists_error(path: str) -> FileExistsError:
    return FileExistsError(
        f"{path} already exists; save_delta does not replace files unless asked: pass "
        "overwrite=True to replace it, or choose another path."
    )


def save_delta(
    delta: Mapping[str, SparseDelta],
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Writes ``delta`` to a safetensors file, atomically.

    The file is written to a temporary file next to ``path`` and moved into place, so a crash
    leaves either the old file or the new one, never half of one; it gets the usual mode for
    new files (``0o666`` less the umask, e.g. ``0o644``). The header records a sha256 of every
    tensor and of the metadata, which :func:`load_delta` verifies, and the leaves'
    fingerprints, which :func:`merge_delta` checks. The bytes depend only on ``delta`` and
    ``metadata``: saving the same delta twice gives identical files.

    Args:
        delta: From :func:`extract_delta`.
        path: Destination (conventionally ``*.safetensors``).
        metadata: JSON-serialisable user metadata (e.g. base model name, rate), returned by
            :func:`load_delta_metadata` (its keys come back sorted).
        overwrite: Replace an existing file at ``path``. By default that is an error.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        IsADirectoryError: ``path`` is a directory.
        TypeError: for something that is not a delta, or metadata JSON cannot hold.

    Example:
        >>> import os, tempfile, numpy as np
        >>> base = {"w": np.zeros(3, np.float32)}
        >>> delta = extract_delta({"w": np.array([0, 2, 0], np.float32)}, base,
        ...                       {"w": np.array([1])})
        >>> f = os.path.join(tempfile.mkdtemp(), "delta.safetensors")
        >>> save_delta(delta, f, {"base_model": "toy"})
        >>> merge_delta(base, load_delta(f))["w"].tolist(), load_delta_metadata(f)
        ([0.0, 2.0, 0.0], {'base_model': 'toy'})
        >>> save_delta(delta, f)
        Traceback (most recent call last):
        ...
        FileExistsError: ... already exists; save_delta does not replace files unless asked: ...
        >>> save_delta(delta, f, {"base_model": "toy"}, overwrite=True)
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{path} is a directory; save_delta needs a file path, e.g. "
            f"{os.path.join(path, 'sift_delta.safetensors')}."
        )
    if not overwrite and os.path.lexists(path):
        raise _exists_error(path)
    tensors: dict[str, np.ndarray] = {}
    leaves: dict[str, dict[str, Any]] = {}
    for name, d in delta.items():
        if not isinstance(name, str) or not isinstance(d, SparseDelta):
            raise TypeError(f"A delta maps path strings to SparseDelta; got {name!r}: {type(d)}.")
        info = {
            "shape": list(d.shape),
            "dtype": np.dtype(d.dtype).name,
            "values_dtype": np.asarray(d.values).dtype.name,
            "dense": d.is_dense,
        }
        if d.base_sha256 is not None and d.finetuned_sha256 is not None:
            info["base_sha256"], info["finetuned_sha256"] = d.base_sha256, d.finetuned_sha256
        leaves[name] = dict(sorted(info.items()))  # leaf order is the delta's, keys sorted
        if not d.is_dense:
            tensors[f"{name}.indices"] = np.asarray(d.indices, np.int32)
        tensors[f"{name}.values"] = _to_storable(np.asarray(d.values))
        if d.fixup_indices is not None:
            tensors[f"{name}.fixup_indices"] = np.asarray(d.fixup_indices, np.int32)
            tensors[f"{name}.fixup_finetuned"] = _to_storable(np.asarray(d.fixup_finetuned))
            tensors[f"{name}.fixup_base"] = _to_storable(np.asarray(d.fixup_base))
    try:
        user = _canonical(dict(metadata or {}))
    except (TypeError, ValueError) as e:
        raise TypeError(f"`metadata` must be JSON-serialisable: {e}") from e
    header = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "leaves": json.dumps(leaves, separators=(",", ":")),
        "user": user,
        "checksums": _canonical({k: _sha256(x) for k, x in tensors.items()}),
    }
    header["header_sha256"] = _header_sha256(header)
    _write_atomic(path, _serialize(tensors, header), overwrite)


def _corrupt(path: str, what: str) -> ValueError:
    return ValueError(
        f"{path}: {what}; the file is corrupt (changed or truncated after it was saved). "
        "Save or copy it again."
    )


@contextlib.contextmanager
def _open(path: str) -> Iterator[tuple[Any, dict[str, str]]]:
    """The open safetensors file and its verified delta header, with clear errors for
    directories, missing, foreign, truncated and corrupt files."""
    if os.path.isdir(path):
        inside = os.path.join(path, "sift_delta.safetensors")
        hint = f" (e.g. {inside})" if os.path.isfile(inside) else ""
        raise IsADirectoryError(
            f"{path} is a directory, not a delta file; pass the .safetensors file saved by "
            f"save_delta{hint}."
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"No delta file at {path}.")
    try:
        f = safetensors.safe_open(path, framework="np")
    except Exception as e:  # SafetensorError (not a public class), OSError
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); it is truncated, corrupt, or "
            "not a sift_jax delta file."
        ) from e
    with f:
        yield f, _read_header(f, path)


def _read_header(f: Any, path: str) -> dict[str, str]:
    header = f.metadata() or {}
    if header.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a sift_jax delta file (no '{FORMAT_NAME}' header).")
    try:
        version = int(header.get("version", "0"))
    except ValueError:
        raise _corrupt(path, f"unreadable format version {header.get('version')!r}") from None
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has delta format version {version}; this sift_jax reads up to "
            f"{FORMAT_VERSION}. Upgrade sift_jax to read it."
        )
    # Version 1 files carry no checksums; newer ones must (checked whenever present).
    if version >= 2 or "header_sha256" in header:
        if header.get("header_sha256") != _header_sha256(header):
            raise _corrupt(path, "the header metadata fails its sha256 check")
    try:
        header["_leaves"] = json.loads(header["leaves"])
        header["_user"] = json.loads(header["user"])
        header["_checksums"] = json.loads(header["checksums"]) if "checksums" in header else None
    except (KeyError, ValueError) as e:
        raise _corrupt(path, f"unreadable header metadata ({e})") from None
    return header


def load_delta(path: str | os.PathLike) -> Delta:
    """Reads a delta written by :func:`save_delta`, verifying its checksums.

    Files of format version 1 (no checksums, no fingerprints) still load, unchecked.

    Raises:
        FileNotFoundError: no file at ``path``.
        IsADirectoryError: ``path`` is a directory.
        ValueError: naming the path (and the tensor), for a file that is not a sift_jax
            delta, is truncated, fails a checksum, or is of a newer format version.

    Example:
        >>> import os, tempfile, numpy as np
        >>> f = os.path.join(tempfile.mkdtemp(), "d.safetensors")
        >>> save_delta({"w": SparseDelta(np.array([0], np.int32), np.array([1.0]), (2,),
        ...                              np.dtype("float32"))}, f)
        >>> load_delta(f)["w"].values.tolist()
        [1.0]
    """
    path = os.fspath(path)
    out: Delta = {}
    with _open(path) as (f, header):
        keys = set(f.keys())
        checksums = header["_checksums"]
        if checksums is not None and set(checksums) != keys:
            odd = sorted(set(checksums) ^ keys)[:5]
            raise _corrupt(path, f"its tensors do not match the checksummed ones ({odd})")

        def get(key: str, dtype: np.dtype | None = None) -> np.ndarray:
            if key not in keys:
                raise _corrupt(path, f"tensor {key!r} is missing")
            x = f.get_tensor(key)
            if checksums is not None and _sha256(x) != checksums[key]:
                raise _corrupt(path, f"tensor {key!r} fails its sha256 check")
            return x if dtype is None else _from_stored(x, dtype)

        try:
            for name, info in header["_leaves"].items():
                dtype = jnp.dtype(info["dtype"])
                values = get(f"{name}.values", jnp.dtype(info["values_dtype"]))
                fix = {}
                if f"{name}.fixup_indices" in keys:
                    fix = dict(
                        fixup_indices=get(f"{name}.fixup_indices"),
                        fixup_finetuned=get(f"{name}.fixup_finetuned", dtype),
                        fixup_base=get(f"{name}.fixup_base", dtype),
                    )
                indices = None if info["dense"] else get(f"{name}.indices")
                out[name] = SparseDelta(
                    indices,
                    values,
                    tuple(info["shape"]),
                    dtype,
                    **fix,
                    base_sha256=info.get("base_sha256"),
                    finetuned_sha256=info.get("finetuned_sha256"),
                )
        except (KeyError, TypeError) as e:
            raise _corrupt(path, f"unreadable leaf record ({e!r})") from None
    return out


def load_delta_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The user metadata saved with a delta (see :func:`save_delta`).

    Raises:
        As :func:`load_delta` (the header checksum is verified, the tensors are not read).

    Example:
        >>> import os, tempfile
        >>> f = os.path.join(tempfile.mkdtemp(), "d.safetensors")
        >>> save_delta({}, f, {"rate": 0.008})
        >>> load_delta_metadata(f)
        {'rate': 0.008}
    """
    path = os.fspath(path)
    with _open(path) as (_, header):
        return header["_user"]
