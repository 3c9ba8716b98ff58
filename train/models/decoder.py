"""LLaMA-family decoders in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP,
optional tied embeddings, a functional KV cache and padding / packing aware masks.

Three families share :class:`LlamaForCausalLM` and are registered here
(:func:`train.models.registry.register_family`):

- ``llama`` (:class:`LlamaConfig`): optional biases on q/k/v/o (``attention_bias``) and on the
  MLP (``mlp_bias``).
- ``qwen2`` (:class:`Qwen2Config`): biases on q/k/v only (HF's Qwen2 has no ``attention_bias``
  field); sliding-window layers (``use_sliding_window``) are refused.
- ``mistral`` (:class:`MistralConfig`): no biases; each query sees only the last
  ``sliding_window`` positions (itself included; ``None`` = full causal attention), with or
  without the KV cache.

Parameter paths (``/``-joined ``nnx.to_pure_dict`` keys)::

    model/embed_tokens/embedding                         [vocab, hidden]
    model/layers/3/self_attn/{q_proj,k_proj,v_proj,o_proj}/kernel   [in, out]  (+ /bias)
    model/layers/3/mlp/{gate_proj,up_proj,down_proj}/kernel
    model/layers/3/{input_layernorm,post_attention_layernorm}/scale
    model/norm/scale
    lm_head/kernel                                       [hidden, vocab] (untied only)

With ``scan_layers=True`` the index disappears (``model/layers/self_attn/q_proj/kernel``,
stacked on a leading ``[num_hidden_layers]`` dim) and the layers run in a ``lax.scan``
(:func:`train.models.layers.scan_layers`: SIFT's per-layer views are applied in its body).

Sequences longer than ``attention_chunk`` (default 512) attend in query blocks of that size
(:func:`train.models.layers.attention`: the same numbers, one block's ``[b, h, block, t]``
scores at a time).

Positions: by default ``cumsum(attention_mask) - 1`` (so left padding works); packed rows pass
``segment_ids`` and ``positions``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from train.models.layers import (
    Embed,
    Linear,
    RMSNorm,
    activation,
    attention,
    attention_weights,
    make_layers,
    run_layers_collect,
)
from train.models.registry import register_family
from train.models.weights.mapping import (
    LLAMA_TABLE,
    MISTRAL_TABLE,
    QWEN2_TABLE,
    normalize_decoder_names,
)

DECODER_TYPES = ("llama", "mistral", "qwen2")
#: config fields that are JAX options, never read from an HF config.json
JAX_OPTIONS = ("dtype", "param_dtype", "scan_layers", "remat", "attention_chunk")


@dataclasses.dataclass
class LlamaConfig:
    """A decoder's shape (HF ``LlamaConfig`` field names) plus JAX options."""

    #: HF architecture written on export
    ARCHITECTURE: ClassVar[str] = "LlamaForCausalLM"
    #: fields of this dataclass that the family's HF config does not have (not exported)
    NOT_IN_HF: ClassVar[tuple[str, ...]] = ()
    #: fields whose ``None`` in config.json is meaningful (not "use the default")
    KEEP_NONE: ClassVar[tuple[str, ...]] = ("head_dim",)

    vocab_size: int = 32000  # token embedding rows
    hidden_size: int = 4096  # model width
    intermediate_size: int = 11008  # SwiGLU width
    num_hidden_layers: int = 32  # blocks
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: int | None = None  # GQA key/value heads (None = num_attention_heads)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    hidden_act: str = "silu"  # SwiGLU gate activation
    max_position_embeddings: int = 2048  # context length
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    tie_word_embeddings: bool = False  # LM head = embed_tokens^T
    attention_bias: bool = False  # biases on q/k/v/o
    mlp_bias: bool = False  # biases on gate/up/down
    attention_dropout: float = 0.0  # dropout on attention probabilities
    initializer_range: float = 0.02  # std of fresh weights
    bos_token_id: int | None = 1  # for export
    eos_token_id: int | list[int] | None = 2  # for export
    pad_token_id: int | None = None  # for export
    model_type: str = "llama"  # the family (see Qwen2Config / MistralConfig for the others)
    dtype: str = "float32"  # compute dtype (float32 | bfloat16)
    param_dtype: str = "float32"  # parameter dtype
    scan_layers: bool = False  # stack layers and lax.scan over them
    remat: bool = False  # gradient checkpointing per layer
    # queries per attention block when a sequence is longer (exact; bounds the [b, h, s, s]
    # scores / probabilities to one block); 0: never blocked
    attention_chunk: int = 512
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # other HF fields (export)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def __hash__(self) -> int:  # graphdefs hash their static config (jit static args)
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hash((type(self).__name__, blob))

    @property
    def qkv_bias(self) -> bool:
        """Whether q/k/v projections have biases."""
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        """Whether the output projection has a bias."""
        return self.attention_bias

    @property
    def window(self) -> int | None:
        """Sliding attention window in positions (``None`` = full causal attention)."""
        return None

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """From an HF ``config.json`` dict (``rope_theta`` also read from ``rope_parameters``).

        Raises:
            ValueError: a config of another ``model_type`` than this class reads, or an
                unsupported setting (RoPE scaling; see the subclasses for theirs).

        Example:
            >>> LlamaConfig.from_hf({"model_type": "llama", "hidden_size": 64,
            ...                      "num_attention_heads": 4}).head_dim
            16
        """
        mt, own = hf.get("model_type"), cls.__dataclass_fields__["model_type"].default
        if mt != own:
            raise ValueError(
                f"{cls.__name__} reads model_type={own!r} configs, not model_type={mt!r} "
                f"(decoders: {list(DECODER_TYPES)}; train.models.pretrained.load_pretrained "
                "picks the config class from config.json)."
            )
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in ("default", None):
            raise ValueError(f"RoPE scaling type {rtype!r} is not supported (only default RoPE).")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", *JAX_OPTIONS, *cls.NOT_IN_HF}
        kw = {k: v for k, v in hf.items() if k in names and (v is not None or k in cls.KEEP_NONE)}
        if "rope_theta" not in hf and "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        kw.update(overrides)
        extra = {
            k: v
            for k, v in hf.items()
            if k not in names and k not in ("rope_scaling", "rope_parameters", *JAX_OPTIONS)
        }
        return cls(**kw, extra=extra)

    def to_hf(self, architecture: str | None = None) -> dict[str, Any]:
        """The HF ``config.json`` dict (``architectures``: ``architecture`` or the family's).

        Example:
            >>> LlamaConfig.tiny().to_hf()["architectures"]
            ['LlamaForCausalLM']
        """
        skip = {*JAX_OPTIONS, "extra", *self.NOT_IN_HF}
        out = {
            k: v
            for k, v in self.extra.items()
            if k not in ("architectures", "torch_dtype", "dtype", *self.NOT_IN_HF)
        }
        out.update(
            {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        )
        out["architectures"] = [architecture or self.ARCHITECTURE]
        out["rope_scaling"] = None
        out["torch_dtype"] = out["dtype"] = (
            "bfloat16" if self.param_dtype == "bfloat16" else "float32"
        )
        return out

    @classmethod
    def tiny(cls, **kw: Any) -> LlamaConfig:
        """A 2-layer GQA config for tests and examples.

        Example:
            >>> MistralConfig.tiny(sliding_window=3).window
            3
        """
        base = dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        )
        base.update(kw)
        return cls(**base)


