"""The loader: any supported checkpoint -> one :class:`Pretrained` bundle.

``load_pretrained`` reads

- ``embedded:minilm`` (the packaged MiniLM-L6 BERT directory, ``train.data.assets.minilm_dir``),
  ``embedded:smollm2`` (the packaged SmolLM2-135M-Instruct GGUF,
  ``train.data.assets.smollm2_gguf_path``),
- a ``.gguf`` file (llama architecture),
- a local HF directory (``config.json`` + safetensors), or a hub id (downloaded when the hub
  is reachable),

picks the registered family from ``config.json``'s ``model_type`` (:mod:`train.models.registry`),
builds the model, and matches the checkpoint strictly (:func:`train.models.weights.match_tensors`):
a missing tensor and a tensor no parameter uses both raise. Skipped without a word: the
buffers in :data:`~train.models.weights.mapping.KNOWN_BUFFERS`. Skipped and printed: a
classifier head for another label count (then freshly initialised), heads the built model
lacks (a RoBERTa pooler under a classifier, a classifier under a bare encoder), pretraining
heads (BERT ``cls.*``, RoBERTa ``lm_head.*``). A tied decoder's ``lm_head.weight`` is dropped
only when it equals the embedding.

Layers: :mod:`train.models.weights` (files, names; no model classes) <- the model modules
(:mod:`~train.models.encoder`, :mod:`~train.models.decoder`, :mod:`~train.models.layers`) <-
this module.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from train.data import assets
from train.models import decoder as _decoder  # noqa: F401  (registers llama / qwen2 / mistral)
from train.models import encoder as _encoder  # noqa: F401  (registers bert / roberta / ...)
from train.models.registry import Family, family_for, family_for_gguf
from train.models.sharding import DEFAULT_RULES, LogicalRules, param_shardings
from train.models.weights.gguf_file import gguf_config, gguf_tensors, gguf_tokenizer, open_gguf
from train.models.weights.hf_dir import (
    load_tokenizer,
    read_config,
    read_safetensors,
    resolve_model_dir,
    write_hf_dir,
)
from train.models.weights.mapping import (
    drop_tied,
    expand_table,
    export_tensors,
    flatten,
    match_tensors,
    stack_layers,
    unflatten,
)

#: ``embedded:<name>`` -> the function that locates the packaged asset
EMBEDDED: dict[str, Callable[[], Path]] = {
    "embedded:minilm": assets.minilm_dir,
    "embedded:smollm2": assets.smollm2_gguf_path,
}
TOKENIZER_MODES = ("auto", "required", "skip")


def resolve_source(name_or_path: str | os.PathLike) -> str:
    """``embedded:<name>`` -> the packaged asset's path (fetched into the cache on first use);
    anything else unchanged.

    Raises:
        ValueError: an unknown ``embedded:`` name.

    Example:
        >>> resolve_source("tests/golden/tiny_roberta")
        'tests/golden/tiny_roberta'
        >>> resolve_source("embedded:nothing")
        Traceback (most recent call last):
        ...
        ValueError: Unknown embedded model 'embedded:nothing'; known: ['embedded:minilm', ...].
    """
    s = str(name_or_path)
    if s.startswith("embedded:"):
        if s not in EMBEDDED:
            raise ValueError(f"Unknown embedded model {s!r}; known: {sorted(EMBEDDED)}.")
        return str(EMBEDDED[s]())
    return s


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint as read from disk: its HF-style ``config`` dict, HF-named ``tensors``,
    ``tokenizer`` (or None), ``family`` and ``source`` path."""

    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    tokenizer: Any
    family: Family
    source: str


def read_checkpoint(name_or_path: str | os.PathLike, *, tokenizer: bool = True) -> Checkpoint:
    """Reads an embedded model, a ``.gguf`` file, an HF directory or a hub id.

    Raises:
        FileNotFoundError: a missing path, ``config.json`` or weights file.
        ValueError: an unregistered ``model_type`` / GGUF architecture.

    Example:
        >>> ck = read_checkpoint("tests/golden/tiny_roberta")
        >>> ck.family.name, ck.tokenizer, len(ck.tensors)
        ('roberta', None, 41)
    """
    path = resolve_source(name_or_path)
    if path.endswith(".gguf"):
        reader = open_gguf(path)
        cfg = gguf_config(reader)
        family = family_for_gguf(cfg["model_type"])
        tensors = gguf_tensors(reader, cfg)
        tok = gguf_tokenizer(reader) if tokenizer else None
        return Checkpoint(cfg, tensors, tok, family, path)
    d = resolve_model_dir(path)
    cfg = read_config(d)
    family = family_for(cfg.get("model_type"))
    tensors = read_safetensors(d)
    return Checkpoint(cfg, tensors, load_tokenizer(d) if tokenizer else None, family, str(d))


