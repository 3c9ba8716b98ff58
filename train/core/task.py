"""What the trainer core needs to know about a job: data, model call, loss, metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

Batch = dict[str, np.ndarray]


@dataclass
class Task:
    """A training job as the fit loop sees it.

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

    Example:
        >>> t = Task(lambda p, b, r, train: b["x"] * p, lambda o, b: o.mean(), 4, None)
        >>> t.train_size
        4
    """

    apply_fn: Callable
    loss_fn: Callable
    train_size: int
    train_batches: Callable[[int, int, int], Iterator[Batch]]
    eval_sets: dict[str, Callable[[int], Iterator[Batch]]] = field(default_factory=dict)
    metrics_fn: Callable[[str, np.ndarray, list[Batch]], dict] | None = None
    eval_outputs: Callable | None = None

    def loss_of_params(self, params, batch, rng):
        """The training loss of ``params`` on ``batch`` (dropout on)."""
        return self.loss_fn(self.apply_fn(params, batch, rng, True), batch)
