"""The training loop shared by ``train.glue`` and ``train.instruct``.

A :class:`Task` says how to batch data, run the model and score it; :func:`train` does the
rest: method setup (full / SIFT / LoRA), a jitted train step with donated state and in-step
gradient accumulation, sharding over a device mesh, evaluation, JSONL logging, a progress bar,
orbax checkpoints with exact resume, and the final results files.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from train import mesh as mesh_lib
from train.checkpoint import Checkpointer
from train.methods import (
    Method,
    build_method,
    flatten_paths,
    make_schedule,
    make_selection_step,
    reset_increments,
    selection_needs_score,
    unflatten_paths,
)

Batch = dict[str, np.ndarray]


@dataclass
class Task:
    """What the trainer needs to know about a task.

    Attributes:
        apply_fn: ``(params, batch, rng, train) -> outputs`` (jit-traceable).
        loss_fn: ``(outputs, batch) -> scalar`` mean loss of the batch.
        train_size: number of training examples.
        train_batches: ``(epoch, start, batch_size) -> iterator of global batches``: the
            epoch's batches in a fixed, seeded order, starting at batch number ``start``.
        eval_sets: ``{name: (batch_size) -> iterator of batches}``; eval batches carry an
            ``example_mask`` (0 for padding rows).
        metrics_fn: ``(name, outputs, batches) -> dict`` from the host-side outputs.
        eval_outputs: ``(outputs, batch) -> array`` what evaluation keeps per example.
        export_fn: ``(params, out_dir) -> None`` writes the merged model, or ``None``.
    """

    apply_fn: Callable
    loss_fn: Callable
    train_size: int
    train_batches: Callable[[int, int, int], Iterator[Batch]]
    eval_sets: dict[str, Callable[[int], Iterator[Batch]]] = field(default_factory=dict)
    metrics_fn: Callable[[str, np.ndarray, list[Batch]], dict] | None = None
    eval_outputs: Callable | None = None
    export_fn: Callable | None = None


@dataclass
class TrainResult:
    """What :func:`train` returns (also written to ``all_results.json``)."""

    metrics: dict[str, Any]
    losses: list[float]
    params: Any
    method: Method
    opt_state: Any
    frozen: Any = None


def print_trainable(num_trainable: int, num_all: int) -> str:
    """The reference implementation's line.

    Example:
        >>> print_trainable(5, 100)
        trainable params: 5 || all params: 100 || trainable%: 5.0000
        'trainable params: 5 || all params: 100 || trainable%: 5.0000'
    """
    line = (
        f"trainable params: {num_trainable} || all params: {num_all} || "
        f"trainable%: {100 * num_trainable / num_all:.4f}"
    )
    print(line)
    return line


def _check_output_dir(cfg) -> Path:
    out = Path(cfg.output_dir)
    if (
        out.exists()
        and any(out.iterdir())
        and not cfg.overwrite_output_dir
        and not (cfg.resume_from_checkpoint)
    ):
        raise ValueError(
            f"--output_dir {out} exists and is not empty; pass --overwrite_output_dir to write "
            "into it or --resume_from_checkpoint latest to continue the run saved there."
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)


def plan_steps(cfg, train_size: int, global_batch: int) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)`` in optimizer steps (last partial batch dropped)."""
    steps_per_epoch = train_size // global_batch
    if steps_per_epoch < 1:
        raise ValueError(
            f"The training set has {train_size} examples, fewer than one optimizer batch of "
            f"{global_batch} (per-device batch x devices x accumulation); lower the batch size."
        )
    if cfg.max_steps and cfg.max_steps > 0:
        return steps_per_epoch, int(cfg.max_steps)
    return steps_per_epoch, int(math.ceil(cfg.num_train_epochs * steps_per_epoch))


