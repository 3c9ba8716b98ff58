"""When SIFT selects, re-selects and trains its sparse entries: one schedule for every path.

Steps are counted from 0. The first ``selection_steps`` steps are the *selection phase*: their
``|gradient|`` is summed into the selection score and the sparse entries do not train (dense
leaves do); the last of them (step ``selection_steps - 1``) chooses the indices. With
``update_on_selection`` that step also applies its gradient at the new indices. With
``reselect_every = N > 0`` every N-th step after the first selection folds the trained values
into the weights and selects anew on that step's gradient (fresh optimizer moments for the
sparse entries; dense leaves and the step count carry on), training the new entries from the
next step (or from that step with ``update_on_selection``).

:class:`Schedule` answers these questions for a host integer step (the compact path, whose
loop runs different jitted steps per phase) and for a traced step count (the optax transform,
which runs one jitted ``update`` and branches with ``lax.cond``).
"""

from __future__ import annotations

import dataclasses
import numbers

import jax.numpy as jnp
import numpy as np

ACCUMULATE, SELECT, RESELECT, TRAIN = "accumulate", "select", "reselect", "train"


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be an int >= {minimum}, got {value!r}. Under "
            "optax.inject_hyperparams pass static_args=('k', 'selection_steps', "
            "'reselect_every', 'seed')."
        )
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The selection schedule (see the module docstring).

    Example:
        >>> s = Schedule(selection_steps=2, reselect_every=3)
        >>> [s.phase(t) for t in range(6)]
        ['accumulate', 'select', 'train', 'train', 'reselect', 'train']
    """

    selection_steps: int = 1
    update_on_selection: bool = False
    reselect_every: int = 0

    def __post_init__(self):
        _check_int("selection_steps", self.selection_steps, 1)
        _check_int("reselect_every", self.reselect_every, 0)
        if not isinstance(self.update_on_selection, (bool, np.bool_)):
            raise TypeError(
                f"`update_on_selection` must be a bool, got {self.update_on_selection!r}."
            )

    @property
    def select_step(self) -> int:
        """The (0-based) step that makes the first selection."""
        return self.selection_steps - 1

    def reselects(self, step: int) -> bool:
        """Whether host step ``step`` re-selects."""
        since = step - self.select_step
        return bool(self.reselect_every) and since > 0 and since % self.reselect_every == 0

    def phase(self, step: int) -> str:
        """``"accumulate"``, ``"select"``, ``"reselect"`` or ``"train"`` for host step ``step``."""
        if step < self.select_step:
            return ACCUMULATE
        if step == self.select_step:
            return SELECT
        return RESELECT if self.reselects(step) else TRAIN

    def num_reselections(self, steps: int) -> int:
        """Re-selections among the first ``steps`` steps.

        Example:
            >>> Schedule(reselect_every=2).num_reselections(7)
            3
        """
        return sum(self.reselects(t) for t in range(steps))

    # --- traced forms (``count`` = the number of updates seen before this one)

    def selects_now(self, count):
        """Traced: this update (re-)selects."""
        first = count == self.select_step
        if not self.reselect_every:
            return first
        since = count - self.select_step
        return first | ((since > 0) & (since % self.reselect_every == 0))

    def in_selection_phase(self, count):
        """Traced: this update's gradient belongs to the first selection's score."""
        return count < self.selection_steps

    def trains_sparse(self, count):
        """Traced: this update applies an update to the sparse entries."""
        if self.update_on_selection:
            return count >= self.select_step
        return (count > self.select_step) & ~self.selects_now(count)

    def is_score_step(self, count):
        """Traced: the score must be kept (accumulated) for this update."""
        return jnp.asarray(self.in_selection_phase(count))
