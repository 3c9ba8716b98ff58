"""The GLUE job: its flags (:class:`GlueConfig`), data + model -> :class:`~train.core.task.Task`,
and :func:`run`."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.core import logs
from train.core import mesh as mesh_lib
from train.core.config import TrainConfig, flag
from train.core.fit import TrainResult, fit, log_errors, open_output_dir
from train.core.methods.sift import scan_layers_for
from train.core.task import Task
from train.glue import batching
from train.glue import data as glue_data
from train.models.pretrained import Pretrained, load_pretrained

log = logging.getLogger("train")
SPARSE_ATTENTION = r"attention/(query|key|value|output)/"


@dataclasses.dataclass
class GlueDataConfig:
    """Which GLUE (or csv/json) task, from where, how long."""

    task_name: str = flag(
        "mr",
        "GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) or the embedded "
        "'mr' (packaged Rotten-Tomatoes review sentences).",
    )
    glue_dir: str | None = flag(None, "Local GLUE directory in the standard TSV layout.")
    train_file: str | None = flag(None, "csv/json/jsonl training file (HF run_glue columns).")
    validation_file: str | None = flag(None, "csv/json/jsonl validation file.")
    max_seq_length: int = flag(48, "Sequences are truncated/padded to this many tokens.")
    length_buckets: list[int] = flag(
        [],
        "Cut each batch back to the smallest of these lengths that holds its longest example "
        "(one compilation per length; far less padding for short texts). Empty: every batch "
        "is --max_seq_length long.",
    )
    max_train_samples: int | None = flag(
        None, "Keep only the first N training examples (default: all)."
    )
    max_eval_samples: int | None = flag(None, "Keep only the first N evaluation examples.")


@dataclasses.dataclass
class GlueConfig(TrainConfig, GlueDataConfig):
    """``train.glue`` flags: the trainer core's sections, the data section, and the paper's
    GLUE defaults (at small scale) where they differ.

    Example:
        >>> GlueConfig().sparse_module, GlueConfig().learning_rate
        (['attention/(query|key|value|output)/'], 0.001)
    """

    sparse_module: list[str] = flag(
        [SPARSE_ATTENTION],
        "SIFT: regexes (searched in parameter paths) of tensors that get sparse increments; "
        "default: attention query/key/value/output (weights and biases), as in the paper.",
    )
    lora_targets: list[str] = flag(
        [r"attention/(query|value)/kernel"], "LoRA: regexes of kernels that get adapters."
    )
    num_train_epochs: float = flag(1.0, "Epochs (ignored when --max_steps > 0).")
    learning_rate: float = flag(1e-3, "Peak learning rate (AdamW).")
    per_device_train_batch_size: int = flag(32, "Training examples per device per step.")
    output_dir: str = flag("outputs/glue", "Where results, logs, checkpoints and exports go.")

    def __post_init__(self):
        TrainConfig.__post_init__(self)
        if self.max_seq_length < 2:
            raise ValueError(f"--max_seq_length must be >= 2, got {self.max_seq_length}.")


def build_task(cfg: GlueConfig) -> tuple[Task, Pretrained]:
    """Loads data + model and returns ``(task, model)``."""
    data = glue_data.load_task(
        cfg.task_name,
        glue_dir=cfg.glue_dir,
        train_file=cfg.train_file,
        validation_file=cfg.validation_file,
        max_train_samples=cfg.max_train_samples,
        max_eval_samples=cfg.max_eval_samples,
    )
    spec = data.spec
    model = load_pretrained(
        cfg.model_name_or_path,
        head="classifier",
        num_labels=spec.num_labels,
        dtype="bfloat16" if cfg.bf16 else "float32",
        remat=cfg.gradient_checkpointing,
        scan_layers=scan_layers_for(cfg),  # SIFT: view and selection per layer in the scan
        id2label={str(i): n for i, n in enumerate(spec.label_names)} or None,
        seed=cfg.seed,
        tokenizer="required",
    )
    log.info(
        "Task %s: %d train / %s examples (from %s); model %s.",
        spec.name,
        len(data.train),
        ", ".join(f"{k} {len(v)}" for k, v in data.eval.items()),
        data.source,
        model.description,
    )
    train_enc, eval_encs = batching.encode_task(data, model.tokenizer, cfg.max_seq_length)
    buckets = sorted(b for b in cfg.length_buckets if b < cfg.max_seq_length) or None
    train_fn, eval_sets = batching.trainer_fns(train_enc, eval_encs, seed=cfg.seed, buckets=buckets)
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
        apply_fn=model.apply_fn,
        loss_fn=loss_fn,
        train_size=len(train_enc),
        train_batches=train_fn,
        eval_sets=eval_sets,
        metrics_fn=metrics_fn,
        eval_outputs=lambda logits, batch: logits.astype(jnp.float32),
    )
    return task, model


def run(cfg: GlueConfig) -> TrainResult:
    """Runs ``train.glue`` for a parsed config and returns the :class:`TrainResult`.

    The output directory is locked (and checked) before anything is loaded; from then on an
    error's traceback also goes to ``<output_dir>/error.log``.
    """
    mesh_lib.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    logs.setup(primary=jax.process_index() == 0)
    mesh = mesh_lib.parse_mesh(cfg.mesh)
    with open_output_dir(cfg) as out, log_errors(out):
        task, model = build_task(cfg)
        meta = {"base_model": cfg.model_name_or_path, "task": cfg.task_name}
        result = fit(cfg, task, model.params, model=model, mesh=mesh, out=out, metadata=meta)
    shown = {k: v for k, v in result.metrics.items() if k.startswith("eval_")}
    log.info("Final: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    return result


def main(argv: Any = None) -> TrainResult:
    """``python -m train.glue``: parses the flags (``--help``) and runs :func:`run`."""
    from train.core.config import parse_args
    from train.glue import __doc__ as doc

    return run(parse_args(argv, GlueConfig, description=doc))


def cli() -> int:
    """The console entry point (``python -m train.glue``): :func:`main` with one-line errors
    (``--debug`` shows the traceback)."""
    from train.core.cli import run_main

    return run_main(main, prog="train.glue")
