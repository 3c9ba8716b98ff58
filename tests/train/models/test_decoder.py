"""LLaMA decoder: the embedded SmolLM2 GGUF vs HF PyTorch, KV-cache generation, packing,
scan, GGUF reading (dequantization, q/k un-permutation, tokenizer), errors, HF export."""

import json
import re
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from train.data.assets import smollm2_gguf_path
from train.models.decoder import DecoderApply, LlamaConfig, LlamaForCausalLM
from train.models.functional import functional_apply, split_params
from train.models.generate import generate, generate_text, left_pad
from train.models.pretrained import export_model, load_pretrained
from train.models.weights import LLAMA_TABLE, expand_table, export_tensors, flatten, stack_layers
from train.models.weights.gguf_file import BLOCK_NAMES as GGUF_BLOCK_NAMES

GOLDEN = Path(__file__).resolve().parents[2] / "golden"


@pytest.fixture(scope="module")
def smollm2():
    # strict loading: every GGUF tensor is used (tied embeddings: no output.weight)
    return load_pretrained("embedded:smollm2")


def test_smollm2_gguf_matches_hf_pytorch_golden(smollm2):
    g = np.load(GOLDEN / "smollm2.npz")
    ids = smollm2.tokenizer("The capital of France is")["input_ids"]
    assert ids == g["input_ids"][0].tolist()
    logits, hidden = jax.jit(smollm2.apply_fn, static_argnames="output_hidden_states")(
        smollm2.params, jnp.asarray(g["input_ids"]), None, output_hidden_states=True
    )
    logits = np.asarray(logits[0])
    assert np.abs(hidden[1, 0] - g["layer1"]).max() <= 1e-3 * np.abs(g["layer1"]).max()
    ref = g["logits_last"]
    assert np.abs(logits[-1] - ref).max() <= 1e-3 * np.abs(ref).max()
    assert np.abs(logits[:, :2048] - g["logits_head"]).max() <= 1e-3 * np.abs(ref).max()


def test_smollm2_greedy_says_paris(smollm2):
    g = np.load(GOLDEN / "smollm2.npz")
    tok = smollm2.tokenizer
    texts = generate_text(smollm2.model, tok, ["The capital of France is", "Hello"], 2)
    assert texts[0].startswith(" Paris")
    assert tok.encode(texts[0]) == g["greedy"][:2].tolist()  # HF's own greedy tokens


def test_smollm2_tokenizer_and_chat_template_come_from_gguf(smollm2):
    tok = smollm2.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_start|>") == 1
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi 123"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nHi 123<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(tok("Hi 123 world!")["input_ids"]) == "Hi 123 world!"
    assert len(tok("123")["input_ids"]) == 3  # smollm pre-tokenizer: one digit per token
    assert smollm2.config.tie_word_embeddings and smollm2.config.num_key_value_heads == 3


# ----------------------------------------------------------------------------- tiny model

CFG = LlamaConfig.tiny()


@pytest.fixture(scope="module")
def tiny():
    return LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))


@jax.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def naive_greedy(model, ids, n, width=16):
    """Greedy by full forwards over a right-padded buffer (no cache; one compilation)."""
    ids = list(ids)
    for _ in range(n):
        buf = np.zeros((1, width), np.int32)
        buf[0, : len(ids)] = ids
        logits = _forward(model, buf, (np.arange(width) < len(ids))[None].astype(np.int32))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[-n:]


def test_kv_cache_generation_matches_full_forward_and_left_padding(tiny):
    prompts = [[5, 9, 3, 7, 1], [4, 2]]
    ids, mask = left_pad(prompts, pad_id=0)
    out = generate(tiny, ids, mask, 5)
    for row, p in zip(out, prompts, strict=True):
        assert row.tolist() == naive_greedy(tiny, p, 5)


def test_eos_stops_a_row_and_sampling_is_seeded(tiny):
    first = naive_greedy(tiny, [5, 9, 3], 1)[0]
    out = generate(tiny, [[5, 9, 3]], [[1, 1, 1]], 4, eos_token_id=first, pad_token_id=63)
    assert out[0].tolist() == [first, 63, 63, 63]
    a = generate(tiny, [[5, 9, 3]], [[1, 1, 1]], 6, temperature=1.0, top_p=0.9, seed=3)
    b = generate(tiny, [[5, 9, 3]], [[1, 1, 1]], 6, temperature=1.0, top_p=0.9, seed=3)
    np.testing.assert_array_equal(a, b)


def test_padding_and_packing_masks(tiny):
    full = tiny(jnp.array([[5, 9, 3]]))
    left = tiny(jnp.array([[0, 0, 5, 9, 3]]), jnp.array([[0, 0, 1, 1, 1]]))
    np.testing.assert_allclose(left[:, 2:], full, atol=1e-5)
    other = tiny(jnp.array([[8, 6]]))
    packed = tiny(
        jnp.array([[5, 9, 3, 8, 6, 0]]),
        jnp.array([[1, 1, 1, 1, 1, 0]]),
        segment_ids=jnp.array([[1, 1, 1, 2, 2, 0]]),
        positions=jnp.array([[0, 1, 2, 0, 1, 0]]),
    )
    np.testing.assert_allclose(packed[:, :3], full, atol=1e-5)
    np.testing.assert_allclose(packed[:, 3:5], other, atol=1e-5)


