"""Communication per train step under an FSDP mesh: full FT vs SIFT compact, global vs shard-local.

Run: ``python -m bench.comm [--meshes fsdp=8 data=2,fsdp=4] [--rate 0.01]``

On 8 fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set here before
jax is imported), a small BERT-shaped encoder (``train.models.encoder``) is placed with the
model's sharding rules (``train.models.sharding.DEFAULT_RULES``: ``fsdp`` splits the embedding
dim) and the trainer's own jitted steps are compiled (nothing is run): the train step of full
fine-tuning, of SIFT's compact path with ``--selection_scope global`` and with
``--selection_scope shard``, and the two SIFT selection steps (run once per run). The collectives
of each compiled HLO module are counted: number of ops and bytes of their results per step (for
an all-gather the gathered array, for an all-reduce the reduced array, for a reduce-scatter the
scattered piece; a tuple-shaped collective counts once, with all its parts). Ratios are against
full FT in the same process.

XLA:CPU is not XLA:GPU: it keeps the partitioner's collectives but, for example, lowers a
gradient's reduce-scatter as an all-reduce followed by a slice, so the kinds of ops differ from a
GPU's and only the comparison between methods on the same backend means something.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before jax is imported
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sift_jax.paths import flatten_paths
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
from train.models.sharding import param_shardings

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
SPARSE = r"attention/(query|key|value|output)/"
_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+(?P<op>"
    + "|".join(KINDS)
    + r")(?P<start>-start)?\("
)
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")


def collective_ops(hlo: str) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """``[(kind, [(dtype, shape), ...])]``: every collective of a compiled HLO module's text.

    Asynchronous pairs count once (at ``-start``, whose result tuple ends with the output).

    Example:
        >>> collective_ops("%ag = f32[8,16]{1,0} all-gather(%p), dimensions={0}")
        [('all-gather', [('f32', (8, 16))])]
    """
    out = []
    for line in hlo.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        shapes = [
            (dt, tuple(int(d) for d in dims.split(",") if d))
            for dt, dims in _SHAPE.findall(m.group("type"))
        ]
        if m.group("start") and len(shapes) > 1:
            shapes = shapes[len(shapes) // 2 :]  # (operands..., results...)
        out.append((m.group("op"), shapes))
    return out


def collective_stats(hlo: str) -> dict[str, tuple[int, int]]:
    """``{kind: (count, bytes)}`` of the collectives in a compiled HLO module's text.

    Example:
        >>> collective_stats("%r = (f32[4]{0}, s32[2]{0}) all-reduce(%a, %b), to_apply=%add")
        {'all-gather': (0, 0), 'all-reduce': (1, 24), 'reduce-scatter': (0, 0), 'all-to-all': (0, 0), 'collective-permute': (0, 0)}
    """  # noqa: E501
    stats = {k: [0, 0] for k in KINDS}
    for kind, shapes in collective_ops(hlo):
        stats[kind][0] += 1
        stats[kind][1] += sum(_BYTES[dt] * int(np.prod(s, dtype=np.int64)) for dt, s in shapes)
    return {k: (c, b) for k, (c, b) in stats.items()}


def small_bert() -> EncoderConfig:
    """BERT-shaped, small enough to compile in seconds on CPU; every sharded dim divides by 8."""
    return EncoderConfig(
        vocab_size=2048,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=64,
    )


def _task(graphdef) -> Task:
    def loss_fn(logits, b):
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

    return Task(classifier_apply_fn(graphdef), loss_fn, 1, None)


def compile_steps(model_cfg, mesh, ftype, scope, rate, batch, seq, *, select=True):
    """``({"train": hlo_text, "select": hlo_text}, n_sparse)`` for one method (``select`` only
    for SIFT and with ``select``), compiled from the trainer's own setup
    (:func:`train.core.fit.setup`)."""
    model = EncoderForSequenceClassification(model_cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    graphdef, params = split_params(model)
    shardings = nnx.to_pure_dict(param_shardings(state, mesh))
    params = jax.tree.map(jax.device_put, params, shardings)
    div = mesh.shape["data"] * mesh.shape["fsdp"]
    cfg = TrainConfig(
        finetuning_type=ftype,
        sparse_rate=rate,
        sparse_module=[SPARSE],
        sparse_exception=["classifier"],
        selection_scope=scope,
        per_device_train_batch_size=batch // div,
        max_steps=1000,
    )
    task = _task(graphdef)
    s = setup(cfg, task, params, mesh, train_size=batch)
    rng = np.random.default_rng(0)
    host = {
        "input_ids": rng.integers(5, model_cfg.vocab_size, (batch, seq)).astype(np.int32),
        "attention_mask": np.ones((batch, seq), np.int32),
        "token_type_ids": np.zeros((batch, seq), np.int32),
        "labels": rng.integers(0, 2, batch).astype(np.int32),
    }
    dev = put_batch(host, mesh)
    st, key = s.state, jax.random.key(1)
    out = {
        "train": s.train_step.lower(st.trainable, st.opt_state, st.buffers, s.frozen, dev, key)
        .compile()
        .as_text()
    }
    n_sparse = 0
    if select and s.method.phase(0) != "train":
        sel = s.phase_step("select").jitted
        out["select"] = (
            sel.lower(st.trainable, st.opt_state, st.buffers, s.frozen, {}, dev, key, 0, last=True)
            .compile()
            .as_text()
        )
        n_sparse = sum(sc.size for sc in s.method.plan.sparse_scopes.values())
    return out, n_sparse


def _fmt_bytes(b: int) -> str:
    for unit, s in (("MiB", 2**20), ("KiB", 2**10)):
        if b >= s:
            return f"{b / s:.3f} {unit}" if unit == "MiB" else f"{b / s:.1f} {unit}"
    return f"{b} B"


def report(mesh_spec: str, model_cfg, rate: float, batch: int, seq: int) -> str:
    mesh = parse_mesh(mesh_spec)
    rows = {}
    k_counts = {}
    for name, ftype, scope in (
        ("full FT", "full", "global"),
        ("SIFT compact, global", "sift", "global"),
        ("SIFT compact, shard-local", "sift", "shard"),
    ):
        hlo, k_counts[name] = compile_steps(model_cfg, mesh, ftype, scope, rate, batch, seq)
        rows[f"{name}: train step"] = collective_stats(hlo["train"])
        if "select" in hlo:
            rows[f"{name}: selection step (once)"] = collective_stats(hlo["select"])
    base = rows["full FT: train step"]
    lines = [
        f"mesh {mesh_spec} ({dict(mesh.shape)}); rate {rate}; trained sparse entries: "
        f"global {k_counts['SIFT compact, global']}, "
        f"shard-local {k_counts['SIFT compact, shard-local']}",
        f"| step | {' | '.join(KINDS)} | total bytes | vs full FT train step |",
        "|---|" + "---|" * (len(KINDS) + 2),
    ]
    total_base = sum(b for _, b in base.values())
    for name, st in rows.items():
        cells = [f"{c} / {_fmt_bytes(b)}" if c else "0" for c, b in st.values()]
        total = sum(b for _, b in st.values())
        ratio = f"{total / total_base:.3f}x" if total_base else "n/a"
        lines.append(f"| {name} | {' | '.join(cells)} | {_fmt_bytes(total)} | {ratio} |")
    return "\n".join(lines)


def _blocks(shape, spec, mesh) -> list[np.ndarray]:
    """Every block of a tensor under ``spec`` on ``mesh``, as its global flat indices."""
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    counts = []
    for e in spec:
        axes = () if e is None else (e,) if isinstance(e, str) else e
        counts.append(int(np.prod([mesh.shape[a] for a in axes])))
    ids = np.arange(int(np.prod(shape))).reshape(shape)
    out = []
    for coord in np.ndindex(*counts):
        sl = tuple(
            slice(c * (n // b), (c + 1) * (n // b))
            for c, n, b in zip(coord, shape, counts, strict=True)
        )
        out.append(ids[sl].ravel())
    return out


def selection_tradeoff(mesh_specs, rates, batch_size: int = 32) -> str:
    """Shard-local vs global top-k on the packaged MiniLM's first MR training batch.

    The gradient is taken on one device (the blocks are only geometry: which rows / columns a
    device holds under the model's sharding rules). For each targeted tensor, with
    ``n = S * ceil(k / S)`` the number of entries shard-local selection trains, it is compared
    with the global top-``n`` (same budget): the share of the global set it keeps, and its
    ``|g|`` mass over the global set's; and the imbalance of the global top-``n`` over the blocks
    (most loaded block's share x S; 1 = even, S = all in one block).
    """
    from sift_jax.selection import count_for_rate
    from train.glue import GlueConfig, build_task

    task, bundle = build_task(GlueConfig(task_name="mr", max_seq_length=128))
    batch = next(task.train_batches(0, 0, batch_size))

    def loss(p):
        return task.loss_fn(task.apply_fn(p, batch, jax.random.key(0), True), batch)

    grads = flatten_paths(jax.jit(jax.grad(loss))(bundle.params))
    targeted = {
        p: np.abs(np.asarray(g, np.float32)) for p, g in grads.items() if re.search(SPARSE, p)
    }
    model = EncoderForSequenceClassification(bundle.config, rngs=nnx.Rngs(0))
    lines = [
        f"MiniLM-L6 (packaged), first MR training batch of {batch_size}. Mean over tensors "
        "(worst tensor in brackets); n = S * ceil(k / S) entries for both selections.",
        "| mesh | rate | tensors | S | global top-n kept | |g| mass vs global top-n "
        "| imbalance of global top-n |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec_str in mesh_specs:
        mesh = parse_mesh(spec_str)
        shardings = param_shardings(nnx.state(model, nnx.Param), mesh)
        specs = flatten_paths(jax.tree.map(lambda s: s.spec, nnx.to_pure_dict(shardings)))
        for rate in rates:
            for kind, ndim in (("weights (2-D)", 2), ("biases, LayerNorm (1-D)", 1)):
                kept, mass, imb, ss = [], [], [], set()
                for p, g in targeted.items():
                    if g.ndim != ndim:
                        continue
                    flat = g.ravel()
                    parts = _blocks(g.shape, specs[p], mesh)
                    k_s = -(-count_for_rate(rate, flat.size) // len(parts))
                    n = k_s * len(parts)
                    glob = np.argpartition(-flat, n - 1)[:n]
                    local = np.concatenate(
                        [ids[np.argpartition(-flat[ids], k_s - 1)[:k_s]] for ids in parts]
                    )
                    ss.add(len(parts))
                    kept.append(np.isin(glob, local).mean())
                    mass.append(flat[local].sum() / flat[glob].sum())
                    imb.append(max(np.isin(glob, ids).sum() for ids in parts) / n * len(parts))
                lines.append(
                    f"| {spec_str} | {rate} | {kind}: {len(kept)} | "
                    f"{'/'.join(map(str, sorted(ss)))} | {np.mean(kept):.3f} ({np.min(kept):.3f})"
                    f" | {np.mean(mass):.3f} ({np.min(mass):.3f}) "
                    f"| {np.mean(imb):.2f} ({np.max(imb):.2f}) |"
                )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--meshes", nargs="*", default=["fsdp=8", "data=2,fsdp=4"])
    ap.add_argument("--rate", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument(
        "--tradeoff",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also compare shard-local and global top-k sets on MiniLM's gradient",
    )
    args = ap.parse_args(argv)
    jnp.zeros(())  # start the backend before timing
    model_cfg = small_bert()
    t0 = time.perf_counter()
    print(
        f"{len(jax.devices())} {jax.devices()[0].platform} devices; encoder "
        f"{model_cfg.num_hidden_layers}x{model_cfg.hidden_size} (mlp {model_cfg.intermediate_size},"
        f" vocab {model_cfg.vocab_size}); batch {args.batch} x seq {args.seq}; SIFT on attention "
        "q/k/v/o, classifier dense. Cells: count / bytes of results per step.\n"
    )
    for spec in args.meshes:
        print(report(spec, model_cfg, args.rate, args.batch, args.seq), end="\n\n", flush=True)
    print(f"wall time {time.perf_counter() - t0:.0f} s", flush=True)
    if args.tradeoff:
        t0 = time.perf_counter()
        print("\n" + selection_tradeoff(args.meshes, [0.008, args.rate]))
        print(f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
