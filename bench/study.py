"""Reproduction study (issue 7, parts 2 and 3) on the embedded MiniLM and the ``mr`` task.

Two small CPU experiments behind the SIFT paper's motivation:

* ``quasi``: gradient quasi-sparsity. The share of the gradient norm held by the top
  0.1% / 1% / 5% of entries by ``|g|``, per module type and per layer, for the pretrained
  model vs a randomly initialised model of the same shape (and an i.i.d. Gaussian reference).
  Writes ``docs/quasi_sparsity.png`` and ``docs/quasi_sparsity_layers.png``.
* ``overlap``: does a selection made on one batch hold? For the attention q/k/v/o kernels at
  ``rate=0.008``, the overlap ``|A & B| / k`` of the top-k of ``|g|`` on batch 1 with the
  top-k of each later batch and of the gradient accumulated over later batches, against
  chance (``k / n``). Writes ``docs/selection_overlap.png``.

Gradients are of the mean cross-entropy of the classifier (fresh head, seed 42) with dropout
off, on batches of 32 examples of ``mr`` (``max_seq_length=48``, as ``train.glue``).

Usage::

    python -m bench.study quasi
    python -m bench.study overlap
"""

from __future__ import annotations

import argparse
import re
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx

import sift_jax
from sift_jax.paths import path_to_str
from sift_jax.selection import count_for_rate
from train.glue.batching import encode_task, train_batches
from train.glue.data import load_task
from train.models.encoder import EncoderForSequenceClassification, classifier_apply_fn
from train.models.functional import split_params
from train.models.pretrained import load_pretrained

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FRACTIONS = (0.001, 0.01, 0.05)
MODULES = ("query", "key", "value", "attn_output", "intermediate", "ffn_output", "embeddings")
_LAYER_MODULE = re.compile(
    r"layers/(\d+)/(?:attention/)?(query|key|value|output|intermediate|ffn_output)/kernel$"
)
BATCH_SIZE = 32
MAX_SEQ_LENGTH = 48


def module_type(path: str) -> str | None:
    """Module type of a leaf path: a :data:`MODULES` name, or ``None`` (biases, norms, heads)."""
    if path.startswith("embeddings/") and path.endswith("/embedding"):
        return "embeddings"
    m = _LAYER_MODULE.search(path)
    if m is None:
        return None
    return "attn_output" if m.group(2) == "output" else m.group(2)


def layer_of(path: str) -> str | None:
    """Layer index of an encoder-layer kernel path (all its linear kernels), else ``None``."""
    m = _LAYER_MODULE.search(path)
    return None if m is None else m.group(1)


def batches(n: int, seed: int = 42) -> list[dict]:
    """``n`` shuffled training batches of ``mr`` (only the keys the model reads)."""
    bundle = _pretrained()
    data = load_task("mr", max_train_samples=4000)
    enc, _ = encode_task(data, bundle.tokenizer, MAX_SEQ_LENGTH)
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels")
    it = train_batches(enc, BATCH_SIZE, epoch=0, seed=seed)
    return [{k: b[k] for k in keys} for _, b in zip(range(n), it, strict=False)]


_BUNDLE = []


def _pretrained():
    if not _BUNDLE:
        _BUNDLE.append(load_pretrained("embedded:minilm", head="classifier", num_labels=2, seed=42))
    return _BUNDLE[0]


def models() -> dict[str, tuple[dict, object]]:
    """``{"pretrained": (params, apply_fn), "random": (params, apply_fn)}``."""
    b = _pretrained()
    graphdef, params = split_params(EncoderForSequenceClassification(b.config, rngs=nnx.Rngs(0)))

    random_apply = classifier_apply_fn(graphdef, dropout=False)
    return {"pretrained": (b.params, b.apply_fn), "random": (params, random_apply)}


