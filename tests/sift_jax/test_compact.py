"""The public compact-gradient API (sift_jax.compact, sift_jax.nnx) in a user's own loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sift_jax
import sift_jax.nnx  # imports flax; not part of `import sift_jax`
from sift_jax import compact

K = jax.random.split(jax.random.key(0), 5)
PARAMS = {
    "l1": {"kernel": jax.random.normal(K[0], (8, 16)) * 0.5, "bias": jnp.zeros(16)},
    "l2": {"kernel": jax.random.normal(K[1], (16, 16)) * 0.5},
    "head": {"kernel": jax.random.normal(K[2], (16, 2)) * 0.3},
    "ln": jnp.ones(16),
}
X = jax.random.normal(K[3], (64, 8))
Y = (X[:, 0] + X[:, 1] > 0).astype(jnp.int32)
BATCHES = [(X[i * 16 : (i + 1) * 16], Y[i * 16 : (i + 1) * 16]) for i in range(4)]
SPARSE, DENSE = "l[12]", "head"


def loss_fn(p, batch, rng):
    x, y = batch
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"]) * p["ln"]
    h = jnp.tanh(h @ p["l2"]["kernel"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["head"]["kernel"], y).mean()


def opt():
    return optax.adamw(0.05, weight_decay=0.1)


def run_compact(steps=8, params=PARAMS, **kw):
    """A user's loop over the public API, phase by phase as the plan's schedule says."""
    sift = compact.Sift.create(params, kw.pop("k", 0.1), sparse=SPARSE, dense=DENSE, **kw)
    tx = opt()
    trainable, state, frozen = sift.split(params)
    opt_state = tx.init(trainable)
    select = jax.jit(sift.selection_step(loss_fn, tx), static_argnames="last")
    train = jax.jit(sift.train_step(loss_fn, tx), donate_argnums=(0, 1, 2))
    score = {} if sift.can_probe() else sift.zero_score(state)
    losses, touched = [], None
    for t in range(steps):
        batch, phase = BATCHES[t % 4], sift.schedule.phase(t)
        if phase in ("accumulate", "select", "reselect"):
            if phase == "reselect":
                touched = sift.touched(state, touched)
                opt_state = sift.refresh_opt_state(tx, opt_state, trainable)
                score = {} if sift.can_probe(True) else sift.zero_score(state)
            trainable, opt_state, state, score, aux = select(
                trainable,
                opt_state,
                state,
                frozen,
                score,
                batch,
                None,
                t,
                last=phase != "accumulate",
            )
            if "candidates" in aux:
                sift, trainable, opt_state, state = sift.apply_budget(
                    aux["candidates"], trainable, opt_state, state, tx
                )
        else:
            trainable, opt_state, state, aux = train(
                trainable, opt_state, state, frozen, batch, None
            )
        losses.append(float(aux["loss"]))
    return sift, trainable, state, frozen, losses, touched


def run_transform(steps=8, **kw):
    tx = sift_jax.sparse_increment(kw.pop("k", 0.1), opt(), sparse=SPARSE, dense=DENSE, **kw)
    state, p = tx.init(PARAMS), PARAMS

    @jax.jit
    def step(p, state, batch):
        loss, g = jax.value_and_grad(loss_fn)(p, batch, None)
        u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state, loss

    losses = []
    for t in range(steps):
        p, state, loss = step(p, state, BATCHES[t % 4])
        losses.append(float(loss))
    return p, sift_jax.selected_indices(state), losses


def test_grad_is_k_sized_training_lowers_the_loss_and_only_selected_weights_move():
    """Issue 11: jax.grad through the public API returns only k-sized leaves for targeted
    weights; training lowers the loss; the weights differ from the pretrained ones only at
    the selected positions (plus the dense head)."""
    sift = compact.Sift.create(PARAMS, 0.1, sparse=SPARSE, dense=DENSE)
    trainable, state, frozen = sift.split(PARAMS)
    grads = jax.grad(lambda t: loss_fn(sift.params(t, state, frozen), BATCHES[0], None))(trainable)
    assert grads["l1"]["kernel"].shape == (13,) and grads["l2"]["kernel"].shape == (26,)
    assert grads["l1"]["bias"].shape == (2,) and grads["head"]["kernel"].shape == (16, 2)
    assert grads["ln"] is None  # frozen: no gradient at all

    sift, trainable, state, frozen, losses, _ = run_compact(steps=24)
    assert losses[-1] < 0.7 * losses[0]
    merged = sift.merged(trainable, state, frozen)
    idx = sift.global_indices(state)
    for path, leaf in sift_jax.paths.flatten_paths(PARAMS).items():
        new = np.asarray(sift_jax.paths.flatten_paths(merged)[path]).ravel()
        changed = np.flatnonzero(new != np.asarray(leaf).ravel())
        if path in idx:
            assert set(changed) <= set(idx[path]) and changed.size > 0
        elif path == "head/kernel":
            assert changed.size == leaf.size
        else:
            assert changed.size == 0
    delta = sift.delta(trainable, state, frozen, PARAMS)
    restored = sift_jax.merge_delta(PARAMS, delta)
    jax.tree.map(np.testing.assert_array_equal, restored, merged)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"selection_steps": 2},
        {"selection": "random", "seed": 3},
        {"selection": "magnitude"},
        {"selection": "grad-row"},
        {"update_on_selection": True},
        {"reselect_every": 3},
        {"reselect_every": 3, "update_on_selection": True, "selection_steps": 2},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default",
)
def test_compact_path_matches_sparse_increment(kw):
    """One SIFT: the transform and the compact API choose the same indices and give the same
    losses (and weights) for every schedule and strategy."""
    p_t, idx_t, loss_t = run_transform(**dict(kw))
    sift, trainable, state, frozen, loss_c, _ = run_compact(**dict(kw))
    idx_c = sift.global_indices(state)
    for path, i in sift_jax.paths.flatten_paths(idx_t).items():
        np.testing.assert_array_equal(np.asarray(i), idx_c[path])
    np.testing.assert_allclose(loss_c, loss_t, atol=1e-6)
    merged = sift.merged(trainable, state, frozen)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), merged, p_t)


def test_values_gradient_is_the_gathered_weight_gradient_and_bf16_weights_keep_small_updates():
    w = jax.random.normal(K[4], (4, 3))
    x = jax.random.normal(K[3], (5, 4))
    idx = jnp.array([0, 5, 11], jnp.int32)
    view = compact.view_fn(compact.WholeTensor((4, 3), 3))
    loss_w = lambda w: jnp.sum(jnp.tanh(x @ w) ** 2)
    g = jax.grad(lambda v: loss_w(view(w, v, idx)))(jnp.zeros(3))
    np.testing.assert_allclose(g, jax.grad(loss_w)(w).ravel()[idx], rtol=1e-6)
    # Original bug 5: bf16 increments lost updates below bf16 resolution; fp32 values do not.
    params = {"w": jnp.ones(4, jnp.bfloat16)}
    sift = compact.Sift.create(params, 2)
    trainable, state, _ = sift.split(params)
    assert trainable["w"].dtype == jnp.float32
    for _ in range(100):
        trainable = {"w": trainable["w"] + 1e-3}  # each below bf16's 2^-7 spacing at 1.0
        state = sift.write(trainable, state)
    out = np.asarray(state.weights["w"], np.float32)
    np.testing.assert_allclose(out, [1.1015625, 1.1015625, 1, 1])


def test_probe_gives_the_true_top_k_inside_the_backward():
    """Selection without a dense gradient tree; indices above 65535 decode exactly."""
    w = {"a": jax.random.normal(K[0], (300, 300)) * 0.05, "b": jax.random.normal(K[1], (300, 10))}
    x = jax.random.normal(K[2], (16, 300))
    loss = lambda w: jnp.sum(jnp.tanh(jnp.tanh(x @ w["a"]) @ w["b"]) ** 2)
    g = jax.grad(loss)(w)
    widths = {"a": 500, "b": 40}
    probes = {p: jnp.zeros((3, n)) for p, n in widths.items()}
    probe = {p: compact.probe_fn(compact.WholeTensor(w[p].shape, widths[p])) for p in w}
    g_pr = jax.jit(jax.grad(lambda pr: loss({p: probe[p](w[p], pr[p]) for p in w})))(probes)
    for p in w:
        idx = compact.decode_probe(g_pr[p])
        want = sift_jax.selection.topk_indices(jnp.abs(g[p]), widths[p])
        np.testing.assert_array_equal(idx, want)
        np.testing.assert_allclose(g_pr[p][2], g[p].ravel()[want], rtol=1e-4)
    assert int(compact.decode_probe(g_pr["a"]).max()) > 65535


def test_stacked_leaves_select_per_layer_like_the_unstacked_model():
    """Scanned models: a [layers, ...] leaf gets its top-k per layer slice, exactly the
    indices the unstacked per-layer leaves get."""
    layers = [jax.random.normal(k, (6, 6)) * 0.5 for k in jax.random.split(K[4], 3)]
    x = jax.random.normal(K[0], (10, 6))

    def loss(p, batch, rng):
        h = batch
        ws = p["stack"] if "stack" in p else [p[str(i)] for i in range(3)]
        for i in range(3):
            h = jnp.tanh(h @ ws[i])
        return jnp.sum(h**2)

    flat = {str(i): w for i, w in enumerate(layers)}
    stacked = {"stack": jnp.stack(layers)}
    out = {}
    for name, params, kw in [("flat", flat, {}), ("stacked", stacked, {"stacked": "stack"})]:
        sift = compact.Sift.create(params, 0.2, **kw)
        trainable, state, frozen = sift.split(params)
        tx = optax.sgd(0.1)
        step = jax.jit(sift.selection_step(loss, tx), static_argnames="last")
        _, _, state, _, _ = step(
            trainable, tx.init(trainable), state, frozen, {}, x, None, 0, last=True
        )
        out[name] = sift.global_indices(state)
    assert out["stacked"]["stack"].shape == (3 * 8,)
    per_layer = np.asarray(out["stacked"]["stack"]).reshape(3, 8) - np.arange(3)[:, None] * 36
    for i in range(3):
        np.testing.assert_array_equal(per_layer[i], out["flat"][str(i)])


def test_global_budget_is_the_joint_top_k_and_matches_the_transform_given_its_counts():
    """Issue 14: one k for all sparse leaves (the joint top-k of |g|), sizes fixed at
    selection; the transform reaches the same selection through budget_counts."""
    sift, trainable, state, frozen, losses, _ = run_compact(steps=6, budget="global")
    total = compact.Sift.create(PARAMS, 0.1, sparse=SPARSE, dense=DENSE).num_trainable
    assert sift.num_trainable == total
    g = jax.grad(loss_fn)(PARAMS, BATCHES[0], None)
    sparse_g = {
        p: x for p, x in sift_jax.paths.flatten_paths(g).items() if p.startswith(("l1", "l2"))
    }
    counts = compact.budget_counts(sparse_g, 13 + 2 + 26)
    idx = sift.global_indices(state)
    assert {p: i.size for p, i in idx.items()} == counts
    everything = np.concatenate([np.abs(np.asarray(v)).ravel() for v in sparse_g.values()])
    threshold = np.sort(everything)[-sum(counts.values())]
    for p, i in idx.items():
        assert (np.abs(np.asarray(sparse_g[p])).ravel()[i] >= threshold).all()
    assert losses[-1] < losses[0]
    p_t, idx_t, _ = run_transform(steps=6, k=counts)
    for path, i in sift_jax.paths.flatten_paths(idx_t).items():
        np.testing.assert_array_equal(np.asarray(i), idx[path])


def test_mass_budget_shares_the_total_by_gradient_mass_then_takes_each_leafs_top_k():
    """Issue 14: budget="mass": each leaf's count in proportion to its sum of |g| (at least
    1), the top-count of |g| within it; the transform matches given the counts."""
    sift, trainable, state, frozen, losses, _ = run_compact(steps=6, budget="mass")
    assert not sift.can_probe()  # needs each leaf's whole |g|
    g = jax.grad(loss_fn)(PARAMS, BATCHES[0], None)
    sparse_g = {
        p: x for p, x in sift_jax.paths.flatten_paths(g).items() if p.startswith(("l1", "l2"))
    }
    total = 13 + 2 + 26
    counts = compact.budget_counts(sparse_g, total, by="mass")
    mass = {p: float(np.abs(np.asarray(x)).sum()) for p, x in sparse_g.items()}
    for p, c in counts.items():  # proportional up to rounding and the minimum of 1
        assert abs(c - total * mass[p] / sum(mass.values())) <= 1 + len(counts)
    assert counts != compact.budget_counts(sparse_g, total)  # not the joint top-k
    idx = sift.global_indices(state)
    assert {p: i.size for p, i in idx.items()} == counts and sum(counts.values()) == total
    for p, i in idx.items():
        want = np.argsort(-np.abs(np.asarray(sparse_g[p])).ravel(), kind="stable")[: counts[p]]
        np.testing.assert_array_equal(i, np.sort(want))
    assert losses[-1] < losses[0]
    p_t, idx_t, _ = run_transform(steps=6, k=counts)
    for path, i in sift_jax.paths.flatten_paths(idx_t).items():
        np.testing.assert_array_equal(np.asarray(i), idx[path])
    with pytest.raises(ValueError, match="`by` must be 'joint' or 'mass'"):
        compact.budget_counts(sparse_g, total, by="norm")
    for budget in ("global", "mass"):  # an int k is the shared total, not a per-leaf count
        assert compact.Sift.create(PARAMS, 30, sparse=SPARSE, budget=budget).total == 30
    with pytest.raises(ValueError, match="pass them as k"):  # fixed-size NNX variables
        sift_jax.nnx.SiftModel(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), 2, budget="mass")


def test_state_dict_restores_a_run_after_reselection_and_the_delta_holds_every_change():
    sift, trainable, state, frozen, _, touched = run_compact(steps=8, reselect_every=3)
    touched = sift.touched(state, touched)
    saved = sift.state_dict(state, touched)
    assert set(saved) == {"indices", "touched", "touched_values"}
    # A fresh split of the pretrained params + the saved dict + the trained values = the run.
    _, fresh, _ = sift.split(PARAMS)
    restored = sift.load_state_dict(saved, trainable, fresh)
    jax.tree.map(np.testing.assert_array_equal, restored.weights, state.weights)
    jax.tree.map(np.testing.assert_array_equal, restored.indices, state.indices)
    delta = sift.delta(trainable, state, frozen, PARAMS, touched)
    jax.tree.map(
        np.testing.assert_array_equal,
        sift_jax.merge_delta(PARAMS, delta),
        sift.merged(trainable, state, frozen),
    )


def test_bad_selection_functions_and_inputs_are_caught():
    """Issue 16.10: duplicate / out-of-range indices raise; NaN gradients never win; a leaf
    whose shape changed since init raises; a pattern that matches nothing warns."""
    params = {"w": jnp.ones((4, 4)), "h": jnp.ones(2)}
    g = {"w": jnp.arange(16.0).reshape(4, 4), "h": jnp.ones(2)}
    for bad in (
        lambda s, p, k, key: jnp.zeros(k, jnp.int32),
        lambda s, p, k, key: jnp.arange(k) + 15,
    ):
        tx = sift_jax.sparse_increment(3, optax.sgd(1.0), sparse="w", selection=bad)
        with pytest.raises(Exception, match="out-of-range .* or repeated"):
            jax.block_until_ready(jax.jit(tx.update)(g, tx.init(params), params))
    g_nan = {"w": g["w"].at[0, 0].set(jnp.nan).at[0, 1].set(jnp.inf), "h": g["h"]}
    tx = sift_jax.sparse_increment(3, optax.sgd(1.0), sparse="w")
    _, st = jax.jit(tx.update)(g_nan, tx.init(params), params)
    assert sift_jax.selected_indices(st)["w"].tolist() == [13, 14, 15]
    sift = compact.Sift.create(params, 3, sparse="w")
    t, s, f = sift.split(params)
    loss = lambda p, b, r: jnp.sum(p["w"] * b)
    sel = sift.selection_step(loss, optax.sgd(1.0))
    _, _, s, _, _ = jax.jit(sel, static_argnames="last")(
        t, optax.sgd(1.0).init(t), s, f, {}, g_nan["w"], None, 0, last=True
    )
    assert sorted(sift.global_indices(s)["w"].tolist()) == [13, 14, 15]
    with pytest.raises(ValueError, match="re-run init"):
        tx.update(
            {"w": jnp.ones(2), "h": jnp.ones(2)}, tx.init({"w": jnp.ones(8), "h": jnp.ones(2)})
        )
    with pytest.warns(UserWarning, match="matches no leaf"):
        sift_jax.sparse_increment(1, optax.sgd(1.0), sparse="w", dense="classifier").init(params)


def test_nnx_model_trains_with_nnx_optimizer_and_only_selected_weights_move():
    """Issue 11 for Flax NNX: nnx.Optimizer(wrt=model.wrt), k-sized gradients, the loss
    falls and the wrapped model's weights change only at the selected positions."""
    base = nnx.Sequential(
        nnx.Linear(8, 16, rngs=nnx.Rngs(0)),
        jnp.tanh,
        nnx.Linear(16, 16, rngs=nnx.Rngs(1)),
        jnp.tanh,
        nnx.Linear(16, 2, rngs=nnx.Rngs(2)),
    )
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(base, nnx.Param)))
    model = sift_jax.nnx.SiftModel(base, 0.1, sparse=r"layers/[02]/kernel", dense="layers/4")

    def loss(m, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    nnx.jit(lambda m, x, y: m.select(loss, x, y))(model, *BATCHES[0])
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=model.wrt)

    @nnx.jit
    def step(model, optimizer, x, y):
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, model.wrt))(model, x, y)
        optimizer.update(model, grads)
        model.write()
        return value, grads

    losses = []
    for t in range(30):
        value, grads = step(model, optimizer, *BATCHES[t % 4])
        losses.append(float(value))
    shapes = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(grads)}
    assert shapes["values/layers.0.kernel"] == (13,) and shapes["values/layers.2.kernel"] == (26,)
    assert shapes["model/layers/4/kernel"] == (16, 2)
    assert not any(k.startswith("model/layers/0") or k.startswith("model/layers/2") for k in shapes)
    assert losses[-1] < 0.7 * losses[0]
    after = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    for i in ("0", "2"):
        idx = np.asarray(model.indices[f"layers.{i}.kernel"][...])
        moved = np.flatnonzero(
            np.asarray(after["layers"][int(i)]["kernel"]).ravel()
            != before["layers"][int(i)]["kernel"].ravel()
        )
        assert moved.size > 0 and set(moved) <= set(idx)
        np.testing.assert_array_equal(
            after["layers"][int(i)]["bias"], before["layers"][int(i)]["bias"]
        )
    delta = model.delta(before)
    jax.tree.map(np.testing.assert_array_equal, sift_jax.merge_delta(before, delta), model.merged())


