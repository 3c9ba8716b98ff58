"""Load a LLaMA-architecture GGUF file (llama.cpp format) as an NNX :class:`LlamaForCausalLM`.

Tensors are dequantized with ``gguf.quants.dequantize`` (F32, F16, BF16, Q8_0, Q4_0, Q4_1),
renamed to HF names, and the rows of ``q_proj`` / ``k_proj`` are un-permuted (llama.cpp's
HF->GGUF converter interleaves the two RoPE halves of every head; we invert it). The config
(:class:`LlamaConfig`) and a ``PreTrainedTokenizerFast`` (GPT-2 style byte-level BPE from
``tokenizer.ggml.tokens`` / ``merges``, chat template from ``tokenizer.chat_template``) come
from the file's metadata.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from train.models.decoder import LlamaConfig

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
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
    if name in _NAMES:
        return _NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m or m.group(2) not in _BLOCK:
        raise KeyError(f"Unknown GGUF tensor {name!r} for a llama model.")
    return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"


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


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_config(reader: Any, **overrides: Any) -> LlamaConfig:
    """A :class:`LlamaConfig` from GGUF metadata (``llama.*`` keys)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"Unsupported GGUF architecture {arch!r}; only 'llama' is supported.")
    names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens.data) if tokens else None)
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    kw: dict[str, Any] = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def read_tensors(reader: Any, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """All tensors dequantized to float32, in HF names and HF layout (``[out, in]``), with the
    q/k RoPE row permutation undone.

    Raises:
        ValueError: a tensor in a quantization type outside :data:`SUPPORTED_TYPES`.
    """
    from gguf.quants import dequantize

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
            arr = unpermute_rope(arr, cfg.num_attention_heads)
        elif ".self_attn.k_proj." in name:
            arr = unpermute_rope(arr, cfg.num_key_value_heads)
        out[name] = arr
    return out


def read_tokenizer(reader: Any) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` from ``tokenizer.ggml.*`` metadata (GPT-2
    style byte-level BPE; ``pre == "smollm"`` also splits digits one by one, as llama.cpp)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"Unsupported GGUF tokenizer model {kind!r}; only 'gpt2' (BPE) is.")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _field(reader, "tokenizer.ggml.pre") in ("smollm", "llama-bpe", "llama3"):
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
        i = _field(reader, key)
        return tokens[int(i)] if i is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=tid("tokenizer.ggml.bos_token_id"),
        eos_token=tid("tokenizer.ggml.eos_token_id"),
        unk_token=tid("tokenizer.ggml.unknown_token_id"),
        pad_token=tid("tokenizer.ggml.padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )


def load_gguf(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    scan_layers: bool = False,
    remat: bool = False,
    with_tokenizer: bool = True,
) -> Any:
    """Loads a llama GGUF file as :class:`~train.models.hf.Loaded` ``(model, config, tokenizer)``.

    Args:
        path: the ``.gguf`` file.
        dtype: compute dtype.
        param_dtype: parameter dtype (default ``dtype``).
        scan_layers: stack the layers for ``lax.scan``.
        remat: gradient checkpointing per layer.
        with_tokenizer: also build the tokenizer from the metadata.

    Example:
        >>> from train.models.gguf import load_gguf
        >>> loaded = load_gguf("model.Q4_1.gguf")  # doctest: +SKIP
        >>> loaded.tokenizer.apply_chat_template(...)  # doctest: +SKIP
    """
    import gguf

    from train.models.hf import Loaded, build_from_tensors

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file {p} does not exist.")
    reader = gguf.GGUFReader(str(p))
    cfg = read_config(
        reader, dtype=dtype, param_dtype=param_dtype or dtype, scan_layers=scan_layers, remat=remat
    )
    tensors = read_tensors(reader, cfg)
    model = build_from_tensors(cfg, tensors, source=str(p))
    return Loaded(model, cfg, read_tokenizer(reader) if with_tokenizer else None)
