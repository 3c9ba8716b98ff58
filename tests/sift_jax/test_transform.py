"""sparse_increment: the optax-contrib checklist plus the SIFT-specific guarantees."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sift_jax
from sift_jax import sparse_increment


def make_params(dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "encoder": {
            "query": {"kernel": jax.random.normal(k1, (8, 6), dtype), "bias": jnp.zeros(6, dtype)},
            "ffn": {"kernel": jax.random.normal(k2, (6, 5), dtype)},
        },
        "classifier": {"kernel": jax.random.normal(k3, (6, 2), dtype)},
        "step": jnp.array(3, jnp.int32),
    }


def grads_at(t, params):
    """A deterministic, step-dependent gradient tree shaped like params."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(100 + t), len(leaves))
    out = [
        jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def run(opt, params, steps, start=0):
    state = opt.init(params)
    update = jax.jit(opt.update)
    for t in range(start, start + steps):
        updates, state = update(grads_at(t, params), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


# ---------------------------------------------------------------- selection and budgets


def test_rate_gives_paper_count_per_leaf_and_indices_are_true_topk():
    params = make_params()
    opt = sparse_increment(0.1, optax.sgd(0.1))
    state = opt.init(params)
    g = grads_at(0, params)
    _, state = jax.jit(opt.update)(g, state, params)
    idx = sift_jax.selected_indices(state)
    get = lambda tree, path: (
        tree[path[0]][path[1]] if len(path) == 2 else tree[path[0]][path[1]][path[2]]
    )
    for path in [
        ("encoder", "query", "kernel"),
        ("encoder", "ffn", "kernel"),
        ("classifier", "kernel"),
    ]:
        leaf_idx, leaf_g = get(idx, path), get(g, path)
        n = leaf_g.size
        k = min(int(0.1 * n) + 1, n)
        assert leaf_idx.shape == (k,) and leaf_idx.dtype == jnp.int32
        expected = np.sort(np.argsort(-np.abs(np.asarray(leaf_g).ravel()), kind="stable")[:k])
        np.testing.assert_array_equal(np.asarray(leaf_idx), expected)
    assert idx["step"] is None  # integer leaves never train


def test_int_count_is_capped_at_leaf_size_and_callable_k_decides_per_leaf():
    params = make_params()
    state = sparse_increment(1000, optax.sgd(0.1)).init(params)
    assert sift_jax.selected_indices(state)["encoder"]["query"]["bias"].shape == (6,)
    k_fn = lambda path, leaf: 2 if path.endswith("bias") else 3
    idx = sift_jax.selected_indices(sparse_increment(k_fn, optax.sgd(0.1)).init(params))
    assert idx["encoder"]["query"]["bias"].shape == (2,)
    assert idx["encoder"]["ffn"]["kernel"].shape == (3,)


@pytest.mark.parametrize(
    "bad, err",
    [
        (0, ValueError),
        (-3, ValueError),
        (0.0, ValueError),
        (1.5, ValueError),
        (float("nan"), ValueError),
        (True, TypeError),
        ("0.1", TypeError),
        (None, TypeError),
    ],
)
def test_bad_k_raises_at_construction(bad, err):
    with pytest.raises(err, match="`k`"):
        sparse_increment(bad, optax.sgd(0.1))


def test_other_bad_arguments_raise_at_construction_or_init():
    with pytest.raises(ValueError, match="Unknown selection"):
        sparse_increment(0.1, optax.sgd(0.1), selection="best")
    with pytest.raises(ValueError, match="selection_steps"):
        sparse_increment(0.1, optax.sgd(0.1), selection_steps=0)
    with pytest.raises(TypeError, match="needs the optimizer"):
        sparse_increment(0.1, inner=optax.sgd)
    with pytest.raises(TypeError, match="needs the optimizer"):
        sparse_increment(0.1)  # the chain form cannot keep decay off unselected weights
    with pytest.raises(ValueError, match="`mode`"):
        sparse_increment(0.1, optax.sgd(0.1), mode="dense")
    with (
        pytest.raises(ValueError, match="no leaf is trainable"),
        pytest.warns(UserWarning, match="matches no leaf"),
    ):
        sparse_increment(0.1, optax.sgd(0.1), sparse="nothing_matches").init(make_params())
    with pytest.raises(ValueError, match="invalid regular expression"):
        sparse_increment(0.1, optax.sgd(0.1), sparse="query(").init(make_params())
    with pytest.raises(ValueError, match="gave 0"):
        sparse_increment(lambda p, x: 0, optax.sgd(0.1)).init(make_params())


def test_multi_step_selection_uses_summed_abs_gradients_and_holds_sparse_leaves_still():
    params = make_params()
    opt = sparse_increment(4, optax.sgd(1.0), sparse="ffn", dense="classifier", selection_steps=3)
    state = opt.init(params)
    update = jax.jit(opt.update)
    total = 0.0
    for t in range(3):
        g = grads_at(t, params)
        total = total + jnp.abs(g["encoder"]["ffn"]["kernel"])
        updates, state = update(g, state, params)
        assert not np.any(np.asarray(updates["encoder"]["ffn"]["kernel"]))  # zero while selecting
        assert np.any(np.asarray(updates["classifier"]["kernel"]))  # dense trains from step 1
    idx = sift_jax.selected_indices(state)["encoder"]["ffn"]["kernel"]
    np.testing.assert_array_equal(
        np.asarray(idx), np.asarray(sift_jax.selection.topk_indices(total, 4))
    )
    updates, state = update(grads_at(3, params), state, params)
    assert int((updates["encoder"]["ffn"]["kernel"] != 0).sum()) == 4


def test_update_on_selection_applies_the_selection_batch():
    params = make_params()
    g = grads_at(0, params)
    for flag, expected in [(False, 0), (True, 5)]:
        opt = sparse_increment(5, optax.sgd(1.0), sparse="ffn", update_on_selection=flag)
        updates, _ = jax.jit(opt.update)(g, opt.init(params), params)
        assert int((updates["encoder"]["ffn"]["kernel"] != 0).sum()) == expected


def test_random_and_magnitude_and_callable_selection():
    params = make_params()
    g = grads_at(0, params)
    w = params["encoder"]["ffn"]["kernel"]
    idx_of = lambda opt: sift_jax.selected_indices(
        jax.jit(opt.update)(g, opt.init(params), params)[1]
    )["encoder"]["ffn"]["kernel"]
    r0 = idx_of(sparse_increment(6, optax.sgd(1.0), selection="random", seed=0))
    r1 = idx_of(sparse_increment(6, optax.sgd(1.0), selection="random", seed=1))
    assert len(set(np.asarray(r0).tolist())) == 6 and not np.array_equal(r0, r1)
    m = idx_of(sparse_increment(6, optax.sgd(1.0), selection="magnitude"))
    np.testing.assert_array_equal(m, sift_jax.selection.topk_indices(jnp.abs(w), 6))
    strided = lambda s, p, k, key: jnp.arange(k) * (p.size // k)
    c = idx_of(sparse_increment(6, optax.sgd(1.0), selection=strided))
    np.testing.assert_array_equal(c, np.arange(6) * 5)
    # A callable's indices in any order: sorted before the (sorted-index) gathers and scatters,
    # so the update lands exactly where the same indices in order put it.
    unsorted = lambda s, p, k, key: strided(s, p, k, key)[::-1]
    runs = []
    for sel in (strided, unsorted):
        opt = sparse_increment(6, optax.sgd(1.0), selection=sel, update_on_selection=True)
        runs.append(jax.jit(opt.update)(g, opt.init(params), params))
    assert np.asarray(runs[1][0]["encoder"]["ffn"]["kernel"]).ravel()[10] != 0
    jax.tree.map(np.testing.assert_array_equal, runs[1], runs[0])
    opt = sparse_increment(6, optax.sgd(1.0), selection="magnitude")
    with pytest.raises(ValueError, match="needs params"):
        opt.update(g, opt.init(params))


def test_row_balanced_selection_spreads_over_rows_and_keeps_each_rows_largest():
    """grad-row: an outlier input row takes every plain top-k pick but only its share of
    the row-balanced ones; within a row the largest |g| still wins; 1-D leaves keep |g|."""
    g = jax.random.normal(jax.random.key(0), (8, 16)).at[0].multiply(100.0)
    s = jnp.abs(g)
    plain = np.asarray(sift_jax.selection.select_by_gradient(s, None, 16, jax.random.key(0)))
    rowed = np.asarray(sift_jax.selection.select_row_balanced(s, None, 16, jax.random.key(0)))
    assert np.all(plain // 16 == 0)
    rows = rowed // 16
    assert len(set(rows.tolist())) >= 6 and np.sum(rows == 0) <= 4
    for r in set(rows.tolist()):
        chosen = rowed[rows == r] % 16
        np.testing.assert_array_equal(np.sort(chosen), np.sort(np.argsort(-s[r])[: len(chosen)]))
    b = jnp.abs(jax.random.normal(jax.random.key(1), (16,)))
    np.testing.assert_array_equal(
        sift_jax.selection.select_row_balanced(b, None, 4, jax.random.key(0)),
        sift_jax.selection.topk_indices(b, 4),
    )
    opt = sparse_increment(6, optax.sgd(1.0), selection="grad-row")
    params = make_params()
    idx = sift_jax.selected_indices(jax.jit(opt.update)(grads_at(0, params), opt.init(params))[1])
    assert idx["encoder"]["ffn"]["kernel"].shape == (6,)


# ---------------------------------------------------------------- training semantics


@pytest.mark.parametrize("update_on_selection", [False, True])
def test_k_equals_n_matches_inner_optimizer_run_densely(update_on_selection):
    """With every entry selected, compact SIFT is exactly the inner optimizer (after selection)."""
    params = make_params()
    inner = optax.adamw(1e-2, weight_decay=0.1)
    opt = sparse_increment(
        1.0, inner, sparse="encoder", dense="classifier", update_on_selection=update_on_selection
    )
    got, _ = run(opt, params, steps=4)

    ref = optax.adamw(1e-2, weight_decay=0.1)
    trainable = {"encoder": params["encoder"], "classifier": params["classifier"]}
    state = ref.init(trainable)
    p = trainable
    for t in range(4):
        g = grads_at(t, params)
        g = {"encoder": g["encoder"], "classifier": g["classifier"]}
        if t == 0 and not update_on_selection:
            # Selection step: sparse leaves see a zero gradient and are not updated.
            g0 = {
                "encoder": jax.tree.map(jnp.zeros_like, g["encoder"]),
                "classifier": g["classifier"],
            }
            u, state = ref.update(g0, state, p)
            u = {
                "encoder": jax.tree.map(jnp.zeros_like, u["encoder"]),
                "classifier": u["classifier"],
            }
        else:
            u, state = ref.update(g, state, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(
        got["encoder"]["ffn"]["kernel"], p["encoder"]["ffn"]["kernel"], rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        got["encoder"]["query"]["bias"], p["encoder"]["query"]["bias"], rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        got["classifier"]["kernel"], p["classifier"]["kernel"], rtol=1e-6, atol=1e-6
    )


def test_frozen_leaves_never_change_and_hold_no_state():
    params = make_params()
    opt = sparse_increment(0.2, optax.adam(0.1), sparse="query/kernel", dense="classifier")
    got, state = run(opt, params, steps=3)
    np.testing.assert_array_equal(
        got["encoder"]["ffn"]["kernel"], params["encoder"]["ffn"]["kernel"]
    )
    np.testing.assert_array_equal(
        got["encoder"]["query"]["bias"], params["encoder"]["query"]["bias"]
    )
    assert got["step"] == params["step"]
    mu = state.inner_state[0].mu
    assert isinstance(mu["encoder"]["ffn"]["kernel"], optax.MaskedNode)
    # The selected entries changed, the others did not.
    changed = np.asarray(
        got["encoder"]["query"]["kernel"] != params["encoder"]["query"]["kernel"]
    ).ravel()
    idx = np.asarray(sift_jax.selected_indices(state)["encoder"]["query"]["kernel"])
    assert set(np.flatnonzero(changed)) == set(idx.tolist())


def test_updates_land_in_the_same_step():
    """Original bug 1: updates were merged one step late. Here step t's gradient moves step t."""
    params = {"w": jnp.arange(6.0)}
    opt = sparse_increment(1.0, optax.sgd(1.0))
    state = opt.init(params)
    g = {"w": jnp.ones(6)}
    _, state = opt.update(g, state, params)  # selection step
    updates, state = opt.update(g, state, params)
    np.testing.assert_array_equal(optax.apply_updates(params, updates)["w"], jnp.arange(6.0) - 1)


def test_adamw_weight_decay_acts_on_selected_weights_only():
    """Original bug 3: decay acted on a zeroed increment. Here it decays the selected weights."""
    params = {"w": jnp.full((4, 4), 2.0)}
    opt = sparse_increment(3, optax.adamw(0.1, weight_decay=0.5), update_on_selection=True)
    g = {"w": jnp.zeros((4, 4)).at[0, :3].set(1.0)}
    state = opt.init(params)
    updates, state = jax.jit(opt.update)(g, state, params)
    updates, state = jax.jit(opt.update)({"w": jnp.zeros((4, 4))}, state, params)
    u = np.asarray(updates["w"])
    # Zero gradient now: Adam's step is m/sqrt(v) != 0 still, but decay adds -lr*wd*w = -0.1.
    assert np.all(u.ravel()[3:] == 0)
    adam_only = sparse_increment(3, optax.adam(0.1), update_on_selection=True)
    s2 = adam_only.init(params)
    _, s2 = adam_only.update(g, s2, params)
    u2, _ = adam_only.update({"w": jnp.zeros((4, 4))}, s2, params)
    np.testing.assert_allclose(u[0, :3] - np.asarray(u2["w"])[0, :3], -0.1, rtol=1e-6)


def test_masking_mode_passes_selected_gradient_only():
    params = make_params()
    opt = sparse_increment(0.1, optax.sgd(1.0), sparse="ffn", dense="classifier", mode="masking")
    state = opt.init(params)
    g = grads_at(0, params)
    u0, state = jax.jit(opt.update)(g, state, params)
    assert not np.any(np.asarray(u0["encoder"]["ffn"]["kernel"]))
    np.testing.assert_allclose(u0["classifier"]["kernel"], -g["classifier"]["kernel"])
    g = grads_at(1, params)
    u1, state = jax.jit(opt.update)(g, state, params)
    idx = np.asarray(sift_jax.selected_indices(state)["encoder"]["ffn"]["kernel"])
    flat_u = np.asarray(u1["encoder"]["ffn"]["kernel"]).ravel()
    flat_g = np.asarray(g["encoder"]["ffn"]["kernel"]).ravel()
    np.testing.assert_allclose(flat_u[idx], -flat_g[idx])
    assert np.count_nonzero(flat_u) == len(idx) == 4
    assert not np.any(np.asarray(u1["encoder"]["query"]["kernel"]))


def test_state_is_o_of_k():
    """Optimizer state for a sparse leaf holds k-sized arrays only (counted in bytes)."""
    big = {"w": jax.ShapeDtypeStruct((2000, 1000), jnp.float32)}
    k = 50
    state = jax.eval_shape(sparse_increment(k, optax.adamw(1e-3)).init, big)
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    # indices (int32) + Adam mu and nu (fp32) = 3 * k * 4 bytes, plus a few scalars and the key.
    assert nbytes <= 3 * k * 4 + 64
    dense_bytes = sum(
        x.size * x.dtype.itemsize
        for x in jax.tree.leaves(jax.eval_shape(optax.adamw(1e-3).init, big))
    )
    assert nbytes / dense_bytes < 1e-3


# ---------------------------------------------------------------- optax checklist


def test_jit_and_lax_scan_give_the_same_result_as_a_python_loop():
    params = make_params()
    opt = sparse_increment(0.2, optax.adam(0.05), dense="classifier")
    ref, _ = run(opt, params, steps=4)

    grads = [grads_at(t, params) for t in range(4)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)

    @jax.jit
    def scan_run(params, stacked):
        def body(carry, g):
            p, s = carry
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), stacked)
        return p

    got = scan_run(params, stacked)
    chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    jax.tree.map(chex_close, got, ref)


def test_multisteps_accumulates_then_selects_on_the_mean_gradient():
    params = make_params()
    opt = optax.MultiSteps(sparse_increment(5, optax.sgd(1.0), sparse="ffn"), every_k_schedule=2)
    state = opt.init(params)
    update = jax.jit(opt.update)
    g0, g1 = grads_at(0, params), grads_at(1, params)
    u, state = update(g0, state, params)
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(u))
    u, state = update(g1, state, params)  # first real update: the selection step
    mean = (g0["encoder"]["ffn"]["kernel"] + g1["encoder"]["ffn"]["kernel"]) / 2
    idx = sift_jax.selected_indices(state)["encoder"]["ffn"]["kernel"]
    np.testing.assert_array_equal(idx, sift_jax.selection.topk_indices(jnp.abs(mean), 5))
    assert not np.any(np.asarray(u["encoder"]["ffn"]["kernel"]))


def test_inject_hyperparams_of_inner_and_of_sparse_increment_itself():
    params = make_params()
    g = grads_at(0, params)
    inner = optax.inject_hyperparams(optax.adamw)(learning_rate=0.1, weight_decay=0.0)
    opt = sparse_increment(3, inner, update_on_selection=True)
    state = opt.init(params)
    u1, s1 = jax.jit(opt.update)(g, state, params)
    assert sift_jax.selected_indices(s1)["encoder"]["ffn"]["kernel"].shape == (3,)
    state.inner_state.hyperparams["learning_rate"] = jnp.array(0.2)
    u2, _ = jax.jit(opt.update)(g, state, params)
    np.testing.assert_allclose(
        u2["encoder"]["ffn"]["kernel"], 2 * u1["encoder"]["ffn"]["kernel"], rtol=1e-6
    )

    factory = optax.inject_hyperparams(
        sparse_increment, static_args=("k", "selection_steps", "reselect_every", "seed")
    )
    wrapped = factory(k=3, inner=optax.adam(0.1), update_on_selection=True)
    plain = sparse_increment(3, optax.adam(0.1), update_on_selection=True)
    uw, sw = jax.jit(wrapped.update)(g, wrapped.init(params), params)
    up, sp = jax.jit(plain.update)(g, plain.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, uw, up)
    jax.tree.map(
        np.testing.assert_array_equal, sift_jax.selected_indices(sw), sift_jax.selected_indices(sp)
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtype_preserved_indices_int32_and_inner_state_fp32_by_default(dtype):
    params = make_params(dtype)
    opt = sparse_increment(0.2, optax.adam(0.1), dense="classifier")
    state = opt.init(params)
    u, state = jax.jit(opt.update)(grads_at(0, params), state, params)
    u, state = jax.jit(opt.update)(grads_at(1, params), state, params)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(params), strict=True):
        assert a.dtype == b.dtype
    assert all(x.dtype == jnp.int32 for x in jax.tree.leaves(sift_jax.selected_indices(state)))
    mu = state.inner_state[0].mu
    assert mu["encoder"]["ffn"]["kernel"].dtype == jnp.float32
    assert mu["classifier"]["kernel"].dtype == jnp.float32
    low = sparse_increment(0.2, optax.adam(0.1), state_dtype=None).init(params)
    assert low.inner_state[0].mu["encoder"]["ffn"]["kernel"].dtype == dtype


def test_init_on_shape_dtype_structs_matches_concrete_init():
    params = make_params(jnp.bfloat16)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    opt = sparse_increment(0.1, optax.adamw(1e-3), sparse="encoder", dense="classifier")
    s_abs = opt.init(abstract)
    s_con = jax.eval_shape(opt.init, params)
    same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), s_abs, s_con)
    assert all(jax.tree.leaves(same))


