"""Training throughput (examples/s) of full FT, LoRA and SIFT, in one process.

Run: ``python -m bench.train_step [--model minilm|bert-base] [--batch 32] [--seq 48]``

Each method runs the trainer's own jitted step (``train.core.fit.setup``: the step builders, donated
state) on the same fixed batch; the first steps (compilation, and for SIFT the selection step)
are excluded. Ratios are against full fine-tuning measured here. ``minilm`` is the packaged
pretrained MiniLM-L6 (weights do not change speed; ``--random_init`` builds the same shape
without loading them, e.g. on a machine without the package).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bench.memory import MODELS, lora_rank_matching
from train.core.config import TrainConfig
from train.core.fit import setup
from train.core.mesh import parse_mesh, put_batch
from train.core.task import Task
from train.models.encoder import (
    EncoderConfig,
    EncoderForSequenceClassification,
    classifier_apply_fn,
)
from train.models.functional import split_params

SPARSE = r"attention/(query|key|value|output)/"
MINILM = EncoderConfig(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
)


def load(model: str, random_init: bool):
    if model == "minilm" and not random_init:
        from train.models.pretrained import load_pretrained

        b = load_pretrained("embedded:minilm", head="classifier", num_labels=2)
        return b.graphdef, b.params, "packaged pretrained MiniLM-L6"
    cfg = MINILM if model == "minilm" else MODELS[model]["cfg"]
    graphdef, params = split_params(EncoderForSequenceClassification(cfg, rngs=nnx.Rngs(0)))
    return graphdef, params, f"{model}-shaped, random init"


def bench_config(ftype, rate, batch, rank=8) -> TrainConfig:
    """The trainer config of a row (attention q/k/v/o sparse or LoRA'd, classifier dense)."""
    return TrainConfig(
        finetuning_type=ftype,
        sparse_rate=rate,
        sparse_module=[SPARSE],
        sparse_exception=["classifier"],
        lora_targets=[SPARSE],
        lora_exception=["classifier"],
        lora_rank=rank,
        warmup_ratio=0.0,
        max_steps=1000,
        per_device_train_batch_size=batch,
        mesh="data=1",
    )


def run_method(graphdef, params, ftype, batch, steps, rate, rank=8):
    """Median seconds of the trainer's own train step (:func:`train.core.fit.setup`), after
    the method's warm-up (SIFT's selection step) and compilation."""
    n = jax.tree.leaves(batch)[0].shape[0]
    cfg = bench_config(ftype, rate, n, rank=rank)
    apply_fn = classifier_apply_fn(graphdef)

    def loss_fn(logits, b):
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

    task = Task(apply_fn, loss_fn, n, None)
    mesh = parse_mesh("data=1", jax.devices()[:1])
    s = setup(cfg, task, params, mesh, train_size=n)
    dev = put_batch({k: np.asarray(v) for k, v in batch.items()}, mesh)
    state, t = s.state, 0
    while s.method.phase(t) != "train":  # SIFT selects first (not timed)
        state, _ = s.step(state, dev, jax.random.key(t), t)
        t += 1
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        state, m = s.step(state, dev, jax.random.key(i), t + i)
        jax.block_until_ready(m["loss"])
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), s.method.num_trainable


def sift_count(params, rate: float) -> int:
    """SIFT's trainable count (known when the plan is made; nothing runs)."""
    from sift_jax import compact

    plan = compact.Sift.create(params, rate, sparse=SPARSE, dense="classifier")
    return plan.num_trainable


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="minilm", choices=["minilm", "bert-base", "roberta-large"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rate", type=float, default=0.008)
    ap.add_argument("--random_init", action="store_true")
    args = ap.parse_args(argv)
    graphdef, params, desc = load(args.model, args.random_init)
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": jnp.asarray(rng.integers(1000, 20000, (args.batch, args.seq)), jnp.int32),
        "attention_mask": jnp.ones((args.batch, args.seq), jnp.int32),
        "token_type_ids": jnp.zeros((args.batch, args.seq), jnp.int32),
        "labels": jnp.asarray(rng.integers(0, 2, args.batch), jnp.int32),
    }
    print(
        f"device: {jax.devices()[0].device_kind}; model: {desc}; batch {args.batch} x seq "
        f"{args.seq}; SIFT rate {args.rate} on attention q/k/v/o, classifier dense"
    )
    spec = {"sparse": SPARSE, "dense": "classifier"}
    print(f"{'method':30s} {'step ms':>9s} {'examples/s':>11s} {'vs full':>8s}", flush=True)
    t_full = None
    n_sift = sift_count(params, args.rate)
    rank = lora_rank_matching(params, spec, n_sift)
    for name, ftype, kw in [
        ("full FT", "full", {}),
        (f"LoRA (r={rank}, matched params)", "lora", {"rank": rank}),
        ("SIFT compact path", "sift", {}),
    ]:
        t, _ = run_method(graphdef, params, ftype, batch, args.steps, args.rate, **kw)
        t_full = t_full or t
        print(f"{name:30s} {t * 1e3:9.1f} {args.batch / t:11.1f} {t_full / t:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
