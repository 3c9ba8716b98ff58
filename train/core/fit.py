"""The fit loop shared by every job (``train.glue``, ``train.instruct``).

:func:`fit` reads top to bottom: set up (placement, method, optimizer state, resume), then one
step per iteration (the method says which kind: a SIFT selection step or the shared train
step), with logging, evaluation and checkpoints as hooks, then the epilogue every job shares
(final evaluation, final checkpoint, results files, the method's outputs such as the SIFT
delta and the merged model export, written by process 0 only, and the completion marker).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from train.core import cli, logs, methods, outputs, prng
from train.core import mesh as mesh_lib
from train.core.checkpoint import Checkpointer, CheckpointError
from train.core.methods.base import PHASE_TRAIN, Method, TrainState
from train.core.optim import make_schedule
from train.core.steps import (
    evaluate,
    make_accum_grads,
    make_eval_fn,
    make_train_step,
    run_train_step,
)
from train.core.task import Task

log = logging.getLogger("train")

#: flags a resumed run may change; every other one must equal the checkpoint's
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "disable_tqdm",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "eval_steps",
        "eval_strategy",
        "export_model",
        "mesh",
        "coordinator_address",
        "num_processes",
        "process_id",
        "per_device_eval_batch_size",
        "max_nonfinite_steps",
        "mmlu_dir",
        "mmlu_before",
        "save_delta",
    }
)


class NonFiniteError(ValueError):
    """Too many consecutive steps had a NaN/inf loss or gradient."""


@dataclass
class TrainResult:
    """What :func:`fit` returns (the metrics are also in ``all_results.json``).

    Attributes:
        metrics: final evaluation + training statistics.
        losses: the training loss of every step run in this process (not the resumed ones).
        params: the fine-tuned params (merged, plain arrays).
        method: the :class:`~train.core.methods.base.Method`.
        state: the final :class:`~train.core.methods.base.TrainState`.
        outputs: files written into ``--output_dir``.
    """

    metrics: dict[str, Any]
    losses: list[float]
    params: Any
    method: Method
    state: TrainState
    outputs: list[str] = dataclasses.field(default_factory=list)


@dataclass
class StepPlan:
    """How many examples and steps: ``per_step`` examples per micro-step on the mesh,
    ``global_batch`` per optimizer step, ``total`` optimizer steps."""

    per_step: int
    accum: int
    global_batch: int
    steps_per_epoch: int
    total: int


def plan_steps(cfg, train_size: int, mesh) -> StepPlan:
    """``StepPlan`` for the config (the last partial batch of an epoch is dropped)."""
    per_step = cfg.per_device_train_batch_size * mesh_lib.batch_divisor(mesh)
    accum = cfg.gradient_accumulation_steps
    global_batch = per_step * accum
    steps_per_epoch = train_size // global_batch
    if steps_per_epoch < 1:
        raise ValueError(
            f"The training set has {train_size} examples, fewer than one optimizer batch of "
            f"{global_batch} (per-device batch x devices x accumulation); lower the batch size."
        )
    if cfg.max_steps and cfg.max_steps > 0:
        total = int(cfg.max_steps)
    else:
        total = int(math.ceil(cfg.num_train_epochs * steps_per_epoch))
    return StepPlan(per_step, accum, global_batch, steps_per_epoch, total)


def trainable_line(num_trainable: int, num_all: int) -> str:
    """The reference implementation's line.

    Example:
        >>> trainable_line(5, 100)
        'trainable params: 5 || all params: 100 || trainable%: 5.0000'
    """
    return (
        f"trainable params: {num_trainable} || all params: {num_all} || "
        f"trainable%: {100 * num_trainable / num_all:.4f}"
    )


# ----------------------------------------------------------------------------- hooks


class Loop:
    """The loop's shared state, read by the hooks."""

    def __init__(self, cfg, task, method, plan, mesh, frozen, out_dir, ckpt, start_step):
        self.cfg, self.task, self.method, self.plan, self.mesh = cfg, task, method, plan, mesh
        self.frozen, self.out_dir, self.ckpt = frozen, out_dir, ckpt
        self.step = start_step
        self.state: TrainState | None = None
        self.rng = None
        self.metrics: dict[str, Any] = {}
        self.eval_fn = make_eval_fn(method, task)
        self.primary = jax.process_index() == 0

    @property
    def epoch(self) -> float:
        return self.step / self.plan.steps_per_epoch

    def evaluate(self) -> dict:
        bs = self.cfg.per_device_eval_batch_size * mesh_lib.batch_divisor(self.mesh)
        m = evaluate(self.method, self.task, self.state, self.frozen, bs, self.mesh, self.eval_fn)
        m["epoch"] = self.epoch
        self.metrics = m
        return m

    def save(self, totals: dict) -> None:
        meta = {
            "step": self.step,
            "epoch": self.epoch,
            "config": _jsonable(asdict(self.cfg)),
            "method": self.method.checkpoint_meta(self.state),
            **totals,
        }
        arrays = self.method.checkpoint_arrays(self.state)
        self.ckpt.save(self.step, self.state, self.rng, meta, arrays)