def test_state_shape_dtype_and_sharding_stable_under_cond_and_mesh():
    params = make_params()
    devices = np.array(jax.devices()[:2])
    mesh = jax.sharding.Mesh(devices, ("data",))
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    params = jax.device_put(params, repl)
    params["encoder"]["query"]["kernel"] = jax.device_put(params["encoder"]["query"]["kernel"], row)
    opt = sparse_increment(0.2, optax.adam(0.1))
    state = opt.init(params)

    @jax.jit
    def step(params, state, g):
        cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
        u, new = jax.lax.cond(cond, lambda: opt.update(g, state, params), lambda: (g, state))
        return optax.apply_updates(params, u), new

    p2, s2 = step(params, state, grads_at(0, params))
    same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), s2, state)
    assert all(jax.tree.leaves(same))
    assert p2["encoder"]["query"]["kernel"].sharding.is_equivalent_to(row, 2)


# ---------------------------------------------------------------- targeting and lookup


def test_targeting_forms_agree():
    params = make_params()
    by_regex = sift_jax.paths.leaf_roles(params, sparse="query/kernel", dense=["classifier"])
    by_fn = sift_jax.paths.leaf_roles(
        params,
        sparse=lambda p, x: p.endswith("query/kernel"),
        dense=lambda p, x: p.startswith("cls") or p.startswith("classifier"),
    )
    bool_tree = {
        "encoder": {"query": {"kernel": True, "bias": False}, "ffn": False},
        "classifier": False,
        "step": True,
    }
    by_tree = sift_jax.paths.leaf_roles(
        params, sparse=bool_tree, dense={"encoder": False, "classifier": True, "step": False}
    )
    assert by_regex == by_fn == by_tree
    assert by_regex.count("sparse") == 1 and by_regex.count("dense") == 1
    with pytest.raises(ValueError, match="bool pytree"):
        sift_jax.paths.leaf_roles(params, sparse={"nope": True})


