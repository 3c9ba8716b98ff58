"""The paper's Table 2 at full scale: RoBERTa-large on GLUE with SIFT (and LoRA / full FT).

A ready script for a GPU machine with internet (the hub's ``roberta-large`` and GLUE) or with
a local GLUE directory (``--glue_dir``, standard TSV layout) and a local model directory. It
runs ``python -m train.glue`` once per (method, task) with the paper's recipe (rate 0.008 on
attention q/k/v/o, classifier dense, AdamW wd 0.1, warmup 0.06, batch 32, max length 512,
seed 42; per-task lr and epochs below) and then prints our numbers next to the paper's.

Usage::

    python -m bench.table2 run --output_root runs/table2            # SIFT, all 8 tasks
    python -m bench.table2 run --methods sift lora full --tasks rte mrpc --dry_run
    python -m bench.table2 collect --output_root runs/table2       # the markdown table

Wall time: not measured here (no GPU with internet was available); the GLUE-average SIFT run
is roughly the paper's full-fine-tuning budget minus the optimizer/gradient traffic.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

#: task: (learning rate, epochs, metric key, paper SIFT, paper LoRA, paper full FT).
PAPER = {
    "mnli": (7e-5, 10, "eval_accuracy", 90.6, 90.6, 90.2),
    "sst2": (7e-5, 15, "eval_accuracy", 96.2, 96.2, 96.4),
    "mrpc": (7e-5, 20, "eval_accuracy", 90.4, 90.2, 90.9),
    "cola": (7e-5, 20, "eval_matthews_correlation", 68.5, 68.2, 68.0),
    "qnli": (5e-5, 10, "eval_accuracy", 94.1, 94.8, 94.7),
    "qqp": (7e-5, 20, "eval_accuracy", 91.0, 91.6, 92.2),
    "rte": (7e-5, 20, "eval_accuracy", 85.9, 85.2, 86.6),
    "stsb": (8e-5, 30, "eval_pearson", 92.3, 92.3, 92.4),
}
COMMON = [
    "--per_device_train_batch_size", "32",
    "--max_seq_length", "512",
    "--weight_decay", "0.1",
    "--warmup_ratio", "0.06",
    "--seed", "42",
    "--eval_strategy", "epoch",
    "--bf16",
]  # fmt: skip
#: Per-method flags. SIFT: the paper's recipe. LoRA: rank 8 on query/value (the LoRA paper's
#: RoBERTa-large setting, lr 4e-4). Full FT: lr 1e-5 (the usual RoBERTa-large choice).
METHODS = {
    "sift": ["--finetuning_type", "sift", "--sparse_rate", "0.008"],
    "lora": ["--finetuning_type", "lora", "--lora_rank", "8", "--lora_alpha", "16"],
    "full": ["--finetuning_type", "full"],
}
METHOD_LR = {"lora": 4e-4, "full": 1e-5}


def command(method: str, task: str, args) -> list[str]:
    """The ``train.glue`` command line for one (method, task).

    Example:
        >>> ns = argparse.Namespace(model="roberta-large", glue_dir=None, output_root="r",
        ...                         extra=[], per_device_batch=None)
        >>> " ".join(command("sift", "rte", ns)[3:9])
        '--model_name_or_path roberta-large --task_name rte --learning_rate 7e-05'
    """
    lr, epochs = PAPER[task][:2]
    lr = METHOD_LR.get(method, lr)
    cmd = [sys.executable, "-m", "train.glue", "--model_name_or_path", args.model]
    cmd += ["--task_name", task, "--learning_rate", str(lr), "--num_train_epochs", str(epochs)]
    cmd += COMMON + METHODS[method]
    cmd += ["--output_dir", str(Path(args.output_root) / method / task), "--overwrite_output_dir"]
    if args.glue_dir:
        cmd += ["--glue_dir", args.glue_dir]
    if args.per_device_batch:  # e.g. 8 per device x 4 GPUs = the paper's 32
        i = cmd.index("--per_device_train_batch_size")
        cmd[i + 1] = str(args.per_device_batch)
    return cmd + list(args.extra)


def collect(output_root: str) -> str:
    """The markdown table of finished runs under ``output_root`` next to the paper's numbers."""
    root = Path(output_root)
    methods = [m for m in METHODS if (root / m).is_dir()]
    head = "| task | " + " | ".join(f"ours {m}" for m in methods) + " | paper SIFT | LoRA | full |"
    lines = [head, "|---" * (len(methods) + 4) + "|"]
    sums = {m: [] for m in methods}
    for task, (_, _, key, p_sift, p_lora, p_full) in PAPER.items():
        cells = []
        for m in methods:
            f = root / m / task / "eval_results.json"
            if f.exists():
                v = 100 * json.loads(f.read_text())[key]
                sums[m].append(v)
                cells.append(f"{v:.1f}")
            else:
                cells.append("–")
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {p_sift} | {p_lora} | {p_full} |")
    avg = [f"{sum(v) / len(v):.1f}" if len(v) == len(PAPER) else "–" for v in sums.values()]
    lines.append("| avg | " + " | ".join(avg) + " | 88.6 | 88.6 | 88.9 |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run train.glue for each (method, task)")
    r.add_argument("--methods", nargs="+", default=["sift"], choices=sorted(METHODS))
    r.add_argument("--tasks", nargs="+", default=list(PAPER), choices=list(PAPER))
    r.add_argument("--model", default="roberta-large", help="hub id or local HF directory")
    r.add_argument("--glue_dir", default=None, help="local GLUE directory (else the hub)")
    r.add_argument("--output_root", default="runs/table2")
    r.add_argument("--per_device_batch", type=int, default=None)
    r.add_argument("--dry_run", action="store_true", help="print the commands only")
    r.add_argument("extra", nargs="*", help="more train.glue flags, after --")
    c = sub.add_parser("collect", help="print the results table")
    c.add_argument("--output_root", default="runs/table2")
    args = ap.parse_args(argv)
    if args.cmd == "collect":
        print(collect(args.output_root))
        return 0
    failed = []
    for method in args.methods:
        for task in args.tasks:
            cmd = command(method, task, args)
            print(shlex.join(cmd), flush=True)
            if not args.dry_run and subprocess.call(cmd) != 0:
                failed.append(f"{method}/{task}")
    if not args.dry_run:
        print(collect(args.output_root))
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
