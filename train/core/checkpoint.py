"""Orbax checkpoints of what trains, the optimizer state, the rng, method state and the loop's
position, verified by checksums.

Layout: ``<output_dir>/checkpoints/<step>/`` written by an orbax ``CheckpointManager`` (it
writes into a temporary directory and renames it when complete, so a crash mid-save leaves no
directory that a resume would pick up), then ``<step>/checksums.json``: the sha256 of every
file orbax wrote. A restore verifies them first: a damaged checkpoint is refused with the
file named and the older checkpoints that still verify listed. ``latest`` means the newest
checkpoint whose checksums were written (a kill between the two leaves an unverified one,
skipped with a warning). A resumed run that reaches a step whose checkpoint does not verify
saves it again; the temporary directories of saves killed midway are removed when the
checkpointer opens (the run holds the output directory's lock).

What is stored is only what trains (SIFT: the selected values, O(k)) plus the optimizer state
and the method's own arrays (:meth:`train.core.methods.base.Method.checkpoint_arrays`, e.g.
SIFT's global indices); frozen weights are never stored, a resume rebuilds them from the base
model. The checkpointer knows no method names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from train.core import outputs

log = logging.getLogger("train")
CHECKSUMS = "checksums.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which one can."""


def _leaves_dict(tree: Any) -> dict[str, Any]:
    """A tree's leaves keyed by position: orbax-safe whatever the tree's node types."""
    return {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(tree))}


def _from_leaves(template: Any, leaves: dict[str, Any]) -> Any:
    treedef = jax.tree.structure(template)
    return jax.tree.unflatten(treedef, [leaves[k] for k in sorted(leaves)])


def _abstract(x):
    """A restore target: numpy arrays stay numpy (restored on the host), arrays and
    ``ShapeDtypeStruct``s become ``ShapeDtypeStruct``s with their sharding."""
    if isinstance(x, np.ndarray):
        return x
    x = jnp.asarray(x) if not hasattr(x, "shape") else x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