def test_selected_indices_found_inside_wrappers_and_errors():
    params = make_params()
    opt = optax.MultiSteps(
        optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.inject_hyperparams(optax.scale)(step_size=1.0),
            sparse_increment(2, optax.sgd(0.1), sparse="ffn"),
        ),
        every_k_schedule=2,
    )
    idx = sift_jax.selected_indices(opt.init(params))
    assert idx["encoder"]["ffn"]["kernel"].shape == (2,)
    assert idx["classifier"]["kernel"] is None
    with pytest.raises(ValueError, match="No sparse_increment state"):
        sift_jax.selected_indices(optax.adam(0.1).init(params))
    two = optax.chain(sparse_increment(1, optax.sgd(1.0)), sparse_increment(2, optax.sgd(1.0)))
    with pytest.raises(ValueError, match="Found 2"):
        sift_jax.selected_indices(two.init(params))


def test_leaf_paths_read_naturally():
    params = {"encoder": {"layers": [{"attention": {"query": {"kernel": jnp.zeros(2)}}}]}}
    assert [p for p, _ in sift_jax.paths.leaves_with_paths(params)] == [
        "encoder/layers/0/attention/query/kernel"
    ]
    assert math.isclose(sift_jax.selection.count_for_rate(0.008, 1_000_000), 8001)


