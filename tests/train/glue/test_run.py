"""``train.glue`` end to end: a tiny random BERT with the real MiniLM tokenizer, fixture data."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import sift_jax
from train import glue
from train.core.config import parse_args
from train.data import assets
from train.models.encoder import EncoderConfig, EncoderForSequenceClassification
from train.models.pretrained import export_model, load_pretrained
from train.models.weights import load_tokenizer, read_safetensors

FIX = Path(__file__).resolve().parents[2] / "fixtures"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer, 32-wide random BERT with MiniLM's real WordPiece tokenizer, as an HF dir."""
    tok = load_tokenizer(assets.minilm_dir())
    cfg = EncoderConfig.tiny(vocab_size=tok.vocab_size, max_position_embeddings=64)
    model = EncoderForSequenceClassification(cfg, rngs=nnx.Rngs(0))
    return str(export_model(model, tmp_path_factory.mktemp("tiny_bert"), tok))


def args(tiny, out, *extra):
    return [
        "--model_name_or_path",
        tiny,
        "--task_name",
        "sst2",
        "--train_file",
        str(FIX / "e2e" / "sst2_train.csv"),
        "--validation_file",
        str(FIX / "e2e" / "sst2_dev.jsonl"),
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "8",
        "--max_seq_length",
        "32",
        "--max_steps",
        "4",
        "--learning_rate",
        "1e-2",
        "--sparse_rate",
        "0.05",
        "--disable_tqdm",
        "--logging_steps",
        "1",
        "--mesh",
        "data=1",
        *extra,
    ]


@pytest.mark.parametrize("ftype", ["sift", "full", "lora"])
def test_each_finetuning_type_runs_and_writes_hf_style_outputs(tiny_bert, tmp_path, ftype):
    out = tmp_path / ftype
    res = glue.run(parse_args(args(tiny_bert, out, "--finetuning_type", ftype), glue.GlueConfig))
    # (Learning itself is asserted on the toy task in test_trainer and on real MiniLM below.)
    assert len(res.losses) == 4 and np.all(np.isfinite(res.losses))
    ev = json.loads((out / "eval_results.json").read_text())
    assert set(ev) >= {"eval_accuracy", "epoch"}
    assert json.loads((out / "all_results.json").read_text())["train_steps"] == 4
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()
    exported = read_safetensors(out / "model")
    assert "classifier.weight" in exported
    if ftype == "sift":
        # The saved delta merged into the base reproduces the fine-tuned model exactly.
        base = load_pretrained(tiny_bert, head="classifier", num_labels=2).params
        merged = sift_jax.merge_delta(base, sift_jax.load_delta(out / "sift_delta.safetensors"))
        jax.tree.map(np.testing.assert_array_equal, merged, jax.device_get(res.params))
        # Only attention q/k/v/o entries and the classifier changed.
        changed = [p for p, (a, b) in _pairs(base, res.params) if not np.array_equal(a, b)]
        assert changed and all(
            ("attention/" in p and "norm" not in p) or p.startswith("classifier") for p in changed
        )


def _pairs(a, b):
    fa, fb = (
        sift_jax.paths.leaves_with_paths(a),
        sift_jax.paths.leaves_with_paths(jax.device_get(b)),
    )
    return [(p, (np.asarray(x), np.asarray(y))) for (p, x), (_, y) in zip(fa, fb, strict=True)]


def test_regression_and_mnli_metrics_from_a_glue_dir(tiny_bert, tmp_path):
    common = ["--glue_dir", str(FIX / "glue"), "--train_file", "", "--validation_file", ""]
    a = args(tiny_bert, tmp_path / "stsb", "--max_steps", "1", "--per_device_train_batch_size", "2")
    a[a.index("sst2")] = "stsb"
    res = glue.run(parse_args(_drop_files(a) + common[:2], glue.GlueConfig))
    assert {"eval_pearson", "eval_spearmanr", "eval_combined_score"} <= set(res.metrics)
    a = args(tiny_bert, tmp_path / "mnli", "--max_steps", "1", "--per_device_train_batch_size", "2")
    a[a.index("sst2")] = "mnli"
    res = glue.run(parse_args(_drop_files(a) + common[:2], glue.GlueConfig))
    assert {"eval_accuracy", "eval_accuracy_mm"} <= set(res.metrics)


