"""BERT/RoBERTa encoder: real MiniLM weights, HF goldens, scan/remat/dropout, errors, export."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from train.data.assets import minilm_dir
from train.models.encoder import (
    EncoderConfig,
    EncoderForSequenceClassification,
    mean_pool,
)
from train.models.functional import functional_apply, split_params
from train.models.pretrained import export_model, load_pretrained
from train.models.sharding import logical_axes, param_shardings
from train.models.weights import flatten, stack_layers

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
TINY_ROBERTA = GOLDEN / "tiny_roberta"


@pytest.fixture(scope="module")
def minilm():
    # strict loading: the packaged MiniLM's only extra tensor is the embeddings.position_ids buffer
    return load_pretrained("embedded:minilm")


def flat(tree):
    return flatten(tree)


def test_minilm_loads_offline_with_exact_parameter_count(minilm):
    assert minilm.family == "bert" and minilm.head == "base"
    assert minilm.num_params == 22_713_216
    assert "encoder/layers/5/attention/query/kernel" in flat(minilm.params)


def test_minilm_matches_hf_pytorch_golden(minilm):
    g = np.load(GOLDEN / "minilm.npz")
    out = jax.jit(lambda m, *a: m(*a))(
        minilm.model, g["input_ids"], g["attention_mask"], g["token_type_ids"]
    )
    assert np.abs(out.last_hidden_state - g["last_hidden_state"]).max() <= 1e-4
    assert np.abs(out.pooler_output - g["pooler_output"]).max() <= 1e-4


def test_minilm_sentence_embeddings_rank_paraphrase_above_unrelated(minilm):
    s = [
        "A man is playing a guitar.",
        "Someone is playing an instrument.",
        "The stock market fell sharply today.",
    ]
    b = minilm.tokenizer(s, padding=True, return_tensors="np")
    h = minilm.model.hidden_states(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]))
    e = np.asarray(mean_pool(h, jnp.asarray(b["attention_mask"])))
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, rtol=1e-5)
    assert e[0] @ e[1] > 0.5 > e[0] @ e[2] + 0.3 and e[0] @ e[1] > e[1] @ e[2]


def test_tiny_roberta_classifier_matches_hf_pytorch_golden():
    g = np.load(GOLDEN / "tiny_roberta.npz")
    loaded = load_pretrained(TINY_ROBERTA, head="classifier")
    model = loaded.model
    assert isinstance(model, EncoderForSequenceClassification) and model.pooler is None
    logits = model(g["input_ids"], g["attention_mask"])
    hidden = model.hidden_states(g["input_ids"], g["attention_mask"])
    assert np.abs(logits - g["logits"]).max() <= 1e-4
    assert np.abs(hidden - g["last_hidden_state"]).max() <= 1e-4


def test_base_checkpoint_gets_fresh_regression_head(minilm, capsys):
    loaded = load_pretrained(minilm_dir(), head="classifier", num_labels=1)
    assert "classifier/kernel" in capsys.readouterr().out
    ids = jnp.array([[101, 2054, 102]])
    assert loaded.model(ids).shape == (1, 1)
    # the encoder is the pretrained one
    np.testing.assert_array_equal(
        loaded.model.encoder.layers["0"].attention.query.kernel[...],
        minilm.model.encoder.layers["0"].attention.query.kernel[...],
    )


# ----------------------------------------------------------------------------- tiny configs


def tiny(model_type="bert", **kw):
    cfg = EncoderConfig.tiny(model_type, **kw)
    return EncoderForSequenceClassification(cfg, rngs=nnx.Rngs(0))


IDS = jnp.array([[2, 5, 7, 9, 0, 0], [3, 4, 5, 6, 7, 8]])
MASK = (IDS != 0).astype(jnp.int32)


def test_split_merge_round_trip_and_functional_apply_under_jit_and_grad():
    model = tiny()
    graphdef, params = split_params(model)
    assert all(isinstance(k, str) for k in params["encoder"]["layers"])
    again = nnx.merge(graphdef, params)
    np.testing.assert_array_equal(again(IDS, MASK), model(IDS, MASK))

    @jax.jit
    def loss(p, key):
        logits = functional_apply(
            graphdef, p, None, IDS, MASK, deterministic=False, rngs=nnx.Rngs(dropout=key)
        )
        return jnp.mean(logits**2)

    grads = jax.grad(loss)(params, jax.random.key(0))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert float(jnp.abs(grads["encoder"]["layers"]["1"]["attention"]["query"]["kernel"]).sum()) > 0


def test_dropout_is_active_only_when_not_deterministic():
    model = tiny(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    a = model(IDS, MASK, deterministic=False, rngs=nnx.Rngs(dropout=1))
    b = model(IDS, MASK, deterministic=False, rngs=nnx.Rngs(dropout=1))
    c = model(IDS, MASK, deterministic=False, rngs=nnx.Rngs(dropout=2))
    d = model(IDS, MASK)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, d)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_scan_and_remat_give_the_same_outputs_and_grads(model_type):
    base = tiny(model_type)
    _, params = split_params(base)
    cfg = EncoderConfig.tiny(model_type, scan_layers=True, remat=True)
    scanned = EncoderForSequenceClassification(cfg, rngs=nnx.Rngs(0))
    sgraph, sparams = split_params(scanned)
    assert sparams["encoder"]["layers"]["attention"]["query"]["kernel"].shape == (2, 32, 32)
    stacked = stack_layers(jax.tree.map(lambda x: x, params), "encoder/layers")
    np.testing.assert_allclose(
        functional_apply(sgraph, stacked, None, IDS, MASK), base(IDS, MASK), atol=1e-5
    )
    g1 = jax.grad(lambda p: functional_apply(sgraph, p, None, IDS, MASK).sum())(stacked)
    g0 = jax.grad(lambda m: m(IDS, MASK).sum())(base)
    np.testing.assert_allclose(
        g1["encoder"]["layers"]["ffn_output"]["kernel"][1],
        g0.encoder.layers["1"].ffn_output.kernel[...],
        atol=1e-5,
    )
    # logical axes get the stacked "layers" dim
    axes = logical_axes(nnx.state(scanned, nnx.Param))
    assert nnx.to_pure_dict(axes)["encoder"]["layers"]["attention"]["query"]["kernel"] == (
        "layers",
        "embed",
        "heads",
    )


def test_bf16_params_and_compute():
    model = tiny(dtype="bfloat16", param_dtype="bfloat16")
    _, params = split_params(model)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert model.hidden_states(IDS, MASK).dtype == jnp.bfloat16
    assert model(IDS, MASK).dtype == jnp.float32


def test_every_param_has_logical_axes_and_shardings_follow_the_mesh():
    model = tiny("roberta")
    state = nnx.state(model, nnx.Param)
    for path, axes in flat(nnx.to_pure_dict(logical_axes(state))).items():
        arr = flat(nnx.to_pure_dict(state))[path]
        assert len(axes) == arr.ndim, path
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    sh = flat(nnx.to_pure_dict(param_shardings(state, mesh)))
    assert sh["encoder/layers/0/attention/query/kernel"].spec == P("fsdp", "tensor")
    assert sh["embeddings/word_embeddings/embedding"].spec == P("tensor", "fsdp")
    assert sh["classifier/out_proj/kernel"].spec == P("fsdp", None)  # labels: replicated
    mesh3 = jax.make_mesh((1, 3), ("fsdp", "tensor"), devices=jax.devices()[:3])
    sh3 = flat(nnx.to_pure_dict(param_shardings(state, mesh3)))
    assert sh3["encoder/layers/0/intermediate/kernel"].spec == P("fsdp", None)  # 64 % 3 != 0
    assert sh3["encoder/layers/0/attention/query/kernel"].spec == P("fsdp", None)  # 32 % 3
    only_data = jax.make_mesh((8,), ("data",))
    assert all(
        all(a is None for a in s.spec)
        for s in flat(nnx.to_pure_dict(param_shardings(state, only_data))).values()
    )


# ----------------------------------------------------------------------------- errors


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    shutil.copy(TINY_ROBERTA / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_offline_hub_id_names_the_local_directory_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="local directory"):
        load_pretrained("sentence-transformers/all-MiniLM-L6-v2")


def test_unknown_architecture(tmp_path):
    cfg = json.loads((TINY_ROBERTA / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(TINY_ROBERTA / "model.safetensors", tmp_path)
    with pytest.raises(ValueError, match="model_type='gpt_neox'"):
        load_pretrained(tmp_path)


def test_shape_mismatch_names_parameter_and_both_shapes(tmp_path):
    shutil.copy(TINY_ROBERTA / "config.json", tmp_path)
    t = load_file(TINY_ROBERTA / "model.safetensors")
    t["roberta.encoder.layer.1.attention.self.key.weight"] = np.zeros((32, 16), np.float32)
    save_file(t, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"encoder/layers/1/attention/key/kernel.*\(16, 32\).*"
        r"\(32, 32\)",
    ):
        load_pretrained(tmp_path, head="classifier")


def test_missing_body_tensor_is_an_error_not_a_fresh_init(tmp_path):
    shutil.copy(TINY_ROBERTA / "config.json", tmp_path)
    t = load_file(TINY_ROBERTA / "model.safetensors")
    del t["roberta.encoder.layer.0.output.dense.weight"]
    save_file(t, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="ffn_output/kernel"):
        load_pretrained(tmp_path, head="classifier")


# ----------------------------------------------------------------------------- export


def test_export_round_trip_uses_hf_names_and_autoconfig_loads(tmp_path):
    from transformers import AutoConfig

    loaded = load_pretrained(TINY_ROBERTA, head="classifier")
    out = loaded.export(None, tmp_path / "export")
    assert set(load_file(out / "model.safetensors")) == set(
        load_file(TINY_ROBERTA / "model.safetensors")
    )  # names HF itself wrote
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == "roberta" and cfg.num_labels == 3
    assert cfg.architectures == ["RobertaForSequenceClassification"]
    again = load_pretrained(out, head="classifier")
    jax.tree.map(np.testing.assert_array_equal, loaded.params, again.params)
    assert not list(out.glob(".tmp*"))


def test_export_of_minilm_keeps_bert_names_and_tokenizer(minilm, tmp_path):
    from transformers import AutoTokenizer

    out = export_model(minilm.model, tmp_path, minilm.tokenizer)
    orig = set(load_file(minilm_dir() / "model.safetensors")) - {"embeddings.position_ids"}
    assert set(load_file(out / "model.safetensors")) == orig
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hello world")["input_ids"] == minilm.tokenizer("hello world")["input_ids"]