class LogHook:
    """JSONL log lines every ``--logging_steps`` (and the last step), the progress bar, the
    running loss; fetches metrics from the device only on those steps, so the loop does not
    wait on every step."""

    def __init__(self, loop: Loop, log_path: Path, start_step: int, totals: dict, schedule):
        self.loop, self.schedule = loop, schedule
        self.file = open(log_path, "a") if loop.primary else None
        self.bar = tqdm(
            total=loop.plan.total,
            initial=start_step,
            disable=loop.cfg.disable_tqdm or not loop.primary,
            dynamic_ncols=True,
        )
        self.pending: list[tuple[int, dict]] = []
        self.losses: list[float] = []
        self.loss_sum = float(totals.get("loss_sum", 0.0))
        self.loss_count = int(totals.get("loss_count", 0))
        self.skipped = int(totals.get("skipped", 0))
        self.t_last = time.perf_counter()

    def on_step(self, step: int, m: dict) -> None:
        self.pending.append((step, m))
        self.bar.update(1)
        loop = self.loop
        if step % loop.cfg.logging_steps == 0 or step == loop.plan.total:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        fetched = mesh_lib.to_host(self.pending)
        self.pending = []
        now = time.perf_counter()
        per_step = (now - self.t_last) / len(fetched)
        self.t_last = now
        total_skipped = consecutive = 0
        for _, m in fetched:
            loss = float(m["loss"])
            self.losses.append(loss)
            # The guard's count of non-finite steps in a row, after this step: > 0 means
            # this step was skipped (its loss, or only its gradient, was NaN/inf).
            run = int(m["nonfinite"]) if "nonfinite" in m else int(not math.isfinite(loss))
            consecutive = max(consecutive, run)
            if run:
                total_skipped += 1
            elif math.isfinite(loss):
                self.loss_sum += loss
                self.loss_count += 1
        step, m = fetched[-1]
        self.skipped += total_skipped
        if total_skipped:
            log.warning(
                "%d step(s) up to step %d had a non-finite loss or gradient and were skipped "
                "(no update).",
                total_skipped,
                step,
            )
        lr = float(self.schedule(step - 1))
        rec = {
            "step": step,
            "epoch": step / self.loop.plan.steps_per_epoch,
            "loss": float(m["loss"]),
            "learning_rate": lr,
            "grad_norm": float(m["grad_norm"]),
            # wall seconds per step since the previous log line (compiles included)
            "seconds_per_step": per_step,
        }
        if self.skipped:
            rec["skipped_nonfinite"] = self.skipped
        self.write(rec)
        self.bar.set_postfix(
            loss=f"{rec['loss']:.4f}",
            lr=f"{lr:.2e}",
            ex_s=f"{self.loop.plan.global_batch / per_step:.1f}",
        )
        if consecutive >= self.loop.cfg.max_nonfinite_steps:
            raise NonFiniteError(
                f"{consecutive} consecutive steps (up to step {step}; --max_nonfinite_steps "
                f"{self.loop.cfg.max_nonfinite_steps}) had a NaN/inf loss or gradient (each "
                "skipped, no update); stopping without writing the delta or the model. Lower "
                "--learning_rate, check the data, or resume from an earlier checkpoint."
            )

    def write(self, rec: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()

    def totals(self) -> dict:
        return {"loss_sum": self.loss_sum, "loss_count": self.loss_count, "skipped": self.skipped}

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


class EvalHook:
    """Evaluates every epoch (``--eval_strategy epoch``) or every ``--eval_steps``."""

    def __init__(self, loop: Loop, logger: LogHook):
        self.loop, self.logger = loop, logger

    def due(self, step: int) -> bool:
        cfg, loop = self.loop.cfg, self.loop
        if not loop.task.eval_sets:
            return False
        return (cfg.eval_strategy == "epoch" and step % loop.plan.steps_per_epoch == 0) or (
            cfg.eval_strategy == "steps" and step % cfg.eval_steps == 0
        )

    def on_step(self, step: int, m: dict) -> None:
        if not self.due(step):
            return
        self.logger.flush()
        metrics = self.loop.evaluate()
        self.logger.write({"step": step, **metrics})
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        if self.loop.primary:
            tqdm.write(f"step {step}: {shown}")


class CheckpointHook:
    """Saves every ``--save_steps`` (the final checkpoint is the epilogue's)."""

    def __init__(self, loop: Loop, logger: LogHook):
        self.loop, self.logger = loop, logger

    def on_step(self, step: int, m: dict) -> None:
        cfg = self.loop.cfg
        if cfg.save_steps and step % cfg.save_steps == 0 and step < self.loop.plan.total:
            self.logger.flush()
            self.loop.save(self.logger.totals())


# ----------------------------------------------------------------------------- setup


@dataclass
class Setup:
    """Everything a run builds before its first step (what :func:`fit` runs; benchmarks call
    :func:`setup` too, so they time and compile the trainer's own steps).

    Attributes:
        method: the :class:`~train.core.methods.base.Method` (its optimizer guarded).
        state: the initial :class:`~train.core.methods.base.TrainState`.
        frozen: what the steps read but never differentiate.
        base: the pretrained params as placed on the mesh.
        plan: batch sizes and step counts.
        schedule: the learning-rate schedule.
        train_step: the jitted shared train step.
        grad_fn: gradient accumulation over micro-batches.
    """

    method: Method
    state: TrainState
    frozen: Any
    base: Any
    plan: StepPlan
    schedule: Callable
    train_step: Callable
    grad_fn: Callable
    task: Task
    phase_steps: dict = dataclasses.field(default_factory=dict)

    def phase_step(self, phase: str) -> Callable:
        """The (cached) step of a method phase such as SIFT's ``select``."""
        if phase not in self.phase_steps:
            self.phase_steps[phase] = self.method.phase_step(
                phase, self.task.loss_of_params, self.grad_fn, self.plan.accum
            )
        return self.phase_steps[phase]

    def step(self, state: TrainState, batch, rng, step: int) -> tuple[TrainState, dict]:
        """One optimizer step of the kind the method says ``step`` is."""
        phase = self.method.phase(step)
        if phase == PHASE_TRAIN:
            return run_train_step(self.train_step, state, self.frozen, batch, rng)
        return self.phase_step(phase)(state, self.frozen, batch, rng, step)

    @property
    def num_all(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.base))


