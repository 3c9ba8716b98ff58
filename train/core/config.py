"""Trainer configuration: typed sections composed into each job's config, flags built from them.

Sections (one dataclass each, every field with its ``--help`` text and checked on creation):
:class:`ModelConfig`, :class:`OptimConfig`, :class:`SiftConfig`, :class:`LoraConfig`,
:class:`RunConfig`. :class:`TrainConfig` composes them; a job's config (``GlueConfig``,
``InstructConfig``) composes ``TrainConfig`` with its data section and re-declares only the
defaults that differ. Flags stay flat and named as in HF's ``run_glue.py`` plus the reference
SIFT code (``--learning_rate``, ``--sparse_rate``, ...); code that needs one section takes it
with :func:`section`. :func:`parse_args` builds the argparse parser from the dataclass fields,
so flags, defaults and help never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def flag(default: Any, help: str, **kw) -> Any:
    """A config field with its ``--help`` text (and argparse extras such as ``choices``).

    Example:
        >>> @dataclass
        ... class C:
        ...     x: int = flag(3, "Three.")
        >>> C().x
        3
    """
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


class ConfigError(ValueError):
    """A flag value that cannot work; the message names the flag and the fix."""


def _finite(name: str, value: float, *, low: float | None = None, positive: bool = False):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"--{name} must be a finite number, got {value!r}.")
    if positive and value <= 0:
        raise ConfigError(f"--{name} must be > 0, got {value}.")
    if low is not None and value < low:
        raise ConfigError(f"--{name} must be >= {low}, got {value}.")


def _at_least(name: str, value: int, low: int):
    if value < low:
        raise ConfigError(f"--{name} must be >= {low}, got {value}.")


def _patterns(name: str, patterns: list[str]) -> None:
    """Each pattern of a regex-list flag must compile (a bad one would fail inside ``re``
    with a traceback once the model is loaded)."""
    for pat in patterns:
        try:
            re.compile(pat)
        except re.error as e:
            raise ConfigError(
                f"--{name}: {pat!r} is not a valid regular expression ({e})."
            ) from None


def check_resume_spec(spec: str | None, output_dir: str) -> None:
    """``--resume_from_checkpoint`` must be ``latest``, a step number or a directory
    ``<output_dir>/checkpoints/<step>`` of this run; checked when the config is made, before
    anything is loaded (whether that checkpoint exists is checked when resuming).

    Example:
        >>> check_resume_spec("latest", "out"), check_resume_spec("out/checkpoints/8", "out")
        (None, None)
        >>> try:
        ...     check_resume_spec("foo", "out")
        ... except ConfigError as e:
        ...     print(str(e).split(" (")[0])
        --resume_from_checkpoint foo: not a checkpoint of this run
    """
    if not spec or spec == "latest" or spec.isdigit():
        return
    path = Path(spec).expanduser().absolute()
    ckpts = (Path(output_dir).expanduser().absolute() / "checkpoints").resolve()
    if path.parent.resolve() != ckpts or not path.name.isdigit():
        raise ConfigError(
            f"--resume_from_checkpoint {spec}: not a checkpoint of this run (expected "
            f"'latest', a step number or {ckpts}/<step>). A run continues only in its own "
            "--output_dir: to continue another run, pass that run's --output_dir."
        )


def _strategies() -> list[str]:
    from sift_jax import selection

    return selection.names()


def _methods() -> list[str]:
    from train.core.methods import names

    return names()


@dataclass
class ModelConfig:
    """Which model, which method."""

    def __post_init__(self):
        if self.finetuning_type not in _methods():
            raise ConfigError(
                f"--finetuning_type {self.finetuning_type!r} is not a registered method: "
                f"{_methods()}."
            )

    model_name_or_path: str = flag(
        "embedded:minilm",
        "Local HF model directory, a hub id (needs internet), or an embedded model "
        "('embedded:minilm' = the packaged pretrained MiniLM-L6 BERT).",
    )
    finetuning_type: str = flag(
        "sift", "Fine-tuning method (a registered method): sift | full | lora.", choices=_methods
    )
    bf16: bool = flag(False, "bf16 parameters and compute (optimizer state stays fp32).")
    gradient_checkpointing: bool = flag(False, "Recompute activations in backward (remat).")


@dataclass
class OptimConfig:
    """AdamW, its schedule, batch sizes and the seed."""

    learning_rate: float = flag(7e-5, "Peak learning rate (AdamW).")
    dense_learning_rate: float = flag(
        0.0,
        "Peak learning rate of the tensors trained densely beside SIFT's increments or LoRA's "
        "adapters (--sparse_exception / --lora_exception, e.g. the classifier head), on the "
        "same schedule; 0: --learning_rate.",
    )
    weight_decay: float = flag(0.1, "AdamW weight decay (never on biases / LayerNorm).")
    adam_beta1: float = flag(0.9, "AdamW beta1.")
    adam_beta2: float = flag(0.999, "AdamW beta2.")
    adam_epsilon: float = flag(1e-8, "AdamW epsilon.")
    adam_mu_dtype: str = flag(
        "auto",
        "dtype of AdamW's first moment (optax mu_dtype): auto = each trainable leaf's own (fp32 "
        "for SIFT's increments and LoRA's adapters), bfloat16 halves it; the second moment "
        "keeps the leaf's dtype.",
        choices=["auto", "bfloat16", "float32"],
    )
    max_grad_norm: float = flag(1.0, "Clip gradients to this global norm (0 disables).")
    num_train_epochs: float = flag(3.0, "Epochs (ignored when --max_steps > 0).")
    max_steps: int = flag(-1, "Total optimizer steps; overrides --num_train_epochs when > 0.")
    warmup_ratio: float = flag(
        0.06, "Linear warmup over this fraction of steps, then linear decay."
    )
    lr_scheduler_type: str = flag("linear", "linear | constant", choices=["linear", "constant"])
    per_device_train_batch_size: int = flag(32, "Training examples per device per step.")
    per_device_eval_batch_size: int = flag(64, "Evaluation examples per device.")
    gradient_accumulation_steps: int = flag(1, "Micro-batches accumulated per optimizer step.")
    max_nonfinite_steps: int = flag(
        10,
        "Steps whose loss or gradient is NaN/inf are skipped (no update, counted in the log); "
        "this many in a row stop the run with an error.",
    )
    seed: int = flag(42, "Seed for data order, initialisation, dropout and random selection.")
    dropout_prng: str = flag(
        "hash32",
        "PRNG of the dropout masks: hash32 (a counter-based hash, ~3x cheaper on CPU, where "
        "threefry's masks cost a third of a MiniLM step) or threefry (JAX's default).",
        choices=["hash32", "threefry"],
    )

    def __post_init__(self):
        _finite("learning_rate", self.learning_rate, positive=True)
        _finite("dense_learning_rate", self.dense_learning_rate, low=0.0)
        _finite("weight_decay", self.weight_decay, low=0.0)
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            _finite(name, v)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"--{name} must be in [0, 1), got {v}.")
        _finite("adam_epsilon", self.adam_epsilon, positive=True)
        _finite("max_grad_norm", self.max_grad_norm, low=0.0)
        _finite("num_train_epochs", self.num_train_epochs, positive=self.max_steps <= 0)
        _finite("warmup_ratio", self.warmup_ratio, low=0.0)
        if self.warmup_ratio > 1:
            raise ConfigError(f"--warmup_ratio must be in [0, 1], got {self.warmup_ratio}.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            _at_least(name, getattr(self, name), 1)
        _at_least("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _at_least("max_nonfinite_steps", self.max_nonfinite_steps, 1)


@dataclass
class SiftConfig:
    """SIFT (names as in the reference implementation)."""

    sparse_rate: float = flag(0.008, "SIFT: fraction of each targeted tensor that trains.")
    sparse_module: list[str] = flag(
        ["attention"],
        "SIFT: regexes (searched in parameter paths) of tensors that get sparse increments; "
        "default: attention query/key/value/output.",
    )
    sparse_exception: list[str] = flag(
        ["classifier"], "SIFT: regexes of tensors trained densely (e.g. the classifier head)."
    )
    selection: str = flag(
        "grad",
        "SIFT index selection: a registered strategy (sift_jax.selection): grad | grad-row | "
        "random | magnitude | ...",
        choices=_strategies,
    )
    selection_steps: int = flag(1, "SIFT: batches whose |gradient| is summed to select indices.")
    update_on_selection: bool = flag(False, "SIFT: also apply the selection batch's gradient.")
    reselect_every: int = flag(
        0,
        "SIFT: every N steps after the first selection, fold the increments into the weights "
        "and select new indices on that step's batch (fresh increments and AdamW moments; 0: "
        "select once, as the paper).",
    )
    selection_scope: str = flag(
        "global",
        "SIFT: 'global' takes each targeted tensor's top-k over the whole tensor; 'shard' "
        "splits it into the S blocks of its sharding on the --mesh and takes the top ceil(k/S) "
        "within each block, so selection, the gradient gather and the increment write run on "
        "each device's own block with no cross-device traffic (not the global top-k; see "
        "docs/sharding.md).",
        choices=["global", "shard"],
    )
    sift_budget: str = flag(
        "per_tensor",
        "SIFT: 'per_tensor' (the paper: --sparse_rate of every targeted tensor), 'global' "
        "(the same total number of entries, chosen as the top-k of |gradient| across all "
        "targeted tensors jointly) or 'mass' (the same total shared out in proportion to each "
        "tensor's sum of |gradient|, then the top-k within each); with both, each tensor's "
        "share is fixed at selection.",
        choices=["per_tensor", "global", "mass"],
    )

    def __post_init__(self):
        _finite("sparse_rate", self.sparse_rate)
        if not 0.0 < self.sparse_rate <= 1.0:
            raise ConfigError(f"--sparse_rate must be in (0, 1], got {self.sparse_rate}.")
        if str(getattr(self, "finetuning_type", "sift")).startswith("sift"):
            if not self.sparse_module or not all(p.strip() for p in self.sparse_module):
                raise ConfigError(
                    f"--sparse_module needs at least one non-empty pattern, got "
                    f"{self.sparse_module!r}: with none, only the --sparse_exception tensors "
                    "(e.g. the classifier) would train, and the run would still be called SIFT. "
                    "Leave the flag out for the default (the attention projections) or use "
                    "--finetuning_type full."
                )
        _patterns("sparse_module", self.sparse_module)
        _patterns("sparse_exception", self.sparse_exception)
        if self.selection not in _strategies():
            raise ConfigError(
                f"--selection {self.selection!r} is not a registered strategy: {_strategies()}."
            )
        _at_least("selection_steps", self.selection_steps, 1)
        _at_least("reselect_every", self.reselect_every, 0)


@dataclass
class LoraConfig:
    """LoRA adapters."""

    lora_rank: int = flag(8, "LoRA rank.")
    lora_alpha: float = flag(16.0, "LoRA alpha (scale = alpha / rank).")
    lora_targets: list[str] = flag(
        ["attention/(query|key|value)"], "LoRA: regexes of 2-D+ kernels that get adapters."
    )
    lora_exception: list[str] = flag(["classifier"], "LoRA: regexes of tensors trained densely.")

    def __post_init__(self):
        _at_least("lora_rank", self.lora_rank, 1)
        _finite("lora_alpha", self.lora_alpha, positive=True)
        _patterns("lora_targets", self.lora_targets)
        _patterns("lora_exception", self.lora_exception)


@dataclass
class RunConfig:
    """Outputs, evaluation, checkpoints, devices."""

    output_dir: str = flag("outputs/run", "Where results, logs, checkpoints and exports go.")
    overwrite_output_dir: bool = flag(
        False,
        "Delete the previous run's outputs in --output_dir before starting: results, logs, "
        "checkpoints, sift_delta.safetensors and model/ (refused while another run holds the "
        "directory, and for a directory that does not look like a run's).",
    )
    eval_strategy: str = flag("epoch", "no | steps | epoch", choices=["no", "steps", "epoch"])
    eval_steps: int = flag(500, "Evaluate every N steps with --eval_strategy steps.")
    logging_steps: int = flag(10, "Write a JSONL log line every N steps.")
    save_steps: int = flag(0, "Checkpoint every N optimizer steps (0: only at the end).")
    save_total_limit: int = flag(2, "Keep at most this many checkpoints.")
    resume_from_checkpoint: str | None = flag(
        None,
        "'latest', a step number, or a checkpoint directory of this run "
        "(<output_dir>/checkpoints/<step>): continue a killed run exactly.",
    )
    mesh: str | None = flag(None, "Device mesh, e.g. 'data=2,fsdp=4' (default: all on data).")
    coordinator_address: str | None = flag(
        None,
        "Multi-process runs: host:port of process 0's coordinator (or $JAX_COORDINATOR_ADDRESS; "
        "SLURM and other clusters are detected).",
    )
    num_processes: int | None = flag(
        None, "Multi-process runs: total processes ($JAX_NUM_PROCESSES)."
    )
    process_id: int | None = flag(None, "Multi-process runs: this process's id ($JAX_PROCESS_ID).")
    export_model: bool = flag(True, "Write the merged fine-tuned model as an HF directory.")
    save_delta: bool = flag(True, "SIFT: save the increments as sift_delta.safetensors.")
    disable_tqdm: bool = flag(False, "No progress bar.")

    def __post_init__(self):
        _at_least("eval_steps", self.eval_steps, 1)
        _at_least("logging_steps", self.logging_steps, 1)
        _at_least("save_steps", self.save_steps, 0)
        _at_least("save_total_limit", self.save_total_limit, 1)
        check_resume_spec(self.resume_from_checkpoint, self.output_dir)


@dataclass
class TrainConfig(RunConfig, LoraConfig, SiftConfig, OptimConfig, ModelConfig):
    """All flags the trainer core reads (each job composes it with its data section)."""

    def __post_init__(self):
        for cls in (ModelConfig, OptimConfig, SiftConfig, LoraConfig, RunConfig):
            post = cls.__dict__.get("__post_init__")
            if post is not None:
                post(self)


def section(cfg: Any, cls: type[T]) -> T:
    """The ``cls`` section of a composed config, as its own (checked) dataclass.

    Example:
        >>> section(TrainConfig(learning_rate=0.5), OptimConfig).learning_rate
        0.5
    """
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


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
            choices = f.metadata["choices"]
            kw["choices"] = choices() if callable(choices) else choices
        if tp is bool:
            parser.add_argument(
                f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, **kw
            )
        elif f.metadata.get("repeat"):  # --x a --x "b c": one value per use of the flag
            parser.add_argument(f"--{f.name}", action="append", type=tp[1], default=None, **kw)
        elif isinstance(tp, tuple):
            parser.add_argument(f"--{f.name}", nargs="*", type=tp[1], default=default, **kw)
        else:
            parser.add_argument(f"--{f.name}", type=tp, default=default, **kw)
    return parser


def parse_args(argv=None, cls=TrainConfig, description: str | None = None):
    """Parses flags into a ``cls`` instance (bad values raise :class:`ConfigError`).

    Example:
        >>> cfg = parse_args(["--finetuning_type", "full", "--sparse_module", "query", "key"])
        >>> cfg.finetuning_type, cfg.sparse_module
        ('full', ['query', 'key'])
    """
    ns = build_parser(cls, description).parse_args(argv)
    return cls(**{k: v for k, v in vars(ns).items() if v is not None or not _repeated(cls, k)})


def _repeated(cls, name: str) -> bool:
    return any(f.name == name and f.metadata.get("repeat") for f in dataclasses.fields(cls))