def _scanned_loss(p, batch, rng):
    """A 3-layer tanh MLP whose layers are a lax.scan over p["stack"] (apply_layer inside)."""
    body = lambda h, w: (jnp.tanh(h @ compact.apply_layer(w)), None)
    h, _ = jax.lax.scan(body, batch, p["stack"])
    return jnp.sum(h**2)


def _unrolled_loss(p, batch, rng):
    h = batch
    for i in range(3):
        h = jnp.tanh(h @ p[str(i)])
    return jnp.sum(h**2)


@pytest.mark.parametrize("kw", [{}, {"selection_steps": 2}, {"update_on_selection": True}])
def test_layer_views_in_a_scan_train_like_the_unstacked_model(kw):
    """Issue 15: with layer_views the stacked leaf reaches the scan body as a LayerView (a
    LayerProbe at selection); losses and indices equal the unstacked model's."""
    layers = [jax.random.normal(k, (6, 6)) * 0.5 for k in jax.random.split(K[4], 3)]
    x = jax.random.normal(K[0], (10, 6))
    runs = {}
    for name, params, loss, extra in [
        ("flat", {str(i): w for i, w in enumerate(layers)}, _unrolled_loss, {}),
        ("scan", {"stack": jnp.stack(layers)}, _scanned_loss, {"stacked": "stack"}),
    ]:
        sift = compact.Sift.create(params, 0.2, layer_views=name == "scan", **extra, **kw)
        t, st, fr = sift.split(params)
        tx = optax.adam(0.05)
        o = tx.init(t)
        select = jax.jit(sift.selection_step(loss, tx), static_argnames="last")
        train = jax.jit(sift.train_step(loss, tx))
        score = {} if sift.can_probe() else sift.zero_score(st)
        losses = []
        for step in range(6):
            phase = sift.schedule.phase(step)
            if phase == "train":
                t, o, st, aux = train(t, o, st, fr, x, None)
            else:
                last = phase != "accumulate"
                t, o, st, score, aux = select(t, o, st, fr, score, x, None, step, last=last)
            losses.append(float(aux["loss"]))
        runs[name] = (losses, sift.global_indices(st), sift, t, st, fr)
    np.testing.assert_allclose(runs["scan"][0], runs["flat"][0], rtol=1e-6)
    per_layer = runs["scan"][1]["stack"].reshape(3, -1) - np.arange(3)[:, None] * 36
    for i in range(3):
        np.testing.assert_array_equal(per_layer[i], runs["flat"][1][str(i)])
    sift, t, st, fr = runs["scan"][2:]
    assert isinstance(sift.params(t, st, fr)["stack"], compact.LayerView)
    assert not isinstance(sift.params(t, st, fr, layer_views=False)["stack"], compact.LayerView)


