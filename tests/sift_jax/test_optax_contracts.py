"""sparse_increment and the compact API under optax's and JAX's own contracts (issue 12):
Explicit sharding, leaf-less trees, truly sparse masking mode, complex leaves, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import sift_jax
from sift_jax import compact

SELECTIONS = [
    {"selection": "grad"},
    {"selection": "grad", "selection_steps": 2},
    {"selection": "random"},
    {"selection": "magnitude"},
]


def explicit_params():
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(AxisType.Explicit,) * 2)
    w = jax.random.normal(jax.random.key(0), (8, 6))
    return mesh, {
        "w": jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor"))),
        "head": jax.device_put(jnp.ones((6, 2)), NamedSharding(mesh, P("tensor", None))),
        "ln": jax.device_put(jnp.ones(6), NamedSharding(mesh, P())),
    }


@pytest.mark.parametrize("mode", ["compact", "masking"])
@pytest.mark.parametrize("kw", SELECTIONS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_transform_under_explicit_sharding_keeps_the_params_sharding(mode, kw):
    mesh, params = explicit_params()
    tx = sift_jax.sparse_increment(5, optax.adamw(0.1), sparse="w", dense="head", mode=mode, **kw)
    state = tx.init(params)
    grads = jax.tree.map(lambda x: x * 0.5 + 1.0, params)

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p, s = params, state
    for _ in range(3):
        p, s = step(p, s, grads)
    for name in params:
        assert p[name].sharding.is_equivalent_to(params[name].sharding, p[name].ndim), name
    changed = np.flatnonzero(np.asarray(p["w"]).ravel() != np.asarray(params["w"]).ravel())
    assert 0 < changed.size <= 5
    assert set(changed) <= set(np.asarray(sift_jax.selected_indices(s)["w"]).tolist())
    np.testing.assert_array_equal(p["ln"], params["ln"])


@pytest.mark.parametrize("kw", SELECTIONS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_compact_api_under_explicit_sharding(kw):
    mesh, params = explicit_params()

    def loss(p, b, r):  # the user's model gathers its sharded weights explicitly
        w, head = (jax.sharding.reshard(p[n], NamedSharding(mesh, P())) for n in ("w", "head"))
        return jnp.sum(jnp.tanh(b @ w @ head) ** 2) * p["ln"][0]

    sift = compact.Sift.create(params, 5, sparse="w", dense="head", **kw)
    tx = optax.adam(0.1)
    t, st, fr = sift.split(params)
    os_ = tx.init(t)
    x = jnp.ones((3, 8))
    sel = jax.jit(sift.selection_step(loss, tx), static_argnames="last")
    score = {} if sift.can_probe() else sift.zero_score(st)
    for i in range(sift.schedule.selection_steps):
        last = i == sift.schedule.select_step
        t, os_, st, score, _ = sel(t, os_, st, fr, score, x, None, i, last=last)
    train = jax.jit(sift.train_step(loss, tx))
    t, os_, st, _ = train(t, os_, st, fr, x, None)
    assert st.weights["w"].sharding.is_equivalent_to(params["w"].sharding, 2)
    w = np.asarray(st.weights["w"]).ravel()
    changed = np.flatnonzero(w != np.asarray(params["w"]).ravel())
    assert 0 < changed.size and set(changed) <= set(sift.global_indices(st)["w"].tolist())


def test_leaf_less_trees_are_accepted_as_optax_does():
    tx = sift_jax.sparse_increment(2, optax.adam(0.1))
    for empty in ({}, [], {"a": {}}):
        tx.update(empty, tx.init(empty), empty)
    # optax's documented way to derive optimizer-state shardings calls init on a placeholder
    params = {"w": jnp.ones((4, 4))}
    state = tx.init(params)
    specs = optax.tree.map_params(tx, lambda _: "spec", state, transform_non_params=lambda _: None)
    assert specs.count is None  # the compact state is not shaped like params (documented)
    # a mask that is all False, and a multi_transform label that no parameter carries
    masked = optax.masked(tx, {"w": False})
    masked.update(params, masked.init(params), params)
    multi = optax.multi_transform({"sift": tx, "plain": optax.sgd(0.1)}, {"w": "plain"})
    u, _ = multi.update(params, multi.init(params), params)
    np.testing.assert_allclose(u["w"], -0.1)
    with pytest.raises(ValueError, match="no leaf is trainable"):
        tx.init({"step": jnp.zeros((), jnp.int32)})


@pytest.mark.parametrize(
    "inner",
    [
        optax.adamw(0.1, weight_decay=0.5),
        optax.chain(optax.add_decayed_weights(0.3), optax.sgd(0.1, momentum=0.9)),
        optax.adamw(optax.linear_schedule(0.1, 0.0, 10), weight_decay=0.2),
    ],
    ids=["adamw", "decay+momentum", "schedule"],
)
def test_masking_mode_changes_only_selected_entries_and_dense_leaves(inner):
    """Issue 12.3: decay, momentum and schedules downstream never move an unselected or
    frozen weight, not even during the selection step."""
    k = jax.random.split(jax.random.key(1), 3)
    params = {"w": jax.random.normal(k[0], (6, 5)), "head": jnp.ones(3), "ln": jnp.ones(4)}
    tx = sift_jax.sparse_increment(4, inner, sparse="w", dense="head", mode="masking")
    state, p = tx.init(params), params
    update = jax.jit(tx.update)
    for t in range(4):
        g = jax.tree.map(lambda x, t=t: jax.random.normal(jax.random.key(t), x.shape), params)
        u, state = update(g, state, p)
        if t == 0:
            assert not np.any(np.asarray(u["w"])) and not np.any(np.asarray(u["ln"]))
        p = optax.apply_updates(p, u)
    idx = np.asarray(sift_jax.selected_indices(state)["w"])
    moved = np.flatnonzero(np.asarray(p["w"]).ravel() != np.asarray(params["w"]).ravel())
    assert set(moved) == set(idx.tolist())
    np.testing.assert_array_equal(p["ln"], params["ln"])
    assert np.all(np.asarray(p["head"]) != 1.0)


def test_complex_leaves_train_at_the_top_k_of_abs_gradient():
    w = (jnp.arange(12.0) + 1j * jnp.arange(12.0)[::-1]).reshape(3, 4).astype(jnp.complex64)
    params = {"w": w, "r": jnp.ones(3)}
    g = {"w": jnp.zeros_like(w).at[1, 2].set(5 - 5j).at[2, 3].set(3j), "r": jnp.ones(3)}
    tx = sift_jax.sparse_increment(2, optax.adam(0.1), sparse="w", update_on_selection=True)
    u, state = jax.jit(tx.update)(g, tx.init(params), params)
    assert sift_jax.selected_indices(state)["w"].tolist() == [6, 11]
    assert u["w"].dtype == jnp.complex64 and np.count_nonzero(np.asarray(u["w"])) == 2
    assert not np.any(np.asarray(u["r"]))


@pytest.mark.parametrize("grad_dtype", [jnp.float32, jnp.bfloat16])
def test_updates_come_back_in_the_gradient_dtype(grad_dtype):
    """Issue 12.5 (optax's convention, now what the docstring says)."""
    params = {"w": jnp.ones((4, 4), jnp.bfloat16), "h": jnp.ones(2, jnp.float32)}
    grads = jax.tree.map(lambda x: jnp.ones(x.shape, grad_dtype), params)
    tx = sift_jax.sparse_increment(3, optax.adam(0.1), sparse="w", dense="h")
    u, _ = tx.update(grads, tx.init(params), params)
    assert u["w"].dtype == grad_dtype and u["h"].dtype == grad_dtype