def setup(cfg, task: Task, params: Any, mesh, model: Any = None, *, train_size=None) -> Setup:
    """Places ``params`` (through ``model``'s logical axes; without one, arrays keep their
    placement and single-device ones are replicated), builds the method,
    its optimizer state and the steps. ``params`` may be ``ShapeDtypeStruct``s (benchmarks
    that only compile): then the state is abstract too."""
    plan = plan_steps(cfg, train_size or task.train_size, mesh)
    schedule = make_schedule(cfg.learning_rate, plan.total, cfg.warmup_ratio, cfg.lr_scheduler_type)
    abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    if abstract:
        base = params
    else:
        # without a model bundle: already placed arrays keep their sharding, the rest is
        # replicated over the mesh
        base = model.place(params, mesh) if model is not None else mesh_lib.onto_mesh(params, mesh)
    root = jax.random.key(cfg.seed)
    method = methods.build(base, cfg, schedule, jax.random.fold_in(root, 1))
    init = jax.eval_shape if abstract else lambda f, x: jax.jit(f)(x)
    state = TrainState(
        method.trainable, init(method.optimizer.init, method.trainable), method.buffers
    )
    grad_fn = make_accum_grads(plan.accum)
    train_step = make_train_step(method, task, plan.accum)
    return Setup(method, state, method.frozen, base, plan, schedule, train_step, grad_fn, task)