def test_layer_views_keep_one_layers_dense_gradient_alive_not_the_stack():
    """The point of layer_views: the backward scan gathers each layer's dW at once instead of
    stacking every layer's dW (compiled temporaries far below the stack's size)."""
    n_layers, d = 16, 256
    params = {"stack": jax.ShapeDtypeStruct((n_layers, d, d), jnp.float32)}
    x = jax.ShapeDtypeStruct((8, d), jnp.float32)
    stack_bytes = n_layers * d * d * 4
    temps = {}
    for lv in (False, True):
        sift = compact.Sift.create(params, 0.01, stacked="stack", layer_views=lv)
        t, st, _ = jax.eval_shape(sift.split, params)
        tx = optax.adam(0.1)
        o = jax.eval_shape(tx.init, t)
        for name, fn, a in [
            ("train", jax.jit(sift.train_step(_scanned_loss, tx)), (t, o, st, {"stack": None}, x)),
            (
                "select",
                jax.jit(sift.selection_step(_scanned_loss, tx), static_argnames="last"),
                (t, o, st, {"stack": None}, {}, x),
            ),
        ]:
            extra = (None, 0) if name == "select" else (None,)
            kw = {"last": True} if name == "select" else {}
            mem = fn.lower(*a, *extra, **kw).compile().memory_analysis()
            temps[lv, name] = mem.temp_size_in_bytes
    assert temps[False, "train"] >= stack_bytes and temps[False, "select"] >= stack_bytes
    assert temps[True, "train"] < stack_bytes / 3 and temps[True, "select"] < stack_bytes / 3


