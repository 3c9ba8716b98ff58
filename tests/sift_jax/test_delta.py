"""SIFT deltas: bitwise-exact extract → save → load → merge / unmerge, validation, atomic save."""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import safetensors.numpy

import sift_jax
from sift_jax import delta as delta_lib
from sift_jax.delta import (
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

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]


def bits(x) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x))
    return x.view(f"uint{8 * x.dtype.itemsize}")


def assert_bitwise_equal(a, b):
    fa, ta = jax.tree.flatten(a)
    fb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(fa, fb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.asarray(x).shape == np.asarray(y).shape
        np.testing.assert_array_equal(bits(x), bits(y))


def random_bit_patterns(rng, n, dtype) -> np.ndarray:
    """Uniform over all bit patterns: every exponent gap, subnormals, ±0, ±inf, NaNs."""
    width = np.dtype(dtype).itemsize * 8
    raw = rng.integers(0, 2**width, size=n, dtype=np.uint64).astype(f"uint{width}")
    return raw.view(dtype)


def adversarial(dtype) -> tuple[np.ndarray, np.ndarray]:
    """(base, finetuned) pairs that break naive ``b + (f - b)`` in one direction or the other."""
    info = ml_dtypes.finfo(dtype)
    tiny, big, eps = float(info.smallest_subnormal), float(info.max), float(info.eps)
    pairs = [
        (big, tiny),  # f far below b: cancellation in merge
        (tiny, big),  # b far below f: cancellation in unmerge
        (big, -big),  # f - b overflows the leaf dtype
        (-big, big),
        (0.0, -0.0),  # signed zeros
        (-0.0, -0.0),
        (1.0, 1.0 + eps),
        (1.0, 1.0 - eps / 2),
        (3.0, np.inf),
        (np.inf, np.inf),
        (np.inf, 1.0),
        (1.0, np.nan),
        (np.nan, 1.0),
        (2.0**10, 2.0**-10),
    ]
    b, f = zip(*pairs, strict=True)
    return np.array(b).astype(dtype), np.array(f).astype(dtype)


@pytest.mark.parametrize("as_jax", [False, True], ids=["numpy", "jax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_roundtrip_is_bitwise_exact_for_every_value(tmp_path, dtype, as_jax):
    rng = np.random.default_rng(0)
    n = 3000
    b = random_bit_patterns(rng, n, dtype)
    f = random_bit_patterns(rng, n, dtype)
    adv_b, adv_f = adversarial(dtype)
    b[: adv_b.size], f[: adv_f.size] = adv_b, adv_f
    rest = rng.choice(np.arange(adv_b.size, n), 500, replace=False)
    sel = np.sort(np.concatenate([np.arange(adv_b.size), rest]))
    keep = np.setdiff1d(np.arange(n), sel)
    f[keep] = b[keep]  # only the selected entries change
    base = {"m": {"w": b.reshape(60, 50)}}
    tuned = {"m": {"w": f.reshape(60, 50)}}
    if as_jax:
        base, tuned = jax.tree.map(jnp.asarray, base), jax.tree.map(jnp.asarray, tuned)

    delta = extract_delta(tuned, base, {"m": {"w": jnp.asarray(sel, jnp.int32)}})
    save_delta(delta, tmp_path / "d.safetensors")
    loaded = load_delta(tmp_path / "d.safetensors")

    merged = merge_delta(base, loaded)
    assert_bitwise_equal(merged, tuned)
    assert isinstance(merged["m"]["w"], jax.Array if as_jax else np.ndarray)
    assert_bitwise_equal(unmerge_delta(merged, loaded), base)
    d = loaded["m/w"]
    assert d.values.dtype == delta_lib.wide_dtype(dtype)
    fixups = set(d.fixup_indices.tolist())
    assert {0, 1, 4, 5} <= fixups  # exponent-gap cancellation and signed zeros need fix-ups ...
    assert not {6, 7, 13} & fixups  # ... ordinary pairs go through the increment


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_ordinary_finetuning_needs_no_fixups(dtype):
    rng = np.random.default_rng(1)
    b = rng.normal(0, 0.05, 20000).astype(dtype)
    sel = np.sort(rng.choice(b.size, 2000, replace=False))
    f = b.copy()
    f[sel] = (f[sel].astype(np.float32) + rng.normal(0, 1e-3, sel.size)).astype(dtype)
    delta = extract_delta({"w": f}, {"w": b}, {"w": sel})
    assert delta["w"].fixup_indices is None
    np.testing.assert_allclose(
        delta["w"].values, f[sel].astype(np.float64) - b[sel].astype(np.float64), rtol=0, atol=0
    )
    assert_bitwise_equal(merge_delta({"w": b}, delta), {"w": f})


def test_naive_float_add_is_not_exact_but_merge_is():
    # The reason for the design: in fp32, b + (f - b) != f here.
    b, f = np.float32(1.0), np.float32(1e-30)
    assert b + (f - b) != f
    delta = extract_delta({"w": np.array([f])}, {"w": np.array([b])}, {"w": np.array([0])})
    assert delta["w"].values[0] == pytest.approx(-1.0)  # still the increment
    assert merge_delta({"w": np.array([b])}, delta)["w"][0] == f


def test_dense_leaves_round_trip_and_need_keep_to_unmerge(tmp_path):
    rng = np.random.default_rng(2)
    base = {
        "enc": {"q": jnp.asarray(rng.normal(size=(4, 6)), jnp.bfloat16)},
        "cls": {"kernel": jnp.asarray(rng.normal(size=(6, 3)), jnp.bfloat16), "b": jnp.zeros(3)},
        "ln": jnp.ones(6),
        "step": jnp.array(3, jnp.int32),
    }
    tuned = dict(base)
    tuned["enc"] = {"q": base["enc"]["q"].at[1, 2].add(0.25).at[3, 5].add(-0.5)}
    tuned["cls"] = {"kernel": base["cls"]["kernel"] * 1.5, "b": base["cls"]["b"] + 0.1}
    indices = {"enc": {"q": jnp.array([8, 23], jnp.int32)}, "cls": None, "ln": None, "step": None}

    delta = extract_delta(tuned, base, indices)
    assert list(delta) == ["cls/b", "cls/kernel", "enc/q"]  # unchanged ln/step are absent
    assert delta["cls/kernel"].is_dense and delta["cls/kernel"].values.dtype == ml_dtypes.bfloat16
    save_delta(delta, tmp_path / "d.safetensors")
    loaded = load_delta(tmp_path / "d.safetensors")
    merged = merge_delta(base, loaded)
    assert_bitwise_equal(merged, tuned)
    assert merged["ln"] is base["ln"]  # untouched leaves are passed through

    with pytest.raises(ValueError, match=r"cls/b.*dense='keep'"):
        unmerge_delta(merged, loaded)
    restored = unmerge_delta(merged, loaded, dense="keep")
    assert_bitwise_equal(restored["enc"], base["enc"])
    assert_bitwise_equal(restored["cls"], tuned["cls"])

    assert delta_num_params(loaded) == 2 + 18 + 3
    assert delta_nbytes(loaded) == 2 * 4 + 2 * 4 + 18 * 2 + 3 * 4  # idx, f32 incr, bf16, f32


def test_dense_spec_stores_selected_leaves_and_rejects_unlisted_changes():
    base = {"cls": np.zeros(2, np.float32), "ln": np.ones(2, np.float32)}
    tuned = {"cls": np.zeros(2, np.float32), "ln": np.full(2, 2.0, np.float32)}
    only_cls = extract_delta(base, base, None, dense="cls")
    assert list(only_cls) == ["cls"] and only_cls["cls"].is_dense  # stored even if unchanged
    with pytest.raises(ValueError, match=r"^ln: 2 entries changed but the leaf is neither"):
        extract_delta(tuned, base, None, dense="cls")
    assert list(extract_delta(tuned, base, None, dense={"cls": False, "ln": True})) == ["ln"]


def test_indices_can_come_from_an_optax_state():
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32), "cls": jnp.zeros(4)}
    tx = sift_jax.sparse_increment(5, optax.adam(1e-2), sparse="w", dense="cls")
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda p: jnp.sum(jnp.sin(p["w"] * 3.0)) + jnp.sum((p["cls"] - 1.0) ** 2))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    tuned = params
    for _ in range(4):
        tuned, state = step(tuned, state)
    delta = extract_delta(tuned, params, state)
    assert delta["w"].indices.size == 5 and delta["cls"].is_dense
    np.testing.assert_array_equal(
        delta["w"].indices, np.asarray(sift_jax.selected_indices(state)["w"])
    )
    assert_bitwise_equal(merge_delta(params, delta), tuned)


