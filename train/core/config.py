"""Trainer configuration: one dataclass, flag names as in HF ``run_glue.py`` plus the SIFT flags.

Every field carries its ``--help`` text; :func:`parse_args` builds the argparse parser from the
dataclass so the two never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """All trainer flags (shared by ``train.glue`` and ``train.instruct``)."""

    # --- model and data
    model_name_or_path: str = _f(
        "embedded:minilm",
        "Local HF model directory, a hub id (needs internet), or an embedded model "
        "('embedded:minilm' = the packaged pretrained MiniLM-L6 BERT).",
    )
    task_name: str = _f(
        "mr",
        "GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) or the embedded "
        "'mr' (packaged Rotten-Tomatoes review sentences).",
    )
    glue_dir: str | None = _f(None, "Local GLUE directory in the standard TSV layout.")
    train_file: str | None = _f(None, "csv/json/jsonl training file (HF run_glue columns).")
    validation_file: str | None = _f(None, "csv/json/jsonl validation file.")
    max_seq_length: int = _f(128, "Sequences are truncated/padded to this many tokens.")
    max_train_samples: int | None = _f(None, "Keep only the first N training examples.")
    max_eval_samples: int | None = _f(None, "Keep only the first N evaluation examples.")
    # --- optimisation
    finetuning_type: str = _f("sift", "sift | full | lora", choices=["sift", "full", "lora"])
    learning_rate: float = _f(7e-5, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.1, "AdamW weight decay (never on biases / LayerNorm).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Clip gradients to this global norm (0 disables).")
    num_train_epochs: float = _f(3.0, "Epochs (ignored when --max_steps > 0).")
    max_steps: int = _f(-1, "Total optimizer steps; overrides --num_train_epochs when > 0.")
    warmup_ratio: float = _f(0.06, "Linear warmup over this fraction of steps, then linear decay.")
    lr_scheduler_type: str = _f("linear", "linear | constant", choices=["linear", "constant"])
    per_device_train_batch_size: int = _f(32, "Training examples per device per step.")
    per_device_eval_batch_size: int = _f(64, "Evaluation examples per device.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches accumulated per optimizer step.")
    seed: int = _f(42, "Seed for data order, initialisation, dropout and random selection.")
    # --- SIFT (names as in the reference implementation)
    sparse_rate: float = _f(0.008, "SIFT: fraction of each targeted tensor that trains.")
    sparse_module: list[str] = _f(
        ["attention"],
        "SIFT: regexes (searched in parameter paths) of tensors that get sparse increments; "
        "default: attention query/key/value/output.",
    )
    sparse_exception: list[str] = _f(
        ["classifier"], "SIFT: regexes of tensors trained densely (e.g. the classifier head)."
    )
    selection: str = _f(
        "grad",
        "SIFT index selection: grad | random | magnitude",
        choices=["grad", "random", "magnitude"],
    )
    selection_steps: int = _f(1, "SIFT: batches whose |gradient| is summed to select indices.")
    update_on_selection: bool = _f(False, "SIFT: also apply the selection batch's gradient.")
    reselect_every: int = _f(
        0,
        "SIFT (compact path): every N steps after the first selection, fold the increments into "
        "the weights and select new indices on that step's batch (fresh increments and AdamW "
        "moments; 0: select once, as the paper).",
    )
    sift_emulate: list[str] = _f(
        [],
        "SIFT (compact path), for studies only: reproduce quirks of the original PyTorch code. "
        "'lagged': each increment update is applied one step late; 'no_selection_update': the "
        "selection batch updates nothing, not even the dense tensors; 'no_sparse_decay': no "
        "weight decay on the selected weights.",
        choices=["lagged", "no_selection_update", "no_sparse_decay"],
    )
    selection_scope: str = _f(
        "global",
        "SIFT (compact path): 'global' takes each targeted tensor's top-k over the whole tensor; "
        "'shard' splits it into the S blocks of its sharding on the --mesh and takes the top "
        "ceil(k/S) of |gradient| within each block, so selection, the gradient gather and the "
        "increment write run on each device's own block with no cross-device traffic (not the "
        "global top-k; see docs/sharding.md). Supports --selection grad and magnitude.",
        choices=["global", "shard"],
    )
    sift_path: str = _f(
        "compact",
        "SIFT training path: 'compact' (trainable = the k-vectors of increments, gradients and "
        "optimizer state O(k)) or 'simple' (optax transform over the dense gradient).",
        choices=["compact", "simple"],
    )
    # --- LoRA
    lora_rank: int = _f(8, "LoRA rank.")
    lora_alpha: float = _f(16.0, "LoRA alpha (scale = alpha / rank).")
    lora_targets: list[str] = _f(
        ["attention/(query|key|value)"], "LoRA: regexes of 2-D+ kernels that get adapters."
    )
    lora_exception: list[str] = _f(["classifier"], "LoRA: regexes of tensors trained densely.")
    # --- run control and outputs
    output_dir: str = _f("outputs/run", "Where results, logs, checkpoints and exports go.")
    overwrite_output_dir: bool = _f(False, "Allow writing into a non-empty --output_dir.")
    eval_strategy: str = _f("epoch", "no | steps | epoch", choices=["no", "steps", "epoch"])
    eval_steps: int = _f(500, "Evaluate every N steps with --eval_strategy steps.")
    logging_steps: int = _f(10, "Write a JSONL log line every N steps.")
    save_steps: int = _f(0, "Checkpoint every N optimizer steps (0: only at the end).")
    save_total_limit: int = _f(2, "Keep at most this many checkpoints.")
    resume_from_checkpoint: str | None = _f(
        None, "'latest' or a checkpoint directory: continue a killed run exactly."
    )
    bf16: bool = _f(False, "bf16 parameters and compute (optimizer state stays fp32).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (remat).")
    mesh: str | None = _f(None, "Device mesh, e.g. 'data=2,fsdp=4' (default: all on data).")
    export_model: bool = _f(True, "Write the merged fine-tuned model as an HF directory.")
    disable_tqdm: bool = _f(False, "No progress bar.")


def _arg_type(tp: Any):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        return _arg_type(args[0])
    if origin is list:
        return ("list", args[0])
    return tp


def build_parser(cls=TrainConfig, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field (help text from the field).

    Example:
        >>> build_parser().parse_args(["--sparse_rate", "0.01"]).sparse_rate
        0.01
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _arg_type(hints[f.name])
        kw: dict[str, Any] = {"help": f.metadata.get("help", "")}
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            parser.add_argument(
                f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, **kw
            )
        elif isinstance(tp, tuple):
            parser.add_argument(f"--{f.name}", nargs="*", type=tp[1], default=default, **kw)
        else:
            parser.add_argument(f"--{f.name}", type=tp, default=default, **kw)
    return parser


def parse_args(argv=None, cls=TrainConfig, description: str | None = None):
    """Parses flags into a ``cls`` instance.

    Example:
        >>> cfg = parse_args(["--finetuning_type", "full", "--sparse_module", "query", "key"])
        >>> cfg.finetuning_type, cfg.sparse_module
        ('full', ['query', 'key'])
    """
    ns = build_parser(cls, description).parse_args(argv)
    return cls(**vars(ns))
