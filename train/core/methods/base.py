"""The :class:`Method` interface: what trains, what is frozen, warm-up steps, checkpoint state,
outputs."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
import optax

from sift_jax.paths import flatten_paths

PHASE_TRAIN = "train"


@dataclasses.dataclass
class TrainState:
    """What changes during training (the loop's state; the step donates its arrays).

    Attributes:
        trainable: the tree given to ``jax.grad`` and the optimizer.
        opt_state: the optimizer state over ``trainable``.
        buffers: method buffers the step updates in place (SIFT: merged weights and
            indices), or ``None``.
        extra: method state outside the step arrays (SIFT: the selection score, the positions
            touched by earlier selections).
    """

    trainable: Any
    opt_state: Any
    buffers: Any = None
    extra: dict = dataclasses.field(default_factory=dict)


def check_patterns(params: Any, patterns: list[str], flag: str) -> None:
    """Raises a clear error for a regex that is invalid or matches no parameter path.

    Example:
        >>> check_patterns({"a": {"kernel": np.ones(1)}}, ["kernel"], "--x")
        >>> check_patterns({"a": {"kernel": np.ones(1)}}, ["bias"], "--x")
        Traceback (most recent call last):
        ...
        ValueError: --x pattern 'bias' matches no parameter. Parameter paths look like: ...
    """
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


class Method:
    """A fine-tuning method over a pure-dict parameter tree.

    A subclass sets :attr:`trainable`, :attr:`buffers`, :attr:`frozen` and :attr:`optimizer`
    in ``__init__(params, cfg, schedule, rng)`` and implements :meth:`loss_params`; the rest
    has defaults for methods without warm-up steps or extra state. ``params`` may be
    ``ShapeDtypeStruct``s (benchmarks compile steps without weights): then the trees are
    abstract too.

    Attributes:
        name: the ``--finetuning_type`` it is registered under.
        trainable: the initial trainable tree.
        buffers: the initial buffers (``None`` if none).
        frozen: what the step reads but never differentiates.
        optimizer: the optax transformation over ``trainable``.
    """

    name: ClassVar[str] = ""
    trainable: Any
    buffers: Any = None
    frozen: Any = None
    optimizer: optax.GradientTransformation

    # ---- the step

    def loss_params(self, trainable: Any, buffers: Any, frozen: Any) -> Any:
        """The model's full params inside the differentiated loss."""
        raise NotImplementedError

    def eval_params(self, trainable: Any, buffers: Any, frozen: Any) -> Any:
        """The model's full params outside ``grad`` (evaluation, export)."""
        return self.loss_params(trainable, buffers, frozen)

    def after_update(self, trainable: Any, buffers: Any) -> Any:
        """New buffers after an optimizer update (inside the jitted step)."""
        return buffers

    @property
    def num_trainable(self) -> int:
        """Trained parameter count."""
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.trainable)))

    # ---- warm-up steps (e.g. SIFT's selection)

    def phase(self, step: int) -> str:
        """Which kind of step host step ``step`` is (``"train"`` or a method phase)."""
        return PHASE_TRAIN

    def phase_step(self, phase: str, loss_of_params: Callable, grad_fn: Callable, accum: int):
        """The step for a non-``train`` phase: ``(state, frozen, batch, rng, step) ->
        (state, metrics)``."""
        raise ValueError(f"{type(self).__name__} has no {phase!r} steps.")

    # ---- checkpoints (beyond trainable, opt_state and the rng)

    def checkpoint_meta(self, state: TrainState) -> dict:
        """JSON-able facts needed to rebuild the templates at restore (e.g. shapes)."""
        return {}

    def prepare_restore(self, meta: dict) -> None:
        """Adjusts the method to a checkpoint's meta before templates are built."""

    def checkpoint_arrays(self, state: TrainState) -> dict[str, dict[str, Any]]:
        """``{group: {name: array}}`` of method state to save (host or device arrays)."""
        return {}

    def checkpoint_template(self, meta: dict) -> dict[str, dict[str, Any]]:
        """``ShapeDtypeStruct``s of :meth:`checkpoint_arrays` for ``meta``."""
        return {}

    def restore(self, state: TrainState, arrays: dict[str, dict[str, Any]]) -> TrainState:
        """``state`` (trainable and opt_state restored) with the method state put back."""
        return state

    # ---- outputs

    def write_outputs(
        self,
        state: TrainState,
        merged: Any,
        base_params: Any,
        out_dir: Path,
        metadata: dict,
        primary: bool,
    ) -> list[str]:
        """Writes method-specific outputs and returns their file names. Every process calls
        it (so collective work can happen); only the ``primary`` one writes. ``merged`` and
        ``base_params`` are the fine-tuned and pretrained params (host arrays when the run
        has several processes)."""
        return []
