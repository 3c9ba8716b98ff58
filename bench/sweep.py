"""Fine-tuning sweeps for the reproduction study (issue 7, parts 1, 3 and 4).

Every run is a real ``train.glue`` run (in this process) on the embedded default task: the
packaged pretrained MiniLM-L6 fine-tuned on ``mr`` (Rotten-Tomatoes review sentences) under a
short, fixed protocol (:data:`PROTOCOL`: the first 3,000 training sentences, one epoch,
batch 16, ``max_seq_length`` 48), scored by accuracy on the whole ``mr`` dev split (1,056
sentences). Each finished run appends one JSON line to ``docs/study/runs.jsonl``; a sweep skips
runs already recorded there, so an interrupted sweep resumes where it stopped.

Sweeps:

* ``budget``: dev accuracy vs trainable parameters for SIFT (gradient / random / magnitude
  selection), LoRA at matched counts, full fine-tuning and classifier-only.
* ``selection``: SIFT selecting on 1, 4 or 16 batches, and periodic re-selection.
* ``original``: our SIFT vs the original PyTorch code's semantics, one quirk at a time.

Usage::

    python -m bench.sweep run budget selection original --seeds 0 1 2
    python -m bench.sweep report       # tables (markdown) + docs/budget_curve.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from sift_jax.selection import count_for_rate

RESULTS = Path("docs/study/runs.jsonl")
PLOT = Path("docs/budget_curve.png")
COMPILE_CACHE = Path.home() / ".cache" / "sift_jax" / "sweep_xla_cache"

#: The fixed training protocol of every sweep run (``train.glue`` flags).
PROTOCOL = dict(
    task_name="mr",
    max_train_samples=3000,
    max_seq_length=48,
    num_train_epochs=1.0,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=128,
    warmup_ratio=0.06,
    weight_decay=0.1,
    logging_steps=1000,
    export_model=False,
    disable_tqdm=True,
    save_total_limit=1,
)
#: Learning rates per method (fixed across budgets, as the paper does).
LR = {"sift": 1e-3, "lora": 1e-3, "classifier": 1e-3, "full": 5e-5}
#: Trainable-parameter budgets (excluding the 770-parameter classifier head that every method
#: trains densely). 28,416 is SIFT's default rate 0.008 on attention q/k/v/o.
BUDGETS = (1_000, 9_216, 28_416, 101_376, 995_328)
SIFT_TARGETS = r"attention/(query|key|value|output)/"
HIDDEN, LAYERS = 384, 6
#: The q/k/v/o kernels and biases of the 6 layers: the tensors SIFT targets.
TARGET_SIZES = [HIDDEN * HIDDEN] * (4 * LAYERS) + [HIDDEN] * (4 * LAYERS)


def sift_count(rate: float) -> int:
    """Increments SIFT trains at ``rate`` on the attention q/k/v/o weights and biases.

    Example:
        >>> sift_count(0.008)
        28416
    """
    return sum(count_for_rate(rate, n) for n in TARGET_SIZES)


def rate_for(budget: int) -> float:
    """The SIFT rate whose increment count is closest to ``budget`` (bisection).

    Example:
        >>> abs(sift_count(rate_for(100_000)) - 100_000) < 100
        True
    """
    lo, hi = 1e-9, 1.0
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if sift_count(mid) < budget:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda r: abs(sift_count(r) - budget))


def lora_overrides(budget: int) -> dict:
    """LoRA on attention query/value kernels (9,216 params per rank) at about ``budget``.

    Below one rank-1 pair it adapts the last layer's query only (768 params per rank).
    """
    if budget < 9_216:
        return dict(lora_rank=1, lora_targets=[r"layers/5/attention/query/kernel"])
    return dict(
        lora_rank=max(1, round(budget / 9_216)), lora_targets=[r"attention/(query|value)/kernel"]
    )


@dataclasses.dataclass(frozen=True)
class Run:
    """One fine-tuning run of a sweep: ``label`` names the configuration (without the seed)."""

    sweep: str
    label: str
    method: str
    budget: int
    overrides: tuple

    def flags(self, seed: int) -> dict:
        base = dict(PROTOCOL, learning_rate=LR[self.method], seed=seed)
        return {**base, **dict(self.overrides)}


def _sift(sweep: str, label: str, budget: int, **kw) -> Run:
    over = dict(
        finetuning_type="sift",
        sparse_rate=0.008 if budget == 28_416 else rate_for(budget),
        sparse_module=[SIFT_TARGETS],
        sparse_exception=["classifier"],
    )
    over.update(kw)
    return Run(sweep, label, "sift", budget, tuple(sorted(over.items())))


def budget_runs() -> list[Run]:
    """Part 1: every method at every budget."""
    runs = []
    for b in BUDGETS:
        for sel in ("grad", "random", "magnitude"):
            runs.append(_sift("budget", f"sift-{sel}@{b}", b, selection=sel))
        lo = dict(finetuning_type="lora", lora_exception=["classifier"], **lora_overrides(b))
        runs.append(Run("budget", f"lora@{b}", "lora", b, tuple(sorted(lo.items()))))
    runs.append(Run("budget", "full", "full", 22_713_216, (("finetuning_type", "full"),)))
    # Classifier only: the head's bias as a "sparse" tensor at k = n (i.e. dense) + its kernel.
    head = dict(
        finetuning_type="sift",
        sparse_rate=1.0,
        sparse_module=["classifier/bias"],
        sparse_exception=["classifier/kernel"],
    )
    runs.append(Run("budget", "classifier-only", "classifier", 0, tuple(sorted(head.items()))))
    return runs


def selection_runs() -> list[Run]:
    """Part 3: selecting on more batches, and periodic re-selection (at SIFT's default rate)."""
    b = 28_416
    return [
        _sift("selection", f"sift-grad@{b} selection_steps=4", b, selection_steps=4),
        _sift("selection", f"sift-grad@{b} selection_steps=16", b, selection_steps=16),
        _sift("selection", f"sift-grad@{b} reselect_every=47", b, reselect_every=47),
    ]


def original_runs() -> list[Run]:
    """Part 4: the original code's quirks, one at a time and all together (default rate)."""
    b = 28_416
    quirks = {
        "lagged updates (bug 1)": dict(sift_emulate=["lagged"]),
        "no update on the selection batch (bug 2)": dict(sift_emulate=["no_selection_update"]),
        "no weight decay on increments (bug 3)": dict(sift_emulate=["no_sparse_decay"]),
    }
    runs = [_sift("original", f"original: {k}", b, **v) for k, v in quirks.items()]
    # Bug 4: the tensor reached last in backward (layer 0's query kernel: q, k and v all read
    # the layer input and autograd runs the earliest-created, query, last) never trained.
    skip_first_query = [r"^(?!encoder/layers/0/attention/query/kernel).*" + SIFT_TARGETS]
    runs.append(
        _sift(
            "original", "original: first query untrained (bug 4)", b, sparse_module=skip_first_query
        )
    )
    everything = [q for v in quirks.values() for q in v["sift_emulate"]]
    runs.append(
        _sift(
            "original",
            "original: all four",
            b,
            sift_emulate=everything,
            sparse_module=skip_first_query,
        )
    )
    return runs


def lr_runs() -> list[Run]:
    """Is the fixed learning rate fair? SIFT and LoRA at ~28k parameters, other rates."""
    b = 28_416
    runs = [
        _sift("lr", f"sift-grad@{b} lr={lr:g}", b, learning_rate=lr) for lr in (3e-4, 3e-3, 1e-2)
    ]
    for lr in (3e-4, 3e-3):
        lo = dict(finetuning_type="lora", lora_exception=["classifier"], **lora_overrides(b))
        lo["learning_rate"] = lr
        runs.append(Run("lr", f"lora@{b} lr={lr:g}", "lora", b, tuple(sorted(lo.items()))))
    return runs


SWEEPS = {
    "budget": budget_runs,
    "selection": selection_runs,
    "original": original_runs,
    "lr": lr_runs,
}


def _done() -> set[tuple[str, int]]:
    if not RESULTS.exists():
        return set()
    recs = [json.loads(ln) for ln in RESULTS.read_text().splitlines() if ln.strip()]
    return {(r["label"], r["seed"]) for r in recs}


def glue_config(run: Run, seed: int, **kw):
    """The ``train.glue`` config of a run (the study's quirk emulations through
    :mod:`bench.emulate`, a study-only method)."""
    from train.glue import GlueConfig

    flags = {**run.flags(seed), **kw}
    if flags.get("sift_emulate"):
        from bench.emulate import EmulateGlueConfig

        return EmulateGlueConfig(**{**flags, "finetuning_type": "sift_emulated"})
    return GlueConfig(**flags)


def train_once(flags: dict, config=None) -> tuple[dict, float]:
    """One ``train.glue`` run (in this process, outputs in a temporary directory removed
    afterwards): ``(metrics, wall seconds)``."""
    from train.glue import GlueConfig
    from train.glue import run as glue_run

    tmp = tempfile.mkdtemp(prefix="sift_sweep_")
    try:
        cfg = config or GlueConfig(**flags, output_dir=tmp, overwrite_output_dir=True)
        if config is not None:
            cfg = dataclasses.replace(config, output_dir=tmp, overwrite_output_dir=True)
        t0 = time.perf_counter()
        res = glue_run(cfg)
        return res.metrics, time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        jax.clear_caches()


def run_one(run: Run, seed: int) -> dict:
    """Trains one configuration with ``train.glue`` and returns its record."""
    m, wall = train_once({}, glue_config(run, seed))
    head = 770
    return {
        "sweep": run.sweep,
        "label": run.label,
        "method": run.method,
        "budget": run.budget,
        "seed": seed,
        "eval_accuracy": float(m["eval_accuracy"]),
        "trainable_params": int(m["trainable_params"]),
        "budget_params": int(m["trainable_params"]) - head,
        "train_loss": float(m["train_loss"]),
        "wall_s": round(wall, 1),
        "flags": {k: v for k, v in run.flags(seed).items()},
    }


def run_sweeps(names: list[str], seeds: list[int], only: str | None = None) -> None:
    """Runs the named sweeps seed by seed (all configurations of seed 0 first), resumably."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    # Seeds of one configuration compile the same programs: keep them across runs.
    jax.config.update("jax_compilation_cache_dir", str(COMPILE_CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    runs = [r for n in names for r in SWEEPS[n]()]
    if only:
        runs = [r for r in runs if only in r.label]
    for seed in seeds:
        for r in runs:
            if (r.label, seed) in _done():
                continue
            print(f"=== {r.label} seed {seed}", flush=True)
            rec = run_one(r, seed)
            with open(RESULTS, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(
                f"=== {r.label} seed {seed}: acc {rec['eval_accuracy']:.4f} "
                f"({rec['trainable_params']} params, {rec['wall_s']} s)",
                flush=True,
            )


def load_records() -> list[dict]:
    """All recorded runs."""
    return [json.loads(ln) for ln in RESULTS.read_text().splitlines() if ln.strip()]


def summarize(recs: list[dict]) -> dict[str, dict]:
    """``{label: {mean, std, min, max, n, params, wall_s, ...}}`` over seeds."""
    out: dict[str, dict] = {}
    for r in recs:
        out.setdefault(r["label"], {"recs": []})["recs"].append(r)
    for d in out.values():
        acc = np.array([r["eval_accuracy"] for r in d["recs"]])
        d.update(
            mean=float(acc.mean()),
            std=float(acc.std(ddof=1)) if acc.size > 1 else float("nan"),
            min=float(acc.min()),
            max=float(acc.max()),
            n=int(acc.size),
            params=d["recs"][0]["budget_params"],
            method=d["recs"][0]["method"],
            sweep=d["recs"][0]["sweep"],
            wall_s=float(np.mean([r["wall_s"] for r in d["recs"]])),
        )
    return out


def _fmt(d: dict | None) -> str:
    if d is None:
        return "–"
    spread = f" ± {d['std']:.3f}" if d["n"] > 1 else ""
    return f"{d['mean']:.3f}{spread} (n={d['n']})"


def _paired(summary: dict, label: str, ref: str) -> str:
    """Mean ± std over seeds of ``acc(label) - acc(ref)`` (same seed = same data order/init)."""
    if label not in summary or ref not in summary:
        return "–"
    a = {r["seed"]: r["eval_accuracy"] for r in summary[label]["recs"]}
    b = {r["seed"]: r["eval_accuracy"] for r in summary[ref]["recs"]}
    d = np.array([a[s] - b[s] for s in sorted(set(a) & set(b))])
    if d.size == 0:
        return "–"
    spread = f" ± {d.std(ddof=1):.3f}" if d.size > 1 else ""
    return f"{d.mean():+.3f}{spread}"


def majority_baseline() -> float:
    """Accuracy of always predicting the dev split's most frequent label."""
    from train.glue.data import load_task

    labels = np.asarray(load_task("mr").eval["validation"]["label"])
    return float(np.bincount(labels).max() / labels.size)


def report() -> None:
    """Prints the markdown tables and draws :data:`PLOT` from the recorded runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = load_records()
    s = summarize(recs)
    total_h = sum(r["wall_s"] for r in recs) / 3600
    print(f"{len(recs)} runs recorded, {total_h:.2f} h of run wall time in all.\n")
    methods = ("sift-grad", "sift-random", "sift-magnitude", "lora")
    print("## Part 1: dev accuracy vs trainable parameters (mean ± std over seeds)\n")
    print("| method | " + " | ".join(f"~{b:,}" for b in BUDGETS) + " |")
    print("|---" * (len(BUDGETS) + 1) + "|")
    for m in methods:
        cells = []
        for b in BUDGETS:
            d = s.get(f"{m}@{b}")
            cells.append("–" if d is None else f"{_fmt(d)} [{d['params']:,}]")
        print(f"| {m} | " + " | ".join(cells) + " |")
    for label in ("full", "classifier-only"):
        d = s.get(label)
        if d:
            print(f"\n{label}: {_fmt(d)} [{d['params'] + 770:,} params incl. head]")
    maj = majority_baseline()
    print(f"\nmajority-class baseline: {maj:.3f}")
    print("\n[params] = trainable parameters excluding the 770-parameter classifier head.")

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {
        "sift-grad": ("C0", "o", "SIFT, gradient selection"),
        "sift-random": ("C1", "s", "SIFT, random selection"),
        "sift-magnitude": ("C2", "^", "SIFT, magnitude selection"),
        "lora": ("C3", "D", "LoRA (query/value), matched"),
    }
    for m, (c, mk, name) in styles.items():
        pts = [s[f"{m}@{b}"] for b in BUDGETS if f"{m}@{b}" in s]
        if not pts:
            continue
        x = [d["params"] for d in pts]
        y = np.array([d["mean"] for d in pts])
        e = np.array([0 if d["n"] < 2 else d["std"] for d in pts])
        ax.errorbar(x, y, yerr=e, color=c, marker=mk, capsize=3, label=name)
        for d in pts:
            accs = [r["eval_accuracy"] for r in d["recs"]]
            ax.scatter([d["params"]] * len(accs), accs, color=c, s=8, alpha=0.35)
    for label, c, name in (("full", "k", "full fine-tuning"), ("classifier-only", "gray", None)):
        if label in s:
            d = s[label]
            ax.axhline(d["mean"], color=c, ls="--", label=f"{name or label} ({d['mean']:.3f})")
            if d["n"] > 1:
                ax.axhspan(d["mean"] - d["std"], d["mean"] + d["std"], color=c, alpha=0.08)
    ax.axhline(maj, color="gray", ls=":", label=f"majority class ({maj:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (excluding the 770-parameter classifier head)")
    ax.set_ylabel("dev accuracy (mr, 1,056 sentences)")
    seeds = sorted({r["seed"] for r in recs if r["sweep"] == "budget"})
    ax.set_title(f"MiniLM-L6 on mr, 3,000 training sentences, 1 epoch; seeds {seeds}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    print(f"\nwrote {PLOT}")

    ref = "sift-grad@28416"

    def paired_table(title, ref_name, vs, runs, sep):
        print(f"\n## {title} (SIFT rate 0.008)\n")
        print(f"| configuration | dev accuracy | paired difference vs {vs} |")
        print("|---|---|---|")
        print(f"| {ref_name} | {_fmt(s.get(ref))} | |")
        for r in runs:
            name = r.label.split(sep, 1)[1]
            print(f"| {name} | {_fmt(s.get(r.label))} | {_paired(s, r.label, ref)} |")

    paired_table(
        "Part 3: selecting on more batches, re-selecting",
        "selection_steps=1 (default)",
        "1 batch, select once",
        selection_runs(),
        " ",
    )
    paired_table("Part 4: the original code's semantics", "ours", "ours", original_runs(), ": ")
    print("\n## Learning-rate check (seed 0 unless n says more)\n")
    print("| configuration | dev accuracy |")
    print("|---|---|")
    for label in ("sift-grad@28416", "lora@28416"):
        print(
            f"| {label} lr={LR[label.split('-')[0].split('@')[0]]:g} (sweep default) | "
            f"{_fmt(s.get(label))} |"
        )
    for r in lr_runs():
        print(f"| {r.label} | {_fmt(s.get(r.label))} |")
    print("\n## Wall time per run (mean, this machine)\n")
    print("| configuration | runs | wall s/run |")
    print("|---|---|---|")
    for label, d in s.items():
        print(f"| {label} | {d['n']} | {d['wall_s']:.0f} |")


def main() -> None:
    """CLI: ``python -m bench.sweep run SWEEP... [--seeds ...]`` or ``report``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run sweeps (resumable; results in docs/study/runs.jsonl)")
    r.add_argument("sweeps", nargs="+", choices=sorted(SWEEPS))
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--only", default=None, help="run only labels containing this string")
    sub.add_parser("report", help="print the tables and draw docs/budget_curve.png")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.cmd == "run":
        run_sweeps(args.sweeps, args.seeds, args.only)
    else:
        report()
    print(f"wall time: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
