"""HF <-> NNX parameter names: declarative tables, hooks, strict matching and export.

Like MaxText's ``param_mapping``: a family's table is a list of ``(hf_name, nnx_path, hook)``
rows (``{i}`` = layer index) and a hook is a small array function (``"T"`` = transpose an
``[out, in]`` HF weight into an ``[in, out]`` kernel; it is its own inverse). A table may list
rows for optional parameters (e.g. LLaMA's ``attention_bias``): only the rows of parameters
the built model has are used, and :func:`match_tensors` refuses a checkpoint tensor that none
of them uses.

Checkpoint names are normalised before matching: ``bert.`` / ``roberta.`` prefixes are dropped
for encoders (:func:`normalize_encoder_names`, which also renames ``LayerNorm.gamma`` /
``beta``), a missing ``model.`` prefix is added for decoders (:func:`normalize_decoder_names`).

Nothing here knows a model class: params are ``/``-joined paths of nested dicts of arrays.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Hook = Callable[[np.ndarray], np.ndarray]
Row = tuple[str, str, str | None]

#: ``None`` = as stored; ``"T"`` = transposed (HF ``[out, in]`` <-> NNX ``[in, out]``).
HOOKS: dict[str | None, Hook] = {None: lambda a: a, "T": lambda a: np.ascontiguousarray(a.T)}

#: Checkpoint tensors that are buffers, not parameters, and are skipped silently (regexes,
#: searched in the normalised name): BERT's ``embeddings.position_ids`` (old checkpoints, e.g.
#: the packaged MiniLM) and the rotary ``inv_freq`` that some LLaMA checkpoints store.
KNOWN_BUFFERS: tuple[str, ...] = (
    r"(^|\.)embeddings\.position_ids$",
    r"(^|\.)rotary_emb\.inv_freq$",
)


def _rows(hf: str, nx: str, leaves: Iterable[tuple[str, str, str | None]]) -> list[Row]:
    return [(f"{hf}.{h}", f"{nx}/{n}", hook) for h, n, hook in leaves]


_DENSE = (("weight", "kernel", "T"), ("bias", "bias", None))
_NORM = (("weight", "scale", None), ("bias", "bias", None))
_EMB = (("weight", "embedding", None),)

#: BERT / RoBERTa (and XLM-RoBERTa / CamemBERT) encoders and their sequence-classification heads
#: (HF keeps the heads outside the ``bert.`` / ``roberta.`` prefix).
ENCODER_TABLE: list[Row] = (
    _rows("embeddings.word_embeddings", "embeddings/word_embeddings", _EMB)
    + _rows("embeddings.position_embeddings", "embeddings/position_embeddings", _EMB)
    + _rows("embeddings.token_type_embeddings", "embeddings/token_type_embeddings", _EMB)
    + _rows("embeddings.LayerNorm", "embeddings/layer_norm", _NORM)
    + [
        row
        for hf, nx, leaves in [
            ("attention.self.query", "attention/query", _DENSE),
            ("attention.self.key", "attention/key", _DENSE),
            ("attention.self.value", "attention/value", _DENSE),
            ("attention.output.dense", "attention/output", _DENSE),
            ("attention.output.LayerNorm", "attention_norm", _NORM),
            ("intermediate.dense", "intermediate", _DENSE),
            ("output.dense", "ffn_output", _DENSE),
            ("output.LayerNorm", "ffn_norm", _NORM),
        ]
        for row in _rows(f"encoder.layer.{{i}}.{hf}", f"encoder/layers/{{i}}/{nx}", leaves)
    ]
    + _rows("pooler.dense", "pooler/dense", _DENSE)
    + _rows("classifier", "classifier", _DENSE)
    + _rows("classifier.dense", "classifier/dense", _DENSE)
    + _rows("classifier.out_proj", "classifier/out_proj", _DENSE)
)

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LEAF = {"weight": "kernel", "bias": "bias"}


def _decoder_rows(biases: Iterable[str]) -> list[Row]:
    def layer(hf: str, leaf: str, hook: str | None) -> Row:
        nx = hf.replace(".", "/")
        return (f"model.layers.{{i}}.{hf}.{leaf}", f"model/layers/{{i}}/{nx}/{_LEAF[leaf]}", hook)

    return (
        [
            ("model.embed_tokens.weight", "model/embed_tokens/embedding", None),
            ("model.norm.weight", "model/norm/scale", None),
            ("lm_head.weight", "lm_head/kernel", "T"),
        ]
        + [layer(p, "weight", "T") for p in _ATTN + _MLP]
        + [
            (
                "model.layers.{i}.input_layernorm.weight",
                "model/layers/{i}/input_layernorm/scale",
                None,
            ),
            (
                "model.layers.{i}.post_attention_layernorm.weight",
                "model/layers/{i}/post_attention_layernorm/scale",
                None,
            ),
        ]
        + [layer(p, "bias", None) for p in biases]
    )


#: LLaMA: the projections may carry biases (``attention_bias`` on q/k/v/o, ``mlp_bias`` on
#: gate/up/down).
LLAMA_TABLE: list[Row] = _decoder_rows(_ATTN + _MLP)
#: Qwen2: LLaMA with biases on q/k/v only (never on o_proj or the MLP).
QWEN2_TABLE: list[Row] = _decoder_rows(_ATTN[:3])
#: Mistral: LLaMA without any bias.
MISTRAL_TABLE: list[Row] = _decoder_rows(())


def expand_table(table: Iterable[Row], num_layers: int) -> dict[str, tuple[str, str | None]]:
    """``{nnx_path: (hf_name, hook)}`` with ``{i}`` expanded over the layers.

    Example:
        >>> m = expand_table(LLAMA_TABLE, 2)
        >>> m["model/layers/1/self_attn/q_proj/kernel"]
        ('model.layers.1.self_attn.q_proj.weight', 'T')
        >>> expand_table(QWEN2_TABLE, 1)["model/layers/0/self_attn/v_proj/bias"]
        ('model.layers.0.self_attn.v_proj.bias', None)
    """
    out: dict[str, tuple[str, str | None]] = {}
    for hf, nx, hook in table:
        if "{i}" in nx:
            for i in range(num_layers):
                out[nx.format(i=i)] = (hf.format(i=i), hook)
        else:
            out[nx] = (hf, hook)
    return out


# ----------------------------------------------------------------------------- names


def normalize_encoder_names(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Drops ``bert.`` / ``roberta.`` (etc.) prefixes and renames ``gamma`` / ``beta``.

    Example:
        >>> list(normalize_encoder_names({"bert.embeddings.LayerNorm.gamma": 1}))
        ['embeddings.LayerNorm.weight']
    """
    out = {}
    for k, v in tensors.items():
        k = re.sub(r"^(bert|roberta|xlm-roberta|camembert|model)\.", "", k)
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        out[k] = v
    return out