def test_layer_views_need_stacked_leaves():
    with pytest.raises(ValueError, match="pass `stacked`"):
        compact.Sift.create({"w": jnp.ones((2, 3))}, 1, layer_views=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_write_scatters_in_place_with_flat_indices(dtype):
    """The write after an update is a 1-D scatter into the donated weights (a stacked leaf:
    one slice at a time): the output aliases the input, no weight-sized temporary and no
    [k, ndim] index arrays (8 B per trained value before)."""
    params = {
        "w": jax.ShapeDtypeStruct((512, 768), dtype),
        "s": jax.ShapeDtypeStruct((4, 64, 96), dtype),
    }
    sift = compact.Sift.create(params, 0.05, stacked="s")
    t, st, _ = jax.eval_shape(sift.split, params)
    c = jax.jit(sift.write, donate_argnums=1).lower(t, st).compile()
    mem = c.memory_analysis()
    w_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(st.weights))
    assert mem.alias_size_in_bytes >= w_bytes
    if dtype == "float32":  # (XLA:CPU scatters bf16 through an fp32 copy: a CPU-only pass)
        idx_bytes = sum(x.size * 4 for x in jax.tree.leaves(st.indices))
        assert mem.temp_size_in_bytes < idx_bytes / 8, (mem.temp_size_in_bytes, idx_bytes)
    hlo = c.as_text()
    assert "s32[19661,2]" not in hlo and "scatter" in hlo


