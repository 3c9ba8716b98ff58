"""Declarative HF <-> NNX weight mapping, safetensors loading and HF-directory export.

Like MaxText's ``param_mapping``: each model family has a table of
``(hf_name, nnx_path, hook)`` rows (``{i}`` = layer index) and a hook is a small array
function (``"T"`` = transpose a ``[out, in]`` HF weight into a ``[in, out]`` kernel, its own
inverse). Checkpoint names are normalised first: ``bert.`` / ``roberta.`` prefixes are
dropped for encoders, a missing ``model.`` prefix is added for decoders, and old
``LayerNorm.gamma`` / ``beta`` become ``weight`` / ``bias``.

Weights are read with ``safetensors.numpy`` (never torch) from ``model.safetensors`` or a
sharded ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from sift_jax._src.paths import unflatten_paths

Hook = Callable[[np.ndarray], np.ndarray]
HOOKS: dict[str | None, Hook] = {None: lambda a: a, "T": lambda a: np.ascontiguousarray(a.T)}

ENCODER_TABLE: list[tuple[str, str, str | None]] = [
    ("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding", None),
    ("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding", None),
    ("embeddings.token_type_embeddings.weight", "embeddings/token_type_embeddings/embedding", None),
    ("embeddings.LayerNorm.weight", "embeddings/layer_norm/scale", None),
    ("embeddings.LayerNorm.bias", "embeddings/layer_norm/bias", None),
    (
        "encoder.layer.{i}.attention.self.query.weight",
        "encoder/layers/{i}/attention/query/kernel",
        "T",
    ),
    (
        "encoder.layer.{i}.attention.self.query.bias",
        "encoder/layers/{i}/attention/query/bias",
        None,
    ),
    ("encoder.layer.{i}.attention.self.key.weight", "encoder/layers/{i}/attention/key/kernel", "T"),
    ("encoder.layer.{i}.attention.self.key.bias", "encoder/layers/{i}/attention/key/bias", None),
    (
        "encoder.layer.{i}.attention.self.value.weight",
        "encoder/layers/{i}/attention/value/kernel",
        "T",
    ),
    (
        "encoder.layer.{i}.attention.self.value.bias",
        "encoder/layers/{i}/attention/value/bias",
        None,
    ),
    (
        "encoder.layer.{i}.attention.output.dense.weight",
        "encoder/layers/{i}/attention/output/kernel",
        "T",
    ),
    (
        "encoder.layer.{i}.attention.output.dense.bias",
        "encoder/layers/{i}/attention/output/bias",
        None,
    ),
    (
        "encoder.layer.{i}.attention.output.LayerNorm.weight",
        "encoder/layers/{i}/attention_norm/scale",
        None,
    ),
    (
        "encoder.layer.{i}.attention.output.LayerNorm.bias",
        "encoder/layers/{i}/attention_norm/bias",
        None,
    ),
    ("encoder.layer.{i}.intermediate.dense.weight", "encoder/layers/{i}/intermediate/kernel", "T"),
    ("encoder.layer.{i}.intermediate.dense.bias", "encoder/layers/{i}/intermediate/bias", None),
    ("encoder.layer.{i}.output.dense.weight", "encoder/layers/{i}/ffn_output/kernel", "T"),
    ("encoder.layer.{i}.output.dense.bias", "encoder/layers/{i}/ffn_output/bias", None),
    ("encoder.layer.{i}.output.LayerNorm.weight", "encoder/layers/{i}/ffn_norm/scale", None),
    ("encoder.layer.{i}.output.LayerNorm.bias", "encoder/layers/{i}/ffn_norm/bias", None),
    ("pooler.dense.weight", "pooler/dense/kernel", "T"),
    ("pooler.dense.bias", "pooler/dense/bias", None),
    # heads (HF keeps them outside the ``bert.`` / ``roberta.`` prefix)
    ("classifier.weight", "classifier/kernel", "T"),
    ("classifier.bias", "classifier/bias", None),
    ("classifier.dense.weight", "classifier/dense/kernel", "T"),
    ("classifier.dense.bias", "classifier/dense/bias", None),
    ("classifier.out_proj.weight", "classifier/out_proj/kernel", "T"),
    ("classifier.out_proj.bias", "classifier/out_proj/bias", None),
]

DECODER_TABLE: list[tuple[str, str, str | None]] = (
    [
        ("model.embed_tokens.weight", "model/embed_tokens/embedding", None),
        ("model.norm.weight", "model/norm/scale", None),
        ("lm_head.weight", "lm_head/kernel", "T"),
    ]
    + [
        (f"model.layers.{{i}}.{hf}.weight", f"model/layers/{{i}}/{nx}/{leaf}", hook)
        for hf, nx, leaf, hook in [
            ("self_attn.q_proj", "self_attn/q_proj", "kernel", "T"),
            ("self_attn.k_proj", "self_attn/k_proj", "kernel", "T"),
            ("self_attn.v_proj", "self_attn/v_proj", "kernel", "T"),
            ("self_attn.o_proj", "self_attn/o_proj", "kernel", "T"),
            ("mlp.gate_proj", "mlp/gate_proj", "kernel", "T"),
            ("mlp.up_proj", "mlp/up_proj", "kernel", "T"),
            ("mlp.down_proj", "mlp/down_proj", "kernel", "T"),
            ("input_layernorm", "input_layernorm", "scale", None),
            ("post_attention_layernorm", "post_attention_layernorm", "scale", None),
        ]
    ]
    + [
        (f"model.layers.{{i}}.{p}.bias", f"model/layers/{{i}}/{p.replace('.', '/')}/bias", None)
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
)

#: params a base checkpoint may lack; they are freshly initialised (and reported).
ENCODER_FRESH_OK = ("classifier/", "pooler/")


def expand_table(
    table: list[tuple[str, str, str | None]], num_layers: int
) -> dict[str, tuple[str, str | None]]:
    """``{nnx_path: (hf_name, hook)}`` with ``{i}`` expanded over the layers.

    Example:
        >>> m = expand_table(DECODER_TABLE, 2)
        >>> m["model/layers/1/self_attn/q_proj/kernel"]
        ('model.layers.1.self_attn.q_proj.weight', 'T')
    """
    out: dict[str, tuple[str, str | None]] = {}
    for hf, nx, hook in table:
        if "{i}" in nx:
            for i in range(num_layers):
                out[nx.format(i=i)] = (hf.format(i=i), hook)
        else:
            out[nx] = (hf, hook)
    return out


# ----------------------------------------------------------------------------- files


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local HF model directory for ``name_or_path`` (a directory, or a hub id downloaded
    with ``huggingface_hub.snapshot_download`` when the hub is reachable).

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        OSError: a hub id while offline (``HF_HUB_OFFLINE``) or when the download fails.

    Example:
        >>> resolve_model_dir("tests/golden/tiny_roberta").name
        'tiny_roberta'
    """
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    s = str(name_or_path)
    if p.exists():
        raise FileNotFoundError(
            f"{s} is a file; expected an HF model directory (config.json + model.safetensors)."
        )
    if s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise FileNotFoundError(f"Model directory {s} does not exist.")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    if offline:
        raise OSError(
            f"{s!r} is not a local directory and the Hugging Face hub is offline "
            "(HF_HUB_OFFLINE is set). Download the model where the hub is reachable "
            "(e.g. `hf download <id> --local-dir DIR`) and pass the local directory DIR instead."
        )
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id=s,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
            etag_timeout=10,
        )
    except Exception as e:  # network, auth, missing repo
        raise OSError(
            f"Could not fetch {s!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Pass a local HF directory (config.json + model.safetensors) instead."
        ) from e
    return Path(path)


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an HF directory as a dict.

    Example:
        >>> read_config("tests/golden/tiny_roberta")["model_type"]
        'roberta'
    """
    f = Path(model_dir) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(
            f"No config.json in {model_dir}; an HF model directory needs "
            "config.json and model.safetensors (or a sharded index)."
        )
    return json.loads(f.read_text())


def read_safetensors(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of ``model.safetensors`` or of the shards listed in
    ``model.safetensors.index.json``, as numpy arrays.

    Example:
        >>> sorted(read_safetensors("tests/golden/tiny_roberta"))[0]
        'classifier.dense.bias'
    """
    d = Path(model_dir)
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        return dict(load_file(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for s in shards:
            if not (d / s).is_file():
                raise FileNotFoundError(f"Shard {s} listed in {index} is missing.")
            out.update(load_file(d / s))
        return out
    raise FileNotFoundError(
        f"No weights in {d}: expected model.safetensors or model.safetensors.index.json "
        "(pytorch_model.bin is not supported: it needs torch)."
    )


# ----------------------------------------------------------------------------- load


def normalize_encoder_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops ``bert.`` / ``roberta.`` (etc.) prefixes and renames ``gamma``/``beta``.

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


def normalize_decoder_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds the ``model.`` prefix that base (``LlamaModel``) checkpoints lack.

    Example:
        >>> list(normalize_decoder_names({"norm.weight": 1, "lm_head.weight": 2}))
        ['model.norm.weight', 'lm_head.weight']
    """
    return {
        (k if k.startswith(("model.", "lm_head.")) else "model." + k): v for k, v in tensors.items()
    }


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (``None`` leaves dropped). Only dicts are
    descended into, so tuple leaves (e.g. logical axis names) stay whole; the inverse is
    :func:`unflatten` (``sift_jax``'s ``unflatten_paths``).

    Example:
        >>> flatten({"a": {"b": 1, "c": None}})
        {'a/b': 1}
    """
    out: dict[str, Any] = {}
    for k, v in tree.items():
        p = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, p + "/"))
        elif v is not None:
            out[p] = v
    return out


