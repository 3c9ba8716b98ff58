"""``python -m train.glue``: SIFT / full / LoRA fine-tuning of BERT/RoBERTa encoders on GLUE.

With no arguments it runs the embedded default, offline: the packaged pretrained MiniLM-L6
BERT fine-tuned on the packaged Rotten-Tomatoes review sentences (task ``mr``) with SIFT at
rate 0.008 on attention query/key/value/output, classifier dense (the paper's GLUE recipe at
small scale). The paper's setting for a real GLUE task::

    python -m train.glue --model_name_or_path roberta-large --task_name rte \\
        --learning_rate 7e-5 --num_train_epochs 20 --per_device_train_batch_size 32 \\
        --max_seq_length 512 --sparse_rate 0.008 --weight_decay 0.1 --warmup_ratio 0.06

Outputs in ``--output_dir``: ``eval_results.json``, ``all_results.json``, ``train_log.jsonl``,
``sift_delta.safetensors`` (SIFT), ``model/`` (the merged model as an HF directory) and
``checkpoints/``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import mesh as mesh_lib
from train.config import TrainConfig, _f, parse_args
from train.data import batching
from train.data import glue as glue_data
from train.models.pretrained import load_pretrained
from train.trainer import Task, save_sift_delta, train

SPARSE_ATTENTION = r"attention/(query|key|value|output)/"


@dataclasses.dataclass
class GlueConfig(TrainConfig):
    """``train.glue`` flags: the shared trainer flags with the paper's GLUE defaults."""

    sparse_module: list[str] = _f(
        [SPARSE_ATTENTION],
        "SIFT: regexes (searched in parameter paths) of tensors that get sparse increments; "
        "default: attention query/key/value/output (weights and biases), as in the paper.",
    )
    lora_targets: list[str] = _f(
        [r"attention/(query|value)/kernel"], "LoRA: regexes of kernels that get adapters."
    )
    num_train_epochs: float = _f(1.0, "Epochs (ignored when --max_steps > 0).")
    learning_rate: float = _f(1e-3, "Peak learning rate (AdamW).")
    max_seq_length: int = _f(48, "Sequences are truncated/padded to this many tokens.")
    per_device_train_batch_size: int = _f(32, "Training examples per device per step.")
    output_dir: str = _f("outputs/glue", "Where results, logs, checkpoints and exports go.")
    max_train_samples: int | None = _f(
        None, "Keep only the first N training examples (default: all)."
    )


def build_task(cfg: GlueConfig, model_dir: Any = None):
    """Loads data + model and returns ``(task, params, model_bundle)``."""
    data = glue_data.load_task(
        cfg.task_name,
        glue_dir=cfg.glue_dir,
        train_file=cfg.train_file,
        validation_file=cfg.validation_file,
        max_train_samples=cfg.max_train_samples,
        max_eval_samples=cfg.max_eval_samples,
    )
    spec = data.spec
    bundle = load_pretrained(
        cfg.model_name_or_path,
        head="classifier",
        num_labels=spec.num_labels,
        dtype="bfloat16" if cfg.bf16 else "float32",
        remat=cfg.gradient_checkpointing,
        id2label={str(i): n for i, n in enumerate(spec.label_names)} or None,
        seed=cfg.seed,
        tokenizer="required",
    )
    print(
        f"Task {spec.name}: {len(data.train)} train / "
        + ", ".join(f"{k} {len(v)}" for k, v in data.eval.items())
        + f" examples (from {data.source}); model {bundle.description}."
    )
    train_enc, eval_encs = batching.encode_task(data, bundle.tokenizer, cfg.max_seq_length)
    train_fn, eval_sets = batching.trainer_fns(train_enc, eval_encs, seed=cfg.seed)
    regression = spec.is_regression

    def loss_fn(logits, batch):
        if regression:
            return jnp.mean((logits[:, 0].astype(jnp.float32) - batch["labels"]) ** 2)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["labels"]
        ).mean()

    def metrics_fn(split, logits, batches):
        labels = np.concatenate([b["labels"] for b in batches])
        return glue_data.compute_metrics(spec, logits, labels, split=split)

    task = Task(
        apply_fn=bundle.apply_fn,
        loss_fn=loss_fn,
        train_size=len(train_enc),
        train_batches=train_fn,
        eval_sets=eval_sets,
        metrics_fn=metrics_fn,
        eval_outputs=lambda logits, batch: logits.astype(jnp.float32),
    )
    return task, bundle


def run(cfg: GlueConfig):
    """Runs ``train.glue`` for a parsed config and returns the :class:`TrainResult`."""
    mesh_lib.maybe_initialize_distributed()
    mesh = mesh_lib.parse_mesh(cfg.mesh)
    div = mesh_lib.batch_divisor(mesh)
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        if getattr(cfg, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1.")
    if jax.process_count() > 1 and (cfg.per_device_train_batch_size * div) % jax.process_count():
        raise ValueError("The global batch is not divisible by the number of processes.")
    task, bundle = build_task(cfg)
    result = train(cfg, task, bundle.params, mesh=mesh, place_params=bundle.place)
    out = Path(cfg.output_dir)
    if jax.process_index() == 0:
        if cfg.finetuning_type == "sift":
            path = save_sift_delta(
                result,
                bundle.params,
                out / "sift_delta.safetensors",
                {
                    "base_model": cfg.model_name_or_path,
                    "task": cfg.task_name,
                    "sparse_rate": cfg.sparse_rate,
                },
            )
            print(f"Saved the SIFT delta to {path}.")
        if cfg.export_model:
            bundle.export(result.params, out / "model")
            print(f"Saved the merged model (HF format) to {out / 'model'}.")
    shown = {k: v for k, v in result.metrics.items() if k.startswith("eval_")}
    print("Final: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    return result


def main(argv=None):
    cfg = parse_args(argv, GlueConfig, description=__doc__)
    run(cfg)


if __name__ == "__main__":
    sys.exit(main())