def base_and_delta():
    base = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    tuned = {"w": base["w"] + np.array([[0, 1, 0], [0, 0, 0]], np.float32)}
    return base, tuned, extract_delta(tuned, base, {"w": np.array([1])})


def test_merge_errors_name_the_leaf():
    base, _, delta = base_and_delta()
    with pytest.raises(ValueError, match=r"^w: shape mismatch: delta \(2, 3\) vs params \(3, 2\)"):
        merge_delta({"w": np.zeros((3, 2), np.float32)}, delta)
    with pytest.raises(ValueError, match=r"^w: dtype mismatch: delta float32 vs params float16"):
        merge_delta({"w": np.zeros((2, 3), np.float16)}, delta)
    with pytest.raises(ValueError, match=r"missing from the params: \['w'\]"):
        merge_delta({"v": base["w"]}, delta)
    bad = SparseDelta(np.array([6], np.int32), np.array([1.0]), (2, 3), np.dtype(np.float32))
    with pytest.raises(ValueError, match=r"^w: index out of range.*\[6, 6\].*6 entries"):
        merge_delta(base, {"w": bad})
    narrow = SparseDelta(np.array([0], np.int32), np.array([1.0], np.float32), (2, 3), np.float32)
    with pytest.raises(ValueError, match=r"^w: increments are float32, expected float64"):
        merge_delta(base, {"w": narrow})


