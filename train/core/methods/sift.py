"""Fine-tuning methods over a pure-dict parameter tree: ``full``, ``sift`` and ``lora``.

A method splits the model's params into what is *trained* (given to ``jax.grad`` and the
optimizer) and what is *frozen* (an input of the step, never differentiated), and knows how to
put them back together for the forward pass and for export.

* ``full``: everything trains with AdamW.
* ``sift``: the tensors matched by ``sparse_module`` (and the dense ``sparse_exception`` ones)
  are trained, through :func:`sift_jax.sparse_increment` in compact mode, so the optimizer state
  is O(k); everything else is frozen and gets no gradient at all.
* ``lora``: low-rank adapters ``W + (alpha / r) A B`` on the ``lora_targets`` kernels, plus the
  dense ``lora_exception`` tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sift_jax
from sift_jax._src import shard_local
from sift_jax._src.paths import flatten_paths, path_to_str, unflatten_paths

Params = dict[str, Any]


def _matches(patterns: list[str], path: str) -> bool:
    return any(re.search(p, path) for p in patterns)


def decay_mask(tree: Any) -> Any:
    """AdamW decay mask: no decay on biases, LayerNorm/RMSNorm scales and embeddings' norms.

    Example:
        >>> decay_mask({"dense": {"kernel": 1.0, "bias": 0.0}, "LayerNorm": {"scale": 1.0}})
        {'LayerNorm': {'scale': False}, 'dense': {'bias': False, 'kernel': True}}
    """

    def keep(path, _):
        p = path_to_str(path).lower()
        return not (p.endswith("bias") or "norm" in p or p.endswith("scale"))

    return jax.tree_util.tree_map_with_path(keep, tree)


def make_schedule(lr: float, total_steps: int, warmup_ratio: float, kind: str = "linear"):
    """Linear warmup then linear decay to 0 (HF's default), or warmup then constant.

    Example:
        >>> s = make_schedule(1.0, 100, 0.1)
        >>> float(s(0)), float(s(10)), float(s(100))
        (0.0, 1.0, 0.0)
    """
    warmup = int(math.ceil(warmup_ratio * total_steps))
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
            [warmup],
        )
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, lr, max(warmup, 1)),
            optax.linear_schedule(lr, 0.0, max(total_steps - warmup, 1)),
        ],
        [warmup],
    )


def adamw(cfg, schedule, mask=decay_mask) -> optax.GradientTransformation:
    """Clip + AdamW with HF's decay mask (or ``mask``), as configured by ``cfg``."""
    parts = []
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.adam_beta1,
            b2=cfg.adam_beta2,
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
            mask=mask,
        )
    )
    return optax.chain(*parts)


class LaggedState(NamedTuple):
    """State of :func:`lag_increments`: the inner state and the update not yet applied."""

    inner: Any
    pending: Any


