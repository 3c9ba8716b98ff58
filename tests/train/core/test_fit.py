"""The fit loop on a toy task: methods, accumulation, resume, sharding, outputs."""

import json

import jax
import numpy as np
import optax
import pytest

import sift_jax
from tests.train.core.toy import H, _run_until, cfg_for, toy_params, toy_task
from train.core.config import ConfigError
from train.core.fit import fit as train
from train.core.mesh import parse_mesh


@pytest.mark.parametrize("ftype", ["sift", "full", "lora"])
def test_each_method_trains_and_writes_outputs(tmp_path, ftype, capsys):
    res = train(cfg_for(tmp_path, finetuning_type=ftype), toy_task(), toy_params())
    assert res.losses[-1] < res.losses[0]
    out = tmp_path / "run"
    assert json.loads((out / "all_results.json").read_text())["finetuning_type"] == ftype
    assert "eval_accuracy" in json.loads((out / "eval_results.json").read_text())
    assert len((out / "train_log.jsonl").read_text().splitlines()) >= 16
    assert "trainable params:" in capsys.readouterr().out


def test_sift_trains_only_selected_entries_and_counts_them(tmp_path, capsys):
    p0 = toy_params()
    res = train(cfg_for(tmp_path), toy_task(), p0)
    q0 = p0["encoder"]["layers"]["0"]["attention"]["query"]["kernel"]
    q1 = res.params["encoder"]["layers"]["0"]["attention"]["query"]["kernel"]
    k = sift_jax.selection.count_for_rate(0.1, q0.size)
    assert 0 < int((q0 != q1).sum()) <= k
    np.testing.assert_array_equal(
        res.params["encoder"]["layers"]["0"]["ffn"]["kernel"],
        p0["encoder"]["layers"]["0"]["ffn"]["kernel"],
    )
    expected = k + sift_jax.selection.count_for_rate(0.1, H) + H * 2 + 2
    assert res.metrics["trainable_params"] == expected
    assert f"trainable params: {expected} ||" in capsys.readouterr().out


def test_gradient_accumulation_matches_big_batch(tmp_path):
    a = train(
        cfg_for(tmp_path / "a", finetuning_type="full", per_device_train_batch_size=16),
        toy_task(),
        toy_params(),
    )
    b = train(
        cfg_for(
            tmp_path / "b",
            finetuning_type="full",
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
        ),
        toy_task(),
        toy_params(),
    )
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-5)


@pytest.mark.parametrize("ftype", ["sift", "full"])
def test_resume_after_kill_reaches_the_same_result(tmp_path, ftype):
    full = train(cfg_for(tmp_path / "full", finetuning_type=ftype), toy_task(), toy_params())
    # "Kill" after 5 of 16 steps: a run whose max_steps stops it there, checkpointing every 5.
    cfg_k = cfg_for(tmp_path / "killed", finetuning_type=ftype, save_steps=5)
    part = _run_until(cfg_k, 5)
    assert part == full.losses[:5]
    # A save that crashed mid-write leaves only orbax's temporary directory: never resumed from.
    ckdir = tmp_path / "killed" / "run" / "checkpoints"
    (ckdir / "9.orbax-checkpoint-tmp-1234").mkdir()
    (ckdir / "9.orbax-checkpoint-tmp-1234" / "partial").write_text("half")
    resumed = train(
        cfg_for(
            tmp_path / "killed",
            finetuning_type=ftype,
            save_steps=5,
            resume_from_checkpoint="latest",
        ),
        toy_task(),
        toy_params(),
    )
    np.testing.assert_allclose(resumed.losses, full.losses[5:], rtol=1e-6)
    assert resumed.metrics["eval_accuracy"] == full.metrics["eval_accuracy"]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        resumed.params,
        full.params,
    )


def test_sharded_run_matches_single_device(tmp_path):
    one = train(
        cfg_for(
            tmp_path / "one", finetuning_type="sift", mesh="data=1", per_device_train_batch_size=8
        ),
        toy_task(),
        toy_params(),
    )
    eight = train(
        cfg_for(
            tmp_path / "eight",
            finetuning_type="sift",
            mesh="data=4,fsdp=2",
            per_device_train_batch_size=1,
        ),
        toy_task(),
        toy_params(),
    )
    np.testing.assert_allclose(one.losses, eight.losses, rtol=1e-5, atol=1e-6)