def test_extract_errors_name_the_leaf():
    base, tuned, _ = base_and_delta()
    with pytest.raises(ValueError, match=r"^w: index out of range"):
        extract_delta(tuned, base, {"w": np.array([-1])})
    with pytest.raises(ValueError, match=r"^w: 1 entries changed outside the 1 selected indices"):
        extract_delta(tuned, base, {"w": np.array([0])})
    with pytest.raises(ValueError, match=r"^w: shape mismatch: finetuned \(6,\) vs base \(2, 3\)"):
        extract_delta({"w": tuned["w"].ravel()}, base, None)
    with pytest.raises(ValueError, match=r"^w: dtype mismatch: finetuned float16 vs base float32"):
        extract_delta({"w": tuned["w"].astype(np.float16)}, base, None)
    with pytest.raises(ValueError, match="not shaped like `base`"):
        extract_delta({"v": tuned["w"]}, base, None)
    with pytest.raises(TypeError, match="floating-point"):
        extract_delta({"w": np.array([1, 2])}, {"w": np.array([1, 3])}, {"w": np.array([1])})


def test_save_is_atomic(tmp_path, monkeypatch):
    base, tuned, delta = base_and_delta()
    path = tmp_path / "d.safetensors"
    save_delta(delta, path, {"v": 1})
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", crash)  # after the bytes were written, before the rename
    bigger = extract_delta(tuned, base, {"w": np.array([1, 2, 3])})
    with pytest.raises(OSError, match="disk on fire"):
        save_delta(bigger, path, {"v": 2}, overwrite=True)
    with pytest.raises(OSError, match="disk on fire"):
        save_delta(bigger, tmp_path / "new.safetensors")
    assert path.read_bytes() == before  # the old file is intact ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]  # ... no debris
    assert load_delta_metadata(path) == {"v": 1}