def build_params(
    family: Family,
    head: str,
    cfg: Any,
    tensors: dict[str, np.ndarray],
    *,
    seed: int = 0,
    source: str = "checkpoint",
) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """``(graphdef, params)`` of ``family``'s ``head`` model for ``cfg`` with every parameter
    from the HF-named ``tensors`` (strictly: see the module docstring); layers stacked when
    ``cfg.scan_layers``.

    Example:
        >>> from train.models.encoder import EncoderConfig
        >>> from train.models.weights import read_safetensors
        >>> cfg = EncoderConfig.tiny("roberta", num_labels=3, layer_norm_eps=1e-5)
        >>> g, p = build_params(family_for("roberta"), "classifier", cfg,
        ...                     read_safetensors("tests/golden/tiny_roberta"))
        >>> p["classifier"]["out_proj"]["kernel"].shape
        (32, 3)
    """
    cls = family.models[head]
    tensors = family.normalize(tensors)
    if getattr(cfg, "tie_word_embeddings", False) and family.tied:
        tensors = drop_tied(tensors, family.tied, source)
    flat_cfg = dataclasses.replace(cfg, scan_layers=False)
    graphdef, state = nnx.split(
        nnx.eval_shape(lambda: cls(flat_cfg, rngs=nnx.Rngs(seed))), nnx.Param
    )
    expected = flatten(nnx.to_pure_dict(state))
    mapping = expand_table(family.table, cfg.num_hidden_layers)
    m = match_tensors(
        {p: s.shape for p, s in expected.items()},
        mapping,
        tensors,
        optional=family.optional,
        drop=family.drop,
        source=source,
    )
    if m.dropped:
        print(
            f"Not loaded (no such part in this {family.name} {head} model): " + ", ".join(m.dropped)
        )
    arrays = {p: jnp.asarray(a, dtype=expected[p].dtype) for p, a in m.arrays.items()}
    if m.fresh:
        print(
            "Freshly initialised (not in the checkpoint): "
            + ", ".join(f"{p} (HF {mapping[p][0]})" for p in m.fresh)
        )
        init = flatten(nnx.to_pure_dict(nnx.state(cls(flat_cfg, rngs=nnx.Rngs(seed)), nnx.Param)))
        arrays.update({p: init[p] for p in m.fresh})
    params = unflatten(arrays)
    if cfg.scan_layers:
        params = stack_layers(params, family.layers_path)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(seed))), nnx.Param)
    return graphdef, params


def export_params(
    family: Family,
    head: str,
    cfg: Any,
    params: dict[str, Any],
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
) -> Path:
    """Writes ``params`` as an HF directory for ``family``'s ``head``: ``config.json`` (the
    family's architecture and config fields), ``model.safetensors`` (HF names) and the
    tokenizer files; each file atomically.

    Example:
        >>> import json, tempfile
        >>> from train.models.decoder import LlamaForCausalLM, MistralConfig
        >>> from train.models.functional import split_params
        >>> cfg = MistralConfig.tiny(sliding_window=4)
        >>> _, p = split_params(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
        >>> d = export_params(family_for("mistral"), "causal_lm", cfg, p, tempfile.mkdtemp())
        >>> c = json.loads((d / "config.json").read_text())
        >>> c["architectures"], c["sliding_window"], "attention_bias" in c
        (['MistralForCausalLM'], 4, False)
    """
    mapping = expand_table(family.table, cfg.num_hidden_layers)
    tensors = export_tensors(
        jax.device_get(params),
        mapping,
        lambda name: family.export_prefix(head, name),
        family.layers_path if cfg.scan_layers else None,
    )
    return write_hf_dir(out_dir, cfg.to_hf(family.architectures[head]), tensors, tokenizer)


def export_model(
    model: nnx.Module, out_dir: str | os.PathLike, tokenizer: Any = None, config: Any = None
) -> Path:
    """:func:`export_params` for an NNX model of a registered family (family from
    ``model.cfg.model_type``, head from the model's class).

    Example:
        >>> import tempfile
        >>> from train.models.encoder import EncoderConfig, EncoderModel
        >>> m = EncoderModel(EncoderConfig.tiny(), rngs=nnx.Rngs(0))
        >>> d = export_model(m, tempfile.mkdtemp())
        >>> sorted(p.name for p in d.iterdir())
        ['config.json', 'model.safetensors']
    """
    cfg = config if config is not None else model.cfg
    family = family_for(cfg.model_type)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return export_params(family, family.head_of(model), cfg, params, out_dir, tokenizer)