def test_every_targeted_tensor_trains():
    """Original bug 4: the last tensor reached in backward was never trained. Here all are."""
    params = make_params()
    opt = sparse_increment(0.1, optax.sgd(1.0))
    state = opt.init(params)
    _, state = jax.jit(opt.update)(grads_at(0, params), state, params)
    updates, _ = jax.jit(opt.update)(grads_at(1, params), state, params)
    for path, u in sift_jax.paths.leaves_with_paths(updates):
        if path != "step":
            assert np.count_nonzero(np.asarray(u)) > 0, path


def _momentum_updates(params, grads, reselect_every):
    tx = sparse_increment(2, optax.sgd(1.0, momentum=0.9), reselect_every=reselect_every)
    st = tx.init(params)
    out = []
    for g in grads:
        u, st = tx.update(g, st, params)
        out.append(u)
    return out


def test_reselection_restarts_the_moments_of_a_bare_array_param():
    # params passed as one array: a re-selection must still start the new entries' momentum
    # afresh (the old trace would otherwise move entries that got no gradient)
    grads = [jnp.array(g, jnp.float32) for g in
             ([0, 0, 0, 0, 5, 6], [0, 0, 0, 0, 1, 1], [7, 8, 0, 0, 0, 0], [0] * 6)]
    bare = _momentum_updates(jnp.zeros(6), grads, 2)
    boxed = _momentum_updates({"w": jnp.zeros(6)}, [{"w": g} for g in grads], 2)
    for b, d in zip(bare, boxed, strict=True):
        np.testing.assert_allclose(b, d["w"])
    assert np.all(np.asarray(bare[-1]) == 0)  # no gradient since the re-selection: no step


