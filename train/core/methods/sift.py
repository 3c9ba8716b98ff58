"""``sift``: thin glue between the trainer and the library's compact API
(:class:`sift_jax.compact.Sift`).

What trains: the selected weights of the ``--sparse_module`` tensors (fp32 ``k``-vectors) and
the dense ``--sparse_exception`` tensors; the targeted weights live merged in donated buffers
updated in place; everything else is frozen and gets no gradient. Selection, re-selection and
global budgets run as the plan's schedule says, through the library's selection step.

Scanned models (``--gradient_checkpointing`` loads the layers stacked, see
:func:`scan_layers_for`): every leaf under a stacked ``.../layers`` node (a dict named
``layers`` whose keys are not layer numbers) is planned ``stacked`` (top-k per layer slice,
the indices the unscanned model selects) with ``layer_views=True``, so the model's scan body
applies the compact view and the selection probe per layer. Checkpoints keep the stacked paths
(a resumed run has the same flags); the delta is written with the unscanned paths
(``.../layers/3/...``, per-layer indices), so it is interchangeable with an unscanned run's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import sift_jax
from sift_jax import compact
from sift_jax.paths import flatten_paths, unflatten_paths
from train.core.config import OptimConfig, SiftConfig, section
from train.core.methods import register
from train.core.methods.base import Method, TrainState, check_patterns
from train.core.optim import adamw

DELTA_FILE = "sift_delta.safetensors"


def _is_abstract(params) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))


def stacked_layer_paths(params: Any) -> list[str]:
    """``/``-joined paths of the scanned layer stacks in a nested-dict ``params``: dicts named
    ``layers`` whose keys are not layer numbers (an unscanned model's ``layers`` holds ``"0"``,
    ``"1"``, ...).

    Example:
        >>> stacked_layer_paths({"model": {"layers": {"mlp": {"kernel": np.zeros((2, 3, 3))}}}})
        ['model/layers']
        >>> stacked_layer_paths({"model": {"layers": {"0": {"kernel": np.zeros((3, 3))}}}})
        []
    """
    out = []

    def walk(node, prefix):
        for key, sub in node.items():
            if not isinstance(sub, dict):
                continue
            path = f"{prefix}{key}"
            if key == "layers" and sub and not all(str(k).isdigit() for k in sub):
                out.append(path)
            else:
                walk(sub, path + "/")

    if isinstance(params, dict):
        walk(params, "")
    return out


def scan_layers_for(cfg) -> bool:
    """Whether a job loads its model with stacked (scanned) layers: under
    ``--gradient_checkpointing`` for SIFT when the plan can select per layer slice
    (``--sift_budget per_tensor``, ``--selection_scope global``); the other methods and
    settings keep the unscanned model with per-layer remat.

    Example:
        >>> from train.core.config import TrainConfig
        >>> scan_layers_for(TrainConfig(gradient_checkpointing=True))
        True
        >>> scan_layers_for(TrainConfig(gradient_checkpointing=True, sift_budget="global"))
        False
    """
    return (
        bool(getattr(cfg, "gradient_checkpointing", False))
        and getattr(cfg, "finetuning_type", "sift") == "sift"
        and getattr(cfg, "sift_budget", "per_tensor") == "per_tensor"
        and getattr(cfg, "selection_scope", "global") == "global"
    )


def unstack_delta_inputs(
    merged: Any, base: Any, indices: dict[str, np.ndarray], layers_paths: list[str]
) -> tuple[Any, Any, dict[str, np.ndarray]]:
    """``(merged, base, indices)`` of a scanned model with the unscanned model's paths: each
    stacked leaf ``<stack>/<rest>`` ``[L, ...]`` becomes ``<stack>/<l>/<rest>`` and its global
    flat indices over the stack become each layer's flat indices (host numpy).

    Example:
        >>> m = {"layers": {"w": np.arange(6.0).reshape(2, 3)}}
        >>> _, _, idx = unstack_delta_inputs(m, m, {"layers/w": np.array([1, 3, 5])}, ["layers"])
        >>> {p: i.tolist() for p, i in idx.items()}
        {'layers/0/w': [1], 'layers/1/w': [0, 2]}
    """

    def unstack(tree):
        flat, out = flatten_paths(tree), {}
        for path, x in flat.items():
            stack = next((s for s in layers_paths if path.startswith(s + "/")), None)
            if stack is None:
                out[path] = x
                continue
            rest = path[len(stack) + 1 :]
            x = np.asarray(x)
            for layer in range(x.shape[0]):
                out[f"{stack}/{layer}/{rest}"] = x[layer]
        return out

    flat_m = flatten_paths(merged)
    new_idx = {}
    for path, idx in indices.items():
        stack = next((s for s in layers_paths if path.startswith(s + "/")), None)
        if stack is None:
            new_idx[path] = np.asarray(idx)
            continue
        shape = tuple(flat_m[path].shape)
        per = int(np.prod(shape[1:]))
        idx = np.asarray(idx, np.int64)
        rest = path[len(stack) + 1 :]
        for layer in range(shape[0]):
            sel = idx[(idx >= layer * per) & (idx < (layer + 1) * per)] - layer * per
            new_idx[f"{stack}/{layer}/{rest}"] = sel.astype(np.int32)
    return unflatten_paths(unstack(merged)), unflatten_paths(unstack(base)), new_idx


@register
class Sift(Method):
    """SIFT over the library's compact API (see the module docstring).

    Example:
        >>> from train.core.config import TrainConfig
        >>> from train.core.optim import make_schedule
        >>> p = {"attention": {"kernel": jnp.ones((10, 10))}, "classifier": jnp.ones(2)}
        >>> m = Sift(p, TrainConfig(sparse_rate=0.05), make_schedule(1e-3, 10, 0.0), None)
        >>> m.num_trainable, m.trainable["attention"]["kernel"].shape
        (8, (6,))
    """

    name = "sift"

    def __init__(self, params, cfg, schedule, rng):
        del rng
        sc = section(cfg, SiftConfig)
        check_patterns(params, sc.sparse_module, "--sparse_module")
        if sc.sparse_exception:
            check_patterns(params, sc.sparse_exception, "--sparse_exception")
        self.cfg = sc
        self.save_delta = cfg.save_delta
        self.layers_paths = stacked_layer_paths(params)
        stacked = [f"^{re.escape(p)}/" for p in self.layers_paths] or None
        self.plan = compact.Sift.create(
            params,
            sc.sparse_rate,
            sparse=sc.sparse_module,
            dense=sc.sparse_exception or None,
            selection=sc.selection,
            selection_steps=sc.selection_steps,
            update_on_selection=sc.update_on_selection,
            reselect_every=sc.reselect_every,
            scope=sc.selection_scope,
            budget=sc.sift_budget,
            seed=cfg.seed,
            stacked=stacked,
            layer_views=stacked is not None,
        )
        self.base = params
        dense = {leaf.path for leaf in self.plan.leaves if leaf.role == "dense"}
        self.optimizer = adamw(section(cfg, OptimConfig), schedule, dense=dense.__contains__)
        self._split()

    def _split(self):
        if _is_abstract(self.base):
            self.trainable, self.buffers, _ = jax.eval_shape(self.plan.split, self.base)
            plan = self.plan
            frozen = [
                x if leaf.role == "frozen" else None
                for leaf, x in zip(plan.leaves, plan._flat(self.base), strict=True)
            ]
            self.frozen = plan._tree(frozen)
        else:
            self.trainable, self.buffers, self.frozen = self.plan.split(self.base)

    @property
    def num_trainable(self) -> int:
        return self.plan.num_trainable

    # ---- the step

    def loss_params(self, trainable, buffers, frozen):
        return self.plan.params(trainable, buffers, frozen)

    def eval_params(self, trainable, buffers, frozen):
        return self.plan.merged(trainable, buffers, frozen)

    def after_update(self, trainable, buffers):
        return self.plan.write(trainable, buffers)

    # ---- selection

    def phase(self, step: int) -> str:
        return self.plan.schedule.phase(step)

    def phase_step(self, phase, loss_of_params, grad_fn, accum):
        """Selection phases through :meth:`sift_jax.compact.Sift.selection_step` (inside the
        backward unless gradients are summed over micro-batches or selection steps)."""
        step_fn = jax.jit(
            self.plan.selection_step(loss_of_params, self.optimizer, grad_fn, probe=accum == 1),
            static_argnames="last",
            # the score is carried (and donated) across the accumulation steps only
            donate_argnums=(0, 1, 2, 4) if phase == "accumulate" else (0, 1, 2),
        )

        def run(state: TrainState, frozen, batch, rng, step: int):
            plan = self.plan
            extra = dict(state.extra)
            last = phase != "accumulate"
            opt_state = state.opt_state
            if phase == "reselect":
                extra["touched"] = plan.touched(state.buffers, extra.get("touched"))
                opt_state = plan.refresh_opt_state(self.optimizer, opt_state, state.trainable)
                score = (
                    {} if (plan.can_probe(True) and accum == 1) else plan.zero_score(state.buffers)
                )
            else:
                score = extra.get("score")
                if score is None:
                    probe = plan.can_probe() and accum == 1
                    score = {} if probe else plan.zero_score(state.buffers)
            trainable, opt_state, buffers, score, aux = step_fn(
                state.trainable,
                opt_state,
                state.buffers,
                frozen,
                score,
                batch,
                rng,
                step,
                last=last,
            )
            if last:
                extra.pop("score", None)
            else:
                extra["score"] = score
            if "candidates" in aux:
                self.plan, trainable, opt_state, buffers = plan.apply_budget(
                    aux.pop("candidates"), trainable, opt_state, buffers, self.optimizer
                )
            return TrainState(trainable, opt_state, buffers, extra), aux

        run.jitted = step_fn  # for benchmarks that compile it
        return run

    # ---- checkpoints: indices (global, mesh independent), earlier selections, the score

    def checkpoint_meta(self, state):
        counts = {p: int(s.size) for p, s in self.plan.sparse_scopes.items()}
        return {
            "sift_counts": counts,
            "sift_touched": sorted(state.extra.get("touched") or {}),
            "sift_touched_sizes": {
                p: int(np.size(i)) for p, i in (state.extra.get("touched") or {}).items()
            },
            "sift_score": "score" in state.extra,
        }

    def prepare_restore(self, meta):
        counts = meta.get("sift_counts", {})
        if self.plan.budget != "per_tensor" and counts:
            self.plan = self.plan.resized(counts)
            self._split()

    def checkpoint_arrays(self, state):
        sd = self.plan.state_dict(state.buffers, state.extra.get("touched"))
        if "score" in state.extra:
            sd["score"] = dict(state.extra["score"])
        return sd

    def checkpoint_template(self, meta):
        counts = meta["sift_counts"]
        sds = lambda shape, dt: np.zeros(shape, dt)  # host arrays: restored on the host
        idt = {p: s.global_dtype for p, s in self.plan.sparse_scopes.items()}  # int64: huge stacks
        out = {"indices": {p: sds((n,), idt[p]) for p, n in counts.items()}}
        sizes = meta.get("sift_touched_sizes") or {}
        if sizes:
            dtypes = {leaf.path: leaf.dtype for leaf in self.plan.leaves}
            out["touched"] = {p: sds((n,), idt[p]) for p, n in sizes.items()}
            out["touched_values"] = {p: sds((n,), dtypes[p]) for p, n in sizes.items()}
        if meta.get("sift_score"):
            w = dict(
                zip(
                    [x.path for x in self.plan.leaves],
                    self.plan._flat(self.buffers.weights),
                    strict=True,
                )
            )
            out["score"] = {
                p: jax.ShapeDtypeStruct(
                    w[p].shape, jnp.float32, sharding=getattr(w[p], "sharding", None)
                )
                for p in counts
            }
        return out

    def restore(self, state, arrays):
        buffers = self.plan.load_state_dict(arrays, state.trainable, self.buffers)
        extra = {}
        if "touched" in arrays:
            extra["touched"] = {p: np.asarray(i) for p, i in arrays["touched"].items()}
        if "score" in arrays:
            extra["score"] = dict(arrays["score"])
        return TrainState(state.trainable, state.opt_state, buffers, extra)

    # ---- outputs

    def write_outputs(self, state, merged, base_params, out_dir: Path, metadata, primary):
        """The SIFT delta (``sift_delta.safetensors``): the selected (and, after
        re-selections, every touched) positions of the sparse tensors and the dense tensors
        whole; ``sift_jax.merge_delta`` of it into the base reproduces the model exactly."""
        if not self.save_delta:
            return []
        touched = self.plan.touched(state.buffers, state.extra.get("touched"))  # collective
        if primary:
            if self.layers_paths:  # scanned: the unscanned model's paths and indices
                delta = self._unstacked_delta(merged, base_params, touched)
            else:
                delta = self.plan.extract(merged, base_params, touched)
            meta = {**metadata, "sparse_rate": self.cfg.sparse_rate}
            sift_jax.save_delta(delta, str(out_dir / DELTA_FILE), meta, overwrite=True)
        return [DELTA_FILE]

    def _unstacked_delta(self, merged, base_params, touched):
        m, b, idx = unstack_delta_inputs(merged, base_params, touched, self.layers_paths)
        dense = {p for p, r in self.plan.roles.items() if r == "dense"}
        restack = re.compile("^(" + "|".join(map(re.escape, self.layers_paths)) + r")/\d+/")
        tree = unflatten_paths({p: idx.get(p) for p in flatten_paths(b)})
        return sift_jax.extract_delta(
            m, b, tree, dense=lambda path, x: restack.sub(r"\1/", path) in dense
        )
