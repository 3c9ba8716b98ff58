"""``--selection_scope shard``: per-block top-k, no cross-device traffic, exact delta and resume."""

import math
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sift_jax
from sift_jax import compact
from tests.train.core.toy import _run_until, cfg_for, toy_params, toy_task
from train.core.fit import fit as train
from train.core.mesh import parse_mesh

Q = "encoder/layers/0/attention/query/kernel"
QB = "encoder/layers/0/attention/query/bias"
F = "encoder/layers/0/ffn/kernel"
# Only the targeted tensors are sharded (every other one is replicated).
SPECS = {
    "data=2,fsdp=4": {Q: P("fsdp", None), QB: P("fsdp"), F: P(None, "fsdp")},
    "data=2,fsdp=2,tensor=2": {Q: P("fsdp", "tensor"), QB: P("tensor"), F: P(None, "fsdp")},
}
SPARSE = ["attention", "ffn"]


class placer:
    """A stand-in for the model bundle: places the toy params with these specs."""

    def __init__(self, specs):
        self.specs = specs

    def place(self, params, mesh):
        def put(path, x):
            spec = self.specs.get("/".join(k.key for k in path), P())
            return jax.device_put(x, NamedSharding(mesh, spec))

        return jax.tree_util.tree_map_with_path(put, params)


