"""BERT / RoBERTa encoders in Flax NNX, driven by an HF ``config.json``.

One implementation covers ``model_type`` ``bert``, ``roberta``, ``xlm-roberta`` and
``camembert`` (RoBERTa's position ids start after ``pad_token_id``:
``cumsum(ids != pad) * (ids != pad) + pad``); each is registered as a family
(:func:`train.models.registry.register_family`) with the heads ``base`` (:class:`EncoderModel`)
and ``classifier`` (:class:`EncoderForSequenceClassification`).

Parameter paths (``nnx.split(model, nnx.Param)[1].to_pure_dict()``, ``/``-joined)::

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
    embeddings/layer_norm/{scale,bias}
    encoder/layers/3/attention/{query,key,value,output}/{kernel,bias}   kernel: [in, out]
    encoder/layers/3/attention_norm/{scale,bias}
    encoder/layers/3/intermediate/{kernel,bias}, encoder/layers/3/ffn_output/{kernel,bias}
    encoder/layers/3/ffn_norm/{scale,bias}
    pooler/dense/{kernel,bias}                                (BERT, and EncoderModel)
    classifier/{kernel,bias}                                  (BERT head)
    classifier/dense/{kernel,bias}, classifier/out_proj/...   (RoBERTa head)

With ``scan_layers=True`` the per-layer index disappears: ``encoder/layers/attention/query/kernel``
holds all layers stacked on a leading ``[num_hidden_layers]`` dim. ``SIFT`` regexes such as
``attention/(query|key|value|output)`` match both forms.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from train.models.functional import ModelApply, functional_apply
from train.models.layers import (
    Embed,
    LayerNorm,
    Linear,
    activation,
    attention_weights,
    make_layers,
    run_layers,
)
from train.models.registry import register_family
from train.models.weights.mapping import ENCODER_TABLE, normalize_encoder_names

#: HF model_type -> (architecture name stem, HF base-model prefix under a head)
ENCODER_FAMILIES = {
    "bert": ("Bert", "bert"),
    "roberta": ("Roberta", "roberta"),
    "xlm-roberta": ("XLMRoberta", "roberta"),
    "camembert": ("Camembert", "roberta"),
}
ENCODER_TYPES = tuple(ENCODER_FAMILIES)
#: config fields that are JAX options, never read from an HF config.json
JAX_OPTIONS = ("dtype", "param_dtype", "scan_layers", "remat")


@dataclasses.dataclass
class EncoderConfig:
    """An encoder's shape (HF ``BertConfig`` / ``RobertaConfig`` field names) plus JAX options."""

    model_type: str = "bert"  # bert | roberta | xlm-roberta | camembert
    vocab_size: int = 30522  # token embedding rows
    hidden_size: int = 768  # model width
    num_hidden_layers: int = 12  # transformer blocks
    num_attention_heads: int = 12  # heads per block
    intermediate_size: int = 3072  # FFN width
    hidden_act: str = "gelu"  # exact (erf) GELU, as HF's "gelu"
    hidden_dropout_prob: float = 0.1  # dropout after embeddings / sublayers
    attention_probs_dropout_prob: float = 0.1  # dropout on attention probabilities
    max_position_embeddings: int = 512  # position table rows
    type_vocab_size: int = 2  # token type table rows
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon
    pad_token_id: int = 0  # RoBERTa: padding_idx for position ids
    initializer_range: float = 0.02  # std of fresh weights
    num_labels: int = 2  # classifier outputs (1 = regression)
    classifier_dropout: float | None = None  # None = hidden_dropout_prob
    problem_type: str | None = None  # HF's regression / single_label_classification / ...
    position_embedding_type: str = "absolute"  # only "absolute" is supported
    id2label: dict[str, str] | None = None  # kept for export
    dtype: str = "float32"  # compute dtype (float32 | bfloat16)
    param_dtype: str = "float32"  # parameter dtype
    scan_layers: bool = False  # stack layers and lax.scan over them
    remat: bool = False  # gradient checkpointing per layer
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # other HF fields (export)

    @property
    def is_roberta(self) -> bool:
        """Whether the RoBERTa embedding/head conventions apply."""
        return self.model_type != "bert"

    def __hash__(self) -> int:  # graphdefs hash their static config (jit static args)
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> EncoderConfig:
        """From an HF ``config.json`` dict; ``overrides`` win (e.g. ``num_labels``, ``dtype``).

        Example:
            >>> EncoderConfig.from_hf({"model_type": "roberta", "hidden_size": 64}).is_roberta
            True
        """
        mt = hf.get("model_type")
        if mt not in ENCODER_TYPES:
            raise ValueError(
                f"Unknown encoder architecture model_type={mt!r}; supported: {list(ENCODER_TYPES)}."
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", *JAX_OPTIONS}
        kw = {k: v for k, v in hf.items() if k in names}
        if "num_labels" not in hf and hf.get("id2label"):
            kw["num_labels"] = len(hf["id2label"])
        extra = {k: v for k, v in hf.items() if k not in names and k not in JAX_OPTIONS}
        kw.update(overrides)
        if "num_labels" in overrides and "id2label" not in overrides:
            kw["id2label"] = None
        cfg = cls(**kw, extra=extra)
        if cfg.position_embedding_type != "absolute":
            raise ValueError(
                f"position_embedding_type={cfg.position_embedding_type!r} is not supported "
                "(only 'absolute')."
            )
        return cfg

    def to_hf(self, architecture: str | None = None) -> dict[str, Any]:
        """The HF ``config.json`` dict (``architectures`` set when given).

        Example:
            >>> EncoderConfig.tiny().to_hf("BertModel")["architectures"]
            ['BertModel']
        """
        skip = {"dtype", "param_dtype", "scan_layers", "remat", "extra", "id2label"}
        out = dict(self.extra)
        out.update(
            {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        )
        id2label = self.id2label or {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        out["id2label"] = {str(k): v for k, v in id2label.items()}
        out["label2id"] = {v: int(k) for k, v in out["id2label"].items()}
        out.pop("num_labels", None)
        if architecture:
            out["architectures"] = [architecture]
        return out

    @classmethod
    def tiny(cls, model_type: str = "bert", **kw: Any) -> EncoderConfig:
        """A 2-layer, 32-wide config for tests and examples."""
        base = dict(
            model_type=model_type,
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=40,
            type_vocab_size=1 if model_type != "bert" else 2,
            pad_token_id=1 if model_type != "bert" else 0,
        )
        base.update(kw)
        return cls(**base)


class EncoderOutput(NamedTuple):
    """``last_hidden_state`` ``[b, s, hidden]``; ``pooler_output`` ``[b, hidden]`` or None."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None


def _dropout_rngs(key: jax.Array | None, deterministic: bool) -> nnx.Rngs | None:
    return None if deterministic or key is None else nnx.Rngs(dropout=key)


def _kw(cfg: EncoderConfig) -> dict[str, Any]:
    return {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}


class Embeddings(nnx.Module):
    """Word + position + token type embeddings, LayerNorm, dropout."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        kw = dict(std=cfg.initializer_range, rngs=rngs, **_kw(cfg))
        self.word_embeddings = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embeddings = Embed(
            cfg.max_position_embeddings, cfg.hidden_size, ("positions", "embed"), **kw
        )
        self.token_type_embeddings = Embed(
            cfg.type_vocab_size, cfg.hidden_size, ("types", "embed"), **kw
        )
        self.layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **_kw(cfg))
        self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)
        self.cfg = cfg

    def __call__(self, ids, token_type_ids, *, deterministic: bool, rngs: nnx.Rngs | None):
        cfg = self.cfg
        if cfg.is_roberta:
            real = (ids != cfg.pad_token_id).astype(jnp.int32)
            pos = jnp.cumsum(real, axis=1) * real + cfg.pad_token_id
        else:
            pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        x = (
            self.word_embeddings(ids)
            + self.position_embeddings(pos)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.layer_norm(x), deterministic=deterministic, rngs=rngs)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with ``query``/``key``/``value``/``output`` projections."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        h = cfg.hidden_size
        kw = dict(std=cfg.initializer_range, rngs=rngs, **_kw(cfg))
        self.query = Linear(h, h, ("embed", "heads"), **kw)
        self.key = Linear(h, h, ("embed", "heads"), **kw)
        self.value = Linear(h, h, ("embed", "heads"), **kw)
        self.output = Linear(h, h, ("heads", "embed"), **kw)
        self.dropout = nnx.Dropout(cfg.attention_probs_dropout_prob)
        self.heads = cfg.num_attention_heads

    def __call__(self, x, mask, *, deterministic: bool, rngs: nnx.Rngs | None):
        b, s, h = x.shape
        split = lambda t: t.reshape(b, s, self.heads, h // self.heads)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        w = attention_weights(q, k, mask, x.dtype)
        w = self.dropout(w, deterministic=deterministic, rngs=rngs)
        o = jnp.einsum("bhst,bthd->bshd", w, v).reshape(b, s, h)
        return self.output(o)


class EncoderLayer(nnx.Module):
    """Post-LN transformer block (BERT layout)."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        kw = dict(std=cfg.initializer_range, rngs=rngs, **_kw(cfg))
        self.attention = SelfAttention(cfg, rngs=rngs)
        self.attention_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **_kw(cfg))
        self.intermediate = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.ffn_output = Linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.ffn_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **_kw(cfg))
        self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x, mask, *, deterministic: bool, rngs: nnx.Rngs | None):
        d = dict(deterministic=deterministic, rngs=rngs)
        a = self.attention(x, mask, **d)
        x = self.attention_norm(x + self.dropout(a, **d))
        f = self.ffn_output(self.act(self.intermediate(x)))
        return self.ffn_norm(x + self.dropout(f, **d))


class Encoder(nnx.Module):
    """The stack of :class:`EncoderLayer` (``layers/0``, ``layers/1``, ... or scanned)."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.layers = make_layers(
            lambda r: EncoderLayer(cfg, rngs=r), cfg.num_hidden_layers, cfg.scan_layers, rngs
        )
        self.cfg = cfg

    def __call__(self, x, mask, *, deterministic: bool, key: jax.Array | None):
        def step(layer, h, k):
            return layer(h, mask, deterministic=deterministic, rngs=_dropout_rngs(k, deterministic))

        return run_layers(
            self.layers,
            self.cfg.num_hidden_layers,
            x,
            step,
            None if deterministic else key,
            scan=self.cfg.scan_layers,
            remat=self.cfg.remat,
        )


class Pooler(nnx.Module):
    """BERT pooler: ``tanh(dense(h[:, 0]))``."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.dense = Linear(
            h, h, ("embed", "embed_out"), std=cfg.initializer_range, rngs=rngs, **_kw(cfg)
        )

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(hidden[:, 0]))


class EncoderModel(nnx.Module):
    """The bare encoder (HF ``BertModel`` / ``RobertaModel``).

    Example:
        >>> m = EncoderModel(EncoderConfig.tiny(), rngs=nnx.Rngs(0))
        >>> out = m(jnp.array([[2, 5, 7, 0]]), jnp.array([[1, 1, 1, 0]]))
        >>> out.last_hidden_state.shape, out.pooler_output.shape
        ((1, 4, 32), (1, 32))
    """

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, add_pooler: bool = True):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.pooler = Pooler(cfg, rngs=rngs) if add_pooler else None

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """The last hidden state ``[b, s, hidden]``."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        key = rngs.dropout() if (rngs is not None and not deterministic) else None
        d = _dropout_rngs(key, deterministic)
        x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic, rngs=d)
        mask = (attention_mask > 0)[:, None, None, :]
        ekey = None if key is None else jax.random.fold_in(key, 1)
        return self.encoder(x, mask, deterministic=deterministic, key=ekey)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> EncoderOutput:
        """``EncoderOutput(last_hidden_state, pooler_output)``; dropout when not deterministic
        (``rngs`` must then have a ``dropout`` stream)."""
        h = self.hidden_states(
            input_ids, attention_mask, token_type_ids, deterministic=deterministic, rngs=rngs
        )
        return EncoderOutput(h, self.pooler(h) if self.pooler is not None else None)