@dataclasses.dataclass
class Qwen2Config(LlamaConfig):
    """Qwen2 (HF ``Qwen2Config``): LLaMA with biases on q/k/v and none on o_proj or the MLP.

    HF's Qwen2 has no ``attention_bias`` / ``mlp_bias`` fields; they stay False here and are not
    exported. Sliding-window attention (``use_sliding_window``) is refused by :meth:`from_hf`.

    Example:
        >>> c = Qwen2Config.tiny()
        >>> c.qkv_bias, c.o_bias, "attention_bias" in c.to_hf()
        (True, False, False)
    """

    ARCHITECTURE: ClassVar[str] = "Qwen2ForCausalLM"
    NOT_IN_HF: ClassVar[tuple[str, ...]] = ("attention_bias", "mlp_bias")

    model_type: str = "qwen2"

    __hash__ = LlamaConfig.__hash__

    def __post_init__(self):
        super().__post_init__()
        if self.attention_bias or self.mlp_bias:
            raise ValueError(
                "model_type='qwen2' has biases on q/k/v only; attention_bias / mlp_bias are "
                "not Qwen2 options."
            )

    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def o_bias(self) -> bool:
        return False

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> Qwen2Config:
        """From an HF Qwen2 ``config.json`` dict.

        Raises:
            ValueError: ``use_sliding_window`` (or sliding ``layer_types``), not supported.

        Example:
            >>> Qwen2Config.from_hf({"model_type": "qwen2", "use_sliding_window": True})
            Traceback (most recent call last):
            ...
            ValueError: model_type='qwen2' with sliding-window attention ...
        """
        if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ()):
            raise ValueError(
                "model_type='qwen2' with sliding-window attention (use_sliding_window=true / "
                "'sliding_attention' layer_types) is not supported: only full attention "
                "(use_sliding_window=false)."
            )
        return super().from_hf(hf, **overrides)