def _drop_files(a):
    out = []
    skip = False
    for x in a:
        if skip:
            skip = False
            continue
        if x in ("--train_file", "--validation_file"):
            skip = True
            continue
        out.append(x)
    return out


def test_sharded_run_matches_single_device(tiny_bert, tmp_path):
    one = glue.run(
        parse_args(
            args(
                tiny_bert,
                tmp_path / "one",
                "--per_device_train_batch_size",
                "8",
                "--max_steps",
                "3",
            ),
            glue.GlueConfig,
        )
    )
    eight = glue.run(
        parse_args(
            args(
                tiny_bert,
                tmp_path / "eight",
                "--per_device_train_batch_size",
                "2",
                "--per_device_eval_batch_size",
                "2",
                "--max_steps",
                "3",
                "--mesh",
                "data=2,fsdp=2,tensor=2",
            ),
            glue.GlueConfig,
        )
    )
    np.testing.assert_allclose(one.losses, eight.losses, rtol=2e-4, atol=1e-5)
    assert one.metrics["eval_accuracy"] == eight.metrics["eval_accuracy"]


def test_bad_input_fails_before_training(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="matches no parameter"):
        glue.run(
            parse_args(args(tiny_bert, tmp_path / "a", "--sparse_module", "nope"), glue.GlueConfig)
        )
    a = args(tiny_bert, tmp_path / "b")
    a[a.index("sst2")] = "rtee"
    with pytest.raises(ValueError, match="rtee"):
        glue.run(parse_args(a, glue.GlueConfig))
    a = args(tiny_bert, tmp_path / "c")
    a[a.index(str(FIX / "e2e" / "sst2_train.csv"))] = str(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="missing.csv"):
        glue.run(parse_args(a, glue.GlueConfig))
    with pytest.raises(ValueError, match="needs 16 devices"):
        glue.run(parse_args(args(tiny_bert, tmp_path / "d", "--mesh", "data=16"), glue.GlueConfig))
    with pytest.raises(ValueError, match="embedded"):
        glue.run(parse_args(args("embedded:nothing", tmp_path / "e"), glue.GlueConfig))


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"], glue.GlueConfig)
    text = capsys.readouterr().out
    for flag in [
        "--model_name_or_path",
        "--task_name",
        "--sparse_rate",
        "--sparse_module",
        "--sparse_exception",
        "--finetuning_type",
        "--selection",
        "--mesh",
        "--resume_from_checkpoint",
        "--gradient_checkpointing",
        "--bf16",
        "--lora_rank",
    ]:
        assert flag in text


@pytest.mark.slow
def test_real_minilm_short_sift_run(tmp_path):
    """The packaged pretrained MiniLM on the packaged review sentences: a few real steps."""
    cfg = parse_args(
        [
            "--output_dir",
            str(tmp_path / "real"),
            "--max_steps",
            "6",
            "--max_train_samples",
            "192",
            "--max_eval_samples",
            "128",
            "--per_device_train_batch_size",
            "32",
            "--disable_tqdm",
            "--mesh",
            "data=1",
            "--no-export_model",
        ],
        glue.GlueConfig,
    )
    res = glue.run(cfg)
    assert res.metrics["trainable_params"] == 29186  # 6 layers x 4 x (1180 + 4) + classifier
    assert np.all(np.isfinite(res.losses)) and 0.0 <= res.metrics["eval_accuracy"] <= 1.0
    base = load_pretrained("embedded:minilm", head="classifier", num_labels=2, seed=42).params
    delta = sift_jax.load_delta(tmp_path / "real" / "sift_delta.safetensors")
    assert sift_jax.delta_num_params(delta) == 29186
    merged = sift_jax.merge_delta(base, delta)
    jax.tree.map(np.testing.assert_array_equal, merged, jax.device_get(res.params))