unflatten = unflatten_paths


def stack_layers(pure: dict[str, Any], layers_path: str) -> dict[str, Any]:
    """Turns ``{..layers: {"0": t0, "1": t1}}`` into the scanned ``{..layers: stack(t)}``."""
    *parents, last = layers_path.split("/")
    node = pure
    for p in parents:
        node = node[p]
    per = [node[last][str(i)] for i in range(len(node[last]))]
    node[last] = jax.tree.map(lambda *a: jnp.stack(a), *per)
    return pure


def unstack_layers(pure: dict[str, Any], layers_path: str) -> dict[str, Any]:
    """Inverse of :func:`stack_layers`."""
    *parents, last = layers_path.split("/")
    node = pure
    for p in parents:
        node = node[p]
    n = jax.tree.leaves(node[last])[0].shape[0]
    node[last] = {str(i): jax.tree.map(lambda a, i=i: a[i], node[last]) for i in range(n)}
    return pure


def build_params(
    make_model: Callable[[int], nnx.Module],
    mapping: dict[str, tuple[str, str | None]],
    tensors: dict[str, np.ndarray],
    *,
    fresh_ok: tuple[str, ...] = (),
    seed: int = 0,
    source: str = "checkpoint",
) -> nnx.Module:
    """Creates the (non-scanned) model from ``make_model(seed)`` with every param taken from
    ``tensors`` via ``mapping``.

    Params under a ``fresh_ok`` prefix that the checkpoint lacks keep their fresh
    initialisation (printed); any other missing tensor, or a shape mismatch, raises.
    """
    abstract = nnx.eval_shape(lambda: make_model(seed))
    graphdef, state = nnx.split(abstract)
    expected = flatten(nnx.to_pure_dict(state))
    out: dict[str, Any] = {}
    missing, fresh = [], []
    for path, sds in expected.items():
        if path not in mapping:
            raise KeyError(f"No HF mapping for model parameter {path}.")
        name, hook = mapping[path]
        if name not in tensors:
            (fresh if path.startswith(fresh_ok) else missing).append(f"{path} (HF {name})")
            continue
        arr = HOOKS[hook](np.asarray(tensors[name]))
        if tuple(arr.shape) != tuple(sds.shape):
            raise ValueError(
                f"Shape mismatch for parameter {path} (HF {name}): {source} has "
                f"{tuple(arr.shape)}, the model expects {tuple(sds.shape)}."
            )
        out[path] = jnp.asarray(arr, dtype=sds.dtype)
    if missing:
        raise KeyError(
            f"{source} lacks {len(missing)} parameter(s): "
            + ", ".join(missing[:8])
            + (" ..." if len(missing) > 8 else "")
        )
    if fresh:
        print("Freshly initialised (not in the checkpoint): " + ", ".join(fresh))
        init = flatten(nnx.to_pure_dict(nnx.state(make_model(seed))))
        for f in fresh:
            p = f.split(" ")[0]
            out[p] = init[p]
    return nnx.merge(graphdef, unflatten(out))