# ----------------------------------------------------------------------------- fit


def fit(
    cfg,
    task: Task,
    params: Any,
    *,
    model: Any = None,
    mesh=None,
    out: outputs.OutputDir | None = None,
    metadata: dict | None = None,
    finish: Callable[[TrainResult], list[str]] | None = None,
) -> TrainResult:
    """Fine-tunes ``params`` on ``task`` as ``cfg`` says, and writes the run's outputs.

    Args:
        cfg: a :class:`train.core.config.TrainConfig` (or a job config composing it).
        task: the :class:`~train.core.task.Task`.
        params: the pretrained params (nested dict of arrays).
        model: the :class:`train.models.pretrained.Pretrained` bundle: places the params on
            the mesh by its logical axes and exports the merged model (default: replicate,
            no export).
        mesh: the device mesh (default: from ``cfg.mesh``).
        out: the locked :class:`train.core.outputs.OutputDir` (default: lock ``cfg.output_dir``
            here).
        metadata: recorded with the method's outputs (e.g. the SIFT delta's header).
        finish: the job's own epilogue, called on every process with the result once the
            shared outputs are written and before the run is marked complete; returns the
            names of the files it wrote (e.g. ``instruct_results.json``), so that the run is
            complete only when they exist too.

    Returns:
        A :class:`TrainResult`.
    """
    logs.setup(primary=jax.process_index() == 0)
    if out is None:
        with open_output_dir(cfg) as out:
            return fit(
                cfg, task, params, model=model, mesh=mesh, out=out, metadata=metadata, finish=finish
            )
    mesh = mesh if mesh is not None else mesh_lib.parse_mesh(cfg.mesh)
    out_dir = out.path
    s = setup(cfg, task, params, mesh, model)
    method, plan, frozen, base = s.method, s.plan, s.frozen, s.base
    state, schedule = s.state, s.schedule
    num_all = s.num_all
    ckpt = Checkpointer(out_dir / "checkpoints", max_to_keep=cfg.save_total_limit)
    loop = Loop(cfg, task, method, plan, mesh, frozen, out_dir, ckpt, 0)
    # the dropout key as raw uint32 data (checkpointed as a plain array); see train.core.prng
    # (on the mesh: a multi-process run checkpoints only global arrays)
    rng = jax.random.key_data(jax.random.fold_in(prng.key(cfg.seed, cfg.dropout_prng), 2))
    loop.rng = mesh_lib.onto_mesh(rng, mesh)

    # ---- resume
    totals: dict = {}
    log_path = out_dir / "train_log.jsonl"
    if cfg.resume_from_checkpoint:
        state, loop.rng, totals = _resume(cfg, ckpt, method, state, loop.rng, mesh)
        loop.step = int(totals.pop("step"))
        log.info("Resumed from checkpoint step %d (epoch %.3f).", loop.step, loop.epoch)
        _truncate_log(log_path, loop.step)
    elif log_path.exists() and loop.primary:
        log_path.unlink()
    if loop.primary:
        outputs.mark_running(out_dir, step=loop.step, total_steps=plan.total)
    loop.state = state

    # ---- hooks
    logger = LogHook(loop, log_path, loop.step, totals, schedule)
    hooks = [logger, EvalHook(loop, logger), CheckpointHook(loop, logger)]
    log.info(
        "Fine-tuning (%s) for %d steps: %d examples, %d steps/epoch, batch %d = %d x %d devices "
        "x %d accumulation; mesh %s.",
        method.name,
        plan.total,
        task.train_size,
        plan.steps_per_epoch,
        plan.global_batch,
        cfg.per_device_train_batch_size,
        mesh_lib.batch_divisor(mesh),
        plan.accum,
        dict(mesh.shape),
    )
    log.info(trainable_line(method.num_trainable, num_all))

    # ---- the loop: one step per iteration
    t_start = time.perf_counter()
    start_step = loop.step
    try:
        for batch in _batches(task, plan, loop.step):
            step = loop.step
            rng = jax.random.fold_in(prng.wrap(loop.rng, cfg.dropout_prng), step)
            dev = mesh_lib.put_batch(batch, mesh, leading=1 if plan.accum > 1 else 0)
            loop.state, m = s.step(loop.state, dev, rng, step)
            loop.step += 1
            for hook in hooks:
                hook.on_step(loop.step, m)
        logger.flush()
    finally:
        logger.close()
    runtime = time.perf_counter() - t_start

    # ---- epilogue: final evaluation and checkpoint, results, outputs
    if cfg.eval_strategy != "no" and task.eval_sets and loop.metrics.get("epoch") != loop.epoch:
        loop.evaluate()
    totals = logger.totals()
    loop.save(totals)
    ckpt.close()
    steps_run = loop.step - start_step
    results = {
        **loop.metrics,
        "train_loss": totals["loss_sum"] / totals["loss_count"]
        if totals["loss_count"]
        else float("nan"),
        "train_runtime": runtime,
        "train_samples_per_second": steps_run * plan.global_batch / max(runtime, 1e-9),
        "train_steps": loop.step,
        "trainable_params": method.num_trainable,
        "all_params": num_all,
        "finetuning_type": method.name,
    }
    if totals["skipped"]:
        results["skipped_nonfinite_steps"] = totals["skipped"]
    if getattr(cfg, "reselect_every", 0) and hasattr(method, "plan"):
        results["reselections"] = method.plan.schedule.num_reselections(loop.step)
    merged = method.eval_params(loop.state.trainable, loop.state.buffers, frozen)
    result = TrainResult(results, logger.losses, merged, method, loop.state)

    def job(written: list[str]) -> list[str]:
        result.outputs = list(written)  # what the job's epilogue sees (delta, model, ...)
        return finish(result) if finish is not None else []

    result.outputs = write_outputs(
        cfg, method, loop, merged, base, model, results, metadata or {}, finish=job
    )
    return result