def make_accum_grads(accum: int):
    """``(loss_of, args, batch, rng) -> (loss, grads)`` averaged over ``accum`` micro-batches.

    ``loss_of(args, micro_batch, rng)``; with ``accum > 1`` the batch leaves carry a leading
    ``[accum]`` dim and a ``lax.scan`` sums the gradients (one gradient tree live at a time).
    """

    def accum_grads(loss_of, args, batch, rng):
        grad_fn = jax.value_and_grad(loss_of)
        if accum == 1:
            return grad_fn(args, batch, rng)
        rngs = jax.random.split(rng, accum)

        def micro(carry, xs):
            mb, r = xs
            loss_i, g = grad_fn(args, mb, r)
            return (jax.tree.map(jnp.add, carry[0], g), carry[1] + loss_i), None

        zeros = jax.tree.map(jnp.zeros_like, args)
        (grads, loss), _ = jax.lax.scan(micro, (zeros, 0.0), (batch, rngs))
        return loss / accum, jax.tree.map(lambda g: g / accum, grads)

    return accum_grads


def make_train_step(method: Method, task: Task, accum: int):
    """The jitted optimizer step: grads over ``accum`` micro-batches, then one update."""
    opt = method.optimizer
    accum_grads = make_accum_grads(accum)

    def step(trainable, opt_state, mut, const, batch, rng):
        frozen = {**const, **mut} if mut else const

        def loss_of(t, b, r):
            params = method.combine(t, frozen)
            return task.loss_fn(task.apply_fn(params, b, r, True), b)

        loss, grads = accum_grads(loss_of, trainable, batch, rng)
        opt_params = method.opt_params(trainable, frozen) if method.opt_params else trainable
        updates, opt_state = opt.update(grads, opt_state, opt_params)
        trainable = optax.apply_updates(trainable, updates)
        if method.post_update is not None:
            frozen = method.post_update(trainable, frozen)
            mut = {k: v for k, v in frozen.items() if k in mut}
        return trainable, opt_state, mut, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1, 2))


def split_frozen(method: Method, frozen: Any) -> tuple[dict, Any]:
    """``(mut, const)``: the frozen-side buffers a step updates in place (donated; copied here
    so the caller's arrays survive) and the ones it only reads."""
    if method.post_update is None:
        return {}, frozen
    mut = {k: jax.tree.map(jnp.copy, v) for k, v in frozen.items() if k != "base"}
    return mut, {"base": frozen["base"]}


def make_selection_fn(method: Method, task: Task, cfg):
    """The compact SIFT path's selection step (see :func:`train.methods.make_selection_step`)."""

    def loss_of_params(params, b, r):
        return task.loss_fn(task.apply_fn(params, b, r, True), b)

    return make_selection_step(
        method, cfg, loss_of_params, make_accum_grads(cfg.gradient_accumulation_steps)
    )


def evaluate(method: Method, task: Task, trainable, frozen, cfg, mesh, eval_fn=None):
    """Runs every eval set and returns HF-style ``eval_*`` metrics."""
    eval_fn = eval_fn or make_eval_fn(method, task)
    bs = cfg.per_device_eval_batch_size * mesh_lib.batch_divisor(mesh)
    metrics: dict[str, float] = {}
    for name, batches_fn in task.eval_sets.items():
        outs, kept = [], []
        for batch in batches_fn(bs):
            dev = mesh_lib.put_batch(batch, mesh)
            out = eval_fn(trainable, frozen, dev)
            out = np.asarray(jax.experimental.multihost_utils.process_allgather(out, tiled=True))
            mask = batch["example_mask"].astype(bool)
            outs.append(out[mask])
            kept.append({k: v[mask] for k, v in batch.items()})
        metrics.update(task.metrics_fn(name, np.concatenate(outs), kept))
    return metrics


def make_eval_fn(method: Method, task: Task):
    """The jitted forward used by :func:`evaluate` (build once, reuse every evaluation)."""

    def run(trainable, frozen, batch):
        params = method.combine(trainable, frozen)
        out = task.apply_fn(params, batch, jax.random.key(0), False)
        return task.eval_outputs(out, batch) if task.eval_outputs else out

    return jax.jit(run)