@dataclasses.dataclass
class MistralConfig(LlamaConfig):
    """Mistral (HF ``MistralConfig``): LLaMA without biases and with a sliding attention window:
    a query at slot ``q`` sees keys at slots ``q - sliding_window < k <= q`` (``None`` = full
    causal attention). The default 4096 is HF's.

    Example:
        >>> MistralConfig.from_hf({"model_type": "mistral", "sliding_window": None}).window is None
        True
    """

    ARCHITECTURE: ClassVar[str] = "MistralForCausalLM"
    NOT_IN_HF: ClassVar[tuple[str, ...]] = ("attention_bias", "mlp_bias")
    KEEP_NONE: ClassVar[tuple[str, ...]] = ("head_dim", "sliding_window")

    model_type: str = "mistral"
    sliding_window: int | None = 4096  # attention window in positions (None = full)

    __hash__ = LlamaConfig.__hash__

    def __post_init__(self):
        super().__post_init__()
        if self.attention_bias or self.mlp_bias:
            raise ValueError("model_type='mistral' has no biases (attention_bias / mlp_bias).")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, not {self.sliding_window}.")

    @property
    def window(self) -> int | None:
        return self.sliding_window


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """HF-style rotary embedding (``rotate_half``) of ``x`` ``[b, s, h, d]`` at ``positions``
    ``[b, s]``.

    Example:
        >>> x = jnp.ones((1, 2, 1, 4))
        >>> bool(jnp.allclose(rope(x, jnp.zeros((1, 2), jnp.int32), 1e4), x))
        True
    """
    d = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = positions.astype(jnp.float32)[..., None] * inv  # [b, s, d/2]
    ang = jnp.concatenate([ang, ang], -1)[:, :, None, :]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x32 = x.astype(jnp.float32)
    rot = jnp.concatenate([-x32[..., d // 2 :], x32[..., : d // 2]], -1)
    return (x32 * cos + rot * sin).astype(x.dtype)


def _kw(cfg: LlamaConfig) -> dict[str, Any]:
    return {
        "dtype": jnp.dtype(cfg.dtype),
        "param_dtype": jnp.dtype(cfg.param_dtype),
        "std": cfg.initializer_range,
    }


class Attention(nnx.Module):
    """Grouped-query attention with RoPE; ``q_proj``/``k_proj``/``v_proj``/``o_proj``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        h, hd = cfg.hidden_size, cfg.head_dim
        qd, kvd = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        kw = dict(use_bias=cfg.qkv_bias, rngs=rngs, **_kw(cfg))
        self.q_proj = Linear(h, qd, ("embed", "heads"), **kw)
        self.k_proj = Linear(h, kvd, ("embed", "kv_heads"), **kw)
        self.v_proj = Linear(h, kvd, ("embed", "kv_heads"), **kw)
        kw["use_bias"] = cfg.o_bias
        self.o_proj = Linear(qd, h, ("heads", "embed"), **kw)
        self.dropout = nnx.Dropout(cfg.attention_dropout)
        self.cfg = cfg

    def __call__(self, x, positions, mask, cache, cache_index, *, deterministic, rngs):
        cfg = self.cfg
        b, s, _ = x.shape
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = rope(self.q_proj(x).reshape(b, s, nh, hd), positions, cfg.rope_theta)
        k = rope(self.k_proj(x).reshape(b, s, nkv, hd), positions, cfg.rope_theta)
        v = self.v_proj(x).reshape(b, s, nkv, hd)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(
                cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0)
            )
            v = jax.lax.dynamic_update_slice(
                cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0)
            )
            cache = {"k": k, "v": v}
        rep = nh // nkv
        kk, vv = jnp.repeat(k, rep, axis=2).astype(q.dtype), jnp.repeat(v, rep, axis=2)
        if deterministic or not cfg.attention_dropout:
            o = attention(q, kk, vv, mask, x.dtype, q_chunk=cfg.attention_chunk or None)
        else:  # dropout on the probabilities: unblocked
            w = attention_weights(q, kk, mask, x.dtype)
            w = self.dropout(w, deterministic=deterministic, rngs=rngs)
            o = jnp.einsum("bhst,bthd->bshd", w, vv.astype(w.dtype))
        return self.o_proj(o.reshape(b, s, nh * hd)), cache


class MLP(nnx.Module):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        kw = dict(use_bias=cfg.mlp_bias, rngs=rngs, **_kw(cfg))
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        kw = {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, mask, cache, cache_index, *, deterministic, rngs):
        a, cache = self.self_attn(
            self.input_layernorm(x),
            positions,
            mask,
            cache,
            cache_index,
            deterministic=deterministic,
            rngs=rngs,
        )
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class LlamaModel(nnx.Module):
    """Embeddings, the decoder layers and the final norm."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        kw = _kw(cfg)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = make_layers(
            lambda r: DecoderLayer(cfg, rngs=r), cfg.num_hidden_layers, cfg.scan_layers, rngs
        )
        self.norm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, dtype=kw["dtype"], param_dtype=kw["param_dtype"]
        )
        self.cfg = cfg


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> dict[str, Any]:
    """An empty KV cache: ``{"k": [layers, b, max_len, kv_heads, head_dim], "v": ...}``.

    Example:
        >>> init_cache(LlamaConfig.tiny(), 2, 8)["k"].shape
        (2, 2, 8, 2, 8)
    """
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    dt = jnp.dtype(dtype or cfg.dtype)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


def causal_mask(
    attention_mask: jax.Array | None,
    q_len: int,
    k_len: int,
    offset: jax.Array | int = 0,
    segment_ids: jax.Array | None = None,
    window: int | None = None,
) -> jax.Array:
    """Bool ``[b|1, 1, q_len, k_len]``: key slot ``<=`` query slot (queries sit at
    ``offset + arange(q_len)``), within ``window`` slots of it (``q - window < k``; as HF's
    sliding window, on slots, so left padding counts), key not padding, and (packing) same
    nonzero segment.

    Example:
        >>> causal_mask(jnp.array([[0, 1, 1]]), 3, 3)[0, 0].astype(int).tolist()
        [[0, 0, 0], [0, 1, 0], [0, 1, 1]]
        >>> causal_mask(None, 4, 4, window=2)[0, 0].astype(int).tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    qpos = (offset + jnp.arange(q_len))[:, None]
    kpos = jnp.arange(k_len)[None, :]
    m = kpos <= qpos
    if window is not None:
        m = m & (qpos - kpos < window)
    m = m[None, None]
    if attention_mask is not None:
        m = m & (attention_mask[:, None, None, :k_len] > 0)
    if segment_ids is not None:
        seg = segment_ids
        m = m & (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, None, :] > 0)
    return m


class LlamaForCausalLM(nnx.Module):
    """A LLaMA causal LM (HF ``LlamaForCausalLM``).

    Example:
        >>> m = LlamaForCausalLM(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
        >>> m(jnp.array([[0, 5, 7]]), jnp.array([[0, 1, 1]])).shape
        (1, 3, 64)
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = LlamaModel(cfg, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                ("embed", "vocab"),
                use_bias=False,
                rngs=rngs,
                **_kw(cfg),
            )
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        cache: dict[str, Any] | None = None,
        cache_index: jax.Array | int = 0,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        output_hidden_states: bool = False,
    ) -> Any:
        """Logits ``[b, s, vocab]`` (fp32).

        Args:
            input_ids: ``[b, s]`` token ids.
            attention_mask: ``[b, s]`` (1 = token, 0 = padding; left or right padding), or with
                ``cache`` ``[b, max_len]`` over cache slots.
            segment_ids: ``[b, s]`` packed-sequence ids (0 = padding); needs ``positions``.
            positions: ``[b, s]`` RoPE positions (default ``cumsum(mask) - 1``).
            cache: a KV cache from :func:`init_cache`; the tokens are written at slots
                ``cache_index ...`` and the call returns ``(logits, new_cache)``.
            cache_index: first cache slot of these tokens (same for every row).
            deterministic: False enables attention dropout (needs ``rngs`` with ``dropout``).
            rngs: dropout randomness.
            output_hidden_states: also return the embeddings and each layer's output
                (``[layers + 1, b, s, hidden]``).
        """
        cfg = self.cfg
        b, s = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, s if cache is None else cache["k"].shape[2]), jnp.int32)
        if positions is None:
            full = jnp.cumsum(attention_mask, axis=1) - 1
            pos = (
                full
                if cache is None
                else jax.lax.dynamic_slice_in_dim(full, cache_index, s, axis=1)
            )
            positions = jnp.maximum(pos, 0)
        if cache is None:
            mask = causal_mask(attention_mask, s, s, 0, segment_ids, cfg.window)
        else:
            mask = causal_mask(
                attention_mask, s, cache["k"].shape[2], cache_index, None, cfg.window
            )
        key = rngs.dropout() if (rngs is not None and not deterministic) else None
        x = self.model.embed_tokens(input_ids)
        n = cfg.num_hidden_layers
        keys = jax.random.split(key, n) if key is not None else jnp.zeros((n, 2), jnp.uint32)
        extra = {"key": keys, "cache": cache}

        def step(layer, h, e):
            r = None if deterministic or key is None else nnx.Rngs(dropout=e["key"])
            h, c = layer(
                h, positions, mask, e["cache"], cache_index, deterministic=deterministic, rngs=r
            )
            return h, {"cache": c, "h": h if output_hidden_states else None}

        x, outs = run_layers_collect(
            self.model.layers, n, x, step, extra, scan=cfg.scan_layers, remat=cfg.remat
        )
        hidden = outs["h"]
        x = self.model.norm(x)
        if self.lm_head is None:
            logits = self.model.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x)
        logits = logits.astype(jnp.float32)
        result: Any = logits
        if output_hidden_states:
            emb = self.model.embed_tokens(input_ids)
            result = (logits, jnp.concatenate([emb[None], hidden], 0))
        if cache is not None:
            return result, outs["cache"]
        return result


