"""The trainer machinery on a toy task: methods, accumulation, resume, sharding, outputs."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sift_jax
from train.config import TrainConfig
from train.mesh import parse_mesh
from train.trainer import Task, train

D, H, N = 8, 16, 64


def toy_params():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "encoder": {
            "layers": {
                "0": {
                    "attention": {
                        "query": {
                            "kernel": jax.random.normal(k[0], (D, H)) * 0.3,
                            "bias": jnp.zeros(H),
                        }
                    },
                    "ffn": {"kernel": jax.random.normal(k[1], (H, H)) * 0.3},
                }
            }
        },
        "classifier": {"kernel": jax.random.normal(k[2], (H, 2)) * 0.1, "bias": jnp.zeros(2)},
    }


def toy_task():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = (x @ rng.normal(size=D) > 0).astype(np.int32)

    def apply_fn(p, batch, rng, train):
        lyr = p["encoder"]["layers"]["0"]
        h = jnp.tanh(
            batch["x"] @ lyr["attention"]["query"]["kernel"] + lyr["attention"]["query"]["bias"]
        )
        h = jnp.tanh(h @ lyr["ffn"]["kernel"])
        return h @ p["classifier"]["kernel"] + p["classifier"]["bias"]

    def loss_fn(logits, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    def train_batches(epoch, start, bs):
        order = np.random.default_rng(epoch).permutation(N)
        for b in range(start, N // bs):
            idx = order[b * bs : (b + 1) * bs]
            yield {"x": x[idx], "labels": y[idx]}

    def eval_batches(bs):
        for s in range(0, N, bs):
            xb, yb = x[s : s + bs], y[s : s + bs]
            pad = bs - len(xb)
            yield {
                "x": np.pad(xb, ((0, pad), (0, 0))),
                "labels": np.pad(yb, (0, pad)),
                "example_mask": np.pad(np.ones(len(xb), np.int32), (0, pad)),
            }

    def metrics_fn(name, preds, batches):
        labels = np.concatenate([b["labels"] for b in batches])
        return {"eval_accuracy": float((preds == labels).mean())}

    return Task(
        apply_fn,
        loss_fn,
        N,
        train_batches,
        {"validation": eval_batches},
        metrics_fn,
        eval_outputs=lambda out, batch: out.argmax(-1),
    )


def cfg_for(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        num_train_epochs=2,
        learning_rate=3e-2,
        warmup_ratio=0.0,
        sparse_rate=0.1,
        sparse_module=["attention"],
        sparse_exception=["classifier"],
        logging_steps=1,
        disable_tqdm=True,
        mesh="data=1",
        lora_targets=["attention/query"],
        weight_decay=0.0,
    )
    base.update(kw)
    return TrainConfig(**base)


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
    k = sift_jax.count_for_rate(0.1, q0.size)
    assert 0 < int((q0 != q1).sum()) <= k
    np.testing.assert_array_equal(
        res.params["encoder"]["layers"]["0"]["ffn"]["kernel"],
        p0["encoder"]["layers"]["0"]["ffn"]["kernel"],
    )
    expected = k + sift_jax.count_for_rate(0.1, H) + H * 2 + 2
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


def _run_until(cfg, kill_at):
    """Runs training and raises out of the loop after ``kill_at`` steps, like a SIGKILL."""
    task = toy_task()
    inner = task.train_batches
    seen = {"n": 0}

    def batches(epoch, start, bs):
        for b in inner(epoch, start, bs):
            if seen["n"] == kill_at + 1:  # the step after the checkpoint never completes
                raise KeyboardInterrupt
            seen["n"] += 1
            yield b

    task.train_batches = batches
    with pytest.raises(KeyboardInterrupt):
        train(cfg, task, toy_params())
    log = Path(cfg.output_dir) / "train_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r][:kill_at]


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
def test_compact_path_matches_simple_path(tmp_path, kw):
    """Issue 5: the compact-gradient path picks the same indices and gives the same losses."""
    simple = train(cfg_for(tmp_path / "s", sift_path="simple", **kw), toy_task(), toy_params())
    compact = train(cfg_for(tmp_path / "c", sift_path="compact", **kw), toy_task(), toy_params())
    np.testing.assert_allclose(compact.losses, simple.losses, rtol=2e-5, atol=1e-6)
    idx_s = simple.method.sparse_indices(None, simple.opt_state)
    idx_c = compact.method.sparse_indices(compact.frozen, compact.opt_state)
    jax.tree.map(np.testing.assert_array_equal, idx_c, idx_s)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        compact.params,
        simple.params,
    )
    # The compact optimizer state holds k-vectors only: no leaf as big as a sparse tensor.
    q_size = toy_params()["encoder"]["layers"]["0"]["attention"]["query"]["kernel"].size
    assert max(x.size for x in jax.tree.leaves(compact.opt_state)) < q_size


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
    from train.trainer import save_sift_delta

    once = train(cfg_for(tmp_path / "once"), toy_task(), toy_params())
    res = train(cfg_for(tmp_path / "re", reselect_every=3), toy_task(), toy_params())
    assert res.metrics["reselections"] == 5  # steps 3, 6, 9, 12, 15 of 16
    k = once.method.sparse_indices(once.frozen, once.opt_state)["encoder"]["layers"]["0"]
    k = k["attention"]["query"]["kernel"].size
    assert len(_changed(once)) <= k
    assert len(_changed(res)) > k  # earlier selections' increments stay folded in
    assert res.losses[-1] < res.losses[0]
    # The delta of a re-selecting run holds every changed position: merging it is exact.
    path = save_sift_delta(res, toy_params(), tmp_path / "d.safetensors")
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


def test_emulating_the_original_codes_quirks(tmp_path):
    ours = train(cfg_for(tmp_path / "o"), toy_task(), toy_params())
    lag = train(cfg_for(tmp_path / "l", sift_emulate=["lagged"]), toy_task(), toy_params())
    # Step 1 sees the same params (no sparse update yet either way); step 2 does not.
    np.testing.assert_allclose(lag.losses[:2], ours.losses[:2], rtol=1e-6)
    assert abs(lag.losses[2] - ours.losses[2]) > 1e-6
    # No update at all from the selection batch: the dense classifier waits too.
    head0 = toy_params()["classifier"]["kernel"]
    one = cfg_for(tmp_path / "n1", max_steps=1)
    assert not np.array_equal(
        train(one, toy_task(), toy_params()).params["classifier"]["kernel"], head0
    )
    frozen_sel = cfg_for(tmp_path / "n2", max_steps=1, sift_emulate=["no_selection_update"])
    np.testing.assert_array_equal(
        train(frozen_sel, toy_task(), toy_params()).params["classifier"]["kernel"], head0
    )


def test_no_sparse_decay_leaves_the_selected_weights_undecayed():
    from train.methods import build_method

    def decay_update(emulate):
        cfg = cfg_for(Path("unused"), weight_decay=0.5, sift_emulate=emulate)
        m = build_method(toy_params(), cfg, optax.constant_schedule(0.1), jax.random.key(0))
        zeros = jax.tree.map(jnp.zeros_like, m.trainable)
        params = jax.tree.map(jnp.ones_like, m.trainable)
        u, _ = m.optimizer.update(zeros, m.optimizer.init(m.trainable), params)
        return u

    ours, orig = decay_update([]), decay_update(["no_sparse_decay"])
    q = ("delta", "encoder", "layers", "0", "attention", "query", "kernel")

    def get(t):
        for key in q:
            t = t[key]
        return t

    assert float(jnp.abs(get(ours)).max()) > 0  # AdamW decays the selected weights
    assert float(jnp.abs(get(orig)).max()) == 0
    np.testing.assert_array_equal(
        ours["dense"]["classifier"]["kernel"], orig["dense"]["classifier"]["kernel"]
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"reselect_every": 2, "sift_path": "simple"},
        {"sift_emulate": ["lagged"], "finetuning_type": "full"},
    ],
)
def test_compact_only_options_are_refused_elsewhere(tmp_path, kw):
    with pytest.raises(ValueError, match="sift_path compact"):
        train(cfg_for(tmp_path, **kw), toy_task(), toy_params())