def train(cfg, task: Task, params: Any, mesh=None, place_params: Callable | None = None):
    """Fine-tunes ``params`` on ``task`` as configured by ``cfg``.

    Args:
        cfg: a :class:`train.config.TrainConfig`.
        task: the :class:`Task`.
        params: the pretrained model's params as a nested dict of arrays.
        mesh: a ``jax.sharding.Mesh`` (default: from ``cfg.mesh``).
        place_params: ``(params, mesh) -> params`` puts params on devices with their
            shardings (default: replicate).

    Returns:
        A :class:`TrainResult`.
    """
    import jax.experimental.multihost_utils  # noqa: F401  (eval gathering)

    mesh = mesh if mesh is not None else mesh_lib.parse_mesh(cfg.mesh)
    out_dir = _check_output_dir(cfg)
    divisor = mesh_lib.batch_divisor(mesh)
    per_step = cfg.per_device_train_batch_size * divisor
    global_batch = per_step * cfg.gradient_accumulation_steps
    steps_per_epoch, total_steps = plan_steps(cfg, task.train_size, global_batch)
    schedule = make_schedule(
        cfg.learning_rate, total_steps, cfg.warmup_ratio, cfg.lr_scheduler_type
    )

    if place_params is None:
        params = jax.device_put(params, mesh_lib.replicated(mesh))
    else:
        params = place_params(params, mesh)
    root = jax.random.key(cfg.seed)
    method = build_method(params, cfg, schedule, jax.random.fold_in(root, 1))
    # Copy what trains: the step donates it, and the caller's arrays must survive.
    trainable = jax.tree.map(jnp.copy, method.trainable)
    mut, const = split_frozen(method, method.frozen)
    opt_state = jax.jit(method.optimizer.init)(trainable)
    num_all = sum(x.size for x in jax.tree.leaves(params))
    del params

    ckpt = Checkpointer(out_dir / "checkpoints", max_to_keep=cfg.save_total_limit)
    start_step, rng, extra = 0, jax.random.fold_in(root, 2), None
    log_path = out_dir / "train_log.jsonl"
    if cfg.resume_from_checkpoint:
        step = (
            ckpt.latest_step()
            if cfg.resume_from_checkpoint == "latest"
            else int(Path(cfg.resume_from_checkpoint).name)
        )
        if step is None:
            raise ValueError(f"--resume_from_checkpoint latest: no checkpoint in {ckpt.directory}.")
        trainable, opt_state, rng, meta, extra = ckpt.restore(
            step, method, trainable, opt_state, rng, extra_template=_extra(method, mut, None, cfg)
        )
        # What was created uncommitted (on one device) comes back committed to that device.
        trainable, opt_state, rng, extra = _onto_mesh((trainable, opt_state, rng, extra), mesh)
        if extra and "idx" in extra:  # saved as global flat indices
            extra = {**extra, "idx": method.compact_ops.idx_from_global(extra["idx"])}
        if extra and "w" in extra:  # re-selection: the merged weights were checkpointed
            mut = {k: extra[k] for k in ("w", "idx", "sel")}
        elif extra and "idx" in extra:
            frozen = method.reselect({**const, **mut}, extra["idx"])
            frozen = method.post_update(trainable, frozen)
            mut = {k: v for k, v in frozen.items() if k != "base"}
        start_step = int(meta["step"])
        print(f"Resumed from checkpoint step {start_step} (epoch {meta['epoch']}).")
        _truncate_log(log_path, start_step)
    elif log_path.exists():
        log_path.unlink()

    step_fn = make_train_step(method, task, cfg.gradient_accumulation_steps)
    eval_fn = make_eval_fn(method, task)
    sel_fn, score = None, None
    if method.selection_steps and start_step < method.selection_steps:
        sel_fn = make_selection_fn(method, task, cfg)
        score = flatten_paths(extra["score"]) if extra and "score" in extra else None
        if score is None:
            score = (
                _zero_score(mut)
                if selection_needs_score(cfg)
                else {}  # top-k taken inside the backward: no O(n) accumulator
            )
    reselect_every = getattr(cfg, "reselect_every", 0)
    resel_fn = reset_fn = None
    if reselect_every:
        resel_fn = sel_fn or make_selection_fn(method, task, cfg)
        reset_fn = jax.jit(reset_increments, donate_argnums=(0, 1))
    accum = cfg.gradient_accumulation_steps
    print(
        f"Fine-tuning ({method.name}) for {total_steps} steps: {task.train_size} examples, "
        f"{steps_per_epoch} steps/epoch, batch {global_batch} = {cfg.per_device_train_batch_size}"
        f" x {divisor} devices x {accum} accumulation; mesh {dict(mesh.shape)}."
    )
    losses: list[float] = []
    metrics: dict[str, Any] = {}

    def save():  # reads the loop's current state
        meta = {"step": step, "epoch": step / steps_per_epoch}
        extra = _extra(method, mut, score, cfg)
        ckpt.save(step, method, trainable, opt_state, rng, meta, extra=extra)

    t_start = time.perf_counter()
    bar = tqdm(total=total_steps, initial=start_step, disable=cfg.disable_tqdm, dynamic_ncols=True)
    printed_trainable = False
    step = start_step
    with open(log_path, "a") as log:
        while step < total_steps:
            epoch, offset = divmod(step, steps_per_epoch)
            for batch in task.train_batches(epoch, offset, global_batch):
                if accum > 1:
                    batch = {k: v.reshape(accum, per_step, *v.shape[1:]) for k, v in batch.items()}
                dev = mesh_lib.put_batch(batch, mesh, leading=1 if accum > 1 else 0)
                t0 = time.perf_counter()
                if sel_fn is not None and step < method.selection_steps:
                    last = step == method.selection_steps - 1
                    trainable, opt_state, mut, score, m = sel_fn(
                        trainable,
                        opt_state,
                        mut,
                        const,
                        score,
                        dev,
                        jax.random.fold_in(rng, step),
                        last,
                    )
                    if last:
                        sel_fn = score = None  # the O(n) selection score is no longer needed
                elif reselect_every and _reselects_at(step, method.selection_steps, reselect_every):
                    # The increments are already folded into the weights ("w"): select anew
                    # on this batch, with fresh increments and moments.
                    trainable, opt_state = reset_fn(trainable, opt_state)
                    score0 = _zero_score(mut) if selection_needs_score(cfg) else {}
                    trainable, opt_state, mut, _, m = resel_fn(
                        trainable,
                        opt_state,
                        mut,
                        const,
                        score0,
                        dev,
                        jax.random.fold_in(rng, step),
                        True,
                    )
                else:
                    trainable, opt_state, mut, m = step_fn(
                        trainable, opt_state, mut, const, dev, jax.random.fold_in(rng, step)
                    )
                step += 1
                loss = float(m["loss"])
                losses.append(loss)
                if not printed_trainable:
                    print_trainable(method.num_trainable(opt_state), num_all)
                    printed_trainable = True
                lr = float(schedule(step - 1))
                dt = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_s=f"{global_batch / dt:.1f}")
                bar.update(1)
                if step % cfg.logging_steps == 0 or step == total_steps:
                    rec = {
                        "step": step,
                        "epoch": step / steps_per_epoch,
                        "loss": loss,
                        "learning_rate": lr,
                        "grad_norm": float(m["grad_norm"]),
                    }
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                end_of_epoch = step % steps_per_epoch == 0
                do_eval = task.eval_sets and (
                    (cfg.eval_strategy == "epoch" and end_of_epoch)
                    or (cfg.eval_strategy == "steps" and step % cfg.eval_steps == 0)
                )
                if do_eval:
                    metrics = evaluate(
                        method, task, trainable, _frozen(mut, const), cfg, mesh, eval_fn
                    )
                    metrics["epoch"] = step / steps_per_epoch
                    rec = {"step": step, **metrics}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    tqdm.write(
                        f"step {step}: "
                        + ", ".join(
                            f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)
                        )
                    )
                if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
                    save()
                if step >= total_steps or end_of_epoch:
                    break
    bar.close()
    runtime = time.perf_counter() - t_start
    if (
        cfg.eval_strategy != "no"
        and task.eval_sets
        and metrics.get("epoch") != step / steps_per_epoch
    ):
        metrics = evaluate(method, task, trainable, _frozen(mut, const), cfg, mesh, eval_fn)
        metrics["epoch"] = step / steps_per_epoch
    save()
    ckpt.close()
    steps_run = step - start_step
    results = {
        **metrics,
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "train_runtime": runtime,
        "train_samples_per_second": steps_run * global_batch / max(runtime, 1e-9),
        "train_steps": step,
        "trainable_params": method.num_trainable(opt_state),
        "all_params": num_all,
        "finetuning_type": method.name,
    }
    if reselect_every:
        results["reselections"] = sum(
            _reselects_at(s, method.selection_steps, reselect_every) for s in range(step)
        )
    if jax.process_index() == 0:
        _write_json(out_dir / "eval_results.json", {k: v for k, v in metrics.items()})
        _write_json(out_dir / "all_results.json", results)
        _write_json(out_dir / "train_config.json", asdict(cfg))
    frozen = _frozen(mut, const)
    params = method.combine(trainable, frozen)
    return TrainResult(results, losses, params, method, opt_state, frozen)


