"""The bottom layer of :mod:`train.models`: checkpoint files and parameter names, no model
classes.

- :mod:`~train.models.weights.hf_dir`: HF directories (local or hub): ``config.json``,
  safetensors files / shards, the tokenizer, and atomic export of an HF directory.
- :mod:`~train.models.weights.gguf_file`: GGUF files: metadata as an HF-style config dict,
  dequantized tensors in HF names, the tokenizer.
- :mod:`~train.models.weights.mapping`: the HF <-> NNX name tables and hooks, name
  normalisation, strict matching (:func:`match_tensors`) and :func:`export_tensors`.

The model modules (:mod:`train.models.encoder`, :mod:`train.models.decoder`) sit above it and
:mod:`train.models.pretrained` (the loader) on top.
"""

from train.models.weights.gguf_file import read_gguf
from train.models.weights.hf_dir import (
    load_tokenizer,
    read_config,
    read_safetensors,
    resolve_model_dir,
    write_hf_dir,
)
from train.models.weights.mapping import (
    ENCODER_TABLE,
    KNOWN_BUFFERS,
    LLAMA_TABLE,
    MISTRAL_TABLE,
    QWEN2_TABLE,
    drop_tied,
    expand_table,
    export_tensors,
    flatten,
    match_tensors,
    normalize_decoder_names,
    normalize_encoder_names,
    stack_layers,
    unflatten,
    unstack_layers,
)

__all__ = [
    "ENCODER_TABLE",
    "KNOWN_BUFFERS",
    "LLAMA_TABLE",
    "MISTRAL_TABLE",
    "QWEN2_TABLE",
    "drop_tied",
    "expand_table",
    "export_tensors",
    "flatten",
    "load_tokenizer",
    "match_tensors",
    "normalize_decoder_names",
    "normalize_encoder_names",
    "read_config",
    "read_gguf",
    "read_safetensors",
    "resolve_model_dir",
    "stack_layers",
    "unflatten",
    "unstack_layers",
    "write_hf_dir",
]