@dataclasses.dataclass(frozen=True)
class DecoderApply:
    """``(params, input_ids, attention_mask, segment_ids=None, positions=None, **kw) -> logits``
    for a fixed graphdef; hashable, so it can be a static ``jit`` argument."""

    graphdef: Any

    def __call__(
        self, params, input_ids, attention_mask=None, segment_ids=None, positions=None, **kw
    ):
        model = nnx.merge(self.graphdef, params)
        return model(input_ids, attention_mask, segment_ids, positions, **kw)


for _config_cls, _table in (
    (LlamaConfig, LLAMA_TABLE),
    (Qwen2Config, QWEN2_TABLE),
    (MistralConfig, MISTRAL_TABLE),
):
    register_family(
        _config_cls.__dataclass_fields__["model_type"].default,
        kind="decoder",
        config_cls=_config_cls,
        models={"causal_lm": LlamaForCausalLM},
        apply_fns={"causal_lm": DecoderApply},
        architectures={"causal_lm": _config_cls.ARCHITECTURE},
        table=_table,
        layers_path="model/layers",
        default_head="causal_lm",
        normalize=normalize_decoder_names,
        tied={"lm_head.weight": "model.embed_tokens.weight"},
        gguf_architectures=("llama",) if _config_cls is LlamaConfig else (),
    )