def write_outputs(
    cfg, method, loop: Loop, merged, base, model, results, metadata, finish=None
) -> list[str]:
    """The epilogue's files, written by process 0 (every process takes part in gathering):
    results, the method's outputs, the merged export, the job's own (``finish(written)``
    returns their names), then the completion marker. Each file is written atomically; the marker
    says complete only when every one exists. Non-finite weights are never written."""
    out_dir = loop.out_dir
    if jax.process_count() > 1:  # sharded over processes: every process gathers
        merged, base = mesh_lib.to_host(merged), mesh_lib.to_host(base)
    bad = [p for p, x in _named_leaves(merged) if not bool(np.all(np.isfinite(np.asarray(x))))]
    if bad:
        raise NonFiniteError(
            f"The fine-tuned weights are not finite ({', '.join(bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''}); no delta or model was written. Resume from an "
            "earlier checkpoint with a lower --learning_rate."
        )
    written = ["eval_results.json", "all_results.json", "train_config.json", "train_log.jsonl"]
    if loop.primary:
        outputs.mark_running(out_dir, step=loop.step, total_steps=loop.plan.total)
        outputs.write_json_atomic(out_dir / "eval_results.json", dict(loop.metrics))
        outputs.write_json_atomic(out_dir / "all_results.json", results)
        outputs.write_json_atomic(out_dir / "train_config.json", _jsonable(asdict(cfg)))
    for name in method.write_outputs(loop.state, merged, base, out_dir, metadata, loop.primary):
        written.append(name)
        if loop.primary:
            log.info("Saved %s.", out_dir / name)
    if loop.primary:
        if cfg.export_model and model is not None:
            model.export(jax.device_get(merged), out_dir / "model")
            written.append("model")
            log.info("Saved the merged model (HF format) to %s.", out_dir / "model")
    if finish is not None:
        written.extend(finish(list(written)) or [])
    if loop.primary:
        outputs.mark_complete(out_dir, written, step=loop.step)
    _sync("outputs-written")
    return written


def open_output_dir(cfg) -> outputs.OutputDir:
    """The run's locked output directory (before anything slow is loaded)."""
    return outputs.OutputDir(
        cfg.output_dir,
        overwrite=cfg.overwrite_output_dir,
        resume=bool(cfg.resume_from_checkpoint),
        is_primary=jax.process_index() == 0,
        # several processes: entering is a barrier, process 0's refusal is everyone's
        share_outcome=mesh_lib.share_outcome if jax.process_count() > 1 else None,
    )