@dataclasses.dataclass
class Pretrained:
    """A loaded model as pure functions over a nested dict of params.

    Attributes:
        family: registered family name (``"bert"``, ``"llama"``, ``"qwen2"``, ...).
        head: ``"base"`` / ``"classifier"`` (encoders) or ``"causal_lm"`` (decoders).
        params: nested dict of arrays with string keys (as
            :func:`train.models.functional.split_params` gives).
        graphdef: the NNX graphdef the params merge into.
        config: the family's config dataclass.
        tokenizer: HF tokenizer, or None.
        source: the file / directory it was read from.
        description: one line for logs.

    Example:
        >>> b = load_pretrained("tests/golden/tiny_roberta", head="classifier")
        >>> b.family, b.head, b.apply_fn.__class__.__name__
        ('roberta', 'classifier', 'ClassifierApply')
    """

    family: str
    head: str
    params: dict[str, Any]
    graphdef: Any
    config: Any
    tokenizer: Any = None
    source: str = ""
    description: str = ""

    @property
    def spec(self) -> Family:
        """The registered :class:`~train.models.registry.Family`."""
        return family_for(self.family)

    @property
    def apply_fn(self) -> Callable:
        """What the jobs call (hashable; a static ``jit`` argument): encoders' ``classifier``:
        ``(params, batch, rng, train) -> logits``; decoders:
        ``(params, input_ids, attention_mask, segment_ids=None, positions=None, **kw) ->
        logits`` (:class:`~train.models.decoder.DecoderApply`); ``base``:
        ``(params, *model_args) -> EncoderOutput``."""
        return self.spec.apply_fns[self.head](self.graphdef)

    @property
    def model(self) -> nnx.Module:
        """The NNX model (``graphdef`` merged with the current ``params``)."""
        return nnx.merge(self.graphdef, self.params)

    @property
    def supports_packing(self) -> bool:
        """Whether ``apply_fn`` takes ``segment_ids`` / ``positions`` (decoders)."""
        return self.spec.kind == "decoder"

    @property
    def num_params(self) -> int:
        """Number of parameters."""
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.params)))

    def shardings(self, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> dict[str, Any]:
        """``NamedSharding`` per param (same tree as ``params``) by the logical-axis ``rules``.

        Example:
            >>> b = load_pretrained("tests/golden/tiny_roberta", head="classifier")
            >>> mesh = jax.make_mesh((1,), ("fsdp",), devices=jax.devices()[:1])
            >>> b.shardings(mesh)["classifier"]["dense"]["kernel"].spec
            P('fsdp', None)
        """
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.params)
        state = nnx.state(nnx.merge(self.graphdef, shapes), nnx.Param)
        return nnx.to_pure_dict(param_shardings(state, mesh, rules))

    def place(self, params: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
        """``params`` put on ``mesh`` with :meth:`shardings`."""
        return jax.tree.map(jax.device_put, params, self.shardings(mesh))

    def export(self, params: dict[str, Any] | None, out_dir: str | os.PathLike) -> Path:
        """Writes ``params`` (default: ``self.params``) as a merged HF directory with the family's
        architecture (``BertForSequenceClassification``, ``Qwen2ForCausalLM``, ...) and config,
        plus the tokenizer."""
        params = self.params if params is None else params
        return export_params(
            self.spec, self.head, self.config, params, out_dir, tokenizer=self.tokenizer
        )

    @classmethod
    def from_model(
        cls, model: nnx.Module, *, tokenizer: Any = None, source: str = "memory"
    ) -> Pretrained:
        """Wraps an NNX model of a registered family (e.g. a freshly initialised one).

        Example:
            >>> from train.models.decoder import LlamaForCausalLM, Qwen2Config
            >>> m = LlamaForCausalLM(Qwen2Config.tiny(), rngs=nnx.Rngs(0))
            >>> Pretrained.from_model(m).description
            'qwen2 causal_lm 2x32 (0.0M params) from memory'
        """
        family = family_for(model.cfg.model_type)
        graphdef, params = nnx.split(model, nnx.Param)
        return cls._make(
            family,
            family.head_of(model),
            graphdef,
            nnx.to_pure_dict(params),
            model.cfg,
            tokenizer,
            source,
            source,
        )

    @classmethod
    def _make(cls, family, head, graphdef, params, cfg, tokenizer, source, label) -> Pretrained:
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        desc = (
            f"{family.name} {head} {cfg.num_hidden_layers}x{cfg.hidden_size} "
            f"({n / 1e6:.1f}M params) from {label}"
        )
        return cls(family.name, head, params, graphdef, cfg, tokenizer, source, desc)


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    head: str | None = None,
    num_labels: int | None = None,
    dtype: str = "float32",
    param_dtype: str | None = None,
    remat: bool = False,
    scan_layers: bool = False,
    seed: int = 0,
    id2label: dict[str, str] | None = None,
    tokenizer: str = "auto",
    **config_overrides: Any,
) -> Pretrained:
    """Loads a pretrained model of any registered family as a :class:`Pretrained`.

    Args:
        name_or_path: ``embedded:minilm`` / ``embedded:smollm2``, a ``.gguf`` file, a local HF
            directory or a hub id.
        head: ``"classifier"`` (encoder + sequence-classification head), ``"base"`` (bare
            encoder with pooler), ``"causal_lm"`` (decoders); None = the family's default
            (``base`` for encoders, ``causal_lm`` for decoders).
        num_labels: classifier outputs (1 = regression; default: the checkpoint's). A
            checkpoint head with another label count is dropped and freshly initialised.
        dtype: compute dtype (``float32`` / ``bfloat16``).
        param_dtype: parameter dtype (default ``dtype``).
        remat: gradient checkpointing per layer.
        scan_layers: stack the layers (paths without the layer index) for ``lax.scan``.
        seed: init seed of the params the checkpoint lacks (a fresh head).
        id2label: classifier label names (kept for export).
        tokenizer: ``"auto"`` (load it when the checkpoint has one), ``"required"`` (raise
            when it has none) or ``"skip"``.
        config_overrides: other config fields (e.g. dropout rates).

    Raises:
        FileNotFoundError: missing files. ValueError: unknown family / head, unsupported config,
        shape mismatch, a checkpoint tensor no parameter uses. KeyError: a missing tensor.

    Example:
        >>> b = load_pretrained("tests/golden/tiny_roberta", head="classifier", num_labels=2)
        tests/golden/tiny_roberta has a 3-label classifier; the task has 2 labels: ...
        Freshly initialised (not in the checkpoint): classifier/dense/bias ...
        >>> b.description
        'roberta classifier 2x32 (0.0M params) from tests/golden/tiny_roberta'
    """
    if tokenizer not in TOKENIZER_MODES:
        raise ValueError(f"tokenizer must be one of {TOKENIZER_MODES}, not {tokenizer!r}.")
    ck = read_checkpoint(name_or_path, tokenizer=tokenizer != "skip")
    family = ck.family
    head = family.check_head(head)
    if head != "classifier" and (num_labels is not None or id2label):
        raise ValueError(f"num_labels / id2label need head='classifier', not {head!r}.")
    over: dict[str, Any] = dict(
        dtype=dtype, param_dtype=param_dtype or dtype, scan_layers=scan_layers, remat=remat
    )
    over.update(config_overrides)
    if tokenizer == "required" and ck.tokenizer is None:
        raise ValueError(
            f"{name_or_path} has no tokenizer files (tokenizer.json / vocab.txt / "
            "tokenizer_config.json, or GGUF tokenizer metadata)."
        )
    tensors = family.normalize(ck.tensors)
    if num_labels is not None:
        over["num_labels"] = num_labels
        saved = ck.config.get("num_labels") or len(ck.config.get("id2label") or {}) or None
        stale = [k for k in tensors if k.startswith("classifier.")]
        if stale and saved not in (None, num_labels):
            # Like HF's ignore_mismatched_sizes: a head for another label set is re-initialised.
            print(
                f"{name_or_path} has a {saved}-label classifier; the task has {num_labels} "
                "labels: the classifier head is freshly initialised."
            )
            tensors = {k: v for k, v in tensors.items() if k not in stale}
    if id2label:
        over["id2label"] = id2label
    cfg = family.config_cls.from_hf(ck.config, **over)
    graphdef, params = build_params(family, head, cfg, tensors, seed=seed, source=ck.source)
    return Pretrained._make(
        family, head, graphdef, params, cfg, ck.tokenizer, ck.source, str(name_or_path)
    )
