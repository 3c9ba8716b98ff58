"""Small NNX building blocks whose parameters carry logical axis names.

Parameter names follow Flax: ``kernel`` (``[in, out]``), ``bias``, ``embedding``
(``[vocab, embed]``), ``scale``. HF stores linear weights as ``[out, in]``; the name tables
in :mod:`train.models.weights.mapping` transpose.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sift_jax.compact import apply_layer

Dtype = jnp.dtype | str


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: Dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def dot_last(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` over ``x``'s last axis, computed on the 2-D view ``[prod(lead), in]``.

    The same product as ``jnp.dot(x, w)``, but its transpose (the weight gradient
    ``x^T dy``) is then a plain 2-D GEMM with one contracting dim. With ``x`` of rank 3 the
    weight gradient contracts two dims (batch and sequence), which XLA:CPU lowers through
    transposing copies of ``x`` and ``dy`` that it fuses with (and so recomputes) their
    producers, e.g. the LayerNorm backward: on the packaged MiniLM (batch 32 x 48) the
    2-D view made full FT's step 14% faster and SIFT's 37% (``bench.train_step``). The
    reshapes are bitcasts, so nothing is copied on any backend.

    Example:
        >>> import jax.numpy as jnp
        >>> dot_last(jnp.ones((2, 3, 4)), jnp.ones((4, 5))).shape
        (2, 3, 5)
    """
    lead = x.shape[:-1]
    return jnp.dot(x.reshape(-1, x.shape[-1]), w).reshape(*lead, w.shape[-1])


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with logical axes on the kernel (``[in, out]``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str | None, str | None],
        *,
        use_bias: bool = True,
        std: float = 0.02,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel = nnx.Param(
            _normal(rngs, (in_features, out_features), std, param_dtype), logical_axes=axes
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))
            if use_bias
            else None
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = dot_last(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Lookup table ``embedding[vocab, features]``; :meth:`attend` is the tied LM head."""

    def __init__(
        self,
        num: int,
        features: int,
        axes: tuple[str, str] = ("vocab", "embed"),
        *,
        std: float = 0.02,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.embedding = nnx.Param(
            _normal(rngs, (num, features), std, param_dtype), logical_axes=axes
        )
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return dot_last(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class LayerNorm(nnx.Module):
    """LayerNorm with ``scale`` and ``bias`` (statistics in fp32)."""

    def __init__(
        self,
        features: int,
        eps: float,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype), logical_axes=("embed",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm: ``x / rms(x) * scale`` computed in fp32 (as HF does)."""

    def __init__(
        self,
        features: int,
        eps: float,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=("embed",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (
            self.scale[...].astype(jnp.float32) * y.astype(self.dtype).astype(jnp.float32)
        ).astype(self.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation HF calls ``name`` (``gelu`` is the exact erf GELU).

    Example:
        >>> float(activation("relu")(jnp.array(-1.0)))
        0.0
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"Unsupported hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def attention_weights(
    q: jax.Array, k: jax.Array, mask: jax.Array | None, dtype: Dtype
) -> jax.Array:
    """Softmax attention probabilities ``[b, h, q, k]`` (scores and softmax in fp32).

    ``q``: ``[b, s, h, d]``, ``k``: ``[b, t, h, d]``; ``mask``: bool, broadcastable to
    ``[b, h, s, t]``, True where attending is allowed.
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    dtype: Dtype,
    *,
    q_chunk: int | None = None,
) -> jax.Array:
    """``softmax(q k^T / sqrt(d)) v`` ``[b, s, h, d]`` (:func:`attention_weights`' scores).

    With ``q_chunk`` and more queries than that, the queries go in blocks of ``q_chunk`` (a
    ``lax.map`` of a ``jax.checkpoint``-ed block): every query row computes exactly what it
    computes unblocked (softmax rows are independent), but only one block's ``[b, h, q_chunk,
    t]`` scores and probabilities exist at a time, in the forward and in the backward (which
    recomputes them per block) instead of ``[b, h, s, t]`` per layer. ``q`` ``[b, s, h, d]``,
    ``k`` / ``v`` ``[b, t, h, d]``, ``mask`` bool broadcastable to ``[b, h, s, t]``.

    Example:
        >>> ks = jax.random.split(jax.random.key(0), 3)
        >>> q, k, v = (jax.random.normal(x, (1, 6, 2, 4)) for x in ks)
        >>> m = jnp.tril(jnp.ones((6, 6), bool))[None, None]
        >>> a = attention(q, k, v, m, jnp.float32)
        >>> b = attention(q, k, v, m, jnp.float32, q_chunk=4)  # blocks of 4 + 2 (padded)
        >>> bool(jnp.allclose(a, b, atol=1e-6))
        True
    """

    def full(q, k, v, mask):
        w = attention_weights(q, k, mask, dtype)
        return jnp.einsum("bhst,bthd->bshd", w, v.astype(w.dtype))

    b, s, h, d = q.shape
    if not q_chunk or s <= q_chunk:
        return full(q, k, v, mask)
    t = k.shape[1]
    n = -(-s // q_chunk)
    pad = n * q_chunk - s
    qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qb = qb.reshape(b, n, q_chunk, h, d).swapaxes(0, 1)  # [n, b, c, h, d]
    if mask is None:
        mask = jnp.ones((1, 1, s, t), bool)
    mask = jnp.broadcast_to(mask, (*mask.shape[:2], s, t))
    mb = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)))  # padded rows: sliced off below
    mb = mb.reshape(*mask.shape[:2], n, q_chunk, t).transpose(2, 0, 1, 3, 4)
    block = jax.checkpoint(full)
    out = jax.lax.map(lambda a: block(a[0], k, v, a[1]), (qb, mb))  # [n, b, c, h, d]
    return out.swapaxes(0, 1).reshape(b, n * q_chunk, h, d)[:, :s]


def stacked(factory: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """``n`` layers built by ``factory`` as one module whose params have a leading ``[n]`` dim
    (for :func:`run_layers` with ``scan=True``)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r: nnx.Rngs):
        return factory(r)

    return create(rngs)


def make_layers(
    factory: Callable[[nnx.Rngs], nnx.Module], n: int, scan: bool, rngs: nnx.Rngs
) -> nnx.Module:
    """``nnx.Dict`` ``{"0": layer, "1": ...}`` (paths ``layers/3/...``), or with ``scan`` one
    stacked module (paths ``layers/...`` with a leading layer dim)."""
    if scan:
        return stacked(factory, n, rngs)
    return nnx.Dict({str(i): factory(rngs) for i in range(n)})


def scan_layers(
    layers: nnx.Module,
    x: jax.Array,
    xs: Any,
    step: Callable[[nnx.Module, jax.Array, Any], tuple[jax.Array, Any]],
    *,
    remat: bool,
) -> tuple[jax.Array, Any]:
    """``lax.scan`` of ``step(layer, h, xs_i) -> (h, out_i)`` over a stacked layer module.

    The body rebuilds one layer from its slice of the stacked params after
    :func:`sift_jax.compact.apply_layer`, so SIFT's stacked sparse leaves (``LayerView`` /
    ``LayerProbe``, from a plan with ``layer_views=True``) are read through the compact view
    per layer: the backward gathers each layer's dense weight gradient into its ``k`` values
    before the next layer's is computed. Plain params pass through unchanged. With ``remat``
    the body is ``jax.checkpoint``-ed: the forward saves only each layer's input ``h`` and the
    backward recomputes one layer at a time.

    Example:
        >>> from flax import nnx
        >>> f = lambda r: Linear(2, 2, (None, None), use_bias=False, rngs=r)
        >>> stack = stacked(f, 3, nnx.Rngs(0))
        >>> h, out = scan_layers(stack, jnp.ones((1, 2)), jnp.arange(3),
        ...                      lambda m, h, i: (m(h), i * 2), remat=True)
        >>> h.shape, out.tolist()
        ((1, 2), [0, 2, 4])
    """
    graphdef, state = nnx.split(layers)

    def body(h, inp):
        st, e = inp
        return step(nnx.merge(graphdef, apply_layer(st)), h, e)

    if remat:
        # prevent_cse is unneeded inside scan (the loop keeps the recompute in the backward)
        body = jax.checkpoint(body, prevent_cse=False)
    return jax.lax.scan(body, x, (state, xs))


def run_layers(
    layers: nnx.Module,
    n: int,
    x: jax.Array,
    step: Callable[[nnx.Module, jax.Array, jax.Array], jax.Array],
    key: jax.Array | None,
    *,
    scan: bool,
    remat: bool,
) -> jax.Array:
    """Applies ``step(layer, x, layer_key) -> x`` over the layers, scanned (see
    :func:`scan_layers`) and/or rematerialised.

    ``key`` (or ``None``) is split into one dropout key per layer.
    """
    keys = jax.random.split(key, n) if key is not None else jnp.zeros((n, 2), jnp.uint32)
    if scan:
        return scan_layers(layers, x, keys, lambda m, h, k: (step(m, h, k), None), remat=remat)[0]
    if remat:
        step = nnx.remat(step)
    for i in range(n):
        x = step(layers[str(i)], x, keys[i])
    return x


def run_layers_collect(
    layers: nnx.Module,
    n: int,
    x: jax.Array,
    step: Callable[..., tuple[jax.Array, object]],
    extra: object,
    *,
    scan: bool,
    remat: bool,
) -> tuple[jax.Array, object]:
    """Like :func:`run_layers` for ``step(layer, x, extra_i) -> (x, out_i)`` where ``extra`` and
    the returned ``out`` are pytrees with a leading layer dim (e.g. a KV cache)."""
    if scan:
        return scan_layers(layers, x, extra, step, remat=remat)
    if remat:
        step = nnx.remat(step)
    outs = []
    for i in range(n):
        x, o = step(layers[str(i)], x, jax.tree.map(lambda a, i=i: a[i], extra))
        outs.append(o)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)