def test_stacked_touched_positions_are_gathered_and_restored_per_slice():
    """Checkpoints of a stacked leaf after re-selections: the touched weights are read and put
    back at (slice, position) coordinates (int32 whatever the stack's size; the global indices
    are int64 past 2**31 - 1 entries, see PerSlice)."""
    w = jax.random.normal(K[0], (3, 4, 5))
    sc = compact.PerSlice((3, 4, 5), 2, lead=1)
    g = np.array([1, 7, 20, 33, 59])
    np.testing.assert_array_equal(sc.gather_global(w, g), np.asarray(w).ravel()[g])
    out = sc.scatter_global(jnp.zeros_like(w), g, jnp.arange(5.0) + 1)
    want = np.zeros(60)
    want[g] = np.arange(5.0) + 1
    np.testing.assert_array_equal(np.asarray(out).ravel(), want)
    assert compact.PerSlice((40, 5120, 13824), 1).global_dtype == np.int64
    assert sc.global_dtype == np.int32


def test_refresh_opt_state_matches_leaves_by_position_not_by_path_suffix():
    # the dense `head/kernel` ends like the sparse `kernel`: only the sparse leaf restarts
    params = {"kernel": jnp.ones((4, 4)), "head": {"kernel": jnp.ones(3)}}
    sift = compact.Sift.create(params, 3, sparse="^kernel", dense="head")
    trainable, _, _ = sift.split(params)
    tx = optax.sgd(1.0, momentum=0.9)
    old = jax.tree.map(lambda x: x + 5.0, tx.init(trainable))
    new = sift.refresh_opt_state(tx, old, trainable)
    assert new[0].trace["kernel"].tolist() == [0.0] * 3
    assert new[0].trace["head"]["kernel"].tolist() == [5.0] * 3
    # a bare array: its trace restarts, the scalar step count (adam's) carries on
    bare = jnp.ones(8)
    s1 = compact.Sift.create(bare, 3)
    t1, _, _ = s1.split(bare)
    adam = optax.adam(0.1)
    old1 = jax.tree.map(lambda x: x + 5, adam.init(t1))
    new1 = s1.refresh_opt_state(adam, old1, t1)
    assert new1[0].mu.tolist() == [0.0] * 3 and int(new1[0].count) == 5


def test_global_budget_takes_a_numpy_integer_k_as_the_total():
    params = {"a": jnp.ones((10, 10)), "b": jnp.ones((10, 10))}
    for budget in ("global", "mass"):
        py = compact.Sift.create(params, 10, budget=budget).num_trainable
        np_k = compact.Sift.create(params, np.int64(10), budget=budget).num_trainable
        assert py == np_k == 10


def test_wrt_accepts_jax_key_paths_with_sequence_keys():
    from jax.tree_util import DictKey, SequenceKey

    params = {"layers": [{"w": jnp.ones((4, 4)), "b": jnp.ones(4)}]}
    sift = compact.Sift.create(params, 2, sparse="w", dense="b")
    key_path = (DictKey("layers"), SequenceKey(0), DictKey("b"))
    assert sift.wrt(key_path) and sift.wrt(("layers", 0, "b")) and sift.wrt("layers/0/b")
    assert not sift.wrt((DictKey("layers"), SequenceKey(0), DictKey("w")))  # sparse, not dense
