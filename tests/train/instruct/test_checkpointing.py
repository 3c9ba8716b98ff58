"""``train.instruct --gradient_checkpointing`` (issue 15): the decoder is loaded with its layers
scanned and rematerialised, SIFT selects and trains per layer inside the scan, and the run
matches the unscanned one (losses, delta with the unscanned paths, export) and resumes."""

import json

import numpy as np
import pytest
from flax import nnx

import sift_jax
from tests.train.core.toy import interrupt_batches
from tests.train.instruct.test_run import CFG, cfg_for, fake_reviews, tok  # noqa: F401
from train.instruct import run
from train.instruct import task as instruct
from train.models.decoder import LlamaForCausalLM
from train.models.pretrained import export_model
from train.models.weights import read_safetensors


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):  # noqa: F811
    """The tiny LLaMA as an HF directory (so the job loads it, scanned or not)."""
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    return str(export_model(model, tmp_path_factory.mktemp("tiny_llama"), tok))


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_gradient_checkpointing_matches_the_unscanned_run_and_resumes(
    tmp_path, tiny_dir, monkeypatch
):
    monkeypatch.setattr(instruct, "review_records", lambda n, seed: fake_reviews())
    seen = {}
    orig_fit = instruct.fit

    def spy(cfg, task, params, **kw):
        seen[cfg.output_dir] = orig_fit(cfg, task, params, **kw)
        return seen[cfg.output_dir]

    monkeypatch.setattr(instruct, "fit", spy)
    kw = dict(model_name_or_path=tiny_dir, save_steps=2)
    plain = run(cfg_for(tmp_path / "plain", **kw))
    ckpt = run(cfg_for(tmp_path / "ckpt", gradient_checkpointing=True, **kw))
    res = seen[str(tmp_path / "ckpt" / "run")]
    assert res.method.layers_paths == ["model/layers"] and res.method.plan.layer_views
    np.testing.assert_allclose(
        _losses(tmp_path / "ckpt" / "run"), _losses(tmp_path / "plain" / "run"), rtol=1e-5
    )
    assert ckpt["after"]["eval_accuracy"] == plain["after"]["eval_accuracy"]
    da, db = (
        sift_jax.load_delta(tmp_path / n / "run" / "sift_delta.safetensors")
        for n in ("plain", "ckpt")
    )
    assert sorted(da) == sorted(db) and "model/layers/1/mlp/down_proj/kernel" in db
    for p in da:
        np.testing.assert_array_equal(da[p].indices, db[p].indices)
        np.testing.assert_allclose(da[p].values, db[p].values, rtol=1e-4, atol=1e-6)

    # killed during step 4 (after the step-2 checkpoint), resumed: the same run
    orig = instruct.build_task

    def killing_task(*a, **k):
        return interrupt_batches(orig(*a, **k), 3)

    monkeypatch.setattr(instruct, "build_task", killing_task)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path / "k", gradient_checkpointing=True, **kw))
    monkeypatch.setattr(instruct, "build_task", orig)
    run(cfg_for(tmp_path / "k", gradient_checkpointing=True, resume_from_checkpoint="latest", **kw))
    np.testing.assert_allclose(
        _losses(tmp_path / "k" / "run"), _losses(tmp_path / "ckpt" / "run"), rtol=1e-5
    )
    ea, eb = (read_safetensors(tmp_path / n / "run" / "model") for n in ("ckpt", "k"))
    for k in ea:
        np.testing.assert_allclose(ea[k], eb[k], rtol=1e-6, atol=1e-7)
