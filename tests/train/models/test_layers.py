"""train.models.layers (issue 15): query-blocked attention is exact; scanned + rematerialised
decoders / encoders train SIFT per layer (LayerViews applied inside the scan body) exactly like
the unscanned models, with one layer's dense weight gradient alive at a time."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sift_jax import compact
from train.models.decoder import LlamaConfig, LlamaForCausalLM, MistralConfig, init_cache
from train.models.encoder import EncoderConfig, EncoderForSequenceClassification
from train.models.functional import split_params
from train.models.layers import Linear, attention
from train.models.weights.mapping import stack_layers

K = jax.random.split(jax.random.key(0), 6)


@pytest.mark.parametrize("s,chunk", [(12, 4), (13, 4), (9, 8)])
def test_blocked_attention_equals_the_full_one_with_its_gradients(s, chunk):
    q = jax.random.normal(K[0], (2, s, 3, 8))
    k = jax.random.normal(K[1], (2, s + 2, 3, 8))
    v = jax.random.normal(K[2], (2, s + 2, 3, 8))
    pad = jnp.arange(s + 2)[None] >= jnp.array([[0], [3]])  # row 1: left padding
    mask = (jnp.arange(s)[:, None] + 2 >= jnp.arange(s + 2)[None])[None, None] & pad[:, None, None]
    f = lambda c: lambda q, k, v: attention(q, k, v, mask, jnp.float32, q_chunk=c)
    np.testing.assert_allclose(f(chunk)(q, k, v), f(None)(q, k, v), rtol=1e-6, atol=1e-6)
    loss = lambda c: lambda *a: jnp.sum(jnp.sin(f(c)(*a)))
    ga = jax.grad(loss(chunk), argnums=(0, 1, 2))(q, k, v)
    gb = jax.grad(loss(None), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ga, gb, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _dot_generals(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for v in eqn.params.values():
            inner = getattr(v, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                yield from _dot_generals(inner)


def test_linear_weight_gradient_is_one_2d_gemm_with_the_same_values():
    # The weight gradient of a batched Linear must be a dot with ONE contracting dim
    # (XLA:CPU turned the two-dim contraction into transposing copies that recomputed the
    # LayerNorm backward: 1.6x slower SIFT steps), and equal the plain product's gradient.
    graphdef, state = nnx.split(Linear(8, 5, (None, None), rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    x = jax.random.normal(K[3], (3, 4, 8))

    def loss(kernel, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, {**params, "kernel": kernel})(x)))

    kernel = params["kernel"]
    jaxpr = jax.make_jaxpr(jax.grad(loss))(kernel, x).jaxpr
    dots = list(_dot_generals(jaxpr))
    assert dots, "no dot_general in the gradient"
    for eqn in dots:
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        assert len(lhs_contract) == 1, eqn
    want = jax.grad(lambda w: jnp.sum(jnp.sin(jnp.einsum("bsi,io->bso", x, w) + params["bias"])))
    np.testing.assert_allclose(jax.grad(loss)(kernel, x), want(kernel), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg_cls", [LlamaConfig, MistralConfig])
def test_decoder_blocks_long_sequences_without_changing_logits_grads_or_the_cache(cfg_cls):
    kw = dict(sliding_window=5) if cfg_cls is MistralConfig else {}
    cfgs = [cfg_cls.tiny(attention_chunk=c, **kw) for c in (0, 4)]
    models = [LlamaForCausalLM(c, rngs=nnx.Rngs(0)) for c in cfgs]
    ids = jax.random.randint(K[3], (2, 11), 0, 64)
    mask = jnp.ones_like(ids).at[1, :3].set(0)
    a, b = (m(ids, mask) for m in models)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    grads = []
    for m in models:
        g, p = split_params(m)
        grads.append(jax.grad(lambda p: jnp.sum(nnx.merge(g, p)(ids, mask) ** 2) * 1e-3)(p))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), *grads)
    # a long prompt into the KV cache (blocked, keys over the whole cache) then one token
    outs = []
    for m, c in zip(models, cfgs, strict=True):
        cache = init_cache(c, 2, 16)
        full_mask = jnp.zeros((2, 16), jnp.int32).at[:, :12].set(1).at[1, :3].set(0)
        lg, cache = m(ids, full_mask, cache=cache, cache_index=0)
        nxt, _ = m(ids[:, :1], full_mask, cache=cache, cache_index=11)
        outs.append((lg, nxt))
    for x, y in zip(*outs, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def _sift_losses(graphdef, params, batch, loss_of_logits, steps=4, **kw):
    def loss_fn(p, b, rng):
        return loss_of_logits(nnx.merge(graphdef, p), b)

    sift = compact.Sift.create(params, 0.1, **kw)
    t, st, fr = sift.split(params)
    tx = optax.adamw(1e-2, weight_decay=0.1)
    o = tx.init(t)
    select = jax.jit(sift.selection_step(loss_fn, tx), static_argnames="last")
    train = jax.jit(sift.train_step(loss_fn, tx))
    t, o, st, _, aux = select(t, o, st, fr, {}, batch, None, 0, last=True)
    losses = [float(aux["loss"])]
    for _ in range(steps):
        t, o, st, aux = train(t, o, st, fr, batch, None)
        losses.append(float(aux["loss"]))
    return losses, sift.global_indices(st), sift.merged(t, st, fr)


def _compare(flat_res, scan_res, layers_path, n_layers):
    (la, ia, ma), (lb, ib, mb) = flat_res, scan_res
    np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-5)
    assert len(ib) * n_layers == len(ia)
    for path, idx in ib.items():
        rest = path[len(layers_path) + 1 :]
        per = idx.reshape(n_layers, -1)
        for i in range(n_layers):
            want = ia[f"{layers_path}/{i}/{rest}"]
            size = int(np.prod(np.shape(_leaf(ma, f"{layers_path}/{i}/{rest}"))))
            np.testing.assert_array_equal(per[i] - i * size, want, err_msg=path)
    unstacked = jax.tree.map(np.asarray, ma)
    restacked = stack_layers(unstacked, layers_path)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-4), restacked, mb)


def _leaf(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _decoder_pair():
    """A tiny 3-layer decoder unscanned ``(cfg, graphdef, params)`` and the same weights
    stacked for the scanned + rematerialised model ``(scfg, graphdef, params)``."""
    cfg = LlamaConfig.tiny(num_hidden_layers=3, attention_chunk=4)
    g, p = split_params(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    scfg = dataclasses.replace(cfg, scan_layers=True, remat=True)
    gs, _ = split_params(LlamaForCausalLM(scfg, rngs=nnx.Rngs(0)))
    ps = stack_layers(jax.tree.map(jnp.copy, p), "model/layers")
    return cfg, g, p, scfg, gs, ps


def test_scanned_rematerialised_decoder_trains_sift_like_the_unscanned_one():
    cfg, g, p, scfg, gs, ps = _decoder_pair()
    ids = jax.random.randint(K[4], (2, 12), 0, 64)

    def lm_loss(model, batch):
        logits = model(batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch[:, 1:]).mean()

    flat = _sift_losses(g, p, ids, lm_loss, sparse="proj")
    scan = _sift_losses(
        gs, ps, ids, lm_loss, sparse="proj", stacked="model/layers/", layer_views=True
    )
    _compare(flat, scan, "model/layers", 3)


def test_scanned_rematerialised_encoder_with_dropout_trains_sift_like_the_unscanned_one():
    cfg = EncoderConfig.tiny(num_hidden_layers=3)
    g, p = split_params(EncoderForSequenceClassification(cfg, rngs=nnx.Rngs(0)))
    scfg = dataclasses.replace(cfg, scan_layers=True, remat=True)
    gs, _ = split_params(EncoderForSequenceClassification(scfg, rngs=nnx.Rngs(0)))
    ps = stack_layers(jax.tree.map(jnp.copy, p), "encoder/layers")
    ids = jax.random.randint(K[5], (4, 10), 2, 100)
    labels = jnp.array([0, 1, 1, 0])

    def cls_loss(model, batch):
        logits = model(batch, deterministic=False, rngs=nnx.Rngs(dropout=7))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    # (not the key bias: its gradient is zero up to rounding, so its top-k is noise)
    kw = dict(sparse=r"attention/(query|key|value|output)/kernel", dense="classifier")
    flat = _sift_losses(g, p, ids, cls_loss, **kw)
    scan = _sift_losses(gs, ps, ids, cls_loss, stacked="encoder/layers/", layer_views=True, **kw)
    _compare(flat, scan, "encoder/layers", 3)


def test_scanned_decoder_step_holds_one_layers_weight_gradient():
    """The compiled SIFT step of a scanned, rematerialised decoder: temporaries well below one
    stacked dW of the targeted kernels (the view runs per layer inside the scan)."""
    cfg = LlamaConfig.tiny(
        num_hidden_layers=8,
        hidden_size=128,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        scan_layers=True,
        remat=True,
    )
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    gd, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    ids = jax.ShapeDtypeStruct((1, 32), jnp.int32)

    def loss(p, b, rng):
        logits = nnx.merge(gd, p)(b)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], b[:, 1:]).mean()

    stacked_dw = cfg.num_hidden_layers * 4 * (4 * 128 * 128 + 3 * 128 * 512)
    temps = {}
    for lv in (False, True):
        sift = compact.Sift.create(
            params, 0.05, sparse="proj", stacked="model/layers/", layer_views=lv
        )
        t, st, _ = jax.eval_shape(sift.split, params)
        frozen = sift._tree(
            [
                None if leaf.role != "frozen" else x
                for leaf, x in zip(sift.leaves, sift._flat(params), strict=True)
            ]
        )
        tx = optax.adamw(1e-3)
        o = jax.eval_shape(tx.init, t)
        step = jax.jit(sift.train_step(loss, tx), donate_argnums=(0, 1, 2))
        temps[lv] = step.lower(t, o, st, frozen, ids, None).compile().memory_analysis()
    assert temps[False].temp_size_in_bytes > stacked_dw
    assert temps[True].temp_size_in_bytes < stacked_dw / 2


def test_scanned_decoder_kv_cache_and_hidden_states_equal_the_unscanned_ones():
    """What the instruct job's evaluations (generation, MMLU scoring) run on a model loaded
    for --gradient_checkpointing: the scan carries the KV cache and collects hidden states."""
    cfg, g, p, scfg, gs, ps = _decoder_pair()
    ids = jax.random.randint(K[1], (2, 9), 0, 64)
    mask = jnp.zeros((2, 16), jnp.int32).at[:, :10].set(1)
    outs = []
    for gd, params, c in ((g, p, cfg), (gs, ps, scfg)):
        model = nnx.merge(gd, params)
        logits, cache = model(ids, mask, cache=init_cache(c, 2, 16), cache_index=0)
        nxt, _ = model(ids[:, :1], mask, cache=cache, cache_index=9)
        outs.append((logits, nxt, model(ids, output_hidden_states=True)[1]))
    for a, b in zip(*outs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
