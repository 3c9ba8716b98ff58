"""Training throughput of full FT, LoRA and SIFT: exactly what the trainer runs, one process.

Run: ``python -m bench.train_step [--batch 32] [--seq 48] [--steps 20]``

The packaged MiniLM-L6 on the embedded ``mr`` task (real review sentences, tokenized and batched
by ``train.glue``'s own data path), each method built by the trainer's own
:func:`train.core.fit.setup` (same step builders, donated state, dropout on with the trainer's
dropout PRNG, batches placed by ``put_batch``):

* **jitted step**: the median seconds of one step, waited for (``block_until_ready``) — the
  device time of the step;
* **trainer loop**: the median seconds per step inside the real fit loop (``train.core.fit.fit``
  on the same data, measured at the loop's batch requests) — what a user's run takes; the
  difference is the loop's per-step host overhead (its own row);
* **FLOP expectation**: the compiled step's FLOPs (XLA's ``cost_analysis``) relative to full
  FT's, i.e. the speedup the arithmetic alone predicts, printed beside the measured ratio so
  the gap to the roofline is visible.

Ratios are against full fine-tuning measured here, in the same process. The first steps (the
compile, SIFT's selection step) are not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import jax
import numpy as np

from bench.memory import lora_rank_matching
from train.core import prng
from train.core.fit import fit, setup
from train.core.mesh import parse_mesh, put_batch

SPARSE = r"attention/(query|key|value|output)/"


def config(ftype: str, batch: int, seq: int, rate: float, rank: int = 8, **kw):
    """The ``train.glue`` config of a row (attention q/k/v/o sparse or LoRA'd, classifier
    dense, the embedded ``mr`` task)."""
    from train.glue import GlueConfig

    return GlueConfig(
        finetuning_type=ftype,
        sparse_rate=rate,
        lora_targets=[r"attention/(query|value)/kernel"],
        lora_rank=rank,
        max_seq_length=seq,
        per_device_train_batch_size=batch,
        mesh="data=1",
        **kw,
    )


def _flops(s, batch) -> float:
    st = s.state
    lowered = s.train_step.lower(
        st.trainable, st.opt_state, st.buffers, s.frozen, batch, prng.key(0)
    )
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def jitted_step(task, model, cfg, steps: int) -> tuple[float, float, int]:
    """``(median s/step, FLOPs/step, trained params)`` of the trainer's own step."""
    mesh = parse_mesh("data=1", jax.devices()[:1])
    s = setup(cfg, task, model.params, mesh, model)
    batches = task.train_batches(0, 0, cfg.per_device_train_batch_size)
    key = prng.key(cfg.seed, cfg.dropout_prng)
    state, t = s.state, 0
    first = put_batch(next(batches), mesh)
    while s.method.phase(t) != "train":  # SIFT's selection step (not timed)
        state, _ = s.step(state, first, jax.random.fold_in(key, t), t)
        t += 1
    flops = _flops(s, first)
    times = []
    for i in range(steps + 2):
        dev = put_batch(next(batches), mesh)
        t0 = time.perf_counter()
        state, m = s.step(state, dev, jax.random.fold_in(key, t + i), t + i)
        jax.block_until_ready(m["loss"])
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), flops, s.method.num_trainable


def loop_step(task, model, cfg, steps: int, every: int = 4) -> float:
    """Median seconds per step inside the real fit loop: its own ``seconds_per_step`` log
    entries (the loop waits for the device only at log lines, so an entry is the true wall
    time of its ``every`` steps), after the first two lines (compiles)."""
    import json

    timed_task = dataclasses.replace(task, eval_sets={})
    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = dataclasses.replace(
            cfg,
            output_dir=tmp,
            max_steps=every * (steps // every + 2),
            logging_steps=every,
            eval_strategy="no",
            export_model=False,
            save_delta=False,
            disable_tqdm=True,
        )
        fit(run_cfg, timed_task, model.params, model=model)
        log = [json.loads(x) for x in open(f"{tmp}/train_log.jsonl")]
    return float(np.median([r["seconds_per_step"] for r in log if "seconds_per_step" in r][2:]))


def measure_trainer(batch: int, seq: int, steps: int, rate: float, loop: bool = False) -> dict:
    """Seconds per step of the trainer's full FT, LoRA (matched) and SIFT steps (and, with
    ``loop``, inside the fit loop)."""
    from train.glue import build_task

    task, model = build_task(config("sift", batch, seq, rate))
    n_sift = None
    out: dict = {}
    for name, ftype in (("full", "full"), ("sift", "sift"), ("lora", "lora")):
        kw = {}
        if ftype == "lora":
            spec = {"sparse": r"attention/(query|value)/kernel", "dense": "classifier"}
            kw["rank"] = lora_rank_matching(model.params, spec, n_sift)
        cfg = config(ftype, batch, seq, rate, **kw)
        t, flops, n = jitted_step(task, model, cfg, steps)
        if ftype == "sift":
            n_sift = n
        out[name] = t
        out[f"{name}_flops"] = flops
        out[f"{name}_params"] = n
        out[f"{name}_rank"] = kw.get("rank")
        if loop:
            out[f"{name}_loop"] = loop_step(task, model, cfg, steps)
        jax.clear_caches()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rate", type=float, default=0.008)
    ap.add_argument("--no_loop", action="store_true", help="skip the fit-loop rows")
    args = ap.parse_args(argv)
    r = measure_trainer(args.batch, args.seq, args.steps, args.rate, loop=not args.no_loop)
    print(
        f"device: {jax.devices()[0].device_kind}; packaged MiniLM-L6 on mr, batch {args.batch} "
        f"x seq {args.seq}, dropout on; SIFT rate {args.rate} on attention q/k/v/o, classifier "
        "dense"
    )
    head = f"{'method':28s} {'step ms':>8s} {'ex/s':>7s} {'vs full':>8s} {'FLOP exp.':>9s}"
    if not args.no_loop:
        head += f" {'loop ms':>8s} {'host ms':>8s}"
    print(head)
    for name, label in (
        ("full", "full FT"),
        ("lora", f"LoRA (r={r['lora_rank']}, matched)"),
        ("sift", "SIFT"),
    ):
        t = r[name]
        line = (
            f"{label:28s} {t * 1e3:8.1f} {args.batch / t:7.1f} {r['full'] / t:7.2f}x "
            f"{r['full_flops'] / r[f'{name}_flops']:8.2f}x"
        )
        if not args.no_loop:
            lt = r[f"{name}_loop"]
            line += f" {lt * 1e3:8.1f} {(lt - t) * 1e3:8.1f}"
        print(line, flush=True)
    return r


if __name__ == "__main__":
    main()