def save_sift_delta(result: TrainResult, base_params: Any, path, metadata=None) -> str:
    """Writes a SIFT run's increments (``sift_jax`` delta format, safetensors).

    Sparse tensors are stored as their selected indices and increments, dense-trained ones
    (e.g. the classifier) whole; ``sift_jax.merge_delta(base, sift_jax.load_delta(path))``
    reproduces ``result.params`` exactly. Works for both SIFT paths.
    """
    import sift_jax

    indices = result.method.sparse_indices(result.frozen, result.opt_state)
    if result.metrics.get("reselections"):
        # Earlier selections changed other positions too: store every position that changed.
        indices = jax.tree.map(
            lambda i, new, old: (
                None
                if i is None
                else np.union1d(
                    np.asarray(i), np.flatnonzero(np.asarray(new) != np.asarray(old))
                ).astype(np.int32)
            ),
            indices,
            result.params,
            base_params,
            is_leaf=lambda x: x is None,
        )
    delta = sift_jax.extract_delta(result.params, base_params, indices)
    sift_jax.save_delta(delta, str(path), metadata or {})
    return str(path)


def _reselects_at(step: int, selection_steps: int, every: int) -> bool:
    """Whether step ``step`` (0-based) re-selects: every ``every`` steps after the first
    selection, which ends at step ``selection_steps - 1``."""
    since = step - (selection_steps - 1)
    return since > 0 and since % every == 0