def get(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def shard_cfg(tmp_path, mesh, **kw):
    per_device = 8 // parse_mesh(mesh).shape["data"] // parse_mesh(mesh).shape["fsdp"]
    kw = {"selection_scope": "shard", "export_model": False, **kw}
    return cfg_for(
        tmp_path, mesh=mesh, per_device_train_batch_size=per_device, sparse_module=SPARSE, **kw
    )


def first_batch_grad():
    """|g| of the loss of the first training batch at the pretrained params, on the host."""
    task = toy_task()
    batch = next(task.train_batches(0, 0, 8))
    params = toy_params()
    g = jax.grad(lambda p: task.loss_fn(task.apply_fn(p, batch, None, True), batch))(params)
    return {p: np.abs(np.asarray(get(g, p))) for p in (Q, QB, F)}


def blocks(shape, spec, mesh):
    """Every block of a tensor as the array of its global flat indices (independent of the
    module under test)."""
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    counts = []
    for e in spec:
        axes = () if e is None else (e,) if isinstance(e, str) else e
        counts.append(math.prod(mesh.shape[a] for a in axes))
    ids = np.arange(math.prod(shape)).reshape(shape)
    out = []
    for coord in np.ndindex(*counts):
        sl = tuple(
            slice(c * (n // b), (c + 1) * (n // b))
            for c, n, b in zip(coord, shape, counts, strict=True)
        )
        out.append(ids[sl].ravel())
    return out


@pytest.mark.parametrize("mesh", sorted(SPECS))
def test_each_block_keeps_its_own_top_k_and_the_delta_is_exact(tmp_path, mesh):
    res = train(shard_cfg(tmp_path, mesh), toy_task(), toy_params(), model=placer(SPECS[mesh]))
    assert res.losses[-1] < res.losses[0]
    g = first_batch_grad()
    idx = res.method.plan.global_indices(res.state.buffers)
    m = parse_mesh(mesh)
    n_sparse = 0
    for path in (Q, QB, F):
        sel = np.asarray(idx[path])
        shape = g[path].shape
        k = sift_jax.selection.count_for_rate(0.1, g[path].size)
        parts = blocks(shape, SPECS[mesh][path], m)
        k_s = -(-k // len(parts))
        assert len(parts) > 1  # every targeted tensor is really split here
        assert len(sel) == len(set(sel.tolist())) == len(parts) * k_s
        assert np.all(np.diff(sel) > 0)  # sorted global flat indices
        flat = g[path].ravel()
        for ids in parts:
            order = np.argsort(-flat[ids], kind="stable")
            want = ids[order[:k_s]]
            if k_s < len(ids):  # the reference is well posed: no near-tie at the boundary
                assert flat[ids][order[k_s - 1]] - flat[ids][order[k_s]] > 1e-6
            assert set(sel[np.isin(sel, ids)].tolist()) == set(want.tolist())
        # Only the selected entries changed.
        p0, p1 = np.asarray(get(toy_params(), path)), np.asarray(get(res.params, path))
        assert set(np.flatnonzero(p0 != p1).tolist()) <= set(sel.tolist())
        n_sparse += len(sel)
    assert res.metrics["trainable_params"] == n_sparse + 16 * 2 + 2  # + the dense classifier
    # The saved delta (global flat indices) merges back to the trained params exactly.
    path = tmp_path / "run" / "sift_delta.safetensors"
    merged = sift_jax.merge_delta(toy_params(), sift_jax.load_delta(path))
    jax.tree.map(np.testing.assert_array_equal, merged, jax.device_get(res.params))


@pytest.mark.parametrize("mesh", ["data=1", "data=4"])
def test_one_block_is_the_global_selection(tmp_path, mesh):
    """S = 1 (one device, or replicated tensors): shard-local is global selection."""
    per = 8 // parse_mesh(mesh).shape["data"]
    kw = dict(mesh=mesh, per_device_train_batch_size=per, sparse_module=SPARSE)
    glob = train(cfg_for(tmp_path / "g", **kw), toy_task(), toy_params())
    shard = train(cfg_for(tmp_path / "s", selection_scope="shard", **kw), toy_task(), toy_params())
    assert all(sc.num_shards == 1 for sc in shard.method.plan.sparse_scopes.values())
    jax.tree.map(
        np.testing.assert_array_equal,
        shard.method.plan.global_indices(shard.state.buffers),
        glob.method.plan.global_indices(glob.state.buffers),
    )
    np.testing.assert_allclose(shard.losses, glob.losses, rtol=1e-6, atol=1e-7)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        shard.params,
        glob.params,
    )


@pytest.mark.parametrize("scope", ["shard", "global"])
def test_resume_under_a_mesh_is_exact(tmp_path, monkeypatch, scope):
    """For both scopes (global: a regression test for resuming under a multi-device mesh);
    shard-local checkpoints hold global indices, and refuse blocks they do not fit."""
    import tests.train.core.toy as tt

    mesh, specs = "data=2,fsdp=4", SPECS["data=2,fsdp=4"]
    place = placer(specs)

    def cfg(path, **kw):
        return shard_cfg(tmp_path / path, mesh, selection_scope=scope, **kw)

    full = train(cfg("full"), toy_task(), toy_params(), model=place)
    cfg_k = cfg("k", save_steps=5)
    with monkeypatch.context() as mp:  # _run_until calls toy.train
        mp.setattr(tt, "train", lambda cfg, task, params: train(cfg, task, params, model=place))
        assert _run_until(cfg_k, 5) == full.losses[:5]
    task = toy_task()
    resumed = train(
        cfg("k", save_steps=5, resume_from_checkpoint="latest"),
        task,
        toy_params(),
        model=place,
    )
    np.testing.assert_allclose(resumed.losses, full.losses[5:], rtol=1e-6)
    jax.tree.map(
        np.testing.assert_array_equal,
        resumed.method.plan.global_indices(resumed.state.buffers),
        full.method.plan.global_indices(full.state.buffers),
    )
    # As tests/test_trainer.py's resume test: the restored optimizer state is replicated where
    # the uninterrupted run's steps had chosen their own placement, so a dense tensor may differ
    # in the last bit (reduction order); the sparse entries are the same.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        resumed.params,
        full.params,
    )
    if scope == "global":
        return
    # Same number of blocks, other blocks: the checkpoint's global indices do not fit them.
    other = {**specs, Q: P(None, "fsdp")}
    with pytest.raises(ValueError, match="different mesh or sharding"):
        train(
            cfg("k", save_steps=5, resume_from_checkpoint="latest"),
            toy_task(),
            toy_params(),
            model=placer(other),
        )


def test_random_selection_is_per_block_too(tmp_path):
    """Every registered strategy works in every scope (it used to be refused, and other
    strategies silently became magnitude)."""
    mesh, specs = "data=2,fsdp=4", SPECS["data=2,fsdp=4"]
    res = train(
        shard_cfg(tmp_path, mesh, selection="random"), toy_task(), toy_params(), model=placer(specs)
    )
    idx = res.method.plan.global_indices(res.state.buffers)[Q]
    q0 = np.asarray(get(toy_params(), Q))
    parts = blocks(q0.shape, specs[Q], parse_mesh(mesh))
    k_s = -(-sift_jax.selection.count_for_rate(0.1, q0.size) // len(parts))
    assert [int(np.isin(idx, ids).sum()) for ids in parts] == [k_s] * len(parts)
    g = first_batch_grad()[Q].ravel()
    top = np.argsort(-g)[: len(idx)]
    assert len(set(top) & set(idx.tolist())) < len(idx) // 2  # not the gradient's top-k


@pytest.mark.parametrize("kw", [{"selection_steps": 2}, {"selection": "magnitude"}])
def test_score_based_selection_is_per_block_too(tmp_path, kw):
    mesh, specs = "data=2,fsdp=4", SPECS["data=2,fsdp=4"]
    res = train(shard_cfg(tmp_path, mesh, **kw), toy_task(), toy_params(), model=placer(specs))
    idx = res.method.plan.global_indices(res.state.buffers)[Q]
    q0 = np.asarray(get(toy_params(), Q))
    k = sift_jax.selection.count_for_rate(0.1, q0.size)
    parts = blocks(q0.shape, specs[Q], parse_mesh(mesh))
    k_s = -(-k // len(parts))
    assert [int(np.isin(idx, ids).sum()) for ids in parts] == [k_s] * len(parts)
    if "selection" in kw:  # magnitude: the top-k_s of |W| of each block
        w = np.abs(q0).ravel()
        for ids in parts:
            want = ids[np.argsort(-w[ids], kind="stable")[:k_s]]
            assert set(idx[np.isin(idx, ids)].tolist()) == set(want.tolist())
    assert res.losses[-1] < res.losses[0]


def test_periodic_reselection_stays_per_block_and_exports_exactly(tmp_path):
    mesh, specs = "data=2,fsdp=4", SPECS["data=2,fsdp=4"]
    res = train(
        shard_cfg(tmp_path, mesh, reselect_every=5),
        toy_task(),
        toy_params(),
        model=placer(specs),
    )
    assert res.metrics["reselections"] == 3  # steps 5, 10, 15 of 16
    q0, q = np.asarray(get(toy_params(), Q)), np.asarray(get(res.params, Q))
    idx = res.method.plan.global_indices(res.state.buffers)[Q]
    parts = blocks(q0.shape, specs[Q], parse_mesh(mesh))
    assert [int(np.isin(idx, ids).sum()) for ids in parts] == [len(idx) // 4] * 4
    assert len(np.flatnonzero(q != q0)) > len(idx)  # earlier selections stay folded in
    path = tmp_path / "run" / "sift_delta.safetensors"
    merged = sift_jax.merge_delta(toy_params(), sift_jax.load_delta(path))
    jax.tree.map(np.testing.assert_array_equal, merged, jax.device_get(res.params))


# --- communication ------------------------------------------------------------------------------


def _collectives(fn, *args):
    from bench.comm import collective_ops

    return collective_ops(jax.jit(fn).lower(*args).compile().as_text())


def test_shard_local_ops_compile_to_no_collective():
    mesh = parse_mesh("data=2,fsdp=4")
    w = jax.device_put(jnp.arange(128.0).reshape(8, 16) / 7.0, NamedSharding(mesh, P("fsdp", None)))
    scope = compact.PerShard.for_array(w, 13)
    assert (scope.num_shards, scope.k, scope.size) == (4, 4, 16)
    idx = scope.placeholder()
    vec = scope.zeros(jnp.float32)
    view, probe = compact.view_fn(scope), compact.probe_fn(scope)
    grad = sift_jax.selection.get("grad")

    def view_bwd(w, d, i, g):
        return jax.vjp(lambda d: view(w, d, i), d)[1](g)[0]

    def probe_bwd(w, g):
        pr = jnp.zeros(scope.probe_shape(), jnp.float32)
        return jax.vjp(lambda pr: probe(w, pr), pr)[1](g)[0]

    key = jax.random.key(0)
    local = {
        "gather": _collectives(scope.gather, w, idx),
        "write": _collectives(scope.write, w, idx, vec),
        "select": _collectives(lambda s: scope.select(grad, s, None, key), w),
        "view backward": _collectives(view_bwd, w, vec, idx, w),
        "probe backward": _collectives(probe_bwd, w, w),
    }
    assert local == {k: [] for k in local}
    # The global counterparts on the same sharded tensor do communicate.
    whole = compact.WholeTensor(w.shape, 13)
    gidx = jnp.arange(0, 128, 8, dtype=jnp.int32)
    assert _collectives(whole.gather, w, gidx)
    assert _collectives(lambda s: whole.select(grad, s, None, key), w)
    # Values: the local ops agree with their global meaning.
    gl = scope.to_global(np.asarray(idx))
    np.testing.assert_array_equal(scope.gather(w, idx), np.asarray(w).ravel()[gl])
    np.testing.assert_array_equal(scope.from_global(gl), np.asarray(idx))
    d = jnp.arange(16.0)
    out = np.asarray(scope.write(w, idx, d)).ravel()
    np.testing.assert_array_equal(out[gl], np.arange(16.0))
    rest = np.setdiff1d(np.arange(128), gl)
    np.testing.assert_array_equal(out[rest], np.asarray(w).ravel()[rest])


def test_train_step_traffic_is_the_models_own(tmp_path):
    """The shard-local train step's all-gathers / all-to-alls / permutes are exactly full FT's
    (the model's FSDP traffic) and no collective carries an index or increment vector; the
    global step adds dense-gradient all-gathers and k-vector all-reduces."""
    from bench.comm import collective_ops, compile_steps
    from train.models.encoder import EncoderConfig

    mesh = parse_mesh("fsdp=8")
    cfg = EncoderConfig.tiny()

    def ops(ftype, scope):
        hlo, _ = compile_steps(cfg, mesh, ftype, scope, 0.05, 8, 8, select=False)
        return collective_ops(hlo["train"])

    def moving(ops):  # everything but all-reduce
        return Counter((k, str(s)) for k, s in ops if k != "all-reduce")

    def parts(ops):
        return {(dt, s) for _, ps in ops for dt, s in ps}

    full, glob, shard = ops("full", "global"), ops("sift", "global"), ops("sift", "shard")
    assert moving(shard) == moving(full)
    assert moving(glob) - moving(full)  # extra all-gathers of dense gradients
    model = {s for _, s in parts(full)}
    k = sift_jax.selection.count_for_rate(0.05, cfg.hidden_size**2)
    k_s = -(-k // 8)
    assert ("f32", (k,)) in parts(glob)  # the k values gathered at global indices
    vectors = {(k,), (8 * k_s,), (k_s,)} - model  # index / increment vector shapes
    assert not vectors & {s for _, s in parts(shard)}
    # Integer collectives: only the model's own (the embedding lookup's token ids), no indices.
    assert {p for p in parts(shard) if p[0] == "s32"} <= parts(full)