def log_errors(out: outputs.OutputDir):
    """Appends the traceback of an error leaving the block to ``<output_dir>/error.log``
    (process 0 only; the one-line message says where): enter it once the directory is
    locked, never before (a run refused by the lock must not write into another run's dir)."""
    if not out.is_primary:
        return contextlib.nullcontext()
    return cli.errors_logged_to(out.path / outputs.ERROR_LOG)


def _batches(task: Task, plan: StepPlan, start: int):
    """Global batches from step ``start`` to the end, epoch by epoch (accumulation shapes
    ``[accum, per_step, ...]``)."""
    step = start
    while step < plan.total:
        epoch, offset = divmod(step, plan.steps_per_epoch)
        for batch in task.train_batches(epoch, offset, plan.global_batch):
            if plan.accum > 1:
                batch = {
                    k: v.reshape(plan.accum, plan.per_step, *v.shape[1:]) for k, v in batch.items()
                }
            yield batch
            step += 1
            if step >= plan.total or step % plan.steps_per_epoch == 0:
                break


def _resume(cfg, ckpt: Checkpointer, method: Method, state: TrainState, rng, mesh):
    try:
        step = ckpt.resolve(str(cfg.resume_from_checkpoint))
    except CheckpointError:
        raise
    meta = ckpt.read_meta(step)
    defaults = {f.name: f.default for f in fields(cfg) if f.default is not MISSING}
    _check_same_config(meta.get("config", {}), asdict(cfg), ckpt.directory / str(step), defaults)
    method.prepare_restore(meta.get("method", {}))
    trainable_t = method.trainable
    opt_t = jax.eval_shape(method.optimizer.init, trainable_t)
    opt_t = (
        jax.tree.map(_with_sharding_of, opt_t, state.opt_state)
        if _same_tree(opt_t, state.opt_state)
        else opt_t
    )
    method_t = method.checkpoint_template(meta.get("method", {}))
    trainable, opt_state, rng, arrays = ckpt.restore(step, trainable_t, opt_t, rng, method_t, meta)
    # What was created uncommitted (on one device) comes back committed to that device.
    trainable, opt_state, rng = mesh_lib.onto_mesh((trainable, opt_state, rng), mesh)
    state = method.restore(TrainState(trainable, opt_state, method.buffers), arrays)
    totals = {k: meta[k] for k in ("loss_sum", "loss_count", "skipped") if k in meta}
    totals["step"] = int(meta["step"])
    return state, rng, totals


def _same_tree(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b)


def _with_sharding_of(sds, like):
    if isinstance(like, jax.Array) and sds.shape == like.shape:
        return jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=like.sharding)
    return sds


def _check_same_config(saved: dict, now: dict, where: Path, defaults: dict | None = None) -> None:
    """Refuses a resume whose flags differ from the checkpoint's; a flag newer than the
    checkpoint counts as its default there (the run was trained without it)."""
    diff = [
        f"--{k} {saved[k]!r} (checkpoint) vs {now[k]!r} (now)"
        for k in sorted(set(saved) & set(now))
        if k not in RESUMABLE_CHANGES and _jsonable(saved[k]) != _jsonable(now[k])
    ]
    if saved:  # (an old checkpoint without a config at all is not checked)
        diff += [
            f"--{k} not in the checkpoint (its default {defaults[k]!r} then) vs {now[k]!r} (now)"
            for k in sorted(set(now) - set(saved))
            if k not in RESUMABLE_CHANGES
            and k in (defaults or {})
            and _jsonable(defaults[k]) != _jsonable(now[k])
        ]
    if diff:
        raise CheckpointError(
            f"Cannot resume from {where}: the run was started with other flags: "
            + "; ".join(diff)
            + ". Resume with the original flags (see train_config.json)."
        )


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def _named_leaves(tree: Any):
    from sift_jax.paths import leaves_with_paths

    return leaves_with_paths(tree)


def _truncate_log(path: Path, step: int) -> None:
    """Drops log lines written after ``step`` by the run being resumed."""
    if not path.exists() or jax.process_index() != 0:
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    outputs.write_text_atomic(path, "".join(ln + "\n" for ln in keep))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