def test_reselection_keeps_the_moments_of_a_dense_leaf_named_like_a_sparse_one():
    # `head/kernel` ends like the sparse leaf `kernel`; it is dense and must keep its momentum
    params = {"kernel": jnp.zeros(6), "head": {"kernel": jnp.zeros(3)}}
    g = {"kernel": jnp.arange(6.0), "head": {"kernel": jnp.ones(3)}}

    def head_updates(reselect_every):
        tx = sparse_increment(
            2, optax.sgd(1.0, momentum=0.9), sparse="^kernel", dense="head",
            reselect_every=reselect_every,
        )
        st, out = tx.init(params), []
        for _ in range(3):
            u, st = tx.update(g, st, params)
            out.append(float(u["head"]["kernel"][0]))
        return out

    np.testing.assert_allclose(head_updates(2), head_updates(0))  # -1, -1.9, -2.71
    np.testing.assert_allclose(head_updates(0)[-1], -2.71, rtol=1e-6)


def test_state_dtype_none_keeps_the_params_dtype_with_fp32_gradients():
    # bf16 params, fp32 gradients, state_dtype=None: the state stays bf16 step after step, so
    # it can be a lax.scan carry (and a re-selection's lax.cond has equal branch types)
    params = {"w": jnp.ones((4, 4), jnp.bfloat16)}
    grads = {"w": jnp.arange(16.0, dtype=jnp.float32).reshape(4, 4)}
    for reselect_every in (0, 2):
        tx = sparse_increment(3, optax.adam(0.1), state_dtype=None, reselect_every=reselect_every)
        st0 = tx.init(params)

        def body(st, _):
            return tx.update(grads, st, params)[1], None

        st, _ = jax.lax.scan(body, st0, None, length=3)
        dtypes = lambda s: [x.dtype for x in jax.tree.leaves(s.inner_state)]
        assert dtypes(st) == dtypes(st0) and jnp.bfloat16 in dtypes(st)


