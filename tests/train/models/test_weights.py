"""train.models.weights: strict matching, tied heads, the family tables, and the layering
(the weights layer imports no model class; the model modules import no loader)."""

import subprocess
import sys

import numpy as np
import pytest

from train.models.weights import (
    ENCODER_TABLE,
    LLAMA_TABLE,
    MISTRAL_TABLE,
    QWEN2_TABLE,
    drop_tied,
    expand_table,
    export_tensors,
    match_tensors,
    normalize_encoder_names,
    read_safetensors,
    unflatten,
    write_hf_dir,
)

MAP = expand_table(ENCODER_TABLE, 1)
EXPECTED = {"embeddings/layer_norm/scale": (2,), "classifier/kernel": (2, 3)}


def test_match_is_strict_both_ways():
    ok = {"embeddings.LayerNorm.weight": np.ones(2), "classifier.weight": np.zeros((3, 2))}
    m = match_tensors(EXPECTED, MAP, ok)
    assert m.arrays["classifier/kernel"].shape == (2, 3) and not m.fresh and not m.dropped
    with pytest.raises(ValueError, match=r"1 tensor\(s\) that no parameter .* uses: extra\.w"):
        match_tensors(EXPECTED, MAP, {**ok, "extra.w": np.ones(1)})
    with pytest.raises(KeyError, match=r"classifier/kernel \(HF classifier.weight\)"):
        match_tensors(EXPECTED, MAP, {"embeddings.LayerNorm.weight": np.ones(2)})
    with pytest.raises(ValueError, match=r"classifier/kernel .*\(2, 2\).*\(2, 3\)"):
        match_tensors(EXPECTED, MAP, {**ok, "classifier.weight": np.zeros((2, 2))})


def test_buffers_optional_heads_and_pretraining_heads():
    base = {"embeddings.LayerNorm.weight": np.ones(2)}
    m = match_tensors(
        {"embeddings/layer_norm/scale": (2,)},
        MAP,
        {
            **base,
            "embeddings.position_ids": np.arange(4),  # a known buffer: skipped silently
            "pooler.dense.weight": np.zeros((2, 2)),  # a head this model lacks: dropped
            "cls.predictions.bias": np.zeros(5),  # BERT's MLM head: dropped
        },
        optional=("classifier/", "pooler/"),
        drop=("cls.",),
    )
    assert m.dropped == ["cls.predictions.bias", "pooler.dense.weight"]
    m = match_tensors(EXPECTED, MAP, base, optional=("classifier/",))
    assert m.fresh == ["classifier/kernel"]  # missing head: left to a fresh init
    with pytest.raises(ValueError, match=r"1 tensor\(s\) .*: rotary_emb\.inv_freqs \("):
        match_tensors({}, MAP, {"rotary_emb.inv_freqs": np.ones(1), "rotary_emb.inv_freq": 1})


def test_tied_head_dropped_only_when_equal():
    emb = np.arange(6.0).reshape(3, 2)
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    t = {"model.embed_tokens.weight": emb, "lm_head.weight": emb.copy()}
    assert list(drop_tied(t, tied)) == ["model.embed_tokens.weight"]
    with pytest.raises(ValueError, match="lm_head.weight .* differ"):
        drop_tied({**t, "lm_head.weight": emb + 1}, tied, "ckpt")


def test_decoder_tables_hold_exactly_each_familys_biases():
    def biases(table):
        return sorted({hf.split(".")[-2] for hf, _, _ in table if hf.endswith(".bias")})

    assert biases(LLAMA_TABLE) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert biases(QWEN2_TABLE) == ["k_proj", "q_proj", "v_proj"]
    assert biases(MISTRAL_TABLE) == []


def test_export_is_the_inverse_of_matching():
    t = normalize_encoder_names(
        {"bert.embeddings.LayerNorm.gamma": np.ones(2), "classifier.weight": np.eye(3)[:, :2]}
    )
    m = match_tensors(EXPECTED, MAP, t)
    back = export_tensors(unflatten(m.arrays), MAP)
    assert set(back) == set(t)
    np.testing.assert_array_equal(back["classifier.weight"], t["classifier.weight"])


def test_layers_import_downwards_only():
    code = (
        "import sys\n"
        "import train.models.weights\n"
        "loaded = lambda *m: [x for x in m if x in sys.modules]\n"
        "assert not loaded('train.models.encoder', 'train.models.decoder',"
        " 'train.models.layers'), 'weights imports models'\n"
        "import train.models.encoder, train.models.decoder\n"
        "assert not loaded('train.models.pretrained'), 'models import loader'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_truncated_or_damaged_weight_files_are_named(tmp_path):
    """Issue 16.11: safetensors' own error names no file; the loader's does (single file,
    shard, malformed index)."""
    one = write_hf_dir(tmp_path / "one", {"model_type": "bert"}, {"w": np.zeros((64, 64))})
    f = one / "model.safetensors"
    f.write_bytes(f.read_bytes()[:2048])
    with pytest.raises(ValueError, match=f"{f} is not a readable safetensors file .*2,048 bytes"):
        read_safetensors(one)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "a.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": {"w": "a.safetensors"}}')
    with pytest.raises(ValueError, match=f"{sharded / 'a.safetensors'} is not a readable"):
        read_safetensors(sharded)
    (sharded / "model.safetensors.index.json").write_text('{"weights": {}}')
    with pytest.raises(ValueError, match="model.safetensors.index.json is not a valid"):
        read_safetensors(sharded)