def grad_fn(apply_fn):
    """Jitted ``(params, batch) -> d mean CE / d params`` (dropout off)."""

    def loss(p, batch):
        logits = apply_fn(p, batch, None, False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    return jax.jit(jax.grad(loss))


def _mean_grad(params, apply_fn, bs: list[dict]) -> dict:
    g = grad_fn(apply_fn)
    total = None
    for b in bs:
        gi = g(params, b)
        total = gi if total is None else jax.tree.map(jnp.add, total, gi)
    return jax.tree.map(lambda x: x / len(bs), total)


def _table(title: str, rows: dict[str, dict], cols: list[str], key: str = "norm_ratio") -> None:
    print(f"\n{title}\n")
    heads = [f"{c} top {f:.1%}" for c in cols for f in FRACTIONS]
    print("| group | " + " | ".join(heads) + " |")
    print("|---" * (len(heads) + 1) + "|")
    for name, per in rows.items():
        vals = [f"{per[c][f][key]:.3f}" for c in cols for f in FRACTIONS]
        print(f"| {name} | " + " | ".join(vals) + " |")


def quasi(num_batches: int = 4) -> None:
    """Part 2: quasi-sparsity tables (printed as markdown) and the two plots."""
    bs = batches(num_batches)
    res = {}
    for name, (params, apply_fn) in models().items():
        res[name] = sift_jax.gradient_sparsity(_mean_grad(params, apply_fn, bs), FRACTIONS)
    gauss = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    ref = sift_jax.gradient_sparsity({"g": gauss}, FRACTIONS)["overall"]
    names = ("pretrained", "random")
    by_mod = {n: sift_jax.gradient_sparsity_by_group(res[n], module_type) for n in names}
    kernels = {
        n: sift_jax.gradient_sparsity_by_group(res[n], lambda p: "all" if layer_of(p) else None)
        for n in names
    }
    by_layer = {n: sift_jax.gradient_sparsity_by_group(res[n], layer_of) for n in names}

    rows = {m: {n: by_mod[n][m] for n in names} for m in MODULES}
    rows["all layer kernels (per tensor)"] = {n: kernels[n]["all"] for n in names}
    rows["whole model (global top-x%)"] = {n: res[n]["overall"] for n in names}
    rows["i.i.d. Gaussian reference"] = {n: ref for n in names}
    layers = sorted(by_layer["pretrained"], key=int)
    for n in names:
        sq = res[n]["sq_norms"]
        top = sorted(sq, key=sq.get, reverse=True)[:3]
        shares = ", ".join(f"{p} {sq[p] / sum(sq.values()):.1%}" for p in top)
        print(f"{n}: largest leaves by share of ||g||^2: {shares}")
    for key in ("norm_ratio", "energy_share"):
        _table(f"{key} by module type (per-tensor top-x%)", rows, list(names), key)
        _table(
            f"{key} by layer (q/k/v/o/intermediate/ffn_output kernels)",
            {f"layer {i}": {n: by_layer[n][i] for n in names} for i in layers},
            list(names),
            key,
        )

    groups = list(MODULES) + ["whole model"]
    fig, axes = plt.subplots(1, len(FRACTIONS), figsize=(15, 4.2), sharey=True)
    x = np.arange(len(groups))
    for ax, f in zip(axes, FRACTIONS, strict=True):
        for i, n in enumerate(names):
            vals = [by_mod[n][m][f]["norm_ratio"] for m in MODULES] + [
                res[n]["overall"][f]["norm_ratio"]
            ]
            ax.bar(x + (i - 0.5) * 0.4, vals, 0.4, label=n)
        ax.axhline(ref[f]["norm_ratio"], color="gray", ls=":", label="i.i.d. Gaussian")
        ax.set_xticks(x, groups, rotation=35, ha="right")
        ax.set_title(f"top {f:.1%} of entries")
    axes[0].set_ylabel("||g_top|| / ||g||")
    axes[0].legend()
    fig.suptitle(f"Gradient quasi-sparsity, MiniLM on mr ({num_batches}x{BATCH_SIZE} examples)")
    fig.tight_layout()
    fig.savefig("docs/quasi_sparsity.png", dpi=110)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for f, c in zip(FRACTIONS, ("C0", "C1", "C2"), strict=True):
        for n, ls in zip(names, ("-", "--"), strict=True):
            vals = [by_layer[n][i][f]["norm_ratio"] for i in layers]
            ax.plot([int(i) for i in layers], vals, ls, color=c, marker="o", label=f"{n} {f:.1%}")
    ax.set_xlabel("layer")
    ax.set_ylabel("||g_top|| / ||g||  (per-tensor top-x%, layer kernels)")
    ax.set_title("Quasi-sparsity per layer: pretrained (solid) vs random init (dashed)")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig("docs/quasi_sparsity_layers.png", dpi=110)


def _topk(a: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(np.abs(a).ravel(), -k)[-k:]


def overlap(num_later: int = 8, rate: float = 0.008) -> None:
    """Part 3: overlap of batch 1's top-k with later batches' (single and accumulated)."""
    params, apply_fn = models()["pretrained"]
    g = grad_fn(apply_fn)
    grads = []
    for b in batches(1 + num_later):
        flat = jax.tree_util.tree_flatten_with_path(g(params, b))[0]
        grads.append({path_to_str(p): np.asarray(v) for p, v in flat})
    targets = [p for p in grads[0] if module_type(p) in ("query", "key", "value", "attn_output")]
    n = grads[0][targets[0]].size
    k = count_for_rate(rate, n)
    single = {t: [] for t in targets}  # overlap with batch j alone, j = 2..1+num_later
    accum = {t: [] for t in targets}  # overlap with top-k of sum of batches 2..1+m
    captured = {t: [] for t in targets}  # energy of accum on A1 / energy of accum's own top-k
    for t in targets:
        a1 = _topk(grads[0][t], k)
        acc = np.zeros_like(grads[0][t])
        for j in range(1, 1 + num_later):
            single[t].append(np.intersect1d(a1, _topk(grads[j][t], k)).size / k)
            acc += grads[j][t]
            best = _topk(acc, k)
            accum[t].append(np.intersect1d(a1, best).size / k)
            sq = acc.ravel() ** 2
            captured[t].append(sq[a1].sum() / sq[best].sum())
    chance = k / n

    def mean_over(d, kind=None):
        sel = [t for t in targets if kind is None or module_type(t) == kind]
        return np.mean([d[t] for t in sel], axis=0)

    print(f"\nrate {rate}: n = {n} per kernel, k = {k}, chance overlap k/n = {chance:.4f}")
    print(f"{len(targets)} kernels (q/k/v/o x {len(targets) // 4} layers)\n")
    print(
        "| kernels | batch 1 vs batch j (mean over j=2..9) | min..max over j |"
        f" vs accumulated 2..{1 + num_later} | energy of accumulated captured by A1 |"
    )
    print("|---|---|---|---|---|")
    for kind in ("query", "key", "value", "attn_output", None):
        s, a, c = mean_over(single, kind), mean_over(accum, kind), mean_over(captured, kind)
        print(
            f"| {kind or 'all'} | {s.mean():.3f} | {s.min():.3f}..{s.max():.3f} |"
            f" {a[-1]:.3f} | {c[-1]:.3f} |"
        )
    print(
        "\n| m (batches accumulated, 2..1+m) | "
        + " | ".join(map(str, range(1, 1 + num_later)))
        + " |"
    )
    print("|---" * (num_later + 1) + "|")
    print("| overlap with A1 | " + " | ".join(f"{v:.3f}" for v in mean_over(accum)) + " |")
    print("| energy captured by A1 | " + " | ".join(f"{v:.3f}" for v in mean_over(captured)) + " |")
    layers = sorted({layer_of(t) for t in targets}, key=int)
    print("\n| layer | " + " | ".join(f"single {m}" for m in ("q", "k", "v", "o")) + " |")
    print("|---" * 5 + "|")
    for i in layers:
        vals = [
            np.mean(single[t])
            for kind in ("query", "key", "value", "attn_output")
            for t in targets
            if layer_of(t) == i and module_type(t) == kind
        ]
        print(f"| {i} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    js = np.arange(2, 2 + num_later)
    for kind, c in zip(
        ("query", "key", "value", "attn_output"), ("C0", "C1", "C2", "C3"), strict=True
    ):
        ax.plot(js, mean_over(single, kind), "-o", color=c, ms=3, label=f"{kind}: batch j alone")
        ax.plot(js, mean_over(accum, kind), "--", color=c, label=f"{kind}: batches 2..j summed")
    ax.axhline(chance, color="gray", ls=":", label=f"chance k/n = {chance:.3f}")
    ax.set_ylim(0, 1)
    ax.set_xlabel("batch j")
    ax.set_ylabel("|top-k(batch 1) & top-k(B)| / k")
    ax.set_title(
        f"Does the batch-1 selection hold? attention kernels, rate {rate} (mean over layers)"
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig("docs/selection_overlap.png", dpi=110)


def main() -> None:
    """CLI: ``python -m bench.study quasi|overlap``; prints markdown tables and the wall time."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("quasi", "overlap"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    {"quasi": quasi, "overlap": overlap}[args.part]()
    print(
        f"\nwall time: {time.perf_counter() - t0:.1f} s ({args.part}, {jax.devices()[0].platform})"
    )


if __name__ == "__main__":
    main()