def test_bad_inputs_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="--sparse_module pattern 'nonexistent' matches no"):
        train(cfg_for(tmp_path / "a", sparse_module=["nonexistent"]), toy_task(), toy_params())
    with pytest.raises(ValueError, match="fewer than one optimizer batch"):
        train(cfg_for(tmp_path / "b", per_device_train_batch_size=128), toy_task(), toy_params())
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        train(cfg_for(tmp_path, output_dir=str(tmp_path / "c")), toy_task(), toy_params())
    assert (tmp_path / "c" / "x").read_text() == "keep me"
    with pytest.raises(ValueError, match="needs 16 devices"):
        parse_mesh("data=16")


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"update_on_selection": True},
        {"selection_steps": 2, "selection": "grad"},
        {"selection": "random"},
        {"selection": "magnitude", "weight_decay": 0.1},
    ],
)
def test_trainer_sift_matches_sparse_increment_in_a_plain_loop(tmp_path, kw):
    """The trainer's SIFT (glue over sift_jax.compact) picks the indices and gives the losses
    that the optax transform gives in a user's own loop with the same optimizer."""
    from train.core.optim import adamw, make_schedule

    cfg = cfg_for(tmp_path / "c", **kw)
    res = train(cfg, toy_task(), toy_params())
    sched = make_schedule(cfg.learning_rate, 16, cfg.warmup_ratio)
    tx = sift_jax.sparse_increment(
        cfg.sparse_rate,
        adamw(cfg, sched),
        sparse=cfg.sparse_module,
        dense=cfg.sparse_exception,
        selection=cfg.selection,
        selection_steps=cfg.selection_steps,
        update_on_selection=cfg.update_on_selection,
        seed=cfg.seed,
    )
    task, params = toy_task(), toy_params()
    state = tx.init(params)
    root = jax.random.key(cfg.seed)

    @jax.jit
    def step(p, s, batch, rng):
        loss, g = jax.value_and_grad(task.loss_of_params)(p, batch, rng)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    losses, t = [], 0
    for epoch in range(2):
        for batch in task.train_batches(epoch, 0, 8):
            params, state, loss = step(params, state, batch, jax.random.fold_in(root, t))
            losses.append(float(loss))
            t += 1
    np.testing.assert_allclose(res.losses, losses, rtol=2e-5, atol=1e-6)
    idx = res.method.plan.global_indices(res.state.buffers)
    for path, i in sift_jax.paths.flatten_paths(sift_jax.selected_indices(state)).items():
        np.testing.assert_array_equal(np.asarray(i), idx[path])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), res.params, params
    )
    # The trainer's optimizer state holds k-vectors only: no leaf as big as a sparse tensor.
    q_size = toy_params()["encoder"]["layers"]["0"]["attention"]["query"]["kernel"].size
    assert max(x.size for x in jax.tree.leaves(res.state.opt_state)) < q_size


def test_resume_inside_a_multi_step_selection_phase(tmp_path):
    full = train(cfg_for(tmp_path / "full", selection_steps=3), toy_task(), toy_params())
    _run_until(cfg_for(tmp_path / "k", selection_steps=3, save_steps=2), 2)
    resumed = train(
        cfg_for(tmp_path / "k", selection_steps=3, save_steps=2, resume_from_checkpoint="latest"),
        toy_task(),
        toy_params(),
    )
    np.testing.assert_allclose(resumed.losses, full.losses[2:], rtol=1e-6)


def _changed(res):
    q0 = toy_params()["encoder"]["layers"]["0"]["attention"]["query"]["kernel"]
    q = res.params["encoder"]["layers"]["0"]["attention"]["query"]["kernel"]
    return set(np.flatnonzero(np.asarray(q) != np.asarray(q0)).tolist())


def test_periodic_reselection_moves_the_increments_and_saves_them_all(tmp_path):
    once = train(cfg_for(tmp_path / "once"), toy_task(), toy_params())
    res = train(cfg_for(tmp_path / "re", reselect_every=3), toy_task(), toy_params())
    assert res.metrics["reselections"] == 5  # steps 3, 6, 9, 12, 15 of 16
    k = once.method.plan.sparse_scopes["encoder/layers/0/attention/query/kernel"].size
    assert len(_changed(once)) <= k
    assert len(_changed(res)) > k  # earlier selections' increments stay folded in
    assert res.losses[-1] < res.losses[0]
    # The delta of a re-selecting run holds every changed position: merging it is exact.
    path = tmp_path / "re" / "run" / "sift_delta.safetensors"
    merged = sift_jax.merge_delta(toy_params(), sift_jax.load_delta(path))
    jax.tree.map(np.testing.assert_array_equal, merged, res.params)


def test_resume_after_a_reselection_is_exact(tmp_path):
    full = train(cfg_for(tmp_path / "full", reselect_every=3), toy_task(), toy_params())
    kw = dict(reselect_every=3, save_steps=5)
    _run_until(cfg_for(tmp_path / "k", **kw), 5)
    resumed = train(
        cfg_for(tmp_path / "k", resume_from_checkpoint="latest", **kw), toy_task(), toy_params()
    )
    np.testing.assert_allclose(resumed.losses, full.losses[5:], rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)


def test_bad_numeric_flags_are_refused_when_the_config_is_made(tmp_path):
    """Issue 16.4/16.5: one validation for every path; NaN and out-of-range values name the
    flag instead of crashing inside JAX (or training 818 entries)."""
    for kw, flag in [
        ({"learning_rate": float("nan")}, "--learning_rate"),
        ({"learning_rate": -1.0}, "--learning_rate"),
        ({"sparse_rate": 0.0}, "--sparse_rate"),
        ({"sparse_rate": 2.0}, "--sparse_rate"),
        ({"sparse_rate": float("nan")}, "--sparse_rate"),
        ({"warmup_ratio": 1.5}, "--warmup_ratio"),
        ({"per_device_train_batch_size": 0}, "--per_device_train_batch_size"),
        ({"selection": "best"}, "--selection"),
        ({"finetuning_type": "adapter"}, "--finetuning_type"),
    ]:
        with pytest.raises(ConfigError, match=flag):
            cfg_for(tmp_path, **kw)
    # A SIFT run whose patterns target nothing sparse is an error, not a classifier-only run.
    with pytest.raises(ValueError, match="sparse"):
        train(cfg_for(tmp_path / "e", sparse_module=[]), toy_task(), toy_params())