def test_apply_fn_is_hashable_and_functional(tiny):
    graphdef, params = split_params(tiny)
    assert hash(DecoderApply(graphdef)) == hash(DecoderApply(nnx.split(tiny, nnx.Param)[0]))
    assert "model/layers/1/self_attn/q_proj/kernel" in flatten(params)
    assert "model/layers/0/mlp/gate_proj/kernel" in flatten(params)
    ids = jnp.array([[1, 2, 3]])
    np.testing.assert_allclose(DecoderApply(graphdef)(params, ids, None), tiny(ids), atol=1e-6)
    grads = jax.jit(jax.grad(lambda p: functional_apply(graphdef, p, None, ids).sum()))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_scan_remat_and_bf16(tiny):
    _, params = split_params(tiny)
    scanned = LlamaForCausalLM(LlamaConfig.tiny(scan_layers=True, remat=True), rngs=nnx.Rngs(0))
    graphdef, sp = split_params(scanned)
    assert sp["model"]["layers"]["self_attn"]["k_proj"]["kernel"].shape == (2, 32, 16)
    stacked = stack_layers(jax.tree.map(lambda x: x, params), "model/layers")
    ids = jnp.array([[1, 2, 3, 4]])
    np.testing.assert_allclose(functional_apply(graphdef, stacked, None, ids), tiny(ids), atol=1e-5)
    bf = LlamaForCausalLM(
        LlamaConfig.tiny(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0)
    )
    assert bf.model.layers["0"].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_allclose(bf(ids), tiny(ids), atol=0.1)


# ----------------------------------------------------------------------------- GGUF


def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(path, model, cfg, quant_tensor=None):
    tensors = export_tensors(
        split_params(model)[1], expand_table(LLAMA_TABLE, cfg.num_hidden_layers)
    )
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [chr(c) for c in range(97, 123)]
    tokens += ["Ġ", "ab", "Ġa"] + [f"x{i}" for i in range(cfg.vocab_size - len(tokens) - 3)]
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["a b", "Ġ a"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    rev = {v: k for k, v in GGUF_BLOCK_NAMES.items()}
    for name, arr in tensors.items():
        if name in names:
            gname = names[name]
        else:
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
            gname = f"blk.{m[1]}.{rev[m[2]]}.{m[3]}"
        if ".q_proj." in name:
            arr = permute(arr, cfg.num_attention_heads)
        elif ".k_proj." in name:
            arr = permute(arr, cfg.num_key_value_heads)
        w.add_tensor(gname, arr.astype(np.float16 if "layernorm" not in name else np.float32))
    if quant_tensor:
        w.add_tensor(
            quant_tensor, np.zeros((1, 84), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q2_K
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_round_trip_undoes_the_qk_permutation(tmp_path):
    cfg = LlamaConfig.tiny(vocab_size=40)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(1))
    write_tiny_gguf(tmp_path / "t.gguf", model, cfg)
    loaded = load_pretrained(tmp_path / "t.gguf")
    assert loaded.family == "llama" and loaded.source == str(tmp_path / "t.gguf")
    assert loaded.config.num_key_value_heads == 2 and loaded.config.tie_word_embeddings
    a, b = flatten(split_params(model)[1]), flatten(loaded.params)
    for k in a:  # stored as f16: equal up to f16 rounding
        np.testing.assert_allclose(b[k], a[k], atol=1e-3, err_msg=k)
    tok = loaded.tokenizer
    assert tok.convert_ids_to_tokens(tok("ab a")["input_ids"]) == ["ab", "Ġa"]
    assert tok.eos_token == "<|im_end|>" and tok.chat_template.startswith("{% for")


def test_gguf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "missing.gguf")
    cfg = LlamaConfig.tiny(vocab_size=40)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(1))
    write_tiny_gguf(tmp_path / "q.gguf", model, cfg, quant_tensor="blk.0.extra.weight")
    with pytest.raises(ValueError, match="Unsupported GGUF quantization type Q2_K"):
        load_pretrained(tmp_path / "q.gguf")
    assert Path(smollm2_gguf_path()).is_file()


# ----------------------------------------------------------------------------- HF dirs


def test_export_round_trip_hf_names_autoconfig_and_tokenizer(tmp_path, smollm2):
    from transformers import AutoConfig, AutoTokenizer

    cfg = LlamaConfig.tiny(tie_word_embeddings=False, vocab_size=49152)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(2))
    out = export_model(model, tmp_path / "exp", smollm2.tokenizer)
    names = set(load_file(out / "model.safetensors"))
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{m}.weight"
        for i in range(2)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        )
    }
    assert names == expected
    assert load_file(out / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].shape == (
        48,
        32,
    )  # HF [out, in]
    hf_cfg = AutoConfig.from_pretrained(out)
    assert hf_cfg.model_type == "llama" and hf_cfg.num_key_value_heads == 2
    assert hf_cfg.architectures == ["LlamaForCausalLM"]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("Paris 42")["input_ids"] == smollm2.tokenizer("Paris 42")["input_ids"]
    assert tok.chat_template == smollm2.tokenizer.chat_template
    again = load_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, split_params(model)[1], again.params)
    scanned = load_pretrained(out, scan_layers=True)
    ids = jnp.array([[3, 4, 5]])
    np.testing.assert_allclose(scanned.model(ids), model(ids), atol=1e-5)


def test_decoder_config_errors(tmp_path):
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        LlamaConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="RoPE scaling"):
        LlamaConfig.from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}})
    (tmp_path / "config.json").write_text(json.dumps(LlamaConfig.tiny().to_hf()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)
