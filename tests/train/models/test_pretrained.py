"""train.models.pretrained / registry: the Pretrained bundle, strict loading, the registered
families, Qwen2 and Mistral against HF PyTorch goldens, and export per family."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from train.models.decoder import DecoderApply, LlamaForCausalLM, MistralConfig, Qwen2Config
from train.models.encoder import ClassifierApply, EncoderConfig, EncoderForSequenceClassification
from train.models.generate import generate
from train.models.pretrained import Pretrained, export_model, load_pretrained
from train.models.registry import families, family_for

GOLDEN = Path(__file__).resolve().parents[2] / "golden"


def copy_ckpt(src: Path, dst: Path, edit=None, config=None) -> Path:
    """A copy of an HF dir with its tensors / config.json edited."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    t = load_file(src / "model.safetensors")
    save_file(edit(t) if edit else t, dst / "model.safetensors")
    return dst


# ----------------------------------------------------------------------------- registry


def test_every_family_is_registered_with_its_architectures():
    assert families() == [
        "bert",
        "camembert",
        "llama",
        "mistral",
        "qwen2",
        "roberta",
        "xlm-roberta",
    ]
    assert family_for("bert").architectures == {
        "base": "BertModel",
        "classifier": "BertForSequenceClassification",
    }
    assert family_for("xlm-roberta").architectures["classifier"] == (
        "XLMRobertaForSequenceClassification"
    )
    for name, arch, cfg in [
        ("llama", "LlamaForCausalLM", "LlamaConfig"),
        ("qwen2", "Qwen2ForCausalLM", "Qwen2Config"),
        ("mistral", "MistralForCausalLM", "MistralConfig"),
    ]:
        f = family_for(name)
        assert (f.architectures["causal_lm"], f.config_cls.__name__) == (arch, cfg)
        assert f.head_of(LlamaForCausalLM) == "causal_lm"
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        family_for("gpt2")


# ----------------------------------------------------------------------------- Qwen2 / Mistral


@pytest.fixture(scope="module", params=["qwen2", "mistral"])
def golden_decoder(request):
    name = request.param
    return name, load_pretrained(GOLDEN / f"tiny_{name}"), np.load(GOLDEN / f"tiny_{name}.npz")


def real_logit_diff(apply_fn, params, g):
    logits = apply_fn(params, jnp.asarray(g["input_ids"]), jnp.asarray(g["attention_mask"]))
    real = g["attention_mask"].astype(bool)  # padded queries are not compared
    return float(np.abs(np.asarray(logits) - g["logits"])[real].max())


def test_tiny_decoder_matches_hf_pytorch_golden(golden_decoder):
    name, b, g = golden_decoder
    assert b.family == name and b.config.model_type == name
    # a left-padded batch (HF given position_ids = cumsum(mask) - 1, as its generate does)
    assert real_logit_diff(b.apply_fn, b.params, g) <= 1e-4 * max(1.0, np.abs(g["logits"]).max())
    # KV-cache greedy (prompt longer than Mistral's window) = HF's greedy
    out = generate(b.model, g["prompt"], np.ones_like(g["prompt"]), len(g["greedy"]))
    assert out[0].tolist() == g["greedy"].tolist()