def lag_increments(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Applies each ``delta`` update one step late (the original SIFT code's behaviour).

    For studies only (``--sift_emulate lagged``): the original merged an increment into its
    weight during the *next* backward pass, after that step's forward had already run, so every
    gradient was taken at parameters missing the latest sparse update, and the last update was
    never applied. Dense (``dense``) updates are not delayed.

    Example:
        >>> opt = lag_increments(optax.sgd(1.0))
        >>> p = {"delta": jnp.zeros(2), "dense": jnp.zeros(1)}
        >>> g = {"delta": jnp.ones(2), "dense": jnp.ones(1)}
        >>> u, s = opt.update(g, opt.init(p))
        >>> u["delta"].tolist(), u["dense"].tolist()  # delta's update waits one step
        ([0.0, 0.0], [-1.0])
        >>> opt.update(g, s)[0]["delta"].tolist()
        [-1.0, -1.0]
    """

    def init(params):
        return LaggedState(
            inner.init(params), {"delta": jax.tree.map(jnp.zeros_like, params["delta"])}
        )

    def update(grads, state, params=None):
        updates, inner_state = inner.update(grads, state.inner, params)
        out = {**updates, "delta": state.pending["delta"]}
        return out, LaggedState(inner_state, {"delta": updates["delta"]})

    return optax.GradientTransformation(init, update)


def reset_increments(trainable: Params, opt_state: Any) -> tuple[Params, Any]:
    """Zeroes the compact path's increments and every optimizer-state leaf under ``delta``.

    Used by periodic re-selection: after the increments are folded into the weights, the new
    positions start from zero increments and zero AdamW moments (the step count, and with it
    the learning-rate schedule, carries on).
    """

    def zero_delta(path, x):
        under = any(getattr(k, "key", None) == "delta" for k in path)
        return jnp.zeros_like(x) if under else x

    trainable = {**trainable, "delta": jax.tree.map(jnp.zeros_like, trainable["delta"])}
    return trainable, jax.tree_util.tree_map_with_path(zero_delta, opt_state)


@dataclass
class Method:
    """A fine-tuning method: how params split into trained/frozen parts and recombine.

    Attributes:
        name: ``full`` | ``sift`` | ``lora``.
        trainable: the tree given to ``jax.grad`` and the optimizer.
        frozen: the tree passed to the step but never differentiated.
        combine: ``(trainable, frozen) -> params`` used inside the loss.
        optimizer: the optax transformation over ``trainable``.
        num_trainable: callable ``opt_state -> int``: trained parameter count.
    """

    name: str
    trainable: Params
    frozen: Params
    combine: Callable[[Params, Params], Params]
    optimizer: optax.GradientTransformation
    num_trainable: Callable[[Any], int]
    path: str = "simple"
    selection_steps: int = 0
    opt_params: Callable[[Params, Params], Params] | None = None
    sparse_indices: Callable[[Params, Any], Params] | None = None
    post_update: Callable[[Params, Params], Params] | None = None
    reselect: Callable[[Params, Params], Params] | None = None
    # The compact path's per-tensor operations (global or shard-local indices, incl. the index
    # conversions for checkpoints) and, with ``--selection_scope shard``, {path: ShardLayout}.
    compact_ops: Any = None
    shard_layouts: dict[str, Any] | None = None


def _split(params: Params, is_trained: Callable[[str], bool]) -> tuple[Params, Params]:
    flat = flatten_paths(params)
    tr = {p: x for p, x in flat.items() if is_trained(p)}
    fr = {p: x for p, x in flat.items() if not is_trained(p)}
    return unflatten_paths(tr), unflatten_paths(fr)


def _merge_trees(a: Params, b: Params) -> Params:
    flat = flatten_paths(b)
    flat.update(flatten_paths(a))
    return unflatten_paths(flat)


def _check_matches(params: Params, patterns: list[str], flag: str) -> None:
    paths = list(flatten_paths(params))
    for pat in patterns:
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise ValueError(f"{flag}: invalid regular expression {pat!r}: {e}") from e
        if not any(rx.search(p) for p in paths):
            sample = ", ".join(paths[:6])
            raise ValueError(
                f"{flag} pattern {pat!r} matches no parameter. Parameter paths look like: "
                f"{sample}, ..."
            )


def full_method(params: Params, cfg, schedule) -> Method:
    n = sum(x.size for x in jax.tree.leaves(params))
    return Method("full", params, {}, lambda t, f: t, adamw(cfg, schedule), lambda s: n)


def sift_method(params: Params, cfg, schedule) -> Method:
    """SIFT: sparse increments on ``sparse_module`` tensors, ``sparse_exception`` dense."""
    _check_matches(params, cfg.sparse_module, "--sparse_module")
    if cfg.sparse_exception:
        _check_matches(params, cfg.sparse_exception, "--sparse_exception")
    is_trained = lambda p: _matches(cfg.sparse_module + cfg.sparse_exception, p)
    trainable, frozen = _split(params, is_trained)
    opt = sift_jax.sparse_increment(
        cfg.sparse_rate,
        adamw(cfg, schedule),
        sparse=cfg.sparse_module,
        dense=cfg.sparse_exception or None,
        selection=cfg.selection,
        selection_steps=cfg.selection_steps,
        update_on_selection=cfg.update_on_selection,
        seed=cfg.seed,
    )
    roles = sift_jax.leaf_roles(trainable, cfg.sparse_module, cfg.sparse_exception or None)
    leaves = jax.tree.leaves(trainable)

    def count(opt_state):
        idx = jax.tree.leaves(sift_jax.selected_indices(opt_state))
        dense = sum(x.size for x, r in zip(leaves, roles, strict=True) if r == "dense")
        return int(sum(i.size for i in idx) + dense)

    def sparse_indices(frozen, opt_state):
        full = {p: None for p in flatten_paths(params)}
        full.update(flatten_paths(sift_jax.selected_indices(opt_state)))
        return unflatten_paths(full)

    return Method(
        "sift", trainable, frozen, _merge_trees, opt, count, sparse_indices=sparse_indices
    )


def sift_compact_method(params: Params, cfg, schedule) -> Method:
    """SIFT with compact gradients: the trainable variables are the increments themselves.

    ``trainable = {"delta": {path: fp32[k]}, "dense": exception tensors}``; the frozen base and
    the selected indices are step inputs, and each sparse weight is formed as
    ``W[idx] + delta`` (:func:`sift_jax.apply_increments`) inside the loss, so ``jax.grad``
    returns k-sized gradients and the optimizer state is O(k). The first ``selection_steps``
    steps compute the dense gradient of the sparse tensors once to choose the indices (the
    trainer runs them with :func:`make_selection_step`). Same maths as the simple path
    (:func:`sift_method`): same indices, same AdamW with decay on the selected weights
    ``W[idx] + delta``, same clipping, same step count.
    """
    _check_matches(params, cfg.sparse_module, "--sparse_module")
    if cfg.sparse_exception:
        _check_matches(params, cfg.sparse_exception, "--sparse_exception")
    flat = flatten_paths(params)
    roles = dict(
        zip(
            flat,
            sift_jax.leaf_roles(params, cfg.sparse_module, cfg.sparse_exception or None),
            strict=True,
        )
    )
    sparse = {p: flat[p] for p, r in roles.items() if r == "sparse"}
    dense = {p: flat[p] for p, r in roles.items() if r == "dense"}
    ks = {p: sift_jax.count_for_rate(cfg.sparse_rate, x.size) for p, x in sparse.items()}
    ops = _shard_local_ops(cfg, sparse, ks) if _scope(cfg) == "shard" else _global_ops(ks)
    trainable = {
        "delta": unflatten_paths({p: ops.vector(p, jnp.float32) for p in sparse}),
        "dense": unflatten_paths(dense),
    }
    # "w": the targeted tensors, kept merged (W = base + scatter(delta)) in a buffer that the
    # step donates and updates in place; "base": every other (frozen) tensor; "sel": the
    # original values at the selected positions (k each), for exact fp32 increments.
    frozen = {
        "base": unflatten_paths({p: x for p, x in flat.items() if p not in sparse}),
        "w": unflatten_paths(sparse),
        "idx": unflatten_paths({p: ops.placeholder_idx(p) for p in sparse}),
        "sel": unflatten_paths({p: ops.vector(p, x.dtype) for p, x in sparse.items()}),
    }

    def combine(t, f):
        out = flatten_paths(f["base"])
        idx, delta, w = flatten_paths(f["idx"]), flatten_paths(t["delta"]), flatten_paths(f["w"])
        for p in idx:
            out[p] = ops.view(p, w[p], delta[p], idx[p])
        out.update(flatten_paths(t["dense"]))
        return unflatten_paths(out)

    def post_update(t, f):
        w, idx, sel = flatten_paths(f["w"]), flatten_paths(f["idx"]), flatten_paths(f["sel"])
        delta = flatten_paths(t["delta"])
        out = {p: ops.write(p, w[p], idx[p], sel[p], delta[p]) for p in w}
        return {**f, "w": unflatten_paths(out)}

    def opt_params(t, f):
        sel, delta = flatten_paths(f["sel"]), flatten_paths(t["delta"])
        return {
            "delta": unflatten_paths({p: sel[p].astype(jnp.float32) + delta[p] for p in sel}),
            "dense": t["dense"],
        }

    def sparse_indices(f, opt_state):
        full = {p: None for p in flatten_paths(params)}
        i = flatten_paths(f["idx"])
        full.update({p: ops.global_idx(p, i[p]) for p in i})
        return unflatten_paths(full)

    def reselect(f, idx):
        """Frozen state for new indices (w must still hold the values to build on)."""
        w, i = flatten_paths(f["w"]), flatten_paths(idx)
        sel = {p: ops.gather(p, w[p], i[p]) for p in i}
        return {**f, "idx": idx, "sel": unflatten_paths(sel)}

    n = sum(ops.count(p) for p in sparse) + sum(x.size for x in dense.values())
    return Method(
        "sift",
        trainable,
        frozen,
        combine,
        _compact_optimizer(cfg, schedule),
        lambda s: n,
        path="compact",
        selection_steps=cfg.selection_steps,
        opt_params=opt_params,
        sparse_indices=sparse_indices,
        post_update=post_update,
        reselect=reselect,
        compact_ops=ops,
        shard_layouts=ops.layouts,
    )


def _scope(cfg) -> str:
    """``--selection_scope`` (``global`` for configs that predate the flag)."""
    return getattr(cfg, "selection_scope", "global")


def _compact_optimizer(cfg, schedule) -> optax.GradientTransformation:
    emulate = set(getattr(cfg, "sift_emulate", None) or ())
    mask = decay_mask
    if "no_sparse_decay" in emulate:  # the original decayed a zeroed increment: no decay at all

        def mask(tree):
            no = jax.tree.map(lambda _: False, tree["delta"])
            return {"delta": no, "dense": decay_mask(tree["dense"])}

    opt = adamw(cfg, schedule, mask)
    if "lagged" in emulate:
        opt = lag_increments(opt)
    return opt


@dataclass
class _CompactOps:
    """The per-tensor operations of the compact path, by path: global or shard-local indices."""

    vector: Callable[[str, Any], jax.Array]  # (path, dtype) -> zero k-vector
    placeholder_idx: Callable[[str], jax.Array]  # indices before selection
    view: Callable  # (path, w, delta, idx) -> w read so that its gradient is grad_W[idx]
    write: Callable  # (path, w, idx, sel, delta) -> w with sel + delta written at idx
    gather: Callable  # (path, w, idx) -> w[idx]
    probe: Callable  # (path, w, probe) -> w whose backward takes the top-k of grad_W
    global_idx: Callable  # (path, idx) -> sorted-or-as-kept global flat indices
    count: Callable[[str], int]  # trained entries of the tensor
    idx_to_global: Callable[[Params], Params]  # index tree as kept -> global flat (checkpoints)
    idx_from_global: Callable[[Params], Params]
    layouts: Any = None


def _global_ops(ks: dict[str, int]) -> _CompactOps:
    """Top-k over each whole tensor; indices are global flat indices."""
    return _CompactOps(
        vector=lambda p, dtype: jnp.zeros((ks[p],), dtype),
        placeholder_idx=lambda p: jnp.arange(ks[p], dtype=jnp.int32),
        view=lambda p, w, delta, idx: sift_jax.increment_view(w, delta, idx),
        write=lambda p, w, idx, sel, delta: sift_jax.write_increments(w, idx, sel, delta),
        gather=lambda p, w, idx: sift_jax.gather_at(w, idx),
        probe=lambda p, w, pr: sift_jax.topk_probe(w, pr),
        global_idx=lambda p, idx: idx,
        count=lambda p: ks[p],
        idx_to_global=lambda idx: idx,
        idx_from_global=lambda idx: idx,
    )


def _shard_local_ops(cfg, sparse: dict, ks: dict[str, int]) -> _CompactOps:
    """``--selection_scope shard``: top-``ceil(k / S)`` within each of a tensor's ``S`` blocks.

    Each targeted tensor split into ``S`` blocks by its sharding trains ``ceil(k / S)`` entries
    per block, chosen within the block; indices are kept *local* to their block in an
    ``int32[S * k_local]`` vector sharded like the tensor, so the backward's gather of
    ``grad_W``, the in-place write of the increments and the selection itself run per device
    with no communication (:mod:`sift_jax._src.shard_local`). Global flat indices are formed
    only outside the step (:attr:`Method.sparse_indices`, checkpoints).
    """
    if cfg.selection == "random":
        raise ValueError(
            "--selection_scope shard supports --selection grad (the default) and magnitude, "
            "not random."
        )
    lay = {p: shard_local.layout_for(x, ks[p]) for p, x in sparse.items()}

    def convert(fn):
        def tree_fn(idx):
            i = flatten_paths(idx)
            out = {p: jax.device_put(fn(i[p], lay[p]), lay[p].vector_sharding()) for p in i}
            return unflatten_paths(out)

        return tree_fn

    return _CompactOps(
        vector=lambda p, dtype: shard_local.zeros_vector(lay[p], dtype),
        placeholder_idx=lambda p: shard_local.placeholder_indices(lay[p]),
        view=lambda p, w, delta, idx: shard_local.increment_view_fn(lay[p])(w, delta, idx),
        write=lambda p, w, idx, sel, delta: shard_local.write_local(w, idx, sel, delta, lay[p]),
        gather=lambda p, w, idx: shard_local.gather_local(w, idx, lay[p]),
        probe=lambda p, w, pr: shard_local.topk_probe_fn(lay[p])(w, pr),
        global_idx=lambda p, idx: jnp.asarray(np.sort(shard_local.to_global(idx, lay[p]))),
        count=lambda p: lay[p].size,
        layouts=lay,
        idx_to_global=convert(shard_local.to_global),
        idx_from_global=convert(shard_local.from_global),
    )


def selection_needs_score(cfg) -> bool:
    """Whether compact-path selection keeps an O(n) ``|g|`` accumulator.

    Not for the default (``grad``, one selection step, no accumulation): then each weight's
    top-k is taken inside the backward (:func:`sift_jax.topk_probe`), so no full gradient tree is
    ever formed. Multi-step or accumulated selection sums ``|g|`` and needs the accumulator;
    random / magnitude selection go through the same general path.
    """
    return not (
        cfg.selection == "grad"
        and cfg.selection_steps == 1
        and cfg.gradient_accumulation_steps == 1
    )


def make_selection_step(method: Method, cfg, loss_of_params: Callable, accum_grads: Callable):
    """The compact path's selection step (jitted; ``last`` is static).

    Computes the gradient of the sparse tensors (dense, once per selection step) and of the
    dense tensors, accumulates ``|g|`` into ``score`` and, on the last selection step, selects
    the indices exactly as :func:`sift_jax.sparse_increment` would. Dense tensors train; the
    increments stay zero unless ``update_on_selection`` (then the last selection batch's
    gradient at the new indices is applied).
    """
    opt = method.optimizer
    in_backward = not selection_needs_score(cfg)
    ops = method.compact_ops
    lay = method.shard_layouts  # shard-local selection: per-block ops, local indices

    def step(trainable, opt_state, mut, const, score, batch, rng, last):
        frozen = {**const, **mut}
        base = flatten_paths(frozen["base"])
        sparse_paths = list(flatten_paths(frozen["idx"]))
        w_sparse = flatten_paths(frozen["w"])  # still the base values: no increment yet

        def loss_with(w, dense, b, r):  # the targeted tensors w, the dense-trained ones
            params = {**base, **w, **flatten_paths(dense)}
            return loss_of_params(unflatten_paths(params), b, r)

        def loss_of(wd, b, r):
            return loss_with(*wd, b, r)

        idx = flatten_paths(frozen["idx"])
        if last and in_backward:
            # One pass: each weight gradient is reduced to its top-k inside the backward.
            probes = {p: jnp.zeros((3, idx[p].shape[0]), jnp.float32) for p in sparse_paths}

            def probe_loss(args, b, r):
                pr, dense = args
                w = {p: ops.probe(p, w_sparse[p], pr[p]) for p in pr}
                return loss_with(w, dense, b, r)

            loss, (g_pr, g_dense) = accum_grads(
                probe_loss, (probes, trainable["dense"]), batch, rng
            )
            idx = {p: sift_jax.probe_indices(g_pr[p]) for p in sparse_paths}
            g_sel = {p: g_pr[p][2] for p in sparse_paths}
            frozen = method.reselect(frozen, unflatten_paths(idx))
        else:
            loss, (g_w, g_dense) = accum_grads(loss_of, (w_sparse, trainable["dense"]), batch, rng)
            score = {p: score[p] + jnp.abs(g_w[p]).astype(jnp.float32) for p in sparse_paths}
            if last and lay is not None:  # grad or magnitude, top-k within each block
                by = score if cfg.selection == "grad" else w_sparse
                idx = {
                    p: shard_local.topk_local(jnp.abs(by[p].astype(jnp.float32)), lay[p])
                    for p in sparse_paths
                }
                frozen = method.reselect(frozen, unflatten_paths(idx))
            elif last:
                idx = flatten_paths(
                    sift_jax.select_indices(
                        unflatten_paths(score),
                        cfg.sparse_rate,
                        selection=cfg.selection,
                        params=unflatten_paths(w_sparse),
                        seed=cfg.seed,
                    )
                )
                frozen = method.reselect(frozen, unflatten_paths(idx))
            g_sel = {p: ops.gather(p, g_w[p], idx[p]).astype(jnp.float32) for p in sparse_paths}
        if "no_selection_update" in (getattr(cfg, "sift_emulate", None) or ()):
            mut = {k: v for k, v in frozen.items() if k != "base"}
            norm = optax.tree.norm((g_sel, g_dense))
            return trainable, opt_state, mut, score, {"loss": loss, "grad_norm": norm}
        train_now = last and cfg.update_on_selection
        g_delta = {
            p: g_sel[p] if train_now else jnp.zeros(idx[p].shape, jnp.float32) for p in sparse_paths
        }
        grads = {"delta": unflatten_paths(g_delta), "dense": g_dense}
        updates, opt_state = opt.update(grads, opt_state, method.opt_params(trainable, frozen))
        if not train_now:
            updates = {
                "delta": jax.tree.map(jnp.zeros_like, updates["delta"]),
                "dense": updates["dense"],
            }
        trainable = optax.apply_updates(trainable, updates)
        if train_now:
            frozen = method.post_update(trainable, frozen)
        mut = {k: v for k, v in frozen.items() if k != "base"}
        return (
            trainable,
            opt_state,
            mut,
            score,
            {"loss": loss, "grad_norm": optax.tree.norm(grads)},
        )

    return jax.jit(step, donate_argnums=(0, 1, 2, 4), static_argnums=(7,))


def lora_method(params: Params, cfg, schedule, rng: jax.Array) -> Method:
    """LoRA adapters ``W + (alpha/r) A @ B`` on ``lora_targets`` kernels (B starts at zero)."""
    _check_matches(params, cfg.lora_targets, "--lora_targets")
    flat = flatten_paths(params)
    r, scale = cfg.lora_rank, cfg.lora_alpha / cfg.lora_rank
    adapters, dense = {}, {}
    keys = iter(jax.random.split(rng, len(flat)))
    for path, w in flat.items():
        if _matches(cfg.lora_exception, path):
            dense[path] = w
        elif _matches(cfg.lora_targets, path) and w.ndim >= 2 and path.endswith("kernel"):
            d_in, d_out = w.shape[0], math.prod(w.shape[1:])
            a = jax.random.normal(next(keys), (d_in, r), jnp.float32) / math.sqrt(d_in)
            adapters[path] = {"lora_a": a.astype(w.dtype), "lora_b": jnp.zeros((r, d_out), w.dtype)}
    if not adapters:
        raise ValueError("--lora_targets matched no kernel with >= 2 dims.")
    trainable = {"adapters": adapters, "dense": unflatten_paths(dense)}

    def combine(t, frozen):
        out = flatten_paths(frozen)
        out.update(flatten_paths(t["dense"]))
        for path, ab in t["adapters"].items():
            w = out[path]
            delta = (ab["lora_a"] @ ab["lora_b"]) * scale
            out[path] = w + delta.reshape(w.shape).astype(w.dtype)
        return unflatten_paths(out)

    n = sum(x.size for x in jax.tree.leaves(trainable))
    return Method("lora", trainable, params, combine, adamw(cfg, schedule), lambda s: n)


def build_method(params: Params, cfg, schedule, rng: jax.Array) -> Method:
    """Builds the method named by ``cfg.finetuning_type``."""
    compact_only = [
        f"--{flag}" for flag in ("reselect_every", "sift_emulate") if getattr(cfg, flag, None)
    ]
    if _scope(cfg) != "global":
        compact_only.append(f"--selection_scope {cfg.selection_scope}")
    if compact_only and (cfg.finetuning_type != "sift" or cfg.sift_path != "compact"):
        raise ValueError(
            f"{' and '.join(compact_only)} need(s) --finetuning_type sift --sift_path compact "
            f"(got --finetuning_type {cfg.finetuning_type}"
            + (f" --sift_path {cfg.sift_path})." if cfg.finetuning_type == "sift" else ").")
        )
    if getattr(cfg, "reselect_every", 0) < 0:
        raise ValueError("--reselect_every must be >= 0 (0 disables re-selection).")
    if cfg.finetuning_type == "full":
        return full_method(params, cfg, schedule)
    if cfg.finetuning_type == "sift":
        if getattr(cfg, "sift_path", "compact") == "compact":
            return sift_compact_method(params, cfg, schedule)
        return sift_method(params, cfg, schedule)
    if cfg.finetuning_type == "lora":
        return lora_method(params, cfg, schedule, rng)
    raise ValueError(f"Unknown --finetuning_type {cfg.finetuning_type!r}: use sift, full or lora.")
