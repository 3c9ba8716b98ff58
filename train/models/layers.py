"""Small NNX building blocks whose parameters carry logical axis names.

Parameter names follow Flax: ``kernel`` (``[in, out]``), ``bias``, ``embedding``
(``[vocab, embed]``), ``scale``. HF stores linear weights as ``[out, in]``; the name tables
in :mod:`train.models.weights.mapping` transpose.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype | str


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: Dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


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
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
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
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


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
    """Applies ``step(layer, x, layer_key) -> x`` over the layers, scanned and/or rematerialised.

    ``key`` (or ``None``) is split into one dropout key per layer.
    """
    keys = jax.random.split(key, n) if key is not None else jnp.zeros((n, 2), jnp.uint32)
    if remat:
        step = nnx.remat(step)
    if scan:

        @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry)
        def body(layer, h, k):
            return step(layer, h, k)

        return body(layers, x, keys)
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
    if remat:
        step = nnx.remat(step)
    if scan:

        @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def body(layer, h, e):
            return step(layer, h, e)

        return body(layers, x, extra)
    outs = []
    for i in range(n):
        x, o = step(layers[str(i)], x, jax.tree.map(lambda a, i=i: a[i], extra))
        outs.append(o)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)