def test_qwen2_has_qkv_biases_only_and_mistral_its_window(golden_decoder):
    name, b, g = golden_decoder
    attn = b.params["model"]["layers"]["1"]["self_attn"]
    has_bias = {p: "bias" in attn[p] for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if name == "qwen2":
        assert has_bias == {"q_proj": True, "k_proj": True, "v_proj": True, "o_proj": False}
        assert b.config.window is None
        return
    assert not any(has_bias.values()) and b.config.window == 4
    full = LlamaForCausalLM(dataclasses.replace(b.config, sliding_window=None), rngs=nnx.Rngs(0))
    graphdef = nnx.split(full, nnx.Param)[0]
    assert real_logit_diff(DecoderApply(graphdef), b.params, g) > 1e-2  # the window matters
    scanned = load_pretrained(GOLDEN / "tiny_mistral", scan_layers=True)
    assert real_logit_diff(scanned.apply_fn, scanned.params, g) <= 1e-4 * np.abs(g["logits"]).max()


def test_a_qwen2_checkpoint_read_as_llama_is_refused_not_silently_truncated(tmp_path):
    def as_llama(cfg):
        return {**cfg, "model_type": "llama"}

    d = copy_ckpt(GOLDEN / "tiny_qwen2", tmp_path / "q", config=as_llama)
    with pytest.raises(ValueError, match=r"no parameter .* uses: .*self_attn\.k_proj\.bias"):
        load_pretrained(d)


def test_qwen2_sliding_window_is_refused(tmp_path):
    def sliding(cfg):
        return {**cfg, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}

    d = copy_ckpt(GOLDEN / "tiny_qwen2", tmp_path / "q", config=sliding)
    with pytest.raises(ValueError, match="model_type='qwen2' with sliding-window attention"):
        load_pretrained(d)


def test_tied_lm_head_is_accepted_only_when_it_repeats_the_embedding(tmp_path):
    def with_head(delta):
        def edit(t):
            t["lm_head.weight"] = t["model.embed_tokens.weight"] + delta
            return t

        return edit

    same = copy_ckpt(GOLDEN / "tiny_qwen2", tmp_path / "same", with_head(0))
    assert "lm_head" not in load_pretrained(same).params
    differ = copy_ckpt(GOLDEN / "tiny_qwen2", tmp_path / "differ", with_head(1))
    with pytest.raises(ValueError, match="stores lm_head.weight .* differ"):
        load_pretrained(differ)


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_decoder_export_writes_the_familys_architecture_and_config(name, tmp_path):
    from transformers import AutoConfig

    b = load_pretrained(GOLDEN / f"tiny_{name}")
    out = b.export(None, tmp_path / name)
    assert set(load_file(out / "model.safetensors")) == set(
        load_file(GOLDEN / f"tiny_{name}" / "model.safetensors")
    )
    raw = json.loads((out / "config.json").read_text())
    assert "attention_bias" not in raw and "mlp_bias" not in raw
    hf = AutoConfig.from_pretrained(out)
    assert hf.model_type == name and hf.architectures == [f"{name.capitalize()}ForCausalLM"]
    assert hf.sliding_window == (4 if name == "mistral" else None)
    again = load_pretrained(out)
    assert type(again.config) is type(b.config) and again.config.window == b.config.window
    jax.tree.map(np.testing.assert_array_equal, again.params, b.params)


def test_config_classes_refuse_what_their_family_lacks():
    with pytest.raises(ValueError, match="qwen2"):
        Qwen2Config.tiny(attention_bias=True)
    with pytest.raises(ValueError, match="sliding_window"):
        MistralConfig.tiny(sliding_window=0)
    with pytest.raises(ValueError, match="model_type='qwen2'"):
        MistralConfig.from_hf({"model_type": "qwen2"})


# ----------------------------------------------------------------------------- the bundle


def test_bundle_functions_sharding_and_export(tmp_path):
    from transformers import AutoConfig

    b = Pretrained.from_model(
        EncoderForSequenceClassification(EncoderConfig.tiny(num_labels=3), rngs=nnx.Rngs(0))
    )
    assert (b.family, b.head) == ("bert", "classifier")
    assert isinstance(b.apply_fn, ClassifierApply) and hash(b.apply_fn) == hash(b.apply_fn)
    ids = jnp.ones((2, 5), jnp.int32)
    logits = jax.jit(b.apply_fn, static_argnums=3)(
        b.params, {"input_ids": ids, "attention_mask": ids}, None, False
    )
    assert logits.shape == (2, 3)
    mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"), devices=jax.devices()[:4])
    placed = b.place(b.params, mesh)
    q = placed["encoder"]["layers"]["0"]["attention"]["query"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    out = b.export(placed, tmp_path / "bert")
    hf = AutoConfig.from_pretrained(out)
    assert hf.architectures == ["BertForSequenceClassification"] and hf.num_labels == 3
    assert "bert.encoder.layer.1.output.dense.weight" in load_file(out / "model.safetensors")
    assert export_model(b.model, tmp_path / "again") == tmp_path / "again"


def test_loader_arguments_and_messages(tmp_path, capsys):
    roberta = GOLDEN / "tiny_roberta"
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_pretrained(roberta, head="classifier", tokenizer="required")
    with pytest.raises(ValueError, match="no 'causal_lm' head"):
        load_pretrained(roberta, head="causal_lm")
    with pytest.raises(ValueError, match="num_labels / id2label need head='classifier'"):
        load_pretrained(GOLDEN / "tiny_qwen2", num_labels=2)
    # a head for another label count: dropped, freshly initialised, said so
    b = load_pretrained(roberta, head="classifier", num_labels=2, id2label={"0": "n", "1": "p"})
    out = capsys.readouterr().out
    assert "3-label classifier; the task has 2 labels" in out and "classifier/out_proj" in out
    assert b.config.num_labels == 2 and b.config.id2label == {"0": "n", "1": "p"}
    # the bare encoder of a classifier checkpoint: the head is dropped, and the message says so
    load_pretrained(roberta)
    assert "Not loaded (no such part in this roberta base model): classifier.dense" in (
        capsys.readouterr().out
    )


def test_encoder_strictness_pretraining_heads_and_unknown_tensors(tmp_path, capsys):
    def pretraining(t):
        t["lm_head.dense.weight"] = np.zeros((32, 32), np.float32)  # RoBERTa's MLM head
        t["roberta.pooler.dense.weight"] = np.zeros((32, 32), np.float32)  # no pooler here
        return t

    d = copy_ckpt(GOLDEN / "tiny_roberta", tmp_path / "pre", pretraining)
    load_pretrained(d, head="classifier")
    assert "lm_head.dense.weight, pooler.dense.weight" in capsys.readouterr().out

    def unknown(t):
        t["roberta.encoder.layer.0.attention.self.rel_bias"] = np.zeros(4, np.float32)
        return t

    d = copy_ckpt(GOLDEN / "tiny_roberta", tmp_path / "unk", unknown)
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention\.self\.rel_bias"):
        load_pretrained(d, head="classifier")
