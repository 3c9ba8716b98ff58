"""GGUF files (llama.cpp format): metadata as an HF-style ``config.json`` dict, tensors
dequantized into HF names and layout, and the tokenizer.

Tensors are dequantized with ``gguf.quants.dequantize`` (F32, F16, BF16, Q8_0, Q4_0, Q4_1),
renamed to HF names, and the rows of ``q_proj`` / ``k_proj`` are un-permuted (llama.cpp's
HF->GGUF converter interleaves the two RoPE halves of every head; we invert it). The tokenizer
is a ``PreTrainedTokenizerFast`` (GPT-2 style byte-level BPE from ``tokenizer.ggml.tokens`` /
``merges``, chat template from ``tokenizer.chat_template``). Only the ``llama`` architecture
is read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.quants import dequantize

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
SUPPORTED_ARCHITECTURES = ("llama",)

TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
#: llama.cpp block tensor -> HF module name (``blk.{i}.<key>.weight``).
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def gguf_to_hf_name(name: str) -> str:
    """HF name of a llama.cpp tensor name.

    Example:
        >>> gguf_to_hf_name("blk.3.attn_q.weight")
        'model.layers.3.self_attn.q_proj.weight'
    """
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m or m.group(2) not in BLOCK_NAMES:
        raise KeyError(f"Unknown GGUF tensor {name!r} for a llama model.")
    return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute`` of q/k rows (``[out, in]`` or ``[out]``).

    Example:
        >>> w = np.arange(8.0)
        >>> perm = w.reshape(2, 2, 2).swapaxes(1, 2).reshape(8)  # llama.cpp, 2 heads
        >>> unpermute_rope(perm, 2).tolist() == w.tolist()
        True
    """
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A ``gguf.GGUFReader`` (memory-mapped) for ``path``.

    Raises:
        FileNotFoundError: no such file.

    Example:
        >>> open_gguf("missing.gguf")
        Traceback (most recent call last):
        ...
        FileNotFoundError: GGUF file missing.gguf does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file {p} does not exist.")
    return gguf.GGUFReader(str(p))


def field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """The value of a metadata key (``default`` when absent)."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The file's metadata as an HF-style ``config.json`` dict (``model_type`` ``llama``).

    Raises:
        ValueError: an architecture other than ``llama``.
    """
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"Unsupported GGUF architecture {arch!r}; only {list(SUPPORTED_ARCHITECTURES)} "
            "is supported."
        )
    names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else None)
    heads = int(field(reader, f"{arch}.attention.head_count"))
    hidden = int(field(reader, f"{arch}.embedding_length"))
    return {
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(field(reader, f"{arch}.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
    }


def gguf_tensors(reader: gguf.GGUFReader, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """All tensors dequantized to float32, in HF names and HF layout (``[out, in]``), with the
    q/k RoPE row permutation undone (head counts from :func:`gguf_config`'s ``config``).

    Raises:
        ValueError: a tensor in a quantization type outside :data:`SUPPORTED_TYPES`.
        KeyError: a tensor name this reader does not know.
    """
    out = {}
    for t in reader.tensors:
        tname = t.tensor_type.name
        if tname not in SUPPORTED_TYPES:
            raise ValueError(
                f"Unsupported GGUF quantization type {tname} for tensor {t.name!r}; "
                f"supported: {', '.join(SUPPORTED_TYPES)}."
            )
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists ne0 (the inner dim) first
        arr = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        name = gguf_to_hf_name(t.name)
        if ".self_attn.q_proj." in name:
            arr = unpermute_rope(arr, config["num_attention_heads"])
        elif ".self_attn.k_proj." in name:
            arr = unpermute_rope(arr, config["num_key_value_heads"])
        out[name] = arr
    return out


def gguf_tokenizer(reader: gguf.GGUFReader) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` from ``tokenizer.ggml.*`` metadata (GPT-2
    style byte-level BPE; ``pre`` ``smollm`` / ``llama-bpe`` / ``llama3`` also split digits one
    by one, as llama.cpp does).

    Raises:
        ValueError: a tokenizer model other than ``gpt2``.
    """
    # transformers / tokenizers are slow to import: only when a tokenizer is asked for
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"Unsupported GGUF tokenizer model {kind!r}; only 'gpt2' (BPE) is.")
    tokens = list(field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    types = list(field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if field(reader, "tokenizer.ggml.pre") in ("smollm", "llama-bpe", "llama3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == 3
    ]
    tok.add_special_tokens(special)

    def tid(key):
        i = field(reader, key)
        return tokens[int(i)] if i is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=tid("tokenizer.ggml.bos_token_id"),
        eos_token=tid("tokenizer.ggml.eos_token_id"),
        unk_token=tid("tokenizer.ggml.unknown_token_id"),
        pad_token=tid("tokenizer.ggml.padding_token_id"),
        chat_template=field(reader, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )


def read_gguf(
    path: str | os.PathLike, *, tokenizer: bool = True
) -> tuple[dict[str, Any], dict[str, np.ndarray], Any]:
    """``(config_dict, tensors, tokenizer_or_None)`` of a llama GGUF file.

    Example:
        >>> cfg, tensors, tok = read_gguf("SmolLM2.Q4_1.gguf")  # doctest: +SKIP
        >>> cfg["model_type"], tensors["model.norm.weight"].shape  # doctest: +SKIP
        ('llama', (576,))
    """
    reader = open_gguf(path)
    cfg = gguf_config(reader)
    return cfg, gguf_tensors(reader, cfg), gguf_tokenizer(reader) if tokenizer else None
