"""``sift``: thin glue between the trainer and the library's compact API
(:class:`sift_jax.compact.Sift`).

What trains: the selected weights of the ``--sparse_module`` tensors (fp32 ``k``-vectors) and
the dense ``--sparse_exception`` tensors; the targeted weights live merged in donated buffers
updated in place; everything else is frozen and gets no gradient. Selection, re-selection and
global budgets run as the plan's schedule says, through the library's selection step.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import sift_jax
from sift_jax import compact
from train.core.config import OptimConfig, SiftConfig, section
from train.core.methods import register
from train.core.methods.base import Method, TrainState, check_patterns
from train.core.optim import adamw

DELTA_FILE = "sift_delta.safetensors"


def _is_abstract(params) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))


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
        )
        self.base = params
        self.optimizer = adamw(section(cfg, OptimConfig), schedule)
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
        out = {"indices": {p: sds((n,), np.int32) for p, n in counts.items()}}
        sizes = meta.get("sift_touched_sizes") or {}
        if sizes:
            dtypes = {leaf.path: leaf.dtype for leaf in self.plan.leaves}
            out["touched"] = {p: sds((n,), np.int32) for p, n in sizes.items()}
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
            delta = self.plan.extract(merged, base_params, touched)
            meta = {**metadata, "sparse_rate": self.cfg.sparse_rate}
            sift_jax.save_delta(delta, str(out_dir / DELTA_FILE), meta, overwrite=True)
        return [DELTA_FILE]
