"""``--gradient_checkpointing`` (issue 15): the encoder's layers are scanned and rematerialised,
SIFT's view and selection act per layer inside the scan; the run matches the unscanned one
(losses, selection and re-selection, delta, export) and resumes."""

import json

import jax
import numpy as np
import pytest

import sift_jax
from tests.train.core.toy import interrupt_batches
from tests.train.glue.test_run import args, tiny_bert  # noqa: F401  (the module fixture)
from train import glue
from train.core.config import parse_args
from train.glue import task as glue_task
from train.models.pretrained import load_pretrained
from train.models.weights import read_safetensors


def _run(tiny, out, *extra):
    return glue.run(parse_args(args(tiny, out, *extra), glue.GlueConfig))


# 6 steps, a checkpoint at step 3, re-selection every 2 steps (so the scanned stack re-selects
# per layer, keeps the earlier-touched positions and resumes across a re-selection): the
# checkpointed run is also the resume test's reference
FLAGS = ("--max_steps", "6", "--save_steps", "3", "--reselect_every", "2")


@pytest.fixture(scope="module")
def runs(tiny_bert, tmp_path_factory):  # noqa: F811
    """``(directory, unscanned run, scanned + rematerialised run)`` of the same recipe."""
    root = tmp_path_factory.mktemp("glue_ckpt")
    plain = _run(tiny_bert, root / "plain", *FLAGS)
    ckpt = _run(tiny_bert, root / "ckpt", *FLAGS, "--gradient_checkpointing")
    return root, plain, ckpt


def test_gradient_checkpointing_scans_and_matches_the_unscanned_run(tiny_bert, runs):  # noqa: F811
    root, plain, ckpt = runs
    # the checkpointed run really runs the scanned model with per-layer SIFT
    assert ckpt.method.layers_paths == ["encoder/layers"]
    assert ckpt.method.plan.layer_views
    np.testing.assert_allclose(ckpt.losses, plain.losses, rtol=1e-5, atol=1e-5)
    assert ckpt.metrics["eval_accuracy"] == plain.metrics["eval_accuracy"]
    assert ckpt.metrics["trainable_params"] == plain.metrics["trainable_params"]
    # the delta has the unscanned paths and the same indices; merged into the base, each
    # reproduces its own run's exported model; the two exports agree
    da = sift_jax.load_delta(root / "plain" / "sift_delta.safetensors")
    db = sift_jax.load_delta(root / "ckpt" / "sift_delta.safetensors")
    assert sorted(da) == sorted(db)
    # re-selection moved the increments: the delta holds more positions than one selection's
    sparse = sum(d.indices.size for d in da.values() if not d.is_dense)
    dense = sum(d.values.size for d in da.values() if d.is_dense)
    assert sparse > plain.metrics["trainable_params"] - dense
    for p in da:
        if da[p].is_dense:
            assert db[p].is_dense
            continue
        np.testing.assert_array_equal(da[p].indices, db[p].indices)
        np.testing.assert_allclose(da[p].values, db[p].values, rtol=1e-4, atol=1e-6)
    base = load_pretrained(tiny_bert, head="classifier", num_labels=2).params
    for name, delta in (("plain", da), ("ckpt", db)):
        merged = sift_jax.merge_delta(base, delta)
        exported = read_safetensors(root / name / "model")
        q = merged["encoder"]["layers"]["1"]["attention"]["query"]["kernel"]
        hf = exported["bert.encoder.layer.1.attention.self.query.weight"]
        np.testing.assert_array_equal(np.asarray(q).T, hf)
    ea, eb = (read_safetensors(root / n / "model") for n in ("plain", "ckpt"))
    assert sorted(ea) == sorted(eb)
    for k in ea:
        np.testing.assert_allclose(ea[k], eb[k], rtol=1e-4, atol=1e-6)
    cfg = json.loads((root / "ckpt" / "model" / "config.json").read_text())
    assert "scan_layers" not in cfg and "remat" not in cfg


def test_gradient_checkpointing_resumes(tiny_bert, runs, tmp_path, monkeypatch):  # noqa: F811
    ga = (*FLAGS, "--gradient_checkpointing")
    full_dir, _, full = runs
    orig = glue_task.build_task

    def killing_build_task(cfg):
        task, model = orig(cfg)
        # dies during step 5, after the step-3 checkpoint
        return interrupt_batches(task, 4), model

    monkeypatch.setattr(glue_task, "build_task", killing_build_task)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_bert, tmp_path / "k", *ga)
    monkeypatch.setattr(glue_task, "build_task", orig)
    resumed = _run(tiny_bert, tmp_path / "k", *ga, "--resume_from_checkpoint", "latest")
    np.testing.assert_allclose(resumed.losses, full.losses[3:], rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        resumed.params,
        full.params,
    )
    da = sift_jax.load_delta(full_dir / "ckpt" / "sift_delta.safetensors")
    db = sift_jax.load_delta(tmp_path / "k" / "sift_delta.safetensors")
    for p in da:
        np.testing.assert_array_equal(da[p].values, db[p].values)


@pytest.mark.parametrize("flags", [["--sift_budget", "global"], ["--finetuning_type", "lora"]])
def test_gradient_checkpointing_without_a_per_layer_plan_keeps_the_unscanned_model(
    tiny_bert,  # noqa: F811
    tmp_path,
    flags,
):
    res = _run(tiny_bert, tmp_path / "r", "--max_steps", "2", "--gradient_checkpointing", *flags)
    assert "0" in res.params["encoder"]["layers"] and np.all(np.isfinite(res.losses))