class RobertaClassificationHead(nnx.Module):
    """``out_proj(dropout(tanh(dense(dropout(h[:, 0])))))`` as in HF RoBERTa."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        kw = dict(std=cfg.initializer_range, rngs=rngs, **_kw(cfg))
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size, ("embed", "embed_out"), **kw)
        self.out_proj = Linear(cfg.hidden_size, cfg.num_labels, ("embed", "labels"), **kw)

    def __call__(self, h, dropout, *, deterministic: bool, rngs: nnx.Rngs | None):
        d = dict(deterministic=deterministic, rngs=rngs)
        x = dropout(h[:, 0], **d)
        return self.out_proj(dropout(jnp.tanh(self.dense(x)), **d))


class EncoderForSequenceClassification(EncoderModel):
    """Encoder + HF's sequence classification head (``num_labels == 1``: regression).

    BERT: pooler + dropout + ``classifier``; RoBERTa: ``classifier.dense`` + tanh +
    ``classifier.out_proj`` on the first token (no pooler).

    Example:
        >>> cfg = EncoderConfig.tiny("roberta", num_labels=3)
        >>> m = EncoderForSequenceClassification(cfg, rngs=nnx.Rngs(0))
        >>> m(jnp.array([[0, 5, 7, 2]])).shape
        (1, 3)
    """

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs, add_pooler=not cfg.is_roberta)
        p = cfg.classifier_dropout
        self.head_dropout = nnx.Dropout(cfg.hidden_dropout_prob if p is None else p)
        if cfg.is_roberta:
            self.classifier = RobertaClassificationHead(cfg, rngs=rngs)
        else:
            self.classifier = Linear(
                cfg.hidden_size,
                cfg.num_labels,
                ("embed", "labels"),
                std=cfg.initializer_range,
                rngs=rngs,
                **_kw(cfg),
            )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Logits ``[b, num_labels]`` (fp32)."""
        h = self.hidden_states(
            input_ids, attention_mask, token_type_ids, deterministic=deterministic, rngs=rngs
        )
        key = rngs.dropout() if (rngs is not None and not deterministic) else None
        d = _dropout_rngs(key, deterministic)
        if self.cfg.is_roberta:
            out = self.classifier(h, self.head_dropout, deterministic=deterministic, rngs=d)
        else:
            pooled = self.head_dropout(self.pooler(h), deterministic=deterministic, rngs=d)
            out = self.classifier(pooled)
        return out.astype(jnp.float32)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array, normalize: bool = True) -> jax.Array:
    """Mask-weighted mean over tokens (sentence-transformers pooling), optionally L2-normalised.

    Example:
        >>> h = jnp.array([[[1.0, 0.0], [3.0, 0.0], [9.0, 9.0]]])
        >>> mean_pool(h, jnp.array([[1, 1, 0]]), normalize=False)
        Array([[2., 0.]], dtype=float32)
    """
    m = attention_mask.astype(jnp.float32)[..., None]
    e = (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    if normalize:
        e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return e


@dataclasses.dataclass(frozen=True)
class ClassifierApply:
    """``(params, batch, rng, train) -> logits [b, num_labels]`` for an encoder classifier's
    ``graphdef``; hashable (a static ``jit`` argument).

    Dropout is on when ``train`` (and ``dropout``); ``token_type_ids`` is optional in the batch.

    Example:
        >>> from train.models.functional import split_params
        >>> g, p = split_params(EncoderForSequenceClassification(EncoderConfig.tiny(),
        ...                                                      rngs=nnx.Rngs(0)))
        >>> ones = jnp.ones((1, 4), int)
        >>> ClassifierApply(g)(p, {"input_ids": ones, "attention_mask": ones}, None, False).shape
        (1, 2)
    """

    graphdef: Any
    dropout: bool = True

    def __call__(self, params, batch, rng, train):
        train = train and self.dropout
        return functional_apply(
            self.graphdef,
            params,
            None,
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("token_type_ids"),
            deterministic=not train,
            rngs=nnx.Rngs(dropout=rng) if train else None,
        )


def classifier_apply_fn(graphdef: Any, dropout: bool = True) -> ClassifierApply:
    """:class:`ClassifierApply` for ``graphdef`` (``dropout=False``: never dropout).

    Example:
        >>> classifier_apply_fn(None, dropout=False).dropout
        False
    """
    return ClassifierApply(graphdef, dropout)


def _export_prefix(base: str):
    def prefix(head: str, name: str) -> str:
        return "" if head == "base" or name.startswith("classifier.") else base + "."

    return prefix


for _model_type, (_stem, _base) in ENCODER_FAMILIES.items():
    register_family(
        _model_type,
        kind="encoder",
        config_cls=EncoderConfig,
        models={"base": EncoderModel, "classifier": EncoderForSequenceClassification},
        apply_fns={"base": ModelApply, "classifier": ClassifierApply},
        architectures={"base": f"{_stem}Model", "classifier": f"{_stem}ForSequenceClassification"},
        table=ENCODER_TABLE,
        layers_path="encoder/layers",
        default_head="base",
        normalize=normalize_encoder_names,
        export_prefix=_export_prefix(_base),
        # heads a checkpoint may lack (fresh init) or have while the model has none (dropped)
        optional=("classifier/", "pooler/"),
        # pretraining heads (BERT's MLM / NSP ``cls.``, RoBERTa's MLM ``lm_head.``)
        drop=("cls.", "lm_head."),
    )