def _onto_mesh(tree: Any, mesh) -> Any:
    """Replicates over ``mesh`` every leaf that sits on a single device (a multi-device mesh
    only), so a step's arguments never mix one-device and mesh placements."""
    if mesh.size == 1:
        return tree

    def put(x):
        single = isinstance(x, jax.Array) and len(x.sharding.device_set) == 1
        return jax.device_put(x, mesh_lib.replicated(mesh)) if single else x

    return jax.tree.map(put, tree)


def _zero_score(mut: dict) -> dict:
    return {p: jnp.zeros(x.shape, jnp.float32) for p, x in flatten_paths(mut["w"]).items()}


def _frozen(mut: dict, const: Any) -> Any:
    return {**const, **mut} if mut else const


def _extra(method: Method, frozen, score, cfg=None) -> dict | None:
    """Method state that lives outside trainable/opt_state and must be checkpointed.

    With re-selection the targeted weights have earlier increments folded in, so they (and the
    values they held at the current indices) are saved too; otherwise base + increments
    rebuilds them.
    """
    if method.path != "compact":
        return None
    # Global flat indices (shard-local ones converted), so a checkpoint is mesh-independent.
    out = {"idx": method.compact_ops.idx_to_global(frozen["idx"])}
    if getattr(cfg, "reselect_every", 0):
        out.update(w=frozen["w"], sel=frozen["sel"])
    if score:
        out["score"] = unflatten_paths(score)
    return out


def _truncate_log(path: Path, step: int) -> None:
    """Drops log lines written after ``step`` by the run being resumed."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)