def test_file_layout_and_foreign_files(tmp_path):
    _, _, delta = base_and_delta()
    save_delta(delta, tmp_path / "d.safetensors", {"base_model": "roberta-large", "rate": 0.008})
    raw = safetensors.numpy.load_file(tmp_path / "d.safetensors")
    assert sorted(raw) == ["w.indices", "w.values"]
    assert raw["w.indices"].dtype == np.int32 and raw["w.values"].dtype == np.float64
    assert load_delta_metadata(tmp_path / "d.safetensors")["rate"] == 0.008

    safetensors.numpy.save_file({"x": np.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a sift_jax delta file"):
        load_delta(tmp_path / "other.safetensors")


def test_merge_inside_nested_lists_keeps_structure_and_dtypes():
    base = {"layers": [{"k": jnp.ones((2, 2), jnp.float16)}, {"k": jnp.ones((2, 2), jnp.float16)}]}
    tuned = {"layers": [base["layers"][0], {"k": base["layers"][1]["k"].at[0, 1].set(0.125)}]}
    delta = extract_delta(tuned, base, {"layers": [{"k": None}, {"k": jnp.array([1, 3])}]})
    assert list(delta) == ["layers/1/k"]
    merged = merge_delta(base, delta)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    assert_bitwise_equal(merged, tuned)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_merge_keeps_the_sharding_of_sharded_leaves(axis_type):
    kind = getattr(jax.sharding.AxisType, axis_type)
    mesh = jax.make_mesh((jax.device_count(),), ("x",), axis_types=(kind,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    n = 4 * jax.device_count()
    base = {"w": jax.device_put(jnp.arange(n, dtype=jnp.bfloat16).reshape(n, 1), sharding)}
    bumped = np.asarray(base["w"]).copy()
    bumped[3, 0] += 0.5
    tuned = {"w": jax.device_put(bumped, sharding)}
    delta = extract_delta(tuned, base, {"w": jnp.array([3], jnp.int32)})
    merged = merge_delta(base, delta)
    assert merged["w"].sharding == base["w"].sharding
    assert_bitwise_equal(merged, tuned)


def test_sparse_delta_is_a_pytree_of_its_arrays():
    _, _, delta = base_and_delta()
    leaves = jax.tree.leaves(delta)
    assert [x.dtype for x in leaves] == [np.int32, np.float64]


# ----------------------------------------------------------------------------- integrity


def saved(tmp_path, name="d.safetensors", metadata=None):
    base, tuned, delta = base_and_delta()
    path = tmp_path / name
    save_delta(delta, path, metadata)
    return base, tuned, path


def data_start(raw: bytes) -> int:
    return 8 + int.from_bytes(raw[:8], "little")


def test_flipped_tensor_bytes_are_detected_and_named(tmp_path):
    base, _, path = saved(tmp_path)
    raw = bytearray(path.read_bytes())
    # tensors are laid out by item size then name: w.values (float64) first
    raw[data_start(raw) + 6] ^= 0x40  # inside the increment: 1.0 -> 1.0 * 2**-124 or so
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"d\.safetensors: tensor 'w\.values' fails its sha256"):
        load_delta(path)


def test_edited_header_metadata_is_detected(tmp_path):
    _, _, path = saved(tmp_path, metadata={"rate": 0.5})
    raw = path.read_bytes()
    edited = raw.replace(b'\\"shape\\":[2,3]', b'\\"shape\\":[3,2]')  # same length
    assert edited != raw
    path.write_bytes(edited)
    with pytest.raises(ValueError, match=r"d\.safetensors: the header metadata fails its sha256"):
        load_delta(path)
    with pytest.raises(ValueError, match="header metadata fails its sha256"):
        load_delta_metadata(path)


def write_v1_file(path, delta, user=None):
    """A delta file exactly as format version 1 wrote it (no checksums, no fingerprints)."""
    import json

    tensors, leaves = {}, {}
    for name, d in delta.items():
        leaves[name] = {
            "shape": list(d.shape),
            "dtype": np.dtype(d.dtype).name,
            "values_dtype": d.values.dtype.name,
            "dense": d.is_dense,
        }
        tensors[f"{name}.indices"] = np.asarray(d.indices, np.int32)
        tensors[f"{name}.values"] = np.asarray(d.values)
    meta = {
        "format": "sift_jax.delta",
        "version": "1",
        "leaves": json.dumps(leaves),
        "user": json.dumps(user or {}),
    }
    safetensors.numpy.save_file(tensors, str(path), metadata=meta)


def test_version_1_files_still_load_and_merge_unchecked(tmp_path):
    base, tuned, delta = base_and_delta()
    write_v1_file(tmp_path / "v1.safetensors", delta, {"rate": 0.1})
    loaded = load_delta(tmp_path / "v1.safetensors")
    assert loaded["w"].base_sha256 is None  # nothing to check against ...
    assert_bitwise_equal(merge_delta(base, loaded), tuned)
    merge_delta(tuned, loaded)  # ... so no fingerprint error either
    assert load_delta_metadata(tmp_path / "v1.safetensors") == {"rate": 0.1}
    assert delta_lib.FORMAT_VERSION == 2


def test_load_errors_name_the_path(tmp_path):
    _, _, path = saved(tmp_path)
    with pytest.raises(IsADirectoryError, match=rf"{tmp_path} is a directory, not a delta file"):
        load_delta(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"No delta file at .*nope\.safetensors"):
        load_delta(tmp_path / "nope.safetensors")
    raw = path.read_bytes()
    for cut in (len(raw) - 3, data_start(raw) - 5, 5, 0):
        (tmp_path / "cut.safetensors").write_bytes(raw[:cut])
        with pytest.raises(ValueError, match=r"cut\.safetensors is not a readable safetensors"):
            load_delta(tmp_path / "cut.safetensors")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "sift_delta.safetensors").write_bytes(raw)
    with pytest.raises(IsADirectoryError, match=r"e\.g\. .*run/sift_delta\.safetensors"):
        load_delta_metadata(tmp_path / "run")


# ----------------------------------------------------------------------------- fingerprints


def test_merge_refuses_another_base_and_a_second_merge(tmp_path):
    base, tuned, path = saved(tmp_path)
    delta = load_delta(path)  # the fingerprints survive save / load
    fresh = extract_delta(tuned, base, {"w": np.array([1])})["w"]
    assert (delta["w"].base_sha256, delta["w"].finetuned_sha256) == (
        fresh.base_sha256,
        fresh.finetuned_sha256,
    )
    merged = merge_delta(base, delta)
    with pytest.raises(ValueError, match=r"^This delta is already merged: 1 of the 1 sparse"):
        merge_delta(merged, delta)
    other = {"w": base["w"] + 0.25}  # same shape and dtype, another checkpoint
    with pytest.raises(ValueError, match=r"^These params are not the base params .*w: neither"):
        merge_delta(other, delta)
    # deliberate use: the check can be skipped, and merging stays what it was
    np.testing.assert_array_equal(
        merge_delta(other, delta, check_base=False)["w"], other["w"] + [[0, 1, 0], [0, 0, 0]]
    )
    np.testing.assert_array_equal(
        merge_delta(merged, delta, check_base=False)["w"], base["w"] + [[0, 2, 0], [0, 0, 0]]
    )


def test_unmerge_checks_it_is_given_the_merged_params():
    base, tuned, delta = base_and_delta()
    assert_bitwise_equal(unmerge_delta(tuned, delta), base)
    with pytest.raises(ValueError, match=r"^This delta is not merged into these params"):
        unmerge_delta(base, delta)
    with pytest.raises(ValueError, match=r"not the fine-tuned \(merged\) params .*check_merged"):
        unmerge_delta({"w": tuned["w"] * 3}, delta)
    np.testing.assert_array_equal(
        unmerge_delta(base, delta, check_merged=False)["w"], base["w"] - [[0, 1, 0], [0, 0, 0]]
    )


def test_dense_leaves_are_fingerprinted_whole_but_only_warn():
    base = {"cls": np.zeros(3, np.float32), "w": np.zeros(4, np.float32)}
    tuned = {"cls": np.ones(3, np.float32), "w": np.array([0, 2, 0, 0], np.float32)}
    delta = extract_delta(tuned, base, {"cls": None, "w": np.array([1])})
    assert delta["cls"].base_sha256 == sha256_of(base["cls"])
    merged = merge_delta(base, delta)
    with pytest.raises(ValueError, match="already merged: 1 of the 1 sparse leaves it sets"):
        merge_delta(merged, delta)
    # A head initialised with another seed is replaced whole: exact result, but a warning.
    other_head = {"cls": np.full(3, 0.5, np.float32), "w": base["w"]}
    with pytest.warns(UserWarning, match=r"dense leaves \['cls'\] hold neither .*another seed"):
        assert_bitwise_equal(merge_delta(other_head, delta), tuned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_delta(other_head, delta, check_base=False)
        merge_delta({"cls": merged["cls"], "w": base["w"]}, delta)  # the head merged: harmless
    with pytest.warns(UserWarning, match=r"unmerge_delta: .*\['cls'\].*kept as they are"):
        unmerge_delta({"cls": other_head["cls"], "w": merged["w"]}, delta, dense="keep")


def test_partly_merged_params_are_named():
    base = {"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)}
    tuned = {"a": np.array([0, 2, 0, 0], np.float32), "b": np.array([3, 0, 0, 0], np.float32)}
    delta = extract_delta(tuned, base, {"a": np.array([1]), "b": np.array([0])})
    half = {"a": tuned["a"], "b": base["b"]}
    with pytest.raises(ValueError, match=r"^This delta is partly merged: 1 of the 2 .*\('a'\)"):
        merge_delta(half, delta)
    with pytest.raises(ValueError, match=r"^This delta is only partly merged into .*\('b'\)"):
        unmerge_delta(half, delta)
    mixed = {"a": tuned["a"], "b": base["b"] + 1}
    with pytest.raises(ValueError, match=r"2 of its 2 sparse leaves .*a: the fine-tuned values; b"):
        merge_delta(mixed, delta)


def sha256_of(x) -> str:
    """The fingerprint the format documents: sha256 of the bit patterns in C order."""
    import hashlib

    return hashlib.sha256(bits(np.asarray(x).reshape(-1))).hexdigest()


def test_the_base_check_looks_only_at_the_selected_entries():
    """The fingerprints are of the k selected entries alone (so checking one gathers only
    those): a base that differs elsewhere still merges, one that differs there does not."""
    rng = np.random.default_rng(4)
    base = {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.bfloat16)}
    sel = np.array([3, 70, 4000])
    tuned = {"w": base["w"].ravel().at[sel].add(1.0).reshape(64, 64)}
    delta = extract_delta(tuned, base, {"w": sel})
    assert delta["w"].base_sha256 == sha256_of(np.asarray(base["w"]).ravel()[sel])
    assert delta["w"].finetuned_sha256 == sha256_of(np.asarray(tuned["w"]).ravel()[sel])
    assert_bitwise_equal(merge_delta(base, delta), tuned)
    elsewhere = {"w": base["w"].ravel().at[5].add(1.0).reshape(64, 64)}
    merged = merge_delta(elsewhere, delta)
    np.testing.assert_array_equal(
        np.asarray(merged["w"]).ravel()[sel], np.asarray(tuned["w"]).ravel()[sel]
    )
    there = {"w": base["w"].ravel().at[70].add(1.0).reshape(64, 64)}
    with pytest.raises(ValueError, match="base"):
        merge_delta(there, delta)
    with pytest.raises(ValueError, match="already merged"):
        merge_delta(tuned, delta)


NAN_PAYLOADS = {  # quiet NaN with a payload, signalling NaN with a payload, then 1.0
    "float32": [0x7FC0_0001, 0xFF80_0003, 0x3F80_0000],
    "bfloat16": [0x7FC1, 0xFF83, 0x3F80],
    "float16": [0x7E01, 0xFC03, 0x3C00],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_nan_payloads_keep_their_fingerprint_on_jax(dtype):
    # extract on numpy, check and merge on jax: the gathered bit patterns must be identical
    b = np.array(NAN_PAYLOADS[np.dtype(dtype).name], f"uint{8 * np.dtype(dtype).itemsize}")
    b = b.view(dtype)
    f = b.copy()
    f[2] = dtype(2.0)
    delta = extract_delta({"w": f}, {"w": b}, {"w": np.array([0, 1, 2])})
    merged = merge_delta({"w": jnp.asarray(b)}, delta)
    assert_bitwise_equal(merged, {"w": f})
    with pytest.raises(ValueError, match="already merged"):
        merge_delta(merged, delta)


# ----------------------------------------------------------------------------- files


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    base, tuned, path = saved(tmp_path, metadata={"v": 1})
    before = path.read_bytes()
    bigger = extract_delta(tuned, base, {"w": np.array([1, 2, 3])})
    with pytest.raises(FileExistsError, match=r"d\.safetensors already exists.*overwrite=True"):
        save_delta(bigger, path, {"v": 2})
    assert path.read_bytes() == before
    save_delta(bigger, path, {"v": 2}, overwrite=True)
    assert load_delta_metadata(path) == {"v": 2} and load_delta(path)["w"].indices.size == 3
    with pytest.raises(IsADirectoryError, match="is a directory; save_delta needs a file path"):
        save_delta(bigger, tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]


def test_save_refuses_a_file_that_appears_while_writing(tmp_path, monkeypatch):
    _, _, delta = base_and_delta()
    path = tmp_path / "d.safetensors"
    real_fsync = os.fsync

    def racing_fsync(fd):  # another process creates the file between check and rename
        real_fsync(fd)
        if not path.exists():
            path.write_bytes(b"theirs")

    monkeypatch.setattr(os, "fsync", racing_fsync)
    with pytest.raises(FileExistsError, match="already exists"):
        save_delta(delta, path)
    assert path.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]


def test_save_works_without_hard_links(tmp_path, monkeypatch):
    base, tuned, delta = base_and_delta()

    def no_links(src, dst):
        raise PermissionError("this file system has no hard links")

    monkeypatch.setattr(os, "link", no_links)
    save_delta(delta, tmp_path / "d.safetensors")
    with pytest.raises(FileExistsError, match="already exists"):
        save_delta(delta, tmp_path / "d.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]
    assert_bitwise_equal(merge_delta(base, load_delta(tmp_path / "d.safetensors")), tuned)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_get_the_mode_from_the_umask(tmp_path, umask):
    from train.models.weights import write_hf_dir

    _, _, delta = base_and_delta()
    old = os.umask(umask)
    try:
        save_delta(delta, tmp_path / "d.safetensors")
        write_hf_dir(tmp_path / "hf", {"a": 1}, {"x": np.zeros(2, np.float32)}, None)
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert os.stat(tmp_path / "d.safetensors").st_mode & 0o777 == want
    for name in ("config.json", "model.safetensors"):
        assert os.stat(tmp_path / "hf" / name).st_mode & 0o777 == want, name
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def test_saving_the_same_delta_twice_gives_identical_bytes(tmp_path):
    rng = np.random.default_rng(5)
    base = {f"l{i}": {"k": rng.normal(size=(8, 8)).astype(np.float32)} for i in range(4)}
    base["cls"] = np.zeros(3, ml_dtypes.bfloat16)
    tuned = jax.tree.map(np.copy, base)
    for i in range(4):
        tuned[f"l{i}"]["k"].ravel()[[i, 9]] += 1.0
    tuned["cls"] = np.ones(3, ml_dtypes.bfloat16)
    indices = {f"l{i}": {"k": np.array([i, 9])} for i in range(4)} | {"cls": None}
    delta = extract_delta(tuned, base, indices)
    meta = {"zeta": 1, "alpha": {"b": 2, "a": [1, 2]}, "mid": "x"}
    for i in range(5):
        save_delta(delta, tmp_path / f"{i}.safetensors", meta)
    save_delta(dict(delta), tmp_path / "r.safetensors", dict(reversed(meta.items())))
    files = {p.read_bytes() for p in tmp_path.iterdir()}
    assert len(files) == 1
    assert_bitwise_equal(merge_delta(base, load_delta(tmp_path / "r.safetensors")), tuned)
