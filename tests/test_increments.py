"""Functional increments (the compact-gradient path's building blocks)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sift_jax


def test_select_indices_agrees_with_the_transform():
    params = {"a": jnp.ones((6, 5)), "b": jnp.ones(7), "head": jnp.ones(3)}
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)
    for sel in ["grad", "random", "magnitude"]:
        opt = sift_jax.sparse_increment(
            0.2, optax.sgd(1.0), sparse="^(a|b)$", selection=sel, seed=3
        )
        _, state = opt.update(g, opt.init(params), params)
        got = sift_jax.select_indices(
            jax.tree.map(jnp.abs, g), 0.2, sparse="^(a|b)$", selection=sel, params=params, seed=3
        )
        want = sift_jax.selected_indices(state)
        assert got["head"] is None and want["head"] is None
        np.testing.assert_array_equal(got["a"], want["a"])
        np.testing.assert_array_equal(got["b"], want["b"])


def test_gradient_wrt_increments_is_the_gathered_weight_gradient():
    w = jax.random.normal(jax.random.key(0), (4, 3))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    idx = {"w": jnp.array([0, 5, 11], jnp.int32)}

    def loss_w(w):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    def loss_d(d):
        return loss_w(sift_jax.apply_increments({"w": w}, idx, d)["w"])

    d0 = sift_jax.init_increments({"w": w}, idx)
    g_d = jax.grad(loss_d)(d0)["w"]
    np.testing.assert_allclose(g_d, jax.grad(loss_w)(w).ravel()[idx["w"]], rtol=1e-6)
    assert g_d.shape == (3,)


def test_fp32_increments_on_bf16_weights_keep_small_updates():
    """Original bug 5: bf16 increments lost updates below bf16 resolution. fp32 Δ does not."""
    w = {"w": jnp.ones(4, jnp.bfloat16)}
    idx = {"w": jnp.array([0, 2], jnp.int32)}
    d = sift_jax.init_increments(w, idx)
    for _ in range(100):
        d = {"w": d["w"] + 1e-3}  # each step alone is below bf16's 2^-7 spacing at 1.0
    out = sift_jax.apply_increments(w, idx, d)["w"]
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), [1.1015625, 1, 1.1015625, 1])
    naive = jnp.ones((), jnp.bfloat16)
    for _ in range(100):
        naive = naive + jnp.bfloat16(1e-3)
    assert float(naive) == 1.0  # what bf16 accumulation would have done


def test_topk_probe_gives_the_true_top_k_inside_the_backward():
    """Issue 5: selection without a dense gradient tree; indices above 65535 decode exactly."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w = {"a": jax.random.normal(k1, (300, 300)) * 0.05, "b": jax.random.normal(k2, (300, 10))}
    x = jax.random.normal(k3, (16, 300))

    def loss(w):
        return jnp.sum(jnp.tanh(jnp.tanh(x @ w["a"]) @ w["b"]) ** 2)

    g = jax.grad(loss)(w)
    probes = {"a": jnp.zeros((3, 500)), "b": jnp.zeros((3, 40))}
    g_probe = jax.jit(jax.grad(lambda pr: loss({p: sift_jax.topk_probe(w[p], pr[p]) for p in w})))(
        probes
    )
    for p in w:
        idx = sift_jax.probe_indices(g_probe[p])
        want = sift_jax.topk_indices(jnp.abs(g[p]), probes[p].shape[1])
        np.testing.assert_array_equal(idx, want)
        np.testing.assert_allclose(g_probe[p][2], g[p].ravel()[want], rtol=1e-4)
    assert int(sift_jax.probe_indices(g_probe["a"]).max()) > 65535