# ----------------------------------------------------------------------------- export


def _write_atomic(out_dir: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Runs each writer into a temporary directory inside ``out_dir``, then moves every file
    into ``out_dir`` with ``os.replace`` (each file appears whole or not at all).

    The files get the usual mode for new files (``0o666`` less the umask): some writers
    (``safetensors.numpy.save_file``) create them ``0o600``, which the moved file would keep.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-export-") as tmp:
        for name, write in writers.items():
            write(Path(tmp) / name)
        # The umask, read without changing it (os.umask would, for every thread).
        probe = Path(tmp) / ".mode-probe"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = probe.stat().st_mode & 0o777
        probe.unlink()
        for f in sorted(Path(tmp).iterdir()):
            if f.is_file():
                os.chmod(f, mode)
                os.replace(f, out_dir / f.name)


def export_tensors(
    model: nnx.Module,
    mapping: dict[str, tuple[str, str | None]],
    prefix_of: Callable[[str], str],
    layers_path: str,
    scanned: bool,
) -> dict[str, np.ndarray]:
    """HF-named numpy tensors of ``model`` (the inverse of the load mapping)."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if scanned:
        pure = unstack_layers(pure, layers_path)
    out = {}
    for path, arr in flatten(pure).items():
        name, hook = mapping[path]
        out[prefix_of(name) + name] = np.ascontiguousarray(HOOKS[hook](np.asarray(arr)))
    return out


def write_hf_dir(
    out_dir: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, np.ndarray],
    tokenizer: Any | None,
) -> Path:
    """Writes ``config.json``, ``model.safetensors`` and the tokenizer files atomically
    (each file via a temporary file + ``os.replace``)."""
    out = Path(out_dir)
    writers: dict[str, Callable[[Path], None]] = {
        "config.json": lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)),
        "model.safetensors": lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
    }
    if tokenizer is not None:

        def tok(p: Path) -> None:
            sub = p.parent / "tok"
            tokenizer.save_pretrained(str(sub))
            for f in sub.iterdir():
                shutil.move(str(f), p.parent / f.name)
            sub.rmdir()

        writers["tokenizer"] = tok
    _write_atomic(out, writers)
    return out


@dataclass
class Loaded:
    """A loaded model: the NNX ``model``, its ``config`` and (if found) the ``tokenizer``."""

    model: Any
    config: Any
    tokenizer: Any = None


def load_tokenizer(model_dir: str | os.PathLike) -> Any | None:
    """``AutoTokenizer.from_pretrained(model_dir)`` if it has tokenizer files, else ``None``."""
    d = Path(model_dir)
    if not any((d / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


# ----------------------------------------------------------------------------- families


def build_from_tensors(
    cfg: Any,
    tensors: dict[str, np.ndarray],
    *,
    seed: int = 0,
    source: str = "checkpoint",
    head: bool = True,
) -> nnx.Module:
    """The NNX model for ``cfg`` (:class:`EncoderConfig` or :class:`LlamaConfig`) with its
    params from HF-named ``tensors`` (stacked afterwards when ``cfg.scan_layers``).

    Encoders: ``head=True`` builds :class:`EncoderForSequenceClassification` (head params
    missing from a base checkpoint are freshly initialised and printed), else
    :class:`EncoderModel` (with pooler).
    """
    import dataclasses

    from train.models.decoder import LlamaConfig, LlamaForCausalLM
    from train.models.encoder import EncoderForSequenceClassification, EncoderModel

    flat_cfg = dataclasses.replace(cfg, scan_layers=False)
    if isinstance(cfg, LlamaConfig):
        tensors = normalize_decoder_names(tensors)
        mapping = expand_table(DECODER_TABLE, cfg.num_hidden_layers)
        cls, fresh_ok, layers = LlamaForCausalLM, (), "model/layers"
    else:
        tensors = normalize_encoder_names(tensors)
        mapping = expand_table(ENCODER_TABLE, cfg.num_hidden_layers)
        cls = EncoderForSequenceClassification if head else EncoderModel
        fresh_ok, layers = ENCODER_FRESH_OK, "encoder/layers"
    model = build_params(
        lambda s: cls(flat_cfg, rngs=nnx.Rngs(s)),
        mapping,
        tensors,
        fresh_ok=fresh_ok,
        seed=seed,
        source=source,
    )
    if not cfg.scan_layers:
        return model
    pure = stack_layers(nnx.to_pure_dict(nnx.state(model, nnx.Param)), layers)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(seed))))
    return nnx.merge(graphdef, pure)


def load_encoder(
    name_or_path: str | os.PathLike,
    *,
    head: bool = False,
    num_labels: int | None = None,
    dtype: str = "float32",
    param_dtype: str | None = None,
    scan_layers: bool = False,
    remat: bool = False,
    seed: int = 0,
    **config_overrides: Any,
) -> Loaded:
    """Loads a BERT / RoBERTa HF directory (or hub id) as NNX.

    Args:
        name_or_path: local HF directory (``config.json`` + safetensors) or hub id.
        head: build :class:`EncoderForSequenceClassification` (``num_labels``; 1 = regression)
            instead of the bare :class:`EncoderModel`.
        num_labels: classifier outputs (default: from the config).
        dtype: compute dtype; ``param_dtype`` defaults to it.
        scan_layers: stack layers (paths ``encoder/layers/...`` without the index).
        remat: gradient checkpointing per layer.
        seed: init seed for params missing from the checkpoint (the head).
        config_overrides: other :class:`EncoderConfig` fields (e.g. dropout rates).

    Returns:
        :class:`Loaded` ``(model, config, tokenizer)``.

    Example:
        >>> loaded = load_encoder("tests/golden/tiny_roberta", head=True)
        >>> type(loaded.model).__name__, loaded.config.num_labels
        ('EncoderForSequenceClassification', 3)
    """
    from train.models.encoder import EncoderConfig

    d = resolve_model_dir(name_or_path)
    over = dict(
        dtype=dtype,
        param_dtype=param_dtype or dtype,
        scan_layers=scan_layers,
        remat=remat,
        **config_overrides,
    )
    if num_labels is not None:
        over["num_labels"] = num_labels
    cfg = EncoderConfig.from_hf(read_config(d), **over)
    model = build_from_tensors(cfg, read_safetensors(d), seed=seed, source=str(d), head=head)
    return Loaded(model, cfg, load_tokenizer(d))


def load_llama(
    name_or_path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    scan_layers: bool = False,
    remat: bool = False,
    **config_overrides: Any,
) -> Loaded:
    """Loads a LLaMA-family decoder from an HF directory, a hub id or a ``.gguf`` file.

    Example:
        >>> loaded = load_llama("path/to/SmolLM2.gguf")  # doctest: +SKIP
    """
    from train.models.decoder import LlamaConfig

    if str(name_or_path).endswith(".gguf"):
        from train.models.gguf import load_gguf

        return load_gguf(
            name_or_path, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat
        )
    d = resolve_model_dir(name_or_path)
    cfg = LlamaConfig.from_hf(
        read_config(d),
        dtype=dtype,
        param_dtype=param_dtype or dtype,
        scan_layers=scan_layers,
        remat=remat,
        **config_overrides,
    )
    return Loaded(
        build_from_tensors(cfg, read_safetensors(d), source=str(d)), cfg, load_tokenizer(d)
    )


def export_hf(
    model: nnx.Module, config: Any, tokenizer: Any | None, out_dir: str | os.PathLike
) -> Path:
    """Writes ``model`` as an HF directory: ``config.json``, ``model.safetensors`` (names as
    HF's ``LlamaForCausalLM`` / ``BertForSequenceClassification`` / ``BertModel`` expect) and
    the tokenizer files. Each file is written to a temporary name and ``os.replace``-d.

    Example:
        >>> import tempfile
        >>> from train.models.encoder import EncoderConfig, EncoderModel
        >>> m = EncoderModel(EncoderConfig.tiny(), rngs=nnx.Rngs(0))
        >>> d = export_hf(m, m.cfg, None, tempfile.mkdtemp())
        >>> sorted(p.name for p in d.iterdir())
        ['config.json', 'model.safetensors']
    """
    from train.models.decoder import LlamaConfig
    from train.models.encoder import EncoderForSequenceClassification

    if isinstance(config, LlamaConfig):
        mapping = expand_table(DECODER_TABLE, config.num_hidden_layers)
        tensors = export_tensors(model, mapping, lambda n: "", "model/layers", config.scan_layers)
        hf_config = config.to_hf()
    else:
        mapping = expand_table(ENCODER_TABLE, config.num_hidden_layers)
        head = isinstance(model, EncoderForSequenceClassification)
        base = {"bert": "bert"}.get(config.model_type, "roberta")
        prefix = (
            (lambda n: "" if n.startswith("classifier.") else base + ".")
            if head
            else (lambda n: "")
        )
        tensors = export_tensors(model, mapping, prefix, "encoder/layers", config.scan_layers)
        arch = {
            "bert": "Bert",
            "roberta": "Roberta",
            "xlm-roberta": "XLMRoberta",
            "camembert": "Camembert",
        }[config.model_type]
        hf_config = config.to_hf(arch + ("ForSequenceClassification" if head else "Model"))
    return write_hf_dir(out_dir, hf_config, tensors, tokenizer)