def normalize_decoder_names(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Adds the ``model.`` prefix that base (``LlamaModel``) checkpoints lack.

    Example:
        >>> list(normalize_decoder_names({"norm.weight": 1, "lm_head.weight": 2}))
        ['model.norm.weight', 'lm_head.weight']
    """
    return {
        (k if k.startswith(("model.", "lm_head.")) else "model." + k): v for k, v in tensors.items()
    }


# ----------------------------------------------------------------------------- trees


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (``None`` leaves dropped). Only dicts are
    descended into, so tuple leaves (e.g. logical axis names) stay whole; the inverse is
    :func:`unflatten`. (The same ``/``-joined paths as ``sift_jax``'s ``flatten_paths``; the
    model layers do not import the optimizer library.)

    Example:
        >>> flatten({"a": {"b": 1, "c": None}})
        {'a/b': 1}
    """
    out: dict[str, Any] = {}
    for k, v in tree.items():
        p = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, p + "/"))
        elif v is not None:
            out[p] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts from ``{"a/b": x}``: the inverse of :func:`flatten`.

    Example:
        >>> unflatten({"a/b": 1, "a/c": 2})
        {'a': {'b': 1, 'c': 2}}
    """
    out: dict[str, Any] = {}
    for path, x in flat.items():
        node = out
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = x
    return out


def _node(pure: dict[str, Any], layers_path: str) -> tuple[dict[str, Any], str]:
    *parents, last = layers_path.split("/")
    node = pure
    for p in parents:
        node = node[p]
    return node, last


def stack_layers(pure: dict[str, Any], layers_path: str) -> dict[str, Any]:
    """Turns ``{..layers: {"0": t0, "1": t1}}`` into the scanned ``{..layers: stack(t)}``
    (in place; returns ``pure``).

    Example:
        >>> p = {"m": {"layers": {"0": {"w": np.zeros(2)}, "1": {"w": np.ones(2)}}}}
        >>> stack_layers(p, "m/layers")["m"]["layers"]["w"].shape
        (2, 2)
    """
    node, last = _node(pure, layers_path)
    per = [node[last][str(i)] for i in range(len(node[last]))]
    node[last] = jax.tree.map(lambda *a: jnp.stack(a), *per)
    return pure


def unstack_layers(pure: dict[str, Any], layers_path: str) -> dict[str, Any]:
    """Inverse of :func:`stack_layers` (in place; returns ``pure``).

    Example:
        >>> p = {"layers": {"w": np.zeros((3, 2))}}
        >>> sorted(unstack_layers(p, "layers")["layers"])
        ['0', '1', '2']
    """
    node, last = _node(pure, layers_path)
    n = jax.tree.leaves(node[last])[0].shape[0]
    node[last] = {str(i): jax.tree.map(lambda a, i=i: a[i], node[last]) for i in range(n)}
    return pure


# ----------------------------------------------------------------------------- matching


def drop_tied(
    tensors: dict[str, Any], tied: Mapping[str, str], source: str = "checkpoint"
) -> dict[str, Any]:
    """Drops each ``tied`` tensor (e.g. ``lm_head.weight``) that only repeats the tensor it is
    tied to (``model.embed_tokens.weight``); a differing copy raises (loading it would silently
    lose weights).

    Example:
        >>> t = {"lm_head.weight": np.eye(2), "model.embed_tokens.weight": np.eye(2)}
        >>> list(drop_tied(t, {"lm_head.weight": "model.embed_tokens.weight"}))
        ['model.embed_tokens.weight']
    """
    out = dict(tensors)
    for name, to in tied.items():
        if name not in out:
            continue
        if to in out and np.array_equal(np.asarray(out[name]), np.asarray(out[to])):
            del out[name]
        else:
            raise ValueError(
                f"{source} stores {name} and the config ties it to {to} "
                "(tie_word_embeddings=True), but the two differ: set tie_word_embeddings=False "
                "in config.json if the checkpoint has its own head."
            )
    return out


@dataclass
class Matched:
    """What :func:`match_tensors` found: ``arrays`` (``{nnx_path: array}`` in the model's
    layout), ``fresh`` (optional params the checkpoint lacks) and ``dropped`` (checkpoint
    tensors deliberately not loaded)."""

    arrays: dict[str, np.ndarray]
    fresh: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def _head(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def match_tensors(
    expected: Mapping[str, tuple[int, ...]],
    mapping: Mapping[str, tuple[str, str | None]],
    tensors: Mapping[str, Any],
    *,
    optional: tuple[str, ...] = (),
    drop: tuple[str, ...] = (),
    buffers: tuple[str, ...] = KNOWN_BUFFERS,
    source: str = "checkpoint",
) -> Matched:
    """Matches (normalised) checkpoint ``tensors`` to the params a model ``expected``, strictly.

    Args:
        expected: ``{nnx_path: shape}`` of every parameter of the built (non-scanned) model.
        mapping: the family's expanded table (:func:`expand_table`), also listing rows for
            parameters this model variant lacks.
        tensors: HF-named arrays.
        optional: nnx path prefixes (e.g. ``classifier/``, ``pooler/``) whose params may be
            missing from the checkpoint (they stay freshly initialised) or present in it while
            the model has none (e.g. a RoBERTa pooler under a classifier; dropped).
        drop: checkpoint name prefixes dropped on purpose (pretraining heads such as ``cls.``).
        buffers: regexes of non-parameter buffers that are skipped (:data:`KNOWN_BUFFERS`).
        source: named in error messages.

    Raises:
        KeyError: a parameter without a table row, or missing from the checkpoint (outside
            ``optional``).
        ValueError: a shape mismatch, or a checkpoint tensor that no parameter uses (outside
            ``optional``, ``drop`` and ``buffers``).

    Example:
        >>> mapping = expand_table(LLAMA_TABLE, 1)
        >>> expected = {"model/norm/scale": (2,)}
        >>> match_tensors(expected, mapping, {"model.norm.weight": np.ones(2)}).arrays
        {'model/norm/scale': array([1., 1.])}
        >>> match_tensors(expected, mapping, {"model.norm.weight": np.ones(2),
        ...                                   "model.norm.bias": np.ones(2)})
        Traceback (most recent call last):
        ...
        ValueError: checkpoint has 1 tensor(s) that no parameter of the model uses: ...
    """
    reverse = {name: path for path, (name, _) in mapping.items()}
    arrays: dict[str, np.ndarray] = {}
    missing, fresh, used = [], [], set()
    for path, shape in expected.items():
        if path not in mapping:
            raise KeyError(f"No HF mapping for model parameter {path}.")
        name, hook = mapping[path]
        if name not in tensors:
            (fresh if path.startswith(optional) else missing).append(path)
            continue
        arr = HOOKS[hook](np.asarray(tensors[name]))
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(
                f"Shape mismatch for parameter {path} (HF {name}): {source} has "
                f"{tuple(arr.shape)}, the model expects {tuple(shape)}."
            )
        arrays[path] = arr
        used.add(name)
    if missing:
        raise KeyError(
            f"{source} lacks {len(missing)} parameter(s): "
            + _head([f"{p} (HF {mapping[p][0]})" for p in missing])
        )
    dropped, unused = [], []
    for name in tensors:
        if name in used or any(re.search(b, name) for b in buffers):
            continue
        if name.startswith(drop) or (name in reverse and reverse[name].startswith(optional)):
            dropped.append(name)
        else:
            unused.append(name)
    if unused:
        raise ValueError(
            f"{source} has {len(unused)} tensor(s) that no parameter of the model uses: "
            + _head(sorted(unused))
            + " (does config.json's model_type / bias / tie settings match the checkpoint?)"
        )
    return Matched(arrays, fresh, sorted(dropped))


def export_tensors(
    params: Mapping[str, Any],
    mapping: Mapping[str, tuple[str, str | None]],
    prefix_of: Callable[[str], str] = lambda name: "",
    layers_path: str | None = None,
) -> dict[str, np.ndarray]:
    """HF-named numpy tensors of a nested params dict (the inverse of :func:`match_tensors`).

    Args:
        params: nested dict of arrays (``nnx.to_pure_dict`` of a model's params).
        mapping: the expanded table.
        prefix_of: HF name -> prefix to prepend (e.g. ``"bert."`` under a classifier).
        layers_path: where the stacked layers sit when ``params`` are scanned (else None).

    Example:
        >>> p = {"model": {"norm": {"scale": np.ones(2)}}}
        >>> export_tensors(p, expand_table(LLAMA_TABLE, 1))
        {'model.norm.weight': array([1., 1.])}
    """
    pure = jax.tree.map(np.asarray, dict(params))
    if layers_path is not None:
        pure = unstack_layers(pure, layers_path)
    out = {}
    for path, arr in flatten(pure).items():
        name, hook = mapping[path]
        out[prefix_of(name) + name] = np.ascontiguousarray(HOOKS[hook](np.asarray(arr)))
    return out