class Checkpointer:
    """Saves and restores training state under ``<output_dir>/checkpoints``.

    Args:
        directory: the checkpoints directory (created).
        max_to_keep: keep at most this many checkpoints.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        outputs.check_writable(self.directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            # cleanup_tmp_directories: a save killed midway leaves orbax's temporary
            # directory; the run holds the output dir's lock, so no other save is under way.
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
            ),
        )

    # ---- which checkpoints exist

    def steps(self) -> list[int]:
        """Committed checkpoint steps, oldest first."""
        return sorted(self.manager.all_steps())

    def verified(self, step: int) -> bool:
        """Whether ``step`` has its checksums (so it was saved completely)."""
        return (self.directory / str(step) / CHECKSUMS).is_file()

    def latest_step(self) -> int | None:
        """The newest checkpoint with checksums (unverified newer ones are skipped, with a
        warning)."""
        for step in reversed(self.steps()):
            if self.verified(step):
                return step
            log.warning(
                "Checkpoint %s has no %s (the run stopped while saving it): skipped.",
                step,
                CHECKSUMS,
            )
        return None

    def resolve(self, spec: str) -> int:
        """The step of ``--resume_from_checkpoint``: ``latest``, a step number, or a directory
        ``<this run's checkpoints>/<step>``; anything else is refused."""
        if spec == "latest":
            step = self.latest_step()
            if step is None:
                raise CheckpointError(
                    f"--resume_from_checkpoint latest: no complete checkpoint in {self.directory}."
                )
            return step
        if spec.isdigit():
            step = int(spec)
        else:
            path = Path(spec).expanduser().absolute()
            if path.parent.resolve() != self.directory.resolve() or not path.name.isdigit():
                raise CheckpointError(
                    f"--resume_from_checkpoint {spec}: not a checkpoint of this run (expected "
                    f"'latest', a step number or {self.directory}/<step>; found steps "
                    f"{self.steps()}). To continue another run, pass its --output_dir."
                )
            step = int(path.name)
        if step not in self.steps():
            raise CheckpointError(
                f"--resume_from_checkpoint {spec}: no checkpoint for step {step} in "
                f"{self.directory} (found {self.steps() or 'none'})."
            )
        return step

    # ---- save

    def save(self, step: int, state, rng, meta: dict, method_arrays: dict) -> bool:
        """Saves a step (all processes call it); returns False when ``step`` is already
        saved and verifies (a resumed finished run re-running its epilogue, or a run resumed
        from an older checkpoint reaching a step it saved before). An existing ``step`` that
        does not verify (its save was killed before the checksums, or it is damaged) is
        replaced."""
        if step in self.steps():
            try:
                self.verify(step, hint=False)
                return False
            except CheckpointError as e:
                log.warning("Replacing checkpoint %s: %s", step, e)
                self.manager.delete(step)
        payload = {
            "trainable": _leaves_dict(state.trainable),
            "opt_state": _leaves_dict(state.opt_state),
            "rng": rng,
            "method": {g: _leaves_dict(list(d.values())) for g, d in method_arrays.items()},
        }
        meta = {**meta, "method_keys": {g: list(d) for g, d in method_arrays.items()}}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(payload), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            step_dir = self.directory / str(step)
            sums = {str(p.relative_to(step_dir)): _sha256(p) for p in _files(step_dir)}
            outputs.write_json_atomic(step_dir / CHECKSUMS, sums)
        _barrier(f"checksums-{step}")
        return True

    # ---- restore

    def verify(self, step: int, *, hint: bool = True) -> None:
        """Raises :class:`CheckpointError` when a file of ``step`` does not match its checksum
        (or the checksums are missing), naming the file and (``hint``) the usable older
        checkpoints."""
        step_dir = self.directory / str(step)
        older = (lambda: self._older_hint(step)) if hint else (lambda: "")
        if not self.verified(step):
            raise CheckpointError(
                f"Checkpoint {step_dir} has no {CHECKSUMS}: it was not saved completely." + older()
            )
        try:
            sums = json.loads((step_dir / CHECKSUMS).read_text())
            if not isinstance(sums, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"Checkpoint {step_dir} is damaged: {CHECKSUMS} cannot be read ({e})." + older()
            ) from None
        present = {str(p.relative_to(step_dir)) for p in _files(step_dir)}
        for rel in sorted(set(sums) | present):
            path = step_dir / rel
            if rel not in sums:
                raise CheckpointError(
                    f"Checkpoint {step_dir} is damaged: {path} is not in {CHECKSUMS}." + older()
                )
            if not path.is_file():
                raise CheckpointError(
                    f"Checkpoint {step_dir} is damaged: {path} is missing." + older()
                )
            if _sha256(path) != sums[rel]:
                raise CheckpointError(
                    f"Checkpoint {step_dir} is damaged: {path} does not match its checksum."
                    + older()
                )

    def _older_hint(self, step: int) -> str:
        older = []
        for s in reversed([s for s in self.steps() if s < step]):
            try:
                self.verify(s, hint=False)
                older.append(s)
            except CheckpointError:
                continue
        if not older:
            return " No older checkpoint verifies; start again with --overwrite_output_dir."
        return (
            f" Older checkpoints that verify: {older}; resume from the newest of them with "
            f"--resume_from_checkpoint {self.directory / str(older[0])} (or remove the damaged "
            "one and resume with --resume_from_checkpoint latest)."
        )

    def read_meta(self, step: int) -> dict:
        """The JSON meta saved with ``step``."""
        self.verify(step)
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore(self, step: int, trainable_t, opt_state_t, rng_t, method_t: dict, meta: dict):
        """``(trainable, opt_state, rng, method_arrays)`` at ``step`` for the given templates
        (arrays or ``ShapeDtypeStruct``s carrying the target shardings)."""
        keys = meta.get("method_keys", {})
        target = {
            "trainable": {k: _abstract(x) for k, x in _leaves_dict(trainable_t).items()},
            "opt_state": {k: _abstract(x) for k, x in _leaves_dict(opt_state_t).items()},
            "rng": _abstract(rng_t),
            "method": {
                g: _leaves_dict([_abstract(method_t[g][n]) for n in names])
                for g, names in keys.items()
            },
        }
        try:
            got = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )["state"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"Checkpoint {self.directory / str(step)} does not fit this run's setup ({e}); "
                "resume with the flags the run was started with."
            ) from e
        trainable = _from_leaves(trainable_t, got["trainable"])
        opt_state = _from_leaves(opt_state_t, got["opt_state"])
        arrays = {
            g: dict(
                zip(names, (got["method"][g][k] for k in sorted(got["method"][g])), strict=True)
            )
            for g, names in keys.items()
        }
        return trainable, opt_state, got["rng"], arrays

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
