"""A toy task and config for the fit-loop tests (a 2-layer MLP on random data; paths like a
real encoder's, so SIFT's patterns apply)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.core.config import TrainConfig
from train.core.fit import fit as train
from train.core.task import Task

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


def interrupt_batches(task, after: int):
    """Makes ``task``'s training batches raise ``KeyboardInterrupt`` (a kill, in-process) when
    batch number ``after + 1`` is requested, so the step that needs it never completes."""
    inner = task.train_batches
    seen = {"n": 0}

    def batches(epoch, start, bs):
        for b in inner(epoch, start, bs):
            if seen["n"] == after:
                raise KeyboardInterrupt
            seen["n"] += 1
            yield b

    task.train_batches = batches
    return task


def _run_until(cfg, kill_at):
    """Runs training and raises out of the loop after ``kill_at`` steps, like a SIGKILL."""
    # the step after the checkpoint never completes
    task = interrupt_batches(toy_task(), kill_at + 1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, task, toy_params())
    log = Path(cfg.output_dir) / "train_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r][:kill_at]