def test_a_gradient_free_strategy_without_params_is_an_error_not_a_ranking_of_gradients():
    from sift_jax import selection

    name = "test-largest-weight"
    selection.register(name, score=lambda g, p, key: jnp.abs(p), needs_grad=False, overwrite=True)
    params, g = {"w": jnp.array([9.0, 0, 0, 0])}, {"w": jnp.array([0.0, 0, 0, 5])}
    opt = sparse_increment(1, optax.sgd(1.0), selection=name)
    _, st = opt.update(g, opt.init(params), params)
    assert sift_jax.selected_indices(st)["w"].tolist() == [0]  # ranked by |w|
    with pytest.raises(ValueError, match="needs params"):
        opt.update(g, opt.init(params))  # would have ranked |g| and picked 3
    rnd = sparse_increment(1, optax.sgd(1.0), selection="random")
    rnd.update(g, rnd.init(params))  # random needs no params
    selection.unregister(name)


def test_a_callable_k_sees_the_leaf_dtype():
    params = {"a": jnp.ones(8, jnp.bfloat16), "b": jnp.ones(8)}
    k = lambda path, leaf: 1 if leaf.dtype == jnp.bfloat16 else 4
    st = sparse_increment(k, optax.sgd(1.0)).init(params)
    assert {p: v.shape[0] for p, v in st.indices.items()} == {"a": 1, "b": 4}
