"""Optimizer step time and state memory: SIFT compact mode vs dense ``optax.adamw``.

Run: ``python -m bench.optimizer [--params 100e6] [--rate 0.01] [--repeats 10]``

Every variant runs in this process on the same ~N-parameter tree of 2-D leaves and is timed as
the step a trainer jits: ``update`` + ``optax.apply_updates`` in one function with params and
optimizer state donated. The table prints each variant's time and state bytes as a ratio of the
dense AdamW baseline measured here, never a bare time alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import sift_jax
from sift_jax import compact


def make_tree(n_params: float, width: int = 2048):
    per_leaf = width * width
    n_leaves = max(1, round(n_params / per_leaf))
    keys = jax.random.split(jax.random.key(0), n_leaves)
    params = {
        f"layer_{i:02d}": {"kernel": jax.random.normal(keys[i], (width, width)) * 0.02}
        for i in range(n_leaves)
    }
    grads = jax.tree.map(lambda p: p * 0.5 + 1e-3, params)
    return params, grads


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def time_step(opt, params, grads, repeats: int, donate: bool = True, warm_updates: int = 1):
    """Median seconds of one jitted update+apply, after ``warm_updates`` (e.g. selection)."""
    params = jax.tree.map(jnp.copy, params)
    state = opt.init(params)

    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jstep = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    for _ in range(warm_updates + 1):  # selection step(s) + compile
        params, state = jstep(params, state, grads)
    jax.block_until_ready(params)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        params, state = jstep(params, state, grads)
        jax.block_until_ready((params, state))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), tree_bytes(state)


def time_compact_path(params, rate: float, repeats: int):
    """The compact path's optimizer step as the trainer runs it (``Sift.train_step`` less the
    backward): AdamW on the k-vectors of selected values, then :meth:`Sift.write` into the
    donated merged weights (gradients arrive as k-vectors)."""
    sift = compact.Sift.create(params, rate)
    trainable, state, _ = sift.split(params)
    key = jax.random.key(0)
    grad = sift_jax.selection.get("grad")
    idx = [  # the top-k of |w| per leaf: any fixed selection times the same
        None if s is None else s.select(grad, jnp.abs(w), None, key)
        for s, w in zip([leaf.scope for leaf in sift.leaves], jax.tree.leaves(params), strict=True)
    ]
    trainable, state = sift.with_indices(
        jax.tree.unflatten(jax.tree.structure(params), idx), trainable, state
    )
    g = jax.tree.map(lambda t: jnp.full(t.shape, 1e-3, jnp.float32), trainable)
    opt = optax.adamw(1e-4, weight_decay=0.01)
    opt_state = opt.init(trainable)

    def step(trainable, opt_state, state, g):
        u, opt_state = opt.update(g, opt_state, trainable)
        trainable = optax.apply_updates(trainable, u)
        return trainable, opt_state, sift.write(trainable, state)

    jstep = jax.jit(step, donate_argnums=(0, 1, 2))
    for _ in range(2):
        trainable, opt_state, state = jstep(trainable, opt_state, state, g)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trainable, opt_state, state = jstep(trainable, opt_state, state, g)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    extra = tree_bytes(state.indices) + tree_bytes(trainable)
    return statistics.median(times), tree_bytes(opt_state) + extra


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params", type=float, default=100e6, help="approximate parameter count")
    ap.add_argument("--rate", type=float, default=0.01, help="SIFT rate per leaf")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)

    params, grads = make_tree(args.params)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  |  "
        f"tree: {len(params)} leaves of 2048x2048 = {n / 1e6:.1f}M params  |  rate {args.rate}"
    )
    adamw = lambda: optax.adamw(1e-4, weight_decay=0.01)
    rows = [("optax.adamw (dense, baseline)", adamw(), True)]
    rows.append(
        (
            f"sparse_increment({args.rate}, adamw)",
            sift_jax.sparse_increment(args.rate, adamw()),
            True,
        )
    )
    rows.append(
        ("  same, params not donated", sift_jax.sparse_increment(args.rate, adamw()), False)
    )
    rows.append(
        (
            "sparse_increment(mode='masking')",
            sift_jax.sparse_increment(args.rate, adamw(), mode="masking"),
            True,
        )
    )
    base_t = base_b = None
    print(
        f"{'variant':44s} {'step ms':>9s} {'time ratio':>10s} {'state MB':>10s} "
        f"{'state ratio':>11s}"
    )
    results = {}
    for name, opt, donate in rows:
        t, b = time_step(opt, params, grads, args.repeats, donate=donate)
        if base_t is None:
            base_t, base_b = t, b
        results[name] = (t / base_t, b / base_b)
        print(
            f"{name:44s} {t * 1e3:9.2f} {t / base_t:9.3f}x {b / 2**20:10.2f} {b / base_b:10.4f}x",
            flush=True,
        )
    t, b = time_compact_path(params, args.rate, args.repeats)
    name = "compact API / trainer (k-vector grads)"
    results[name] = (t / base_t, b / base_b)
    print(
        f"{name:44s} {t * 1e3:9.2f} {t / base_t:9.3f}x {b / 2**20:10.2f} {b / base_b:10.4f}x",
        flush=True,
    )
    return results


if __name__ == "__main__":
    main()
